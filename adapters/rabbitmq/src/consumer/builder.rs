//! [`ConsumerBuilder`]: the consumer's settings, their checks, and the first connection.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::time::Duration;

use redrive_core::{Capabilities, OrderingScope};
use tokio::sync::{mpsc, watch};

use crate::connection::{CaFile, Reconnect, parse_url};
use crate::error::{Error, Result, redact};
use crate::settle::Counters;
use crate::topology::{QueueKind, Topology};

use super::monitor::Shared;
use super::reconnect::run;
use super::session::Session;
use super::{Current, RabbitConsumer};

/// Builds a [`RabbitConsumer`]; [`connect`](ConsumerBuilder::connect) checks the settings
/// and opens the first connection.
///
/// | setting | default |
/// |---|---|
/// | `prefetch` (`basic.qos`) | 32 |
/// | `connection_name` | `redrive:<queue>` |
/// | `declare` (the [`Topology`], idempotently) | on |
/// | `reconnect` | [`Reconnect::default`] (100 ms doubling to 30 s, jittered) |
/// | `publish_timeout` (a republish, from start to confirm) | 10 s |
/// | `close_timeout` (closing the connections) | 5 s |
/// | `tls_ca_file` | none: an `amqps://` address trusts the platform's root certificates |
#[derive(Clone)]
#[must_use]
pub struct ConsumerBuilder {
    url: String,
    topology: Topology,
    prefetch: u16,
    name: Option<String>,
    declare: bool,
    reconnect: Reconnect,
    publish_timeout: Duration,
    close_timeout: Duration,
    ca_file: Option<PathBuf>,
}

impl fmt::Debug for ConsumerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsumerBuilder")
            .field("url", &redact(&self.url))
            .field("topology", &self.topology)
            .field("prefetch", &self.prefetch)
            .field("name", &self.name)
            .field("declare", &self.declare)
            .field("reconnect", &self.reconnect)
            .field("publish_timeout", &self.publish_timeout)
            .field("close_timeout", &self.close_timeout)
            .field("tls_ca_file", &self.ca_file)
            .finish()
    }
}

impl ConsumerBuilder {
    /// The most unacked deliveries the broker sends this consumer (at least 1). After a
    /// message the client cannot parse broke the connection, the consumer uses 1 until
    /// that message is gone (see the [crate docs](crate)).
    pub fn prefetch(mut self, n: u16) -> Self {
        self.prefetch = n;
        self
    }

    /// The connection's name, shown by `rabbitmqctl list_connections name client_properties`
    /// and the management UI. Republishes (delayed retries, a classic queue's
    /// redeliveries) go on a second connection, `<name>:publish`, opened when first
    /// needed.
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Whether to declare the topology on every (re)connect. Off, the queues must exist:
    /// a missing queue is an error at connect, a missing delay queue fails the nack.
    pub fn declare(mut self, declare: bool) -> Self {
        self.declare = declare;
        self
    }

    /// The backoff between reconnect attempts.
    pub fn reconnect(mut self, reconnect: Reconnect) -> Self {
        self.reconnect = reconnect;
        self
    }

    /// How long a republish (a delayed retry, a classic queue's redelivery or hand-back)
    /// may take, from declaring its delay queue to the broker's confirm; at
    /// [`close`](redrive_core::Consumer::close), how long republishing all the
    /// deliveries the Worker never took may take. A broker that blocks publishing during
    /// a resource alarm would otherwise hold the nack, and a Worker's shutdown, until the
    /// alarm ends.
    /// Past it, the nack fails with [`Error::Timeout`] and hands the message back with
    /// `basic.nack(requeue)` (on a classic queue, that counts as one more attempt); the
    /// copy may still reach the queue once the broker reads it, so the message can come
    /// twice, never not at all. Above zero.
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// How long closing the consumer's connections may take, at
    /// [`close`](redrive_core::Consumer::close) and before a reconnect. Past it the
    /// connections are dropped (the broker closes a blocked one once it reads from it
    /// again) and `close` fails with [`Error::Timeout`]. On a classic queue, `close`
    /// first takes as long again at most to cancel the consumer and collect the
    /// deliveries the Worker never took, which it hands back with their attempt. Above
    /// zero.
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
        self
    }

    /// For an `amqps://` address: trust the certificate authority in `ca_file` (PEM) as
    /// well as the platform's root certificates. The file is read once, at
    /// [`connect`](Self::connect); every reconnect and the republishing connection use
    /// the same CA. See [`connect_with_ca_file`](crate::connect_with_ca_file) for the
    /// host the server's certificate must name.
    pub fn tls_ca_file(mut self, ca_file: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(ca_file.into());
        self
    }

    /// Checks the settings, connects, declares the topology (if asked) and starts consuming.
    ///
    /// # Errors
    /// [`Error::Config`] for settings that cannot work (among them a CA file that cannot
    /// be read, holds no PEM certificate or comes with an `amqp://` address),
    /// [`Error::Connect`] when the broker cannot be reached or the TLS handshake fails,
    /// [`Error::TopologyMismatch`] when a queue exists with other arguments,
    /// [`Error::Amqp`] when the broker refuses to consume the queue.
    pub async fn connect(self) -> Result<RabbitConsumer> {
        self.topology.validate()?;
        self.reconnect.validate()?;
        if self.prefetch == 0 {
            return Err(Error::Config(
                "prefetch must be at least 1: with 0 the broker sends without limit".into(),
            ));
        }
        for (name, timeout) in [
            ("publish_timeout", self.publish_timeout),
            ("close_timeout", self.close_timeout),
        ] {
            if timeout.is_zero() {
                return Err(Error::Config(format!(
                    "{name} must be above zero: with zero nothing could finish"
                )));
            }
        }
        let ca = self.ca_file.as_deref().map(CaFile::read).transpose()?;
        parse_url(&self.url, ca.as_ref())?;
        // Once per consumer, not per reconnect.
        if let Some(what) = self.topology.unguarded() {
            tracing::warn!(queue = %self.topology.queue(), "{what}");
        } else if self.prefetch > 1 {
            tracing::debug!(
                queue = %self.topology.queue(),
                prefetch = self.prefetch,
                "a message the client cannot parse returns the deliveries of its prefetch window with it once; the consumer then takes one message at a time until it is gone. One that kills the process takes its window with it on every delivery"
            );
        }
        let config = Arc::new(Config {
            name: self
                .name
                .unwrap_or_else(|| format!("redrive:{}", self.topology.queue())),
            url: self.url,
            ca,
            topology: self.topology,
            prefetch: self.prefetch,
            declare: self.declare,
            reconnect: self.reconnect,
            publish_timeout: self.publish_timeout,
            close_timeout: self.close_timeout,
            tags: AtomicU64::new(0),
            settlement: Arc::default(),
        });
        let opened = Session::open(&config, false).await?;
        let shared = Arc::new(Shared {
            reconnects: AtomicU64::new(0),
            careful: AtomicU64::new(0),
            prefetch: AtomicU16::new(config.prefetch),
            connected: AtomicBool::new(true),
            stale: AtomicU64::new(0),
            settlement: config.settlement.clone(),
        });
        let caps = capabilities(&config.topology);
        let queue: Arc<str> = config.topology.queue().into();
        let first = Current {
            session: opened.session.clone(),
            stream: opened.stream.clone(),
        };
        let (tx, rx) = watch::channel(Some(first));
        let (lost_tx, lost_rx) = mpsc::unbounded_channel();
        let close_timeout = config.close_timeout;
        let task = tokio::spawn(run(config, shared.clone(), tx, lost_rx, opened));
        Ok(RabbitConsumer {
            current: Some(rx),
            cached: None,
            next: None,
            lost: lost_tx,
            queue,
            shared,
            caps,
            close_timeout,
            task: Some(task),
        })
    }
}

fn capabilities(topology: &Topology) -> Capabilities {
    Capabilities::new()
        .with_max_nack_delay(topology.max_delay())
        .with_delivery_count(topology.kind() == QueueKind::Quorum)
        // RabbitMQ keeps an unacked message for as long as its channel is open.
        .with_lease(None, false)
        .with_ordering(OrderingScope::Queue)
}

pub(super) struct Config {
    pub(super) url: String,
    /// The CA an `amqps://` connection trusts beyond the platform's roots.
    pub(super) ca: Option<CaFile>,
    pub(super) topology: Topology,
    pub(super) prefetch: u16,
    pub(super) name: String,
    pub(super) declare: bool,
    pub(super) reconnect: Reconnect,
    pub(super) publish_timeout: Duration,
    pub(super) close_timeout: Duration,
    tags: AtomicU64,
    pub(super) settlement: Arc<Counters>,
}

impl Config {
    /// A consumer tag unique to this process.
    pub(super) fn consumer_tag(&self) -> String {
        format!(
            "{}-{}-{}",
            self.name,
            std::process::id(),
            self.tags.fetch_add(1, Ordering::Relaxed)
        )
    }
}

impl RabbitConsumer {
    /// Starts building a consumer of `topology`'s queue at `url`
    /// (`amqp://user:pass@host:5672/vhost`, or `amqps://` with the `tls` feature).
    pub fn builder(url: impl Into<String>, topology: Topology) -> ConsumerBuilder {
        ConsumerBuilder {
            url: url.into(),
            topology,
            prefetch: 32,
            name: None,
            declare: true,
            reconnect: Reconnect::default(),
            publish_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(5),
            ca_file: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builder_debug_hides_the_password() {
        for url in [
            "amqp://guest:secret@localhost:5672/%2f",
            "amqp:guest:secret@localhost",
        ] {
            let b = RabbitConsumer::builder(url, Topology::new("q"));
            let text = format!("{b:?}");
            assert!(!text.contains("secret"), "{text}");
            assert!(text.contains("q"), "{text}");
        }
    }
}
