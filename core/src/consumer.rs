//! The broker side of the contract: [`Consumer`], [`Publisher`] and [`Capabilities`].

use std::future::Future;
use std::time::Duration;

use crate::{Delivery, OutgoingMessage, Result};

/// The scope within which a broker keeps messages in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OrderingScope {
    /// No order is promised (SQS standard queues).
    None,
    /// Messages are delivered in order per queue (RabbitMQ, the in-memory broker).
    Queue,
    /// In order per partition (Kafka).
    Partition,
    /// In order per key or group (SQS FIFO message groups).
    Key,
}

/// What a broker can do; the Worker and the stack check configuration against it.
///
/// | field | meaning |
/// |---|---|
/// | `max_nack_delay` | largest delay `nack` can honour; zero means delayed nacks are unsupported |
/// | `can_nack` | whether one message can be handed back on its own (Kafka cannot) |
/// | `delivery_count` | whether the broker counts deliveries itself |
/// | `lease` | how long a delivery stays invisible before the broker redelivers it, if it has leases |
/// | `extendable` | whether the lease can be extended |
/// | `ordering` | the broker's ordering scope |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Largest delay [`Acker::nack`](crate::Acker::nack) can honour.
    pub max_nack_delay: Duration,
    /// Whether one message can be handed back on its own.
    pub can_nack: bool,
    /// Whether the broker counts deliveries itself (`attempt` survives crashes).
    pub delivery_count: bool,
    /// The lease (visibility timeout), if deliveries have one.
    pub lease: Option<Duration>,
    /// Whether the lease can be extended.
    pub extendable: bool,
    /// The broker's ordering scope.
    pub ordering: OrderingScope,
}

impl Capabilities {
    /// A broker with no delay, no count, no lease and no order; adapters start here and
    /// set what they have.
    pub const fn new() -> Self {
        Capabilities {
            max_nack_delay: Duration::ZERO,
            can_nack: true,
            delivery_count: false,
            lease: None,
            extendable: false,
            ordering: OrderingScope::None,
        }
    }

    /// Sets the largest nack delay.
    #[must_use]
    pub const fn with_max_nack_delay(mut self, d: Duration) -> Self {
        self.max_nack_delay = d;
        self
    }

    /// Sets whether one message can be handed back on its own.
    #[must_use]
    pub const fn with_can_nack(mut self, v: bool) -> Self {
        self.can_nack = v;
        self
    }

    /// Sets whether the broker counts deliveries.
    #[must_use]
    pub const fn with_delivery_count(mut self, v: bool) -> Self {
        self.delivery_count = v;
        self
    }

    /// Sets the lease and whether it can be extended.
    #[must_use]
    pub const fn with_lease(mut self, lease: Option<Duration>, extendable: bool) -> Self {
        self.lease = lease;
        self.extendable = extendable;
        self
    }

    /// Sets the ordering scope.
    #[must_use]
    pub const fn with_ordering(mut self, ordering: OrderingScope) -> Self {
        self.ordering = ordering;
        self
    }
}

impl Default for Capabilities {
    fn default() -> Self {
        Self::new()
    }
}

/// A source of deliveries from one queue, topic or subscription.
///
/// Adapters may fetch in batches and hand deliveries out one at a time.
pub trait Consumer: Send + 'static {
    /// The next delivery; `Ok(None)` when the consumer is closed for good.
    ///
    /// Must be cancel-safe: the Worker drops this future when shutdown begins, and no
    /// delivery may be lost by that (an adapter keeps fetched deliveries in a buffer,
    /// or leaves them unacked so the broker redelivers them).
    fn receive(&mut self) -> impl Future<Output = Result<Option<Delivery>>> + Send;

    /// What the broker can do.
    fn capabilities(&self) -> Capabilities;

    /// Called once when the Worker stops: flush pending acks or offset commits, close
    /// connections. The default does nothing.
    fn close(&mut self) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }
}

/// Publishes messages and waits for the broker's confirmation.
pub trait Publisher: Send + Sync + 'static {
    /// Publishes `message` to `destination` (a queue, topic or exchange); returns once
    /// the broker has confirmed it.
    fn publish(
        &self,
        destination: &str,
        message: OutgoingMessage,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Checks, without a request, that `destination` is a name this broker accepts (SQS
    /// queue names, Kafka topic names, RabbitMQ's 255 bytes), so a destination no
    /// publish could ever reach is an error at start-up rather than a message that
    /// cannot be dead-lettered. The default accepts every name.
    ///
    /// # Errors
    /// [`Error::Config`](crate::Error::Config) saying which rule the name breaks.
    fn check_destination(&self, destination: &str) -> Result<()> {
        let _ = destination;
        Ok(())
    }
}
