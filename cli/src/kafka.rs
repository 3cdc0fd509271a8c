//! Kafka: a DLQ is a topic, read by a consumer group of the tool's own.
//!
//! Kafka never deletes one record: the tool's group has a committed offset per
//! partition, and "removed" means "before it". Acking a letter completes its offset in
//! the adapter's watermark, which commits only the contiguous run of completed offsets,
//! so a letter kept (not selected, refused, a dry run) holds its partition's committed
//! offset. The letters replayed or purged after it are kept as done in the committed
//! offset's metadata, as far as it holds them, and skipped by the next run; a broker
//! that drops commit metadata (tansu 0.6) has the next run read them again.
//! [`KafkaDlq`] counts those, for the warning at the end of a run.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use redrive_core::delivery::SettleFuture;
use redrive_core::{Acker, Capabilities, Consumer, Delivery, Settle};
use redrive_kafka::rdkafka::consumer::{BaseConsumer, Consumer as _};
use redrive_kafka::rdkafka::{ClientConfig, Offset, TopicPartitionList};
use redrive_kafka::{KafkaConsumer, KafkaPublisher};

/// How long the first letter may take: joining the group (tansu holds a JoinGroup for
/// seconds; a member of a killed run is expired after its session timeout) and the
/// first fetch.
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The session timeout of the tool's group member: a killed run's member is expired
/// after it, and the next run's join waits that long at most.
const SESSION_TIMEOUT_MS: &str = "10000";

/// The most records one partition holds open behind a kept letter before the adapter
/// pauses it (16 bytes each); a run reads at most this many letters of a partition.
pub(crate) const MAX_OPEN_PER_PARTITION: usize = 1_000_000;

/// The tool's consumer group for `topic` unless `--group` names one.
pub(crate) fn default_group(topic: &str) -> String {
    format!("redrive-dlq-{topic}")
}

/// What the topic holds for the group at the start of a run: per partition, the first
/// offset to read (the group's committed offset, or the earliest) and the end (the high
/// watermark).
#[derive(Clone, Debug, Default)]
pub(crate) struct Extent {
    pub(crate) partitions: BTreeMap<i32, (i64, i64)>,
}

impl Extent {
    /// The records between the group's committed offsets and the ends.
    pub(crate) fn depth(&self) -> u64 {
        self.partitions
            .values()
            .map(|(from, end)| u64::try_from(end - from).unwrap_or(0))
            .sum()
    }
}

/// Reads the topic's partitions, their watermarks and the group's committed offsets
/// (without joining the group).
pub(crate) async fn extent(brokers: &str, group: &str, topic: &str) -> Result<Extent, String> {
    let (brokers, group, topic) = (brokers.to_owned(), group.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || extent_blocking(&brokers, &group, &topic))
        .await
        .map_err(|e| format!("reading the topic's offsets: {e}"))?
}

fn extent_blocking(brokers: &str, group: &str, topic: &str) -> Result<Extent, String> {
    let timeout = Duration::from_secs(10);
    let client: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| format!("cannot create a Kafka client for {brokers}: {e}"))?;
    let metadata = client
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| format!("cannot read the metadata of `{topic}` at {brokers}: {e}"))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(format!("the topic `{topic}` does not exist at {brokers}"));
    }
    let mut tpl = TopicPartitionList::with_capacity(partitions.len());
    for p in &partitions {
        tpl.add_partition(topic, *p);
    }
    let committed = client
        .committed_offsets(tpl, timeout)
        .map_err(|e| format!("cannot read the committed offsets of group `{group}`: {e}"))?;
    let mut extent = Extent::default();
    for p in partitions {
        let (low, high) = client
            .fetch_watermarks(topic, p, timeout)
            .map_err(|e| format!("cannot read the offsets of `{topic}` partition {p}: {e}"))?;
        let from = match committed.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o.max(low),
            _ => low,
        };
        extent.partitions.insert(p, (from, high.max(from)));
    }
    Ok(extent)
}

/// The consumer of a Kafka DLQ in `group`, from the earliest offset when the group has
/// committed none; committing only on close (and the adapter's periodic commit).
pub(crate) fn consumer(brokers: &str, group: &str, topic: &str) -> Result<KafkaConsumer, String> {
    KafkaConsumer::builder(brokers, group, [topic])
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", SESSION_TIMEOUT_MS)
        .set("heartbeat.interval.ms", "1000")
        .max_open_per_partition(MAX_OPEN_PER_PARTITION)
        // A selection keeps letters on purpose: read on rather than wait for them.
        .pause_when_metadata_full(false)
        .close_timeout(Duration::from_secs(15))
        .build()
        .map_err(|e| format!("cannot consume the DLQ `{topic}`: {e}"))
}

/// The publisher a Kafka replay puts letters back with: each record sent at once
/// (`linger.ms=0`), since a replay one letter at a time waits for each before the next.
pub(crate) fn publisher(brokers: &str) -> Result<KafkaPublisher, String> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "0");
    KafkaPublisher::from_config(config).map_err(|e| format!("cannot create a Kafka producer: {e}"))
}

/// Per partition, each offset read and whether it was acked (removed).
#[derive(Debug, Default)]
struct Ledger {
    partitions: BTreeMap<i32, BTreeMap<i64, bool>>,
}

/// The letters a run removed after a letter it kept, which the next run may read again.
#[derive(Clone, Debug, Default)]
pub(crate) struct Reread(Arc<Mutex<Ledger>>);

impl Reread {
    fn lock(&self) -> MutexGuard<'_, Ledger> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many letters were acked after the first kept letter of their partition: the
    /// committed offset cannot move past that one, so the next run reads again those its
    /// metadata does not keep (all of them on a broker that drops commit metadata).
    pub(crate) fn count(&self) -> u64 {
        let ledger = self.lock();
        ledger
            .partitions
            .values()
            .map(|offsets| {
                let first_kept = offsets.iter().find(|(_, acked)| !**acked).map(|(o, _)| *o);
                match first_kept {
                    Some(kept) => offsets.range(kept..).filter(|(_, acked)| **acked).count() as u64,
                    None => 0,
                }
            })
            .sum()
    }
}

/// A Kafka DLQ consumer for one run: ends the run once every partition was read to the
/// end it had at the start (the idle wait remains the fallback, for gaps a compacted
/// topic leaves), waits for the group join before the first letter, and records which
/// letters were acked.
pub(crate) struct KafkaDlq {
    consumer: KafkaConsumer,
    /// Partitions not yet read to their end: the end offset.
    open: HashMap<i32, i64>,
    /// The first letter, taken while joining the group.
    first: Option<Delivery>,
    reread: Reread,
}

impl KafkaDlq {
    /// Wraps `consumer`, reading up to `extent`, and waits for the first letter when
    /// there is one to read.
    ///
    /// # Errors
    /// No letter came within the join timeout though the topic has some past the
    /// group's committed offset (another member of the group holds the partitions), or
    /// the receive failed.
    pub(crate) async fn start(
        mut consumer: KafkaConsumer,
        extent: &Extent,
        group: &str,
    ) -> Result<Self, String> {
        let open: HashMap<i32, i64> = extent
            .partitions
            .iter()
            .filter(|(_, (from, end))| end > from)
            .map(|(p, (_, end))| (*p, *end))
            .collect();
        let mut first = None;
        if !open.is_empty() {
            match tokio::time::timeout(JOIN_TIMEOUT, consumer.receive()).await {
                Ok(Ok(d)) => first = d,
                Ok(Err(e)) => {
                    let _ = consumer.close().await;
                    return Err(format!("reading the DLQ: {e}"));
                }
                Err(_) => {
                    let _ = consumer.close().await;
                    return Err(format!(
                        "no letter within {JOIN_TIMEOUT:?} though {} are past group `{group}`'s \
                         committed offset: is another member of the group (another run) \
                         holding the partitions?",
                        extent.depth()
                    ));
                }
            }
        }
        Ok(KafkaDlq {
            consumer,
            open,
            first,
            reread: Reread::default(),
        })
    }

    /// The count of letters the next run may read again, readable after the run.
    pub(crate) fn reread(&self) -> Reread {
        self.reread.clone()
    }

    fn track(&mut self, delivery: Delivery) -> Delivery {
        let source = &delivery.message.metadata.source;
        let (Some(partition), Some(offset)) = (source.partition, source.offset) else {
            return delivery;
        };
        if self
            .open
            .get(&partition)
            .is_some_and(|end| offset + 1 >= *end)
        {
            self.open.remove(&partition);
        }
        self.reread
            .lock()
            .partitions
            .entry(partition)
            .or_default()
            .insert(offset, false);
        let (message, settle) = delivery.into_parts();
        Delivery::new(
            message,
            Tracked {
                inner: settle,
                partition,
                offset,
                reread: self.reread.clone(),
            },
        )
    }
}

impl Consumer for KafkaDlq {
    async fn receive(&mut self) -> redrive_core::Result<Option<Delivery>> {
        if let Some(d) = self.first.take() {
            return Ok(Some(self.track(d)));
        }
        if self.open.is_empty() {
            return Ok(None);
        }
        // Cancel-safe: the adapter's receive loses nothing when dropped, and the
        // tracking happens after it returned.
        match self.consumer.receive().await? {
            Some(d) => Ok(Some(self.track(d))),
            None => Ok(None),
        }
    }

    fn capabilities(&self) -> Capabilities {
        self.consumer.capabilities()
    }

    /// Commits the final watermarks (waiting for the broker) and leaves the group.
    async fn close(&mut self) -> redrive_core::Result<()> {
        if let Some(d) = self.first.take() {
            let _ = d.hand_back().await;
        }
        self.consumer.close().await
    }
}

/// Settles through the adapter's handle, and records an ack in the ledger.
struct Tracked {
    inner: Settle,
    partition: i32,
    offset: i64,
    reread: Reread,
}

impl Acker for Tracked {
    fn ack(&self) -> SettleFuture<'_> {
        SettleFuture::new(async move {
            self.inner.ack().await?;
            if let Some(acked) = self
                .reread
                .lock()
                .partitions
                .get_mut(&self.partition)
                .and_then(|p| p.get_mut(&self.offset))
            {
                *acked = true;
            }
            Ok(())
        })
    }

    fn nack(&self, delay: Duration) -> SettleFuture<'_> {
        SettleFuture::new(self.inner.nack(delay))
    }

    fn extend(&self, lease: Duration) -> SettleFuture<'_> {
        SettleFuture::new(self.inner.extend(lease))
    }

    fn hand_back(&self) -> SettleFuture<'_> {
        SettleFuture::new(self.inner.hand_back())
    }

    fn is_current(&self) -> bool {
        self.inner.is_current()
    }

    fn running(&self, running: bool) {
        self.inner.running(running);
    }
}

#[cfg(test)]
mod tests {
    use super::{Ledger, Reread};
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    #[test]
    fn letters_removed_after_a_kept_one_are_counted() {
        let mut ledger = Ledger::default();
        ledger.partitions.insert(
            0,
            BTreeMap::from([(0, true), (1, false), (2, true), (3, true)]),
        );
        ledger
            .partitions
            .insert(1, BTreeMap::from([(5, true), (6, true)]));
        ledger
            .partitions
            .insert(2, BTreeMap::from([(7, false), (8, false)]));
        assert_eq!(Reread(Arc::new(Mutex::new(ledger))).count(), 2);
    }
}
