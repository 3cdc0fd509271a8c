//! [`ConnectionMonitor`]: the consumer's connection state, read from outside the Worker.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};

use crate::settle::Counters;

pub(super) struct Shared {
    pub(super) reconnects: AtomicU64,
    /// Times the consumer started consuming one message at a time (careful mode).
    pub(super) careful: AtomicU64,
    /// The prefetch of the consumer now consuming.
    pub(super) prefetch: AtomicU16,
    pub(super) connected: AtomicBool,
    pub(super) stale: AtomicU64,
    pub(super) settlement: Arc<Counters>,
}

/// Reads a consumer's connection state after the consumer moved into a Worker.
#[derive(Clone)]
pub struct ConnectionMonitor {
    pub(super) shared: Arc<Shared>,
}

impl ConnectionMonitor {
    /// How many times the consumer reconnected after losing its connection.
    pub fn reconnects(&self) -> u64 {
        self.shared.reconnects.load(Ordering::Relaxed)
    }

    /// How many times a frame the client could not parse broke the connection and the
    /// consumer started consuming one message at a time until that message was gone
    /// (see the [crate docs](crate)).
    pub fn careful_modes(&self) -> u64 {
        self.shared.careful.load(Ordering::Relaxed)
    }

    /// The prefetch the consumer consumes with now: the configured one, or 1 while it
    /// waits for a message that broke the connection to be gone.
    pub fn prefetch(&self) -> u16 {
        self.shared.prefetch.load(Ordering::Relaxed)
    }

    /// Whether the consumer is connected now.
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Relaxed)
    }

    /// Deliveries received on a connection that was lost before the Worker took them;
    /// they were dropped unsettled and the broker delivers them again.
    pub fn stale_dropped(&self) -> u64 {
        self.shared.stale.load(Ordering::Relaxed)
    }

    /// Deliveries settled by `basic.ack` and `basic.nack` frames on the consuming
    /// channels. Acks that end close together share one frame (see the
    /// [crate docs](crate)), so this is at least [`settle_frames`](Self::settle_frames).
    pub fn settled(&self) -> u64 {
        self.shared.settlement.settled.load(Ordering::Relaxed)
    }

    /// `basic.ack` and `basic.nack` frames written on the consuming channels.
    pub fn settle_frames(&self) -> u64 {
        self.shared.settlement.frames.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for ConnectionMonitor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionMonitor")
            .field("connected", &self.is_connected())
            .field("reconnects", &self.reconnects())
            .field("careful_modes", &self.careful_modes())
            .field("prefetch", &self.prefetch())
            .field("settled", &self.settled())
            .field("settle_frames", &self.settle_frames())
            .finish()
    }
}
