//! [`QueueStatsBuilder`]: the poller's settings, checked when it starts.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::{Config, Inner, QueueFigures, QueueStats, QueueStatus};
use crate::Reconnect;
use crate::error::{Error, Result};

/// Settings of a [`QueueStats`] poller, from [`QueueStats::builder`] or
/// [`QueueStats::for_topology`].
///
/// | setting | default |
/// |---|---|
/// | interval | 15 s |
/// | timeout (connect, open a channel, each declare, close) | 5 s |
/// | reconnect | [`Reconnect::default`] (100 ms to 30 s) |
/// | connection name | `redrive-queue-stats` |
#[derive(Clone, Debug)]
#[must_use = "a builder does nothing until started"]
pub struct QueueStatsBuilder {
    config: Config,
}

impl QueueStatsBuilder {
    pub(super) fn new(url: String, queues: Vec<String>) -> Self {
        let mut builder = QueueStatsBuilder {
            config: Config {
                url,
                queues: Vec::new(),
                interval: Duration::from_secs(15),
                timeout: Duration::from_secs(5),
                reconnect: Reconnect::default(),
                connection_name: "redrive-queue-stats".to_owned(),
            },
        };
        builder.add(queues, false);
        builder
    }

    fn add(&mut self, queues: impl IntoIterator<Item = String>, optional: bool) {
        for queue in queues {
            if !self.config.queues.iter().any(|(q, _)| *q == queue) {
                self.config.queues.push((queue, optional));
            }
        }
    }

    /// Also polls `queues`.
    pub fn queues<Q: Into<String>>(mut self, queues: impl IntoIterator<Item = Q>) -> Self {
        self.add(queues.into_iter().map(Into::into), false);
        self
    }

    /// Also polls `queues`, which may not exist (delay queues declared when first used):
    /// while one is missing it is [`QueueStatus::NotFound`] and logged at debug, not warn.
    pub fn optional_queues<Q: Into<String>>(mut self, queues: impl IntoIterator<Item = Q>) -> Self {
        self.add(queues.into_iter().map(Into::into), true);
        self
    }

    /// How often the queues are read.
    pub fn interval(mut self, interval: Duration) -> Self {
        self.config.interval = interval;
        self
    }

    /// The longest wait for the broker: to connect, to open a channel, for each declare
    /// and to close.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.config.timeout = timeout;
        self
    }

    /// How the poller waits between attempts to connect.
    pub fn reconnect(mut self, reconnect: Reconnect) -> Self {
        self.config.reconnect = reconnect;
        self
    }

    /// The connection's name in the broker's connection list.
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.config.connection_name = name.into();
        self
    }

    /// Starts the poller on the current tokio runtime. It connects in the background:
    /// a broker that cannot be reached now is no error, its queues are
    /// [`QueueStatus::Disconnected`] until it can.
    ///
    /// # Errors
    /// [`Error::Config`] when there is no queue, the interval or the timeout is zero,
    /// the reconnect backoff is invalid, the address is not an AMQP address (or is
    /// `amqps://` in a build without TLS), or this is not called within a tokio runtime.
    pub fn start(self) -> Result<QueueStats> {
        let config = self.config;
        if config.queues.is_empty() {
            return Err(Error::Config(
                "the queue stats poller has no queue to read; give it at least one".into(),
            ));
        }
        if config.interval.is_zero() {
            return Err(Error::Config(
                "the queue stats interval is zero; set one above zero (the default is 15 s)".into(),
            ));
        }
        if config.timeout.is_zero() {
            return Err(Error::Config(
                "the queue stats timeout is zero; set one above zero (the default is 5 s)".into(),
            ));
        }
        config.reconnect.validate()?;
        crate::connection::parse_url(&config.url, None)?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::Config(
                "QueueStatsBuilder::start was called outside a tokio runtime; call it from within one".into(),
            )
        })?;
        let figures = Arc::new(Mutex::new(
            config
                .queues
                .iter()
                .map(|(queue, _)| QueueFigures {
                    queue: queue.clone(),
                    status: QueueStatus::Pending,
                    counts: None,
                })
                .collect(),
        ));
        let (stop, stopped) = watch::channel(false);
        runtime.spawn(super::poll::run(config, figures.clone(), stopped));
        Ok(QueueStats {
            inner: Arc::new(Inner { figures, stop }),
        })
    }
}
