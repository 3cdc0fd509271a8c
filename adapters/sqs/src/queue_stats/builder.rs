//! [`QueueStatsBuilder`]: the poller's settings, checked when it starts.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::{Config, Inner, QueueFigures, QueueStats, QueueStatus};
use crate::client::is_url;
use crate::{Error, Result, Sqs};

/// Settings of a [`QueueStats`] poller, from [`QueueStats::builder`] or
/// [`QueueStats::for_queue`].
///
/// | setting | default |
/// |---|---|
/// | interval | 15 s |
/// | timeout (each queue's read, the SDK's retries included) | 5 s |
#[derive(Clone, Debug)]
#[must_use = "a builder does nothing until started"]
pub struct QueueStatsBuilder {
    config: Config,
}

impl QueueStatsBuilder {
    pub(super) fn new(sqs: Sqs, queues: Vec<String>) -> Self {
        let mut builder = QueueStatsBuilder {
            config: Config {
                sqs,
                queues: Vec::new(),
                interval: Duration::from_secs(15),
                timeout: Duration::from_secs(5),
            },
        };
        builder.add(queues);
        builder
    }

    fn add(&mut self, queues: impl IntoIterator<Item = String>) {
        for queue in queues {
            if !self.config.queues.contains(&queue) {
                self.config.queues.push(queue);
            }
        }
    }

    /// Also polls `queues` (names or URLs).
    pub fn queues<Q: Into<String>>(mut self, queues: impl IntoIterator<Item = Q>) -> Self {
        self.add(queues.into_iter().map(Into::into));
        self
    }

    /// How often the queues are read.
    pub fn interval(mut self, interval: Duration) -> Self {
        self.config.interval = interval;
        self
    }

    /// The longest wait for SQS to tell one queue's figures, its URL lookup and the SDK's
    /// retries included.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.config.timeout = timeout;
        self
    }

    /// Starts the poller on the current tokio runtime. An endpoint that cannot be
    /// reached now is no error: its queues are [`QueueStatus::Unavailable`] until it can.
    ///
    /// # Errors
    /// [`Error::Config`] when there is no queue, the interval or the timeout is zero, or
    /// this is not called within a tokio runtime; [`Error::InvalidQueueName`] for a
    /// queue name SQS would refuse.
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
        for queue in config.queues.iter().filter(|q| !is_url(q)) {
            crate::validate_queue_name(queue)?;
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::Config(
                "QueueStatsBuilder::start was called outside a tokio runtime; call it from within one".into(),
            )
        })?;
        let figures = Arc::new(Mutex::new(
            config
                .queues
                .iter()
                .map(|queue| QueueFigures {
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
