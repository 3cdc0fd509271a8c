//! The metrics layer's counters after a known mix of successes, redeliveries,
//! duplicates and dead letters, read through an in-memory metric exporter.
#![cfg(all(
    feature = "metrics",
    feature = "dead-letter",
    feature = "idempotency",
    feature = "retry"
))]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, SdkMeterProvider};
use redrive_core::memory::MemoryBroker;
use redrive_core::{
    BoxError, Message, OutgoingMessage, Publisher, Redelivery, Worker, classify, handler_fn,
};
use redrive_middleware::dead_letter::{DeadLetterConfig, DeadLetterLayer};
use redrive_middleware::idempotency::{
    IDEMPOTENCY_KEY, IdempotencyConfig, IdempotencyLayer, MemoryStore,
};
use redrive_middleware::metrics::MetricsLayer;
use redrive_middleware::retry::{Backoff, RetryConfig, RetryLayer, Try};
use tower::ServiceBuilder;

/// Every counter and histogram count, by name, for destination `orders`.
fn read(exporter: &InMemoryMetricExporter) -> HashMap<String, i64> {
    let mut out = HashMap::new();
    for rm in exporter.get_finished_metrics().unwrap() {
        for sm in rm.scope_metrics() {
            for m in sm.metrics() {
                let v = match m.data() {
                    AggregatedMetrics::U64(MetricData::Sum(s)) => {
                        s.data_points().map(|p| p.value() as i64).sum()
                    }
                    AggregatedMetrics::I64(MetricData::Sum(s)) => {
                        s.data_points().map(|p| p.value()).sum()
                    }
                    AggregatedMetrics::F64(MetricData::Histogram(h)) => {
                        h.data_points().map(|p| p.count() as i64).sum()
                    }
                    AggregatedMetrics::I64(MetricData::Gauge(g)) => {
                        g.data_points().map(|p| p.value()).sum()
                    }
                    AggregatedMetrics::U64(MetricData::Gauge(g)) => {
                        g.data_points().map(|p| p.value() as i64).sum()
                    }
                    other => panic!("unexpected data for {}: {other:?}", m.name()),
                };
                out.insert(m.name().to_owned(), v);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_after_a_known_mix() {
    known_mix(MetricsLayer::new).await;
}

#[cfg(feature = "metrics-bound")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bound_histograms_count_the_same_mix() {
    known_mix(|meter| MetricsLayer::new(meter).with_bound_histograms()).await;
}

/// Runs a known mix of messages through a stack with the metrics layer `make` builds,
/// and checks every count.
async fn known_mix(make: impl Fn(&opentelemetry::metrics::Meter) -> MetricsLayer) {
    let exporter = InMemoryMetricExporter::default();
    let provider = SdkMeterProvider::builder()
        .with_periodic_exporter(exporter.clone())
        .build();
    let meter = provider.meter("test");

    let broker = MemoryBroker::new();
    let mut bodies = vec!["ok"; 6];
    bodies.extend(["flaky", "flaky", "poison", "retry-me", "retry-me"]);
    for body in bodies {
        broker
            .publish("orders", OutgoingMessage::new(body))
            .await
            .unwrap();
    }
    for _ in 0..2 {
        let dup = OutgoingMessage::new("ok")
            .with_header(IDEMPOTENCY_KEY, "charge-1")
            .unwrap();
        broker.publish("orders", dup).await.unwrap();
    }

    let metrics = make(&meter);
    let retry = RetryLayer::new(
        RetryConfig::default()
            .with_backoff(Backoff::constant(Duration::from_millis(1)))
            .with_max_tries(2)
            .without_budget(),
    )
    .unwrap()
    .on_retry(metrics.retry_counter());
    let stack = ServiceBuilder::new()
        .layer(metrics)
        .layer(
            DeadLetterLayer::new(
                Arc::new(broker.clone()),
                DeadLetterConfig::default().with_max_attempts(3),
            )
            .unwrap(),
        )
        .layer(
            IdempotencyLayer::new(Arc::new(MemoryStore::new()), IdempotencyConfig::default())
                .unwrap(),
        )
        .layer(retry)
        .service(handler_fn(|m: Message| async move {
            let try_number = m.extensions.get::<Try>().map_or(0, |t| t.number);
            match (&m.payload[..], m.attempt(), try_number) {
                (b"poison", _, _) => Err(classify::permanent("schema violation")),
                // Fails both tries of its first delivery: one retry, then a nack.
                (b"flaky", 1, _) => Err::<(), BoxError>("downstream timeout".into()),
                // Fails its first try only: one retry, then success.
                (b"retry-me", _, 1) => Err("blip".into()),
                _ => Ok(()),
            }
        }));
    let b = broker.clone();
    let report = Worker::builder(broker.consumer("orders"))
        .service(stack)
        .concurrency(1)
        .redelivery(Redelivery::constant(Duration::from_millis(5)))
        .build()
        .unwrap()
        .run_until(async move {
            while b.depth("orders") + b.in_flight("orders") > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
    assert_eq!(
        (
            report.processed,
            report.nacked,
            report.dead_lettered,
            report.deduplicated
        ),
        (11, 2, 1, 1),
        "{report:?}"
    );

    provider.force_flush().unwrap();
    let m = read(&exporter);
    let get = |name: &str| *m.get(name).unwrap_or_else(|| panic!("no {name} in {m:?}"));
    // 13 messages; the two flaky ones were delivered twice.
    assert_eq!(get("messaging.client.consumed.messages"), 15);
    assert_eq!(get("messaging.process.duration"), 15);
    assert_eq!(get("redrive.message.age"), 15);
    assert_eq!(get("redrive.messages.acked"), 13);
    // One in-process retry for each flaky delivery that failed and each retry-me.
    assert_eq!(get("redrive.messages.retried"), 4);
    assert_eq!(get("redrive.messages.nacked"), 2);
    assert_eq!(get("redrive.messages.dead_lettered"), 1);
    assert_eq!(get("redrive.messages.deduplicated"), 1);
    assert_eq!(get("redrive.messages.in_flight"), 0);
}

/// The consumed count and the duration histogram's count per destination.
fn per_destination(exporter: &InMemoryMetricExporter) -> HashMap<(String, String), i64> {
    let mut out = HashMap::new();
    for rm in exporter.get_finished_metrics().unwrap() {
        for sm in rm.scope_metrics() {
            for m in sm.metrics() {
                let points: Vec<(Vec<opentelemetry::KeyValue>, i64)> = match m.data() {
                    AggregatedMetrics::U64(MetricData::Sum(s))
                        if m.name() == "messaging.client.consumed.messages" =>
                    {
                        s.data_points()
                            .map(|p| (p.attributes().cloned().collect(), p.value() as i64))
                            .collect()
                    }
                    AggregatedMetrics::F64(MetricData::Histogram(h))
                        if m.name() == "messaging.process.duration" =>
                    {
                        h.data_points()
                            .map(|p| (p.attributes().cloned().collect(), p.count() as i64))
                            .collect()
                    }
                    _ => continue,
                };
                for (attrs, v) in points {
                    let destination = attrs
                        .iter()
                        .find(|kv| kv.key.as_str() == "messaging.destination.name")
                        .map(|kv| kv.value.to_string())
                        .expect("a destination attribute");
                    *out.entry((m.name().to_owned(), destination)).or_default() += v;
                }
            }
        }
    }
    out
}

#[tokio::test]
async fn one_service_counts_each_destination_apart_however_they_alternate() {
    use tower::{Layer, Service, ServiceExt};
    let exporter = InMemoryMetricExporter::default();
    let provider = SdkMeterProvider::builder()
        .with_periodic_exporter(exporter.clone())
        .build();
    let meter = provider.meter("test");
    let mut svc =
        MetricsLayer::new(&meter).layer(handler_fn(|_m: Message| async { Ok::<_, BoxError>(()) }));
    // The service remembers the last destination: switch back and forth, and come
    // back to names it saw before through a fresh allocation of the same text.
    for destination in [
        "orders", "payments", "payments", "orders", "refunds", "orders",
    ] {
        let mut m = Message::new("x");
        m.metadata.source.system = "memory";
        m.metadata.source.destination = destination.into();
        svc.ready().await.unwrap().call(m).await.unwrap();
    }
    provider.force_flush().unwrap();
    let counts = per_destination(&exporter);
    for (destination, n) in [("orders", 3), ("payments", 2), ("refunds", 1)] {
        for name in [
            "messaging.client.consumed.messages",
            "messaging.process.duration",
        ] {
            assert_eq!(
                counts.get(&(name.to_owned(), destination.to_owned())),
                Some(&n),
                "{name} of {destination} in {counts:?}"
            );
        }
    }
}

/// The bucket boundaries both histograms export: `(duration, age)`.
fn boundaries(exporter: &InMemoryMetricExporter) -> (Vec<f64>, Vec<f64>) {
    let (mut duration, mut age) = (Vec::new(), Vec::new());
    for rm in exporter.get_finished_metrics().unwrap() {
        for sm in rm.scope_metrics() {
            for m in sm.metrics() {
                if let AggregatedMetrics::F64(MetricData::Histogram(h)) = m.data() {
                    let bounds: Vec<f64> = h
                        .data_points()
                        .next()
                        .map(|p| p.bounds().collect())
                        .unwrap_or_default();
                    match m.name() {
                        "messaging.process.duration" => duration = bounds,
                        "redrive.message.age" => age = bounds,
                        _ => {}
                    }
                }
            }
        }
    }
    (duration, age)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_histograms_have_buckets_fine_enough_for_a_fast_handler() {
    let exporter = InMemoryMetricExporter::default();
    let provider = SdkMeterProvider::builder()
        .with_periodic_exporter(exporter.clone())
        .build();
    let meter = provider.meter("test");
    let broker = MemoryBroker::new();
    broker
        .publish("orders", OutgoingMessage::new("x"))
        .await
        .unwrap();
    let handler = handler_fn(|_m: Message| async {
        tokio::time::sleep(Duration::from_millis(30)).await;
        Ok::<_, BoxError>(())
    });
    let service = ServiceBuilder::new()
        .layer(MetricsLayer::new(&meter))
        .service(handler);
    Worker::builder(broker.consumer("orders"))
        .service(service)
        .build()
        .unwrap()
        .run_until(tokio::time::sleep(Duration::from_millis(500)))
        .await;
    provider.force_flush().unwrap();
    let (duration, age) = boundaries(&exporter);
    // OpenTelemetry's messaging conventions: a 30 ms handler lands in (25 ms, 50 ms].
    assert_eq!(
        duration,
        redrive_middleware::metrics::DURATION_BUCKETS,
        "the process-duration buckets"
    );
    assert!(
        duration
            .windows(2)
            .any(|w| w[0] < 0.030 && 0.030 <= w[1] && w[1] / w[0] <= 2.0)
    );
    assert_eq!(
        age,
        redrive_middleware::metrics::AGE_BUCKETS,
        "the age buckets"
    );
    assert!(
        duration.contains(&1.0),
        "a bucket at 1 s, for the SLO alert"
    );
}

/// A Stack that builds its retry layer from settings counts retries into its metrics
/// layer, whichever of the two it is given first; a retry layer given ready-made keeps
/// its own hooks (the Stack does not count its retries twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stack_counts_the_retries_of_the_retry_layer_it_builds() {
    use redrive_middleware::Stack;

    // Runs one message that fails its first try (one retry, then success) through
    // `$stack`, and reads `redrive.messages.retried`.
    macro_rules! retried {
        ($stack:expr, $exporter:expr, $provider:expr) => {{
            let broker = MemoryBroker::new();
            broker
                .publish("orders", OutgoingMessage::new("retry-me"))
                .await
                .unwrap();
            let b = broker.clone();
            let report = Worker::builder(broker.consumer("orders"))
                .stack($stack)
                .handler(handler_fn(|m: Message| async move {
                    match m.extensions.get::<Try>().map_or(0, |t| t.number) {
                        1 => Err::<(), BoxError>("blip".into()),
                        _ => Ok(()),
                    }
                }))
                .build()
                .unwrap()
                .run_until(async move {
                    while b.depth("orders") + b.in_flight("orders") > 0 {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
                .await;
            assert_eq!(report.processed, 1, "{report:?}");
            $provider.force_flush().unwrap();
            read(&$exporter)
                .get("redrive.messages.retried")
                .copied()
                .unwrap_or(0)
        }};
    }

    let settings = || {
        RetryConfig::default()
            .with_backoff(Backoff::constant(Duration::from_millis(1)))
            .without_budget()
    };
    for order in ["metrics first", "retry first", "ready-made"] {
        let exporter = InMemoryMetricExporter::default();
        let provider = SdkMeterProvider::builder()
            .with_periodic_exporter(exporter.clone())
            .build();
        let metrics = MetricsLayer::new(&provider.meter("test"));
        let n = match order {
            "metrics first" => {
                retried!(
                    Stack::new().metrics(metrics).retry(settings()),
                    exporter,
                    provider
                )
            }
            "retry first" => {
                retried!(
                    Stack::new().retry(settings()).metrics(metrics),
                    exporter,
                    provider
                )
            }
            _ => {
                let counter = metrics.retry_counter();
                let retry = RetryLayer::new(settings()).unwrap().on_retry(counter);
                retried!(
                    Stack::new().retry(retry).metrics(metrics),
                    exporter,
                    provider
                )
            }
        };
        assert_eq!(n, 1, "{order}: one retry counted once");
    }
}

/// `redrive.circuit.state` per destination, as last exported.
fn circuit_states(exporter: &InMemoryMetricExporter) -> HashMap<String, i64> {
    let mut out = HashMap::new();
    for rm in exporter.get_finished_metrics().unwrap() {
        for sm in rm.scope_metrics() {
            for m in sm.metrics().filter(|m| m.name() == "redrive.circuit.state") {
                let AggregatedMetrics::I64(MetricData::Gauge(g)) = m.data() else {
                    panic!("redrive.circuit.state is not an i64 gauge: {:?}", m.data());
                };
                for p in g.data_points() {
                    let dest = p
                        .attributes()
                        .find(|kv| kv.key.as_str() == "messaging.destination.name")
                        .map(|kv| kv.value.to_string())
                        .expect("every series names its destination");
                    out.insert(dest, p.value());
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stack_reports_the_state_of_its_breaker() {
    use redrive_middleware::Stack;
    use redrive_middleware::circuit_breaker::{CircuitBreakerConfig, CircuitState};

    // Failures in a row open `$stack`'s breaker; the gauge reads 2 (open) for the
    // destination, 0 before.
    macro_rules! state_once_open {
        ($stack:expr, $exporter:expr, $provider:expr) => {{
            let stack = $stack;
            let handle = stack.circuit_handle();
            let broker = MemoryBroker::new();
            for i in 0..10 {
                broker
                    .publish("orders", OutgoingMessage::new(i.to_string()))
                    .await
                    .unwrap();
            }
            let worker = Worker::builder(broker.consumer("orders"))
                .stack(stack)
                .handler(handler_fn(|_: Message| async {
                    Err::<(), BoxError>("downstream down".into())
                }))
                .redelivery(Redelivery::constant(Duration::from_secs(60)))
                .build()
                .unwrap();
            $provider.force_flush().unwrap();
            let before = circuit_states(&$exporter);
            let h = handle.clone();
            worker
                .run_until(async move {
                    while h.state() != CircuitState::Open {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
                .await;
            $exporter.reset();
            $provider.force_flush().unwrap();
            (before, circuit_states(&$exporter))
        }};
    }

    for case in [
        "default breaker",
        "classifier set after metrics",
        "breaker given",
    ] {
        let exporter = InMemoryMetricExporter::default();
        let provider = SdkMeterProvider::builder()
            .with_periodic_exporter(exporter.clone())
            .build();
        let metrics = MetricsLayer::new(&provider.meter("test"));
        let (before, open) = match case {
            "default breaker" => {
                state_once_open!(Stack::new().metrics(metrics), exporter, provider)
            }
            "classifier set after metrics" => state_once_open!(
                // The classifier rebuilds the default breaker: the gauge follows.
                Stack::new()
                    .metrics(metrics)
                    .classifier(redrive_core::Classifier::new()),
                exporter,
                provider
            ),
            _ => state_once_open!(
                Stack::new()
                    .metrics(metrics)
                    .circuit_breaker(CircuitBreakerConfig::default().with_consecutive_failures(2)),
                exporter,
                provider
            ),
        };
        assert_eq!(
            before.get("orders"),
            None,
            "{case}: no destination seen yet: {before:?}"
        );
        assert_eq!(
            open.get("orders"),
            Some(&2),
            "{case}: the breaker is open: {open:?}"
        );
    }
}

/// The u64 gauge `name`'s points, by `redrive.worker.name`.
fn worker_gauge(exporter: &InMemoryMetricExporter, name: &str) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    for rm in exporter.get_finished_metrics().unwrap() {
        for sm in rm.scope_metrics() {
            for m in sm.metrics().filter(|m| m.name() == name) {
                let AggregatedMetrics::U64(MetricData::Gauge(g)) = m.data() else {
                    panic!("{name} is not a u64 gauge: {:?}", m.data());
                };
                for p in g.data_points() {
                    let worker = p
                        .attributes()
                        .find(|kv| kv.key.as_str() == "redrive.worker.name")
                        .map(|kv| kv.value.to_string())
                        .expect("every series names its Worker");
                    out.insert(worker, p.value());
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stack_reports_the_messages_its_worker_parks() {
    use redrive_core::OrderingMode;
    use redrive_middleware::Stack;

    let exporter = InMemoryMetricExporter::default();
    let provider = SdkMeterProvider::builder()
        .with_periodic_exporter(exporter.clone())
        .build();
    let broker = MemoryBroker::new();
    for key in ["a", "b", "c"] {
        broker
            .publish("orders", OutgoingMessage::new("fails").with_key(key))
            .await
            .unwrap();
    }
    // Per-key ordering parks failures; a breaker that does not open lets all three fail.
    let stack = Stack::new()
        .metrics(MetricsLayer::new(&provider.meter("test")))
        .circuit_breaker(
            redrive_middleware::circuit_breaker::CircuitBreakerConfig::default()
                .with_consecutive_failures(100),
        );
    let worker = Worker::builder(broker.consumer("orders"))
        .stack(stack)
        .handler(handler_fn(|_: Message| async {
            Err::<(), BoxError>("downstream down".into())
        }))
        .ordering(OrderingMode::PerKey)
        .redelivery(Redelivery::constant(Duration::from_secs(3600)))
        .name("billing")
        .build()
        .unwrap();
    let health = worker.health();
    let (p, e) = (provider.clone(), exporter.clone());
    worker
        .run_until(async move {
            while health.report().parked < 3 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            p.force_flush().unwrap();
            let parked = worker_gauge(&e, "redrive.worker.parked");
            assert_eq!(parked.get("billing"), Some(&3), "{parked:?}");
            let failures = worker_gauge(&e, "redrive.worker.receive_failures");
            assert_eq!(failures.get("billing"), Some(&0), "{failures:?}");
        })
        .await;
}

/// The u64 instrument `name`'s value for the rate limit's `key`, if it has a point.
#[cfg(all(feature = "rate-limit", feature = "redis"))]
fn rate_limit_figure(exporter: &InMemoryMetricExporter, name: &str, key: &str) -> Option<u64> {
    let mut found = None;
    for rm in exporter.get_finished_metrics().unwrap() {
        for sm in rm.scope_metrics() {
            for m in sm.metrics().filter(|m| m.name() == name) {
                let points: Vec<(String, u64)> = match m.data() {
                    AggregatedMetrics::U64(MetricData::Gauge(g)) => g
                        .data_points()
                        .map(|p| {
                            (
                                p.attributes().map(|kv| kv.value.to_string()).collect(),
                                p.value(),
                            )
                        })
                        .collect(),
                    AggregatedMetrics::U64(MetricData::Sum(s)) => s
                        .data_points()
                        .map(|p| {
                            (
                                p.attributes().map(|kv| kv.value.to_string()).collect(),
                                p.value(),
                            )
                        })
                        .collect(),
                    other => panic!("{name} is not a u64 gauge or counter: {other:?}"),
                };
                for (attrs, value) in points {
                    if attrs == key {
                        found = Some(value);
                    }
                }
            }
        }
    }
    found
}

#[cfg(all(feature = "rate-limit", feature = "redis"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stack_reports_a_cluster_rate_limit_running_without_redis() {
    use redrive_middleware::Stack;
    use redrive_middleware::rate_limit::{
        OnUnreachable, RedisRateLimitConfig, RedisRateLimitLayer,
    };

    let exporter = InMemoryMetricExporter::default();
    let provider = SdkMeterProvider::builder()
        .with_periodic_exporter(exporter.clone())
        .build();
    let broker = MemoryBroker::new();
    for i in 0..5 {
        broker
            .publish("orders", OutgoingMessage::new(i.to_string()))
            .await
            .unwrap();
    }
    // Nothing listens on port 1: the limit fails open, and says so.
    let limit = RedisRateLimitLayer::from_url(
        "redis://127.0.0.1:1",
        RedisRateLimitConfig::new(
            "orders-downstream",
            redrive_middleware::rate_limit::RateLimitConfig::per_second(100),
        )
        .with_on_unreachable(OnUnreachable::fail_open())
        .with_timeout(Duration::from_millis(200)),
    )
    .unwrap();
    let stack = Stack::new()
        .metrics(MetricsLayer::new(&provider.meter("test")))
        .rate_limit(limit.clone());
    let handled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = handled.clone();
    let worker = Worker::builder(broker.consumer("orders"))
        .stack(stack)
        .handler(handler_fn(move |_: Message| {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok::<(), BoxError>(())
            }
        }))
        .build()
        .unwrap();
    let (p, e, h, l) = (
        provider.clone(),
        exporter.clone(),
        handled.clone(),
        limit.clone(),
    );
    worker
        .run_until(async move {
            while h.load(std::sync::atomic::Ordering::SeqCst) < 5 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            p.force_flush().unwrap();
            let figure = |name| rate_limit_figure(&e, name, "orders-downstream");
            assert_eq!(figure("redrive.rate_limit.degraded"), Some(1));
            assert_eq!(figure("redrive.rate_limit.outages"), Some(1));
            // Each message handled took a permit, and the Worker readies the service
            // for the next one: one more may be taken.
            let permits = figure("redrive.rate_limit.degraded_permits");
            assert_eq!(permits, Some(l.degraded_permits()));
            assert!(permits.is_some_and(|n| (5..=6).contains(&n)), "{permits:?}");
            assert!(
                figure("redrive.rate_limit.redis_calls").is_some_and(|n| (1..=2).contains(&n)),
                "{:?}",
                figure("redrive.rate_limit.redis_calls")
            );
        })
        .await;
}
