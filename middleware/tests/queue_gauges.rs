//! `MetricsLayer::observe_queue` and `MetricsLayer::observe_partitions`: the queue depth,
//! consumer, in-flight and delayed gauges and the per-partition lag and oldest-record age
//! gauges, with their attributes, read through an in-memory metric exporter.
#![cfg(feature = "metrics")]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, SdkMeterProvider};
use std::time::Duration;

use redrive_middleware::metrics::{
    ATTR_CONSUMER_GROUP, ATTR_DESTINATION, ATTR_PARTITION, ATTR_SYSTEM, MetricsLayer,
    PartitionReading, QueueReading,
};

/// (metric, destination) → (value, system, unit), from the last collection only.
type Points = BTreeMap<(String, String), (u64, String, String)>;

fn collect(provider: &SdkMeterProvider, exporter: &InMemoryMetricExporter) -> Points {
    exporter.reset();
    provider.force_flush().unwrap();
    let mut out = Points::new();
    for rm in exporter.get_finished_metrics().unwrap() {
        for sm in rm.scope_metrics() {
            for m in sm.metrics() {
                let AggregatedMetrics::U64(MetricData::Gauge(g)) = m.data() else {
                    panic!("{} is not a u64 gauge: {:?}", m.name(), m.data());
                };
                for p in g.data_points() {
                    let attr = |key: &str| {
                        p.attributes()
                            .find(|kv| kv.key.as_str() == key)
                            .map(|kv| kv.value.to_string())
                            .unwrap_or_else(|| panic!("{} has no {key}", m.name()))
                    };
                    assert_eq!(
                        p.attributes().count(),
                        2,
                        "{}: only the two attributes",
                        m.name()
                    );
                    out.insert(
                        (m.name().to_owned(), attr(ATTR_DESTINATION)),
                        (p.value(), attr(ATTR_SYSTEM), m.unit().to_owned()),
                    );
                }
            }
        }
    }
    out
}

fn provider() -> (SdkMeterProvider, InMemoryMetricExporter) {
    let exporter = InMemoryMetricExporter::default();
    let provider = SdkMeterProvider::builder()
        .with_periodic_exporter(exporter.clone())
        .build();
    (provider, exporter)
}

fn point(value: u64, unit: &str) -> (u64, String, String) {
    (value, "rabbitmq".to_owned(), unit.to_owned())
}

#[test]
fn depth_and_consumers_per_destination() {
    let (provider, exporter) = provider();
    let metrics = MetricsLayer::new(&provider.meter("test"));
    let depth = Arc::new(Mutex::new(7u64));
    let d = depth.clone();
    metrics.observe_queue("rabbitmq", "orders", move || {
        Some(QueueReading::new(*d.lock().unwrap()).with_consumers(2))
    });
    metrics.observe_queue("rabbitmq", "orders-dlq", || {
        Some(QueueReading::new(3).with_consumers(0))
    });

    let key = |name: &str, dest: &str| (name.to_owned(), dest.to_owned());
    let points = collect(&provider, &exporter);
    assert_eq!(
        points,
        Points::from([
            (key("redrive.queue.depth", "orders"), point(7, "{message}")),
            (
                key("redrive.queue.depth", "orders-dlq"),
                point(3, "{message}")
            ),
            (
                key("redrive.queue.consumers", "orders"),
                point(2, "{consumer}")
            ),
            (
                key("redrive.queue.consumers", "orders-dlq"),
                point(0, "{consumer}")
            ),
        ])
    );

    // Each collection reads the figures again.
    *depth.lock().unwrap() = 9;
    let points = collect(&provider, &exporter);
    assert_eq!(points[&key("redrive.queue.depth", "orders")].0, 9);
}

#[test]
fn an_absent_reading_observes_nothing() {
    let (provider, exporter) = provider();
    let metrics = MetricsLayer::new(&provider.meter("test"));
    let present = Arc::new(AtomicBool::new(false));
    let p = present.clone();
    metrics.observe_queue("rabbitmq", "orders", move || {
        p.load(Ordering::Relaxed)
            .then(|| QueueReading::new(4).with_consumers(1))
    });

    assert_eq!(collect(&provider, &exporter), Points::new());
    present.store(true, Ordering::Relaxed);
    assert_eq!(collect(&provider, &exporter).len(), 2);
    // Absent again: the gauges stop reporting rather than repeat the last figures.
    present.store(false, Ordering::Relaxed);
    assert_eq!(collect(&provider, &exporter), Points::new());
}

#[test]
fn a_reading_without_consumers_reports_the_depth_only() {
    let (provider, exporter) = provider();
    let metrics = MetricsLayer::new(&provider.meter("test"));
    metrics.observe_queue("sqs", "orders", || Some(QueueReading::new(5)));

    let points = collect(&provider, &exporter);
    assert_eq!(
        points.into_iter().collect::<Vec<_>>(),
        [(
            ("redrive.queue.depth".to_owned(), "orders".to_owned()),
            (5, "sqs".to_owned(), "{message}".to_owned())
        )]
    );
}

#[test]
fn in_flight_and_delayed_only_when_the_reading_has_them() {
    let (provider, exporter) = provider();
    let metrics = MetricsLayer::new(&provider.meter("test"));
    metrics.observe_queue("aws_sqs", "orders", || {
        Some(QueueReading::new(5).with_in_flight(2).with_delayed(1))
    });
    metrics.observe_queue("aws_sqs", "orders-dlq", || {
        Some(QueueReading::new(0).with_in_flight(0))
    });

    let key = |name: &str, dest: &str| (name.to_owned(), dest.to_owned());
    let sqs = |value: u64| (value, "aws_sqs".to_owned(), "{message}".to_owned());
    assert_eq!(
        collect(&provider, &exporter),
        Points::from([
            (key("redrive.queue.depth", "orders"), sqs(5)),
            (key("redrive.queue.in_flight", "orders"), sqs(2)),
            (key("redrive.queue.delayed", "orders"), sqs(1)),
            (key("redrive.queue.depth", "orders-dlq"), sqs(0)),
            // Zero in flight is a figure; no delayed count is none.
            (key("redrive.queue.in_flight", "orders-dlq"), sqs(0)),
        ])
    );
}

/// One partition gauge's point: (metric, topic, partition) → (value, system, group, unit).
type PartitionPoints = BTreeMap<(String, String, String), (f64, String, String, String)>;

fn collect_partitions(
    provider: &SdkMeterProvider,
    exporter: &InMemoryMetricExporter,
) -> PartitionPoints {
    exporter.reset();
    provider.force_flush().unwrap();
    let mut out = PartitionPoints::new();
    for rm in exporter.get_finished_metrics().unwrap() {
        for sm in rm.scope_metrics() {
            for m in sm.metrics() {
                let points: Vec<(f64, Vec<(String, String)>)> = match m.data() {
                    AggregatedMetrics::U64(MetricData::Gauge(g)) => g
                        .data_points()
                        .map(|p| (p.value() as f64, attrs(p.attributes())))
                        .collect(),
                    AggregatedMetrics::F64(MetricData::Gauge(g)) => g
                        .data_points()
                        .map(|p| (p.value(), attrs(p.attributes())))
                        .collect(),
                    other => panic!("{} is not a gauge: {other:?}", m.name()),
                };
                for (value, attributes) in points {
                    let attr = |key: &str| {
                        attributes
                            .iter()
                            .find(|(k, _)| k == key)
                            .map(|(_, v)| v.clone())
                            .unwrap_or_else(|| panic!("{} has no {key}: {attributes:?}", m.name()))
                    };
                    assert_eq!(attributes.len(), 4, "{}: {attributes:?}", m.name());
                    out.insert(
                        (
                            m.name().to_owned(),
                            attr(ATTR_DESTINATION),
                            attr(ATTR_PARTITION),
                        ),
                        (
                            value,
                            attr(ATTR_SYSTEM),
                            attr(ATTR_CONSUMER_GROUP),
                            m.unit().to_owned(),
                        ),
                    );
                }
            }
        }
    }
    out
}

fn attrs<'a>(kvs: impl Iterator<Item = &'a opentelemetry::KeyValue>) -> Vec<(String, String)> {
    kvs.map(|kv| (kv.key.as_str().to_owned(), kv.value.to_string()))
        .collect()
}

#[test]
fn lag_and_oldest_incomplete_age_per_partition() {
    let (provider, exporter) = provider();
    let metrics = MetricsLayer::new(&provider.meter("test"));
    let lag = Arc::new(Mutex::new(12u64));
    let l = lag.clone();
    metrics.observe_partitions("kafka", "orders", "billing", move || {
        vec![
            PartitionReading::new(0).with_lag(*l.lock().unwrap()),
            PartitionReading::new(1)
                .with_lag(0)
                .with_oldest_incomplete_age(Duration::from_millis(2500)),
            // A partition this process does not own: the lag only.
            PartitionReading::new(2).with_lag(4),
            // Nothing known: nothing observed.
            PartitionReading::new(3),
        ]
    });

    let key = |name: &str, p: &str| (name.to_owned(), "orders".to_owned(), p.to_owned());
    let point = |value: f64, unit: &str| {
        (
            value,
            "kafka".to_owned(),
            "billing".to_owned(),
            unit.to_owned(),
        )
    };
    assert_eq!(
        collect_partitions(&provider, &exporter),
        PartitionPoints::from([
            (key("redrive.consumer.lag", "0"), point(12.0, "{message}")),
            (key("redrive.consumer.lag", "1"), point(0.0, "{message}")),
            (key("redrive.consumer.lag", "2"), point(4.0, "{message}")),
            (
                key("redrive.consumer.oldest_incomplete_age", "1"),
                point(2.5, "s")
            ),
        ])
    );

    // Each collection reads again; a partition gone from the reading goes stale.
    *lag.lock().unwrap() = 3;
    let points = collect_partitions(&provider, &exporter);
    assert_eq!(points[&key("redrive.consumer.lag", "0")].0, 3.0);
}

#[test]
fn an_empty_partition_reading_observes_nothing() {
    let (provider, exporter) = provider();
    let metrics = MetricsLayer::new(&provider.meter("test"));
    metrics.observe_partitions("kafka", "orders", "billing", Vec::new);
    assert_eq!(
        collect_partitions(&provider, &exporter),
        PartitionPoints::new()
    );
}
