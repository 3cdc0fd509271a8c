//! The poller's background task: connects, reads every queue with a passive declare
//! each interval, and reconnects when the connection is lost.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use lapin::options::QueueDeclareOptions;
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio::sync::watch;

use super::{Config, QueueCounts, QueueFigures, QueueStatus};
use crate::error::redact;

/// How a bounded wait ended.
enum Wait<T> {
    Done(T),
    TimedOut,
    Stopped,
}

/// Why reading stopped.
enum Ended {
    Stopped,
    Lost(String),
}

/// Waits for `fut` at most `limit`, or until the poller is stopped.
async fn bounded<T>(
    stop: &mut watch::Receiver<bool>,
    limit: Duration,
    fut: impl Future<Output = T>,
) -> Wait<T> {
    tokio::select! {
        biased;
        // A stop, or the last handle dropped (the sender with it).
        _ = stop.changed() => Wait::Stopped,
        r = tokio::time::timeout(limit, fut) => r.map_or(Wait::TimedOut, Wait::Done),
    }
}

/// Sleeps `d`; `true` if the poller was stopped meanwhile.
async fn sleep(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    matches!(
        bounded(stop, d, std::future::pending::<()>()).await,
        Wait::Stopped
    )
}

struct Poller {
    config: Config,
    figures: Arc<Mutex<Vec<QueueFigures>>>,
    /// Whether the last attempt to connect (or the connection) worked; `None` before
    /// the first, so each change is logged once.
    connected: Option<bool>,
}

/// Runs the poller until it is stopped.
pub(super) async fn run(
    config: Config,
    figures: Arc<Mutex<Vec<QueueFigures>>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut poller = Poller {
        config,
        figures,
        connected: None,
    };
    let timeout = poller.config.timeout;
    let mut failures: u32 = 0;
    loop {
        let connect = crate::connect(&poller.config.url, &poller.config.connection_name);
        let why = match bounded(&mut stop, timeout, connect).await {
            Wait::Stopped => return,
            Wait::Done(Ok(connection)) => {
                if poller.connected == Some(false) {
                    tracing::info!(url = %redact(&poller.config.url), "queue stats: connected to RabbitMQ again");
                }
                poller.connected = Some(true);
                let ended = poller.read(&connection, &mut stop, &mut failures).await;
                // Bounded, and not cut short by the stop: the broker is told goodbye.
                let _ =
                    tokio::time::timeout(timeout, connection.close(200, "queue stats done")).await;
                match ended {
                    Ended::Stopped => return,
                    Ended::Lost(why) => {
                        tracing::warn!(url = %redact(&poller.config.url), reason = %why, "queue stats: lost the connection to RabbitMQ; reconnecting");
                        poller.connected = Some(false);
                        poller.disconnected();
                        None
                    }
                }
            }
            Wait::Done(Err(e)) => Some(e.to_string()),
            Wait::TimedOut => Some(format!("no answer within {timeout:?}")),
        };
        if let Some(why) = why {
            if poller.connected != Some(false) {
                tracing::warn!(url = %redact(&poller.config.url), reason = %why, "queue stats: cannot connect to RabbitMQ; retrying");
            }
            poller.connected = Some(false);
            poller.disconnected();
        }
        let wait = poller.config.reconnect.delay(failures);
        failures = failures.saturating_add(1);
        if sleep(&mut stop, wait).await {
            return;
        }
    }
}

impl Poller {
    /// Reads every queue each interval on `connection` until it is lost or the poller
    /// stopped. A read that succeeds resets `failures`.
    async fn read(
        &mut self,
        connection: &Connection,
        stop: &mut watch::Receiver<bool>,
        failures: &mut u32,
    ) -> Ended {
        let timeout = self.config.timeout;
        let mut channel: Option<Channel> = None;
        loop {
            for i in 0..self.config.queues.len() {
                let ch = match channel.as_ref().filter(|c| c.status().connected()) {
                    Some(ch) => ch.clone(),
                    None => match bounded(stop, timeout, connection.create_channel()).await {
                        Wait::Stopped => return Ended::Stopped,
                        Wait::Done(Ok(ch)) => channel.insert(ch).clone(),
                        Wait::Done(Err(e)) => {
                            return Ended::Lost(format!("cannot open a channel: {e}"));
                        }
                        Wait::TimedOut => {
                            return Ended::Lost(format!(
                                "opening a channel took longer than {timeout:?}"
                            ));
                        }
                    },
                };
                let queue = self.config.queues[i].0.clone();
                let options = QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                };
                let declare = ch.queue_declare(&queue, options, FieldTable::default());
                match bounded(stop, timeout, declare).await {
                    Wait::Stopped => return Ended::Stopped,
                    Wait::Done(Ok(q)) => {
                        *failures = 0;
                        let counts = QueueCounts {
                            ready: q.message_count(),
                            consumers: q.consumer_count(),
                            read_at: SystemTime::now(),
                        };
                        self.set(i, QueueStatus::Read, Some(counts), "");
                    }
                    Wait::Done(Err(e)) => {
                        // The broker closes the channel of a declare it refuses.
                        channel = None;
                        let status = match e.kind() {
                            lapin::ErrorKind::ProtocolError(amqp) => match amqp.kind() {
                                AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => {
                                    QueueStatus::NotFound
                                }
                                AMQPErrorKind::Soft(_) => QueueStatus::Refused,
                                AMQPErrorKind::Hard(_) => return Ended::Lost(e.to_string()),
                            },
                            _ => return Ended::Lost(e.to_string()),
                        };
                        self.set(i, status, None, &e.to_string());
                    }
                    Wait::TimedOut => {
                        return Ended::Lost(format!(
                            "no answer to a passive declare of `{queue}` within {timeout:?}"
                        ));
                    }
                }
            }
            if sleep(stop, self.config.interval).await {
                return Ended::Stopped;
            }
        }
    }

    /// Records queue `i`'s status, logging a change of it once.
    fn set(&self, i: usize, status: QueueStatus, counts: Option<QueueCounts>, reason: &str) {
        let (queue, optional) = &self.config.queues[i];
        let before = {
            let mut figures = self.figures.lock().unwrap_or_else(PoisonError::into_inner);
            let f = &mut figures[i];
            let before = f.status;
            f.status = status;
            f.counts = counts;
            before
        };
        if before == status {
            return;
        }
        match status {
            QueueStatus::NotFound if *optional => {
                tracing::debug!(queue = %queue, "queue stats: the queue does not exist (yet)");
            }
            QueueStatus::NotFound => {
                tracing::warn!(queue = %queue, "queue stats: the queue does not exist; its figures are absent until it does");
            }
            QueueStatus::Refused => {
                tracing::warn!(queue = %queue, reason = %reason, "queue stats: the broker refused to tell the queue's figures");
            }
            QueueStatus::Read if matches!(before, QueueStatus::NotFound | QueueStatus::Refused) => {
                tracing::info!(queue = %queue, "queue stats: the queue can be read again");
            }
            _ => {}
        }
    }

    /// Marks every queue disconnected (the connection logs it, not each queue).
    fn disconnected(&self) {
        let mut figures = self.figures.lock().unwrap_or_else(PoisonError::into_inner);
        for f in figures.iter_mut() {
            f.status = QueueStatus::Disconnected;
            f.counts = None;
        }
    }
}
