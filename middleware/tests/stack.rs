//! The Stack builder: canonical order whatever the call order, start-up checks, and the
//! whole stack under a Worker.
#![cfg(all(
    feature = "trace",
    feature = "metrics",
    feature = "dead-letter",
    feature = "idempotency",
    feature = "circuit-breaker",
    feature = "rate-limit",
    feature = "retry",
    feature = "timeout"
))]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use redrive_core::memory::{MemoryBroker, QueueConfig};
use redrive_core::{
    BoxError, Capabilities, Consumer, Message, OutgoingMessage, Publisher, Redelivery, Worker,
    classify, handler_fn,
};
use redrive_middleware::Stack;
use redrive_middleware::circuit_breaker::{
    CircuitBreakerConfig, CircuitBreakerLayer, CircuitState,
};
use redrive_middleware::dead_letter::{self, DeadLetterConfig, DeadLetterLayer};
use redrive_middleware::idempotency::{
    IDEMPOTENCY_KEY, IdempotencyConfig, IdempotencyLayer, MemoryStore,
};
use redrive_middleware::metrics::MetricsLayer;
use redrive_middleware::rate_limit::{RateLimitConfig, RateLimitLayer};
use redrive_middleware::retry::{Backoff, RetryConfig, RetryLayer, Try};
use redrive_middleware::timeout::TimeoutLayer;
use redrive_middleware::trace::TraceLayer;

fn retry(min: Duration, max: Duration) -> RetryLayer {
    RetryLayer::new(
        RetryConfig::default()
            .with_backoff(Backoff::exponential(min, max))
            .with_max_tries(3),
    )
    .unwrap()
}

#[test]
fn any_call_order_builds_the_canonical_order() {
    let broker = Arc::new(MemoryBroker::new());
    let stack = Stack::new()
        .timeout(TimeoutLayer::new(Duration::from_secs(5)).unwrap())
        .retry(retry(Duration::from_millis(10), Duration::from_millis(100)))
        .rate_limit(RateLimitLayer::new(RateLimitConfig::per_second(50)).unwrap())
        .circuit_breaker(CircuitBreakerLayer::new(CircuitBreakerConfig::default()).unwrap())
        .idempotency_layer(
            IdempotencyLayer::new(Arc::new(MemoryStore::new()), IdempotencyConfig::default())
                .unwrap(),
        )
        .dead_letter_layer(DeadLetterLayer::new(broker, DeadLetterConfig::default()).unwrap())
        .metrics(MetricsLayer::global())
        .trace(TraceLayer::new());
    assert_eq!(
        stack.describe(),
        "trace -> metrics -> dead_letter(max_attempts=5, to=<source>-dlq) -> \
         circuit_breaker(consecutive_failures=5, open_for=30s) -> \
         idempotency(lease=30s, ttl=86400s) -> rate_limit(50/1s) -> \
         retry(max_tries=3, window=30ms, budget) -> timeout(5s) -> handler"
    );
}

#[test]
fn a_new_stack_has_a_circuit_breaker_unless_told_otherwise() {
    assert_eq!(
        Stack::new().describe(),
        "circuit_breaker(consecutive_failures=5, open_for=30s) -> handler"
    );
    assert_eq!(Stack::new().without_circuit_breaker().describe(), "handler");
}

#[test]
fn check_rejects_a_retry_window_the_idempotency_lease_cannot_hold() {
    // Two retries after up to 5 s and 10 s: a 15 s window, against a 10 s lease.
    let idempotency = |lease| {
        IdempotencyLayer::new(
            Arc::new(MemoryStore::new()),
            IdempotencyConfig::default().with_lease(lease),
        )
        .unwrap()
    };
    let retries = retry(Duration::from_secs(5), Duration::from_secs(20));
    let short = Stack::new()
        .retry(retries.clone())
        .idempotency_layer(idempotency(Duration::from_secs(10)));
    let err = short.check(&Capabilities::new()).unwrap_err().to_string();
    assert!(err.starts_with("idempotency: "), "{err}");
    assert!(err.contains("with_lease"), "{err}");
    let long = Stack::new()
        .retry(retries)
        .idempotency_layer(idempotency(Duration::from_secs(60)));
    long.check(&Capabilities::new()).unwrap();
    // The defaults fit each other.
    Stack::new()
        .retry(RetryLayer::new(RetryConfig::default()).unwrap())
        .idempotency_layer(idempotency(IdempotencyConfig::default().lease()))
        .check(&Capabilities::new())
        .unwrap();
}

#[test]
fn check_rejects_a_retry_window_the_lease_cannot_hold() {
    // Two retries after up to 5 s and 10 s: a 15 s window.
    let stack = Stack::new().retry(retry(Duration::from_secs(5), Duration::from_secs(20)));
    let fixed_lease = Capabilities::new().with_lease(Some(Duration::from_secs(10)), false);
    let err = stack.check(&fixed_lease).unwrap_err().to_string();
    assert!(err.starts_with("retry: "), "{err}");
    assert!(err.contains("lease"), "{err}");
    // The Worker keeps an extendable lease, so the same window is fine there.
    let kept = Capabilities::new().with_lease(Some(Duration::from_secs(10)), true);
    stack.check(&kept).unwrap();
}

#[tokio::test]
async fn your_own_layers_run_around_the_handler_on_every_try() {
    use tower::{Service, ServiceExt};
    // Each layer appends its name to a header, so the handler sees the order.
    let tag = |name: &'static str| {
        tower::util::MapRequestLayer::new(move |mut m: Message| {
            let seen = m.headers.get_str("x-seen").unwrap_or("").to_owned();
            m.headers.insert("x-seen", format!("{seen}{name}")).unwrap();
            m
        })
    };
    let stack = Stack::new()
        .without_circuit_breaker()
        .around_handler(tag("a"))
        .retry(retry(Duration::from_millis(1), Duration::from_millis(2)))
        .around_handler(tag("b"));
    assert_eq!(
        stack.describe(),
        "retry(max_tries=3, window=3ms, budget) -> custom(2) -> handler"
    );
    let tries = Arc::new(std::sync::Mutex::new(Vec::new()));
    let t = tries.clone();
    let mut service = stack.service(handler_fn(move |m: Message| {
        let t = t.clone();
        async move {
            let mut tries = t.lock().unwrap();
            tries.push(m.headers.get_str("x-seen").unwrap_or("").to_owned());
            if tries.len() < 3 {
                Err::<(), BoxError>("blip".into())
            } else {
                Ok(())
            }
        }
    }));
    service
        .ready()
        .await
        .unwrap()
        .call(Message::new("x"))
        .await
        .unwrap();
    // Inside the retries (three tries, each through both layers), the first given
    // outermost.
    assert_eq!(*tries.lock().unwrap(), ["ab", "ab", "ab"]);
}

#[test]
fn every_layer_reports_a_bad_configuration_with_one_error_type() {
    let errors: [redrive_middleware::ConfigError; 4] = [
        RetryLayer::new(RetryConfig::default().with_max_tries(0)).unwrap_err(),
        TimeoutLayer::new(Duration::ZERO).unwrap_err(),
        RateLimitLayer::new(RateLimitConfig::per_second(0)).unwrap_err(),
        IdempotencyLayer::new(
            Arc::new(MemoryStore::new()),
            IdempotencyConfig::default().with_lease(Duration::ZERO),
        )
        .unwrap_err(),
    ];
    let layers: Vec<&str> = errors.iter().map(|e| e.layer()).collect();
    assert_eq!(layers, ["retry", "timeout", "rate limit", "idempotency"]);
    for e in &errors {
        assert!(
            e.to_string()
                .starts_with(&format!("invalid {} configuration: ", e.layer())),
            "{e}"
        );
        assert!(!e.message().is_empty());
    }
}

#[test]
fn the_worker_refuses_to_build_around_a_stack_that_fails_its_check() {
    let broker = MemoryBroker::new();
    // A 15 s retry window against a 10 s idempotency lease.
    let stack = Stack::new()
        .retry(retry(Duration::from_secs(5), Duration::from_secs(20)))
        .idempotency_layer(
            IdempotencyLayer::new(
                Arc::new(MemoryStore::new()),
                IdempotencyConfig::default().with_lease(Duration::from_secs(10)),
            )
            .unwrap(),
        );
    let handler = handler_fn(|_m: Message| async { Ok::<_, BoxError>(()) });
    let Err(err) = Worker::builder(broker.consumer("jobs"))
        .stack(stack)
        .handler(handler)
        .build()
    else {
        panic!("a Worker was built around a stack whose check fails");
    };
    let err = err.to_string();
    assert!(err.contains("idempotency: "), "{err}");
    assert!(err.contains("with_lease"), "{err}");

    // A stack that passes builds, with no separate check.
    let handler = handler_fn(|_m: Message| async { Ok::<_, BoxError>(()) });
    Worker::builder(broker.consumer("jobs"))
        .stack(Stack::new().retry(retry(Duration::from_millis(10), Duration::from_millis(100))))
        .handler(handler)
        .build()
        .unwrap();
}

#[test]
fn settings_given_to_the_stack_are_checked_when_the_worker_is_built() {
    let broker = MemoryBroker::new();
    // The Worker's build error, if any, around a handler that succeeds.
    macro_rules! build {
        ($stack:expr $(,)?) => {
            Worker::builder(broker.consumer("jobs"))
                .stack($stack)
                .handler(handler_fn(|_m: Message| async { Ok::<_, BoxError>(()) }))
                .build()
                .err()
                .map(|e| e.to_string())
        };
    }
    // Each bad setting is reported by its layer, with no `?` on the way.
    let err = build!(
        Stack::new()
            .retry(RetryConfig::default().with_max_tries(0))
            .timeout(Duration::from_secs(1))
    );
    assert!(
        err.as_deref().is_some_and(|e| e.contains("retry")),
        "{err:?}"
    );
    let err = build!(Stack::new().timeout(Duration::ZERO));
    assert!(
        err.as_deref().is_some_and(|e| e.contains("timeout")),
        "{err:?}"
    );
    let err = build!(
        Stack::new().circuit_breaker(CircuitBreakerConfig::default().with_open_for(Duration::ZERO)),
    );
    assert!(
        err.as_deref().is_some_and(|e| e.contains("circuit")),
        "{err:?}"
    );
    let err = build!(Stack::new().idempotency(
        MemoryStore::new(),
        IdempotencyConfig::default().with_lease(Duration::ZERO),
    ));
    assert!(
        err.as_deref().is_some_and(|e| e.contains("idempotency")),
        "{err:?}"
    );
    let err = build!(Stack::new().dead_letter(
        broker.clone(),
        DeadLetterConfig::default().with_max_attempts(0),
    ));
    assert!(
        err.as_deref().is_some_and(|e| e.contains("dead")),
        "{err:?}"
    );

    // Good settings build.
    let stack = Stack::new()
        .retry(RetryConfig::default())
        .timeout(Duration::from_secs(1))
        .circuit_breaker(CircuitBreakerConfig::default())
        .idempotency(MemoryStore::new(), IdempotencyConfig::default())
        .dead_letter(broker.clone(), DeadLetterConfig::default());
    assert_eq!(build!(stack), None);
}

#[test]
#[should_panic(expected = "settings that cannot work")]
fn a_stack_with_bad_settings_will_not_wrap_a_handler_unchecked() {
    let stack = Stack::new().timeout(Duration::ZERO);
    assert!(stack.check(&Capabilities::new()).is_err());
    let _ = stack.service(handler_fn(|_m: Message| async { Ok::<_, BoxError>(()) }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_classifier_classifies_for_every_layer_the_stack_builds() {
    #[derive(Debug, thiserror::Error)]
    #[error("invalid order")]
    struct Invalid;
    let broker = MemoryBroker::new();
    // One more than the breaker's default run of failures.
    for _ in 0..6 {
        broker
            .publish("orders", OutgoingMessage::new(b"bad".to_vec()))
            .await
            .unwrap();
    }
    let tries = Arc::new(AtomicU32::new(0));
    let handler = handler_fn({
        let tries = tries.clone();
        move |_m: Message| {
            tries.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), BoxError>(Box::new(Invalid)) }
        }
    });
    let classifier = redrive_core::Classifier::new().with_hook(|e| {
        e.is::<Invalid>()
            .then_some(redrive_core::Classification::PERMANENT)
    });
    let stack = Stack::new()
        .classifier(classifier)
        .retry(RetryConfig::default().with_max_tries(5))
        .dead_letter(broker.clone(), DeadLetterConfig::default());
    let breaker = stack.circuit_handle();
    let report = Worker::builder(broker.consumer("orders"))
        .stack(stack)
        .handler(handler)
        .build()
        .unwrap()
        .run_until(async {
            for _ in 0..200 {
                if broker.depth("orders-dlq") == 6 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    // Permanent for retry (one try each) and for the dead-letter layer (dead-lettered
    // on the first attempt, not the fifth)...
    assert_eq!(tries.load(Ordering::SeqCst), 6, "{report:?}");
    assert_eq!(broker.depth("orders-dlq"), 6, "{report:?}");
    // ...and for the default breaker, which counts no permanent error as a failure:
    // six in a row leave it closed.
    assert_eq!(breaker.state(), CircuitState::Closed);

    // Set after a layer took its settings, it is an error, not a silent half-measure.
    let late = Stack::new()
        .retry(RetryConfig::default())
        .classifier(redrive_core::Classifier::new());
    let err = late.check(&Capabilities::new()).unwrap_err().to_string();
    assert!(err.contains("call `classifier` first"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_stack_under_a_worker() {
    let broker = MemoryBroker::new();
    broker.declare(
        "jobs",
        QueueConfig::default().with_lease(Duration::from_secs(5)),
    );
    for body in ["ok", "blip", "poison", "ok"] {
        broker
            .publish("jobs", OutgoingMessage::new(body))
            .await
            .unwrap();
    }
    for _ in 0..2 {
        let twice = OutgoingMessage::new("ok")
            .with_header(IDEMPOTENCY_KEY, "job-9")
            .unwrap();
        broker.publish("jobs", twice).await.unwrap();
    }
    let runs = Arc::new(AtomicU32::new(0));
    let r = runs.clone();
    let handler = handler_fn(move |m: Message| {
        let runs = r.clone();
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            let try_number = m.extensions.get::<Try>().map(|t| t.number);
            match (&m.payload[..], try_number) {
                (b"poison", _) => Err(classify::permanent("cannot parse")),
                (b"blip", Some(1)) => Err::<(), BoxError>("blip".into()),
                _ => Ok(()),
            }
        }
    });
    let consumer = broker.consumer("jobs");
    let stack = Stack::new()
        .trace(TraceLayer::new())
        .metrics(MetricsLayer::global())
        .dead_letter_layer(
            DeadLetterLayer::new(Arc::new(broker.clone()), DeadLetterConfig::default()).unwrap(),
        )
        .idempotency_layer(
            IdempotencyLayer::new(Arc::new(MemoryStore::new()), IdempotencyConfig::default())
                .unwrap(),
        )
        .circuit_breaker(CircuitBreakerLayer::new(CircuitBreakerConfig::default()).unwrap())
        .rate_limit(RateLimitLayer::new(RateLimitConfig::per_second(1000)).unwrap())
        .retry(retry(Duration::from_millis(10), Duration::from_millis(50)))
        .timeout(TimeoutLayer::new(Duration::from_secs(2)).unwrap());
    stack.check(&consumer.capabilities()).unwrap();
    let b = broker.clone();
    // One at a time, so the two copies of job-9 do not race for the key (a race is
    // correct too: the loser is redelivered after the winner's lease; idempotency's own
    // tests cover it).
    let report = Worker::builder(consumer)
        .service(stack.service(handler))
        .concurrency(1)
        .redelivery(Redelivery::constant(Duration::from_millis(10)))
        .build()
        .unwrap()
        .run_until(async move {
            while b.depth("jobs") + b.in_flight("jobs") > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
    // blip succeeded on its retry inside one delivery: no nack.
    assert_eq!(
        (
            report.received,
            report.processed,
            report.dead_lettered,
            report.deduplicated,
            report.nacked
        ),
        (6, 4, 1, 1, 0),
        "{report:?}"
    );
    // ok, ok, blip twice, poison once (permanent: no retry), job-9 once.
    assert_eq!(runs.load(Ordering::SeqCst), 6);
    let dead = broker.messages("jobs-dlq");
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].headers.get_str(dead_letter::ERROR_KIND),
        Some("permanent")
    );
}
