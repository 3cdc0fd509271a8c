//! The poller's thread: reads every topic's metadata, watermarks and committed offsets
//! each interval.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::{Duration, Instant, SystemTime};

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use super::{LagStatus, PartitionLag, TopicLag};

/// The most events drained from the client's queue per interval.
const MAX_EVENTS: usize = 1_000;

pub(super) struct Poller {
    /// A consumer with the group's id that never subscribes, so never joins.
    pub(super) consumer: BaseConsumer,
    pub(super) topics: Vec<String>,
    pub(super) interval: Duration,
    pub(super) timeout: Duration,
    pub(super) figures: Arc<Mutex<Vec<TopicLag>>>,
    pub(super) stop: mpsc::Receiver<()>,
    pub(super) stopped: Arc<AtomicBool>,
}

/// Why a topic's read failed.
enum Failed {
    NotFound,
    Unavailable(String),
}

impl Poller {
    /// Reads until stopped or the last handle dropped, then drops the client here, off
    /// any runtime.
    pub(super) fn run(self) {
        loop {
            for i in 0..self.topics.len() {
                let result = self.read(&self.topics[i]);
                self.set(i, result);
                if self.stopping(Duration::ZERO) {
                    return self.end();
                }
            }
            // The client's events (errors, logs) go to the consumer queue, which nothing
            // else polls: drain it, so it does not grow while the broker is down.
            for _ in 0..MAX_EVENTS {
                if self.consumer.poll(Duration::ZERO).is_none() {
                    break;
                }
            }
            if self.stopping(self.interval) {
                return self.end();
            }
        }
    }

    /// Waits up to `wait`; whether the poller must stop.
    fn stopping(&self, wait: Duration) -> bool {
        !matches!(
            self.stop.recv_timeout(wait),
            Err(mpsc::RecvTimeoutError::Timeout)
        )
    }

    fn end(self) {
        let stopped = self.stopped.clone();
        drop(self);
        stopped.store(true, Ordering::Release);
    }

    /// One read of `topic`: every partition's watermarks and the group's committed
    /// offsets, all within the timeout.
    fn read(&self, topic: &str) -> Result<Vec<PartitionLag>, Failed> {
        let deadline = Instant::now() + self.timeout;
        let left = || {
            deadline
                .checked_duration_since(Instant::now())
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    Failed::Unavailable(format!("no whole answer within {:?}", self.timeout))
                })
        };
        let metadata = self
            .consumer
            .fetch_metadata(Some(topic), left()?)
            .map_err(unavailable)?;
        let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
            return Err(Failed::NotFound);
        };
        match t.error() {
            None => {}
            Some(e) if RDKafkaErrorCode::from(e) == RDKafkaErrorCode::UnknownTopicOrPartition => {
                return Err(Failed::NotFound);
            }
            Some(e) => {
                return Err(Failed::Unavailable(format!(
                    "the topic's metadata has an error: {}",
                    RDKafkaErrorCode::from(e)
                )));
            }
        }
        if t.partitions().is_empty() {
            return Err(Failed::NotFound);
        }
        let mut ids: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
        ids.sort_unstable();
        let mut tpl = TopicPartitionList::with_capacity(ids.len());
        for id in &ids {
            tpl.add_partition(topic, *id);
        }
        let committed = self
            .consumer
            .committed_offsets(tpl, left()?)
            .map_err(unavailable)?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let (low, high) = self
                .consumer
                .fetch_watermarks(topic, id, left()?)
                .map_err(unavailable)?;
            let elem = committed.find_partition(topic, id).ok_or_else(|| {
                Failed::Unavailable(format!("no committed offset answer for partition {id}"))
            })?;
            elem.error().map_err(|e| {
                Failed::Unavailable(format!("the committed offset of partition {id}: {e}"))
            })?;
            let committed = match elem.offset() {
                Offset::Offset(o) if o >= 0 => Some(o),
                _ => None,
            };
            out.push(PartitionLag::new(id, low, high, committed));
        }
        Ok(out)
    }

    /// Records topic `i`'s read, logging a change of its status once.
    fn set(&self, i: usize, result: Result<Vec<PartitionLag>, Failed>) {
        let (status, partitions, reason) = match result {
            Ok(p) => (LagStatus::Read, p, String::new()),
            Err(Failed::NotFound) => (LagStatus::NotFound, Vec::new(), String::new()),
            Err(Failed::Unavailable(why)) => (LagStatus::Unavailable, Vec::new(), why),
        };
        let topic = &self.topics[i];
        let before = {
            let mut figures = self.figures.lock().unwrap_or_else(PoisonError::into_inner);
            let f = &mut figures[i];
            let before = f.status;
            f.status = status;
            f.read_at = (status == LagStatus::Read).then(SystemTime::now);
            f.partitions = partitions;
            before
        };
        if before == status {
            return;
        }
        match status {
            LagStatus::NotFound => {
                tracing::warn!(topic = %topic, "consumer lag: the topic does not exist; its figures are absent until it does");
            }
            LagStatus::Unavailable => {
                tracing::warn!(topic = %topic, reason = %reason, "consumer lag: cannot read the topic's lag; asking again each interval");
            }
            LagStatus::Read if before != LagStatus::Pending => {
                tracing::info!(topic = %topic, "consumer lag: the topic can be read again");
            }
            LagStatus::Read | LagStatus::Pending => {}
        }
    }
}

fn unavailable(e: KafkaError) -> Failed {
    Failed::Unavailable(e.to_string())
}
