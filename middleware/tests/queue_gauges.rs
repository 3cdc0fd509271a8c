//! `MetricsLayer::observe_queue`: the queue depth and consumer gauges, with their
//! attributes, read through an in-memory metric exporter.
#![cfg(feature = "metrics")]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, SdkMeterProvider};
use redrive_middleware::metrics::{ATTR_DESTINATION, ATTR_SYSTEM, MetricsLayer, QueueReading};

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
