//! The consumer lag poller: per partition, the high watermark less the group's committed
//! offset (the high less the low watermark before any commit), read without joining the
//! group; a missing topic or a broker that is down gives no figure; the figures, and the
//! age of the consumer's oldest incomplete record, reach the `redrive.consumer.*` gauges.
//!
//! The scenarios with exact offsets run on librdkafka's mock cluster (`mock::…`) and on
//! the real broker started by `scripts/kafka-broker` (`tansu::…`).

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::Env;
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, SdkMeterProvider};
use redrive_core::Consumer as _;
use redrive_core::testkit::unique_name;
use redrive_kafka::rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
use redrive_kafka::rdkafka::producer::{FutureProducer, FutureRecord};
use redrive_kafka::rdkafka::{ClientConfig, Offset, TopicPartitionList};
use redrive_kafka::{ConsumerLag, LagStatus, PartitionLag};
use redrive_middleware::metrics::{
    ATTR_CONSUMER_GROUP, ATTR_PARTITION, MetricsLayer, PartitionReading,
};

const INTERVAL: Duration = Duration::from_millis(100);
const WITHIN: Duration = Duration::from_secs(20);

on_both!(
    lag_is_the_high_watermark_less_the_committed_offset,
    a_missing_topic_is_absent,
);

fn lag(env: &Env, group: &str, topics: &[&str]) -> ConsumerLag {
    ConsumerLag::builder(&env.brokers, group, topics.iter().copied())
        .interval(INTERVAL)
        .timeout(Duration::from_secs(2))
        .start()
        .expect("start the poller")
}

/// Sends `n` records to `partition` of `topic`.
async fn produce(brokers: &str, topic: &str, partition: i32, n: usize) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("message.timeout.ms", "10000")
        .create()
        .expect("producer");
    for i in 0..n {
        let body = format!("m{i}");
        producer
            .send(
                FutureRecord::<(), _>::to(topic)
                    .partition(partition)
                    .payload(&body),
                Duration::from_secs(10),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("produce to {topic}/{partition}: {e}"));
    }
}

/// Commits `offsets` (partition, next offset) for `group` without joining it.
async fn commit(brokers: &str, group: &str, topic: &str, offsets: &[(i32, i64)]) {
    let (brokers, group, topic) = (brokers.to_owned(), group.to_owned(), topic.to_owned());
    let offsets = offsets.to_vec();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()
            .expect("committer");
        let mut tpl = TopicPartitionList::new();
        for (p, o) in offsets {
            tpl.add_partition_offset(&topic, p, Offset::Offset(o))
                .expect("offset");
        }
        consumer.commit(&tpl, CommitMode::Sync).expect("commit");
    })
    .await
    .expect("the committer ran");
}

/// Waits until `topic`'s figures satisfy `ok`, or fails naming `what` and the last ones.
async fn wait_for(
    lag: &ConsumerLag,
    topic: &str,
    what: &str,
    ok: impl Fn(LagStatus, &[PartitionLag]) -> bool,
) {
    let start = Instant::now();
    loop {
        let figures = lag.snapshot();
        let t = figures
            .iter()
            .find(|t| t.topic == topic)
            .unwrap_or_else(|| panic!("{topic} is not polled: {figures:?}"));
        if ok(t.status, &t.partitions) {
            return;
        }
        assert!(
            start.elapsed() < WITHIN,
            "{what}: not within {WITHIN:?}; last figures {t:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Each partition's (partition, lag, committed) is `expected`.
fn lags_are(expected: &[(i32, u64, Option<i64>)]) -> impl Fn(LagStatus, &[PartitionLag]) -> bool {
    let expected = expected.to_vec();
    move |status, partitions| {
        status == LagStatus::Read
            && partitions
                .iter()
                .map(|p| (p.partition, p.lag, p.committed))
                .collect::<Vec<_>>()
                == expected
    }
}

async fn lag_is_the_high_watermark_less_the_committed_offset(env: &Env) {
    let topic = unique_name("lag");
    let group = unique_name("lag-group");
    env.create_topic(&topic, 2).await;
    produce(&env.brokers, &topic, 0, 5).await;
    produce(&env.brokers, &topic, 1, 3).await;
    commit(&env.brokers, &group, &topic, &[(0, 2)]).await;
    let lag = lag(env, &group, &[&topic]);

    // Partition 1 has no committed offset: every record in it counts.
    wait_for(
        &lag,
        &topic,
        "5 - 2 and 3 - 0",
        lags_are(&[(0, 3, Some(2)), (1, 3, None)]),
    )
    .await;
    let p = lag.partitions(&topic).expect("read");
    assert_eq!((p[0].low_watermark, p[0].high_watermark), (0, 5));
    assert_eq!((p[1].low_watermark, p[1].high_watermark), (0, 3));
    assert!(lag.snapshot()[0].read_at.is_some());

    commit(&env.brokers, &group, &topic, &[(0, 5), (1, 3)]).await;
    produce(&env.brokers, &topic, 0, 4).await;
    wait_for(
        &lag,
        &topic,
        "9 - 5 and 3 - 3",
        lags_are(&[(0, 4, Some(5)), (1, 0, Some(3))]),
    )
    .await;

    // Another group's commits are not this group's.
    let other = self::lag(env, &unique_name("lag-other"), &[&topic]);
    wait_for(
        &other,
        &topic,
        "nothing committed",
        lags_are(&[(0, 9, None), (1, 3, None)]),
    )
    .await;
    lag.stop();
    other.stop();
}

async fn a_missing_topic_is_absent(env: &Env) {
    let missing = unique_name("lag-missing");
    let present = unique_name("lag-present");
    env.create_topic(&present, 1).await;
    produce(&env.brokers, &present, 0, 2).await;
    let lag = lag(env, &unique_name("lag-group"), &[&missing, &present]);
    wait_for(&lag, &missing, "missing", |s, p| {
        s == LagStatus::NotFound && p.is_empty()
    })
    .await;
    wait_for(&lag, &present, "the other topic", lags_are(&[(0, 2, None)])).await;
    assert_eq!(lag.partitions(&missing), None);
    assert!(!lag.is_stopped());
    lag.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_poller_never_joins_the_group() {
    // On the real broker: the mock cluster has no DescribeGroups.
    let env = Env::real();
    let topic = unique_name("lag-nojoin");
    let group = unique_name("lag-nojoin-group");
    env.create_topic(&topic, 1).await;
    produce(&env.brokers, &topic, 0, 3).await;
    commit(&env.brokers, &group, &topic, &[(0, 1)]).await;
    let lag = lag(&env, &group, &[&topic]);
    wait_for(&lag, &topic, "read", lags_are(&[(0, 2, Some(1))])).await;
    // Several reads later the group still has no member.
    tokio::time::sleep(INTERVAL * 10).await;
    let (empty, last) = common::group_empties(&env.brokers, &group, Duration::ZERO).await;
    assert!(empty, "the poller is a member of {group}: {last}");
    lag.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_is_down_gives_no_figure_until_it_is_back() {
    let env = Env::mock();
    let cluster = env.mock.as_ref().expect("mock");
    let topic = unique_name("lag-down");
    let group = unique_name("lag-down-group");
    env.create_topic(&topic, 1).await;
    produce(&env.brokers, &topic, 0, 4).await;
    commit(&env.brokers, &group, &topic, &[(0, 1)]).await;
    let lag = ConsumerLag::builder(&env.brokers, &group, [&topic])
        .interval(INTERVAL)
        .timeout(Duration::from_millis(500))
        .start()
        .expect("start");
    wait_for(&lag, &topic, "read", lags_are(&[(0, 3, Some(1))])).await;

    cluster.broker_down(1).expect("broker down");
    wait_for(&lag, &topic, "down", |s, p| {
        s == LagStatus::Unavailable && p.is_empty()
    })
    .await;
    assert_eq!(lag.partitions(&topic), None);

    cluster.broker_up(1).expect("broker up");
    wait_for(&lag, &topic, "back", lags_are(&[(0, 3, Some(1))])).await;

    // Dropping the last handle ends the poller.
    let watcher = lag.clone();
    let stopped = {
        let w = watcher.clone();
        move || w.is_stopped()
    };
    drop(lag);
    assert!(!stopped(), "a clone keeps the poller");
    watcher.stop();
    let start = Instant::now();
    while !stopped() {
        assert!(start.elapsed() < WITHIN, "the poller did not end");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The figures stay as last read.
    assert_eq!(
        watcher.partitions(&topic).map(|p| p[0].lag),
        Some(3),
        "{watcher:?}"
    );
}

#[test]
fn settings_that_cannot_work_are_errors() {
    let empty: [&str; 0] = [];
    for (what, builder) in [
        ("no topic", ConsumerLag::builder("127.0.0.1:1", "g", empty)),
        ("no group", ConsumerLag::builder("127.0.0.1:1", "", ["t"])),
        (
            "zero interval",
            ConsumerLag::builder("127.0.0.1:1", "g", ["t"]).interval(Duration::ZERO),
        ),
        (
            "zero timeout",
            ConsumerLag::builder("127.0.0.1:1", "g", ["t"]).timeout(Duration::ZERO),
        ),
        (
            "auto commit",
            ConsumerLag::builder("127.0.0.1:1", "g", ["t"]).set("enable.auto.commit", "true"),
        ),
    ] {
        builder.start().expect_err(what);
    }
}

/// (metric, partition) → (value, group), from one collection.
fn scrape(
    provider: &SdkMeterProvider,
    exporter: &InMemoryMetricExporter,
) -> Vec<(String, String, f64, String)> {
    exporter.reset();
    provider.force_flush().expect("flush");
    let mut out = Vec::new();
    for rm in exporter.get_finished_metrics().expect("metrics") {
        for sm in rm.scope_metrics() {
            for m in sm.metrics() {
                let points: Vec<(f64, Vec<opentelemetry::KeyValue>)> = match m.data() {
                    AggregatedMetrics::U64(MetricData::Gauge(g)) => g
                        .data_points()
                        .map(|p| (p.value() as f64, p.attributes().cloned().collect()))
                        .collect(),
                    AggregatedMetrics::F64(MetricData::Gauge(g)) => g
                        .data_points()
                        .map(|p| (p.value(), p.attributes().cloned().collect()))
                        .collect(),
                    _ => continue,
                };
                for (value, attrs) in points {
                    let attr = |key: &str| {
                        attrs
                            .iter()
                            .find(|kv| kv.key.as_str() == key)
                            .map(|kv| kv.value.to_string())
                            .unwrap_or_default()
                    };
                    out.push((
                        m.name().to_owned(),
                        attr(ATTR_PARTITION),
                        value,
                        attr(ATTR_CONSUMER_GROUP),
                    ));
                }
            }
        }
    }
    out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_and_the_oldest_incomplete_age_reach_the_gauges() {
    let env = Env::mock();
    let topic = unique_name("lag-gauges");
    let group = unique_name("lag-gauges-group");
    env.create_topic(&topic, 2).await;
    produce(&env.brokers, &topic, 0, 6).await;
    produce(&env.brokers, &topic, 1, 2).await;
    commit(&env.brokers, &group, &topic, &[(0, 2)]).await;
    let lag = lag(&env, &group, &[&topic]);
    wait_for(
        &lag,
        &topic,
        "read",
        lags_are(&[(0, 4, Some(2)), (1, 2, None)]),
    )
    .await;

    // A member of the group receives a record and does not finish it.
    let mut consumer = common::consumer(&env.brokers, &group, &topic);
    let delivery = tokio::time::timeout(WITHIN, consumer.receive())
        .await
        .expect("a delivery in time")
        .expect("receive")
        .expect("a delivery");
    let held = delivery
        .message
        .metadata
        .source
        .partition
        .expect("partition");
    let open = consumer.open_records();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let exporter = InMemoryMetricExporter::default();
    let provider = SdkMeterProvider::builder()
        .with_periodic_exporter(exporter.clone())
        .build();
    let metrics = MetricsLayer::new(&provider.meter("test"));
    // One registration per source: the poller's lag, the consumer's open records.
    let (l, t) = (lag.clone(), topic.clone());
    metrics.observe_partitions(
        redrive_kafka::SYSTEM,
        topic.clone(),
        group.clone(),
        move || {
            let partitions = l.partitions(&t).unwrap_or_default();
            partitions
                .iter()
                .map(|p| PartitionReading::new(p.partition).with_lag(p.lag))
                .collect()
        },
    );
    let t = topic.clone();
    metrics.observe_partitions(
        redrive_kafka::SYSTEM,
        topic.clone(),
        group.clone(),
        move || {
            open.partitions()
                .into_iter()
                .filter(|b| b.topic == t && b.oldest_incomplete.is_some())
                .map(|b| {
                    PartitionReading::new(b.partition).with_oldest_incomplete_age(b.oldest_age)
                })
                .collect()
        },
    );
    let points = scrape(&provider, &exporter);
    let lags: Vec<(String, f64)> = points
        .iter()
        .filter(|p| p.0 == "redrive.consumer.lag")
        .map(|p| (p.1.clone(), p.2))
        .collect();
    // Nothing is committed yet by the member: the lag is what the poller read.
    assert_eq!(
        lags,
        [("0".to_owned(), 4.0), ("1".to_owned(), 2.0)],
        "{points:?}"
    );
    // The held record's partition has an age; records polled ahead on the other
    // partition, not handed out yet, may give it one too.
    let ages: Vec<(&str, f64)> = points
        .iter()
        .filter(|p| p.0 == "redrive.consumer.oldest_incomplete_age")
        .map(|p| (p.1.as_str(), p.2))
        .collect();
    let held_age = ages
        .iter()
        .find(|(p, _)| *p == held.to_string())
        .unwrap_or_else(|| panic!("no age for partition {held}: {points:?}"))
        .1;
    assert!(
        (0.3..30.0).contains(&held_age),
        "the held record's age: {points:?}"
    );
    assert!(ages.iter().all(|(_, a)| *a < 30.0), "{points:?}");
    assert!(points.iter().all(|p| p.3 == group), "{points:?}");

    drop(delivery);
    consumer.close().await.expect("close");
    lag.stop();
}
