//! The retry layer, driven by a scripted inner service on paused tokio time.
#![cfg(feature = "retry")]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redrive_core::{Capabilities, Message, Shutdown, classify};
use redrive_middleware::retry::{
    Backoff, Budget, Jitter, RetryConfig, RetryEvent, RetryLayer, Try,
};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

#[path = "support/mock.rs"]
mod mock;

use mock::Mock;

const MS: Duration = Duration::from_millis(1);

fn exact(min: Duration, max: Duration) -> Backoff {
    Backoff::exponential(min, max).with_jitter(Jitter::None)
}

fn layer(config: RetryConfig) -> RetryLayer {
    RetryLayer::new(config).expect("valid config")
}

#[tokio::test(start_paused = true)]
async fn retries_with_exact_exponential_delays_and_gives_the_last_error() {
    let mock = Mock::failing();
    let svc = layer(
        RetryConfig::default()
            .with_backoff(exact(100 * MS, 300 * MS))
            .with_max_tries(5)
            .without_budget(),
    )
    .layer(mock.clone());
    let t0 = Instant::now();
    let err = svc.oneshot(Message::new("x")).await.unwrap_err();
    assert_eq!(err.to_string(), "downstream unavailable");
    // Delays 100, 200, 300 (capped), 300 ms.
    assert_eq!(
        mock.offsets(t0),
        [Duration::ZERO, 100 * MS, 300 * MS, 600 * MS, 900 * MS]
    );
    assert_eq!(mock.tries(), [Some(1), Some(2), Some(3), Some(4), Some(5)]);
}

#[tokio::test(start_paused = true)]
async fn stops_at_the_first_success() {
    let mock = Mock::scripted(|i, _| if i < 2 { Err("flaky".into()) } else { Ok(()) });
    let svc = layer(
        RetryConfig::default()
            .with_backoff(exact(10 * MS, 10 * MS))
            .with_max_tries(5),
    )
    .layer(mock.clone());
    svc.oneshot(Message::new("x")).await.unwrap();
    assert_eq!(mock.count(), 3);
}

#[tokio::test(start_paused = true)]
async fn jittered_delays_stay_within_their_bounds() {
    for (jitter, low) in [(Jitter::Full, Duration::ZERO), (Jitter::Equal, 200 * MS)] {
        let mock = Mock::failing();
        let base = Backoff::exponential(400 * MS, 400 * MS).with_jitter(jitter);
        let svc = layer(
            RetryConfig::default()
                .with_backoff(base)
                .with_max_tries(2)
                .without_budget(),
        )
        .layer(mock.clone());
        let mut delays = Vec::new();
        for _ in 0..200 {
            let t0 = Instant::now();
            let before = mock.count();
            let _ = svc.clone().oneshot(Message::new("x")).await;
            let offsets = mock.offsets(t0);
            delays.push(offsets[before + 1]);
        }
        assert!(
            delays.iter().all(|d| (low..=400 * MS).contains(d)),
            "{jitter:?}: {delays:?}"
        );
        let spread = delays
            .iter()
            .max()
            .unwrap()
            .saturating_sub(*delays.iter().min().unwrap());
        assert!(
            spread > 50 * MS,
            "{jitter:?} did not spread the delays: {delays:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn permanent_errors_are_not_retried() {
    let mock = Mock::scripted(|_, _| Err(classify::permanent("bad schema")));
    let svc = layer(RetryConfig::default()).layer(mock.clone());
    let err = svc.oneshot(Message::new("x")).await.unwrap_err();
    assert_eq!(mock.count(), 1);
    assert!(
        err.is::<classify::Permanent>(),
        "the error goes up unchanged"
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_replaces_the_computed_delay() {
    let mock = Mock::scripted(|i, _| match i {
        0 => Err(classify::retry_after("throttled", 750 * MS)),
        _ => Ok(()),
    });
    // Window: 500 + 1000 ms of sleeps; the 750 ms hint fits.
    let svc =
        layer(RetryConfig::default().with_backoff(exact(500 * MS, 2000 * MS))).layer(mock.clone());
    let t0 = Instant::now();
    svc.oneshot(Message::new("x")).await.unwrap();
    assert_eq!(mock.offsets(t0), [Duration::ZERO, 750 * MS]);
}

#[tokio::test(start_paused = true)]
async fn hints_never_sleep_past_the_retry_window() {
    // Each try asks for 600 ms; the window is 500 + 1000 ms.
    let mock = Mock::scripted(|_, _| Err(classify::retry_after("throttled", 600 * MS)));
    let config = RetryConfig::default()
        .with_backoff(exact(500 * MS, 2000 * MS))
        .with_max_tries(3);
    assert_eq!(config.window(), 1500 * MS);
    let svc = layer(config).layer(mock.clone());
    let t0 = Instant::now();
    let err = svc.oneshot(Message::new("x")).await.unwrap_err();
    // 600 + 600 ms fit in 1500 ms.
    assert_eq!(mock.offsets(t0), [Duration::ZERO, 600 * MS, 1200 * MS]);
    assert!(err.is::<classify::RetryAfter>());

    let mock = Mock::scripted(|_, _| Err(classify::retry_after("throttled", 900 * MS)));
    let svc = layer(
        RetryConfig::default()
            .with_backoff(exact(500 * MS, 2000 * MS))
            .with_max_tries(3),
    )
    .layer(mock.clone());
    let t0 = Instant::now();
    let _ = svc.oneshot(Message::new("x")).await;
    // 900 ms fits in 1500; a second 900 ms would make 1800: left to the broker.
    assert_eq!(mock.offsets(t0), [Duration::ZERO, 900 * MS]);
}

#[tokio::test(start_paused = true)]
async fn a_hint_longer_than_the_backoff_max_goes_to_the_broker() {
    let mock =
        Mock::scripted(|_, _| Err(classify::retry_after("throttled", Duration::from_secs(60))));
    let svc =
        layer(RetryConfig::default().with_backoff(exact(10 * MS, 1000 * MS))).layer(mock.clone());
    let t0 = Instant::now();
    let err = svc.oneshot(Message::new("x")).await.unwrap_err();
    assert_eq!(mock.count(), 1);
    assert_eq!(t0.elapsed(), Duration::ZERO, "did not wait in process");
    assert!(err.is::<classify::RetryAfter>());
}

#[tokio::test(start_paused = true)]
async fn max_elapsed_stops_retries_that_would_start_too_late() {
    let mock = Mock::failing();
    let svc = layer(
        RetryConfig::default()
            .with_backoff(Backoff::constant(Duration::from_secs(1)))
            .with_max_tries(100)
            .with_max_elapsed(3500 * MS)
            .without_budget(),
    )
    .layer(mock.clone());
    let t0 = Instant::now();
    let _ = svc.oneshot(Message::new("x")).await;
    // Tries at 0, 1, 2 and 3 s; one at 4 s would start past 3.5 s.
    let secs: Vec<_> = mock.offsets(t0).iter().map(Duration::as_secs).collect();
    assert_eq!(secs, [0, 1, 2, 3]);
    assert_eq!(t0.elapsed(), Duration::from_secs(3));
}

#[tokio::test(start_paused = true)]
async fn the_budget_is_shared_by_clones_stops_retries_and_refills() {
    let mock = Mock::failing();
    let budget = Budget::default()
        .with_ratio(0.0)
        .with_min_per_second(1)
        .with_window(Duration::from_secs(2));
    let layer = layer(
        RetryConfig::default()
            .with_backoff(exact(10 * MS, 10 * MS))
            .with_max_tries(3)
            .with_budget(budget),
    );
    // Two services from one layer (two stacks), and a clone of one of them.
    let a = layer.layer(mock.clone());
    let b = layer.clone().layer(mock.clone());
    let c = b.clone();

    // The reserve is 1/s over 2 s: two retries.
    let _ = a.clone().oneshot(Message::new("1")).await;
    assert_eq!(mock.count(), 3, "first message: two retries");
    let _ = b.clone().oneshot(Message::new("2")).await;
    assert_eq!(
        mock.count(),
        4,
        "budget spent by the other service: no retry"
    );
    let _ = c.clone().oneshot(Message::new("3")).await;
    assert_eq!(mock.count(), 5, "and none for a clone");

    tokio::time::advance(Duration::from_secs(3)).await;
    let _ = c.oneshot(Message::new("4")).await;
    assert_eq!(mock.count(), 8, "the window moved on: the budget refilled");
}

#[tokio::test(start_paused = true)]
async fn during_an_outage_retries_add_at_most_the_ratio() {
    let mock = Mock::failing();
    let budget = Budget::default().with_ratio(0.5).with_min_per_second(0);
    let svc = layer(
        RetryConfig::default()
            .with_backoff(exact(MS, MS))
            .with_max_tries(3)
            .with_budget(budget),
    )
    .layer(mock.clone());
    for _ in 0..10 {
        let _ = svc.clone().oneshot(Message::new("x")).await;
    }
    // Without a budget: 30 calls. With it: 10 first tries and 5 retries.
    assert_eq!(mock.count(), 15);
}

#[tokio::test(start_paused = true)]
async fn no_retry_once_shutdown_has_begun() {
    let mock = Mock::failing();
    let svc = layer(RetryConfig::default()).layer(mock.clone());
    let (fire, shutdown) = Shutdown::channel();
    fire();
    let mut msg = Message::new("x");
    msg.extensions.insert(shutdown);
    let _ = svc.oneshot(msg).await;
    assert_eq!(mock.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn shutdown_cuts_a_backoff_sleep_short() {
    let mock = Mock::failing();
    let svc = layer(
        RetryConfig::default()
            .with_backoff(Backoff::constant(Duration::from_secs(20)))
            .with_max_elapsed(Duration::from_secs(60)),
    )
    .layer(mock.clone());
    let (fire, shutdown) = Shutdown::channel();
    let mut msg = Message::new("x");
    msg.extensions.insert(shutdown);
    let t0 = Instant::now();
    let call = tokio::spawn(svc.oneshot(msg));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!call.is_finished(), "still in its backoff sleep");
    fire();
    let err = call.await.unwrap().unwrap_err();
    assert_eq!(
        err.to_string(),
        "downstream unavailable",
        "the last error goes up"
    );
    assert_eq!(mock.count(), 1);
    assert_eq!(t0.elapsed(), Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn a_retry_asks_readiness_only_after_its_delay() {
    let mock = Mock::failing();
    let mut svc = layer(
        RetryConfig::default()
            .with_backoff(exact(100 * MS, 100 * MS))
            .with_max_tries(3)
            .without_budget(),
    )
    .layer(mock.clone());
    let t0 = Instant::now();
    let _ = svc.ready().await.unwrap().call(Message::new("x")).await;
    let readies: Vec<_> = mock.readies().iter().map(|t| *t - t0).collect();
    // Once by the caller before the first try, then once per retry, each after its sleep.
    assert_eq!(readies, [Duration::ZERO, 100 * MS, 200 * MS]);
}

#[tokio::test(start_paused = true)]
async fn on_retry_sees_each_retry() {
    let mock = Mock::failing();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let svc = layer(
        RetryConfig::default()
            .with_backoff(exact(100 * MS, 1000 * MS))
            .with_max_tries(3)
            .without_budget(),
    )
    .on_retry(move |e: &RetryEvent<'_>| {
        let seen_try = e.message.extensions.get::<Try>().map(|t| t.number);
        assert_eq!(
            seen_try,
            Some(e.try_number),
            "the event's message is the failed try's"
        );
        record
            .lock()
            .unwrap()
            .push((e.try_number, e.delay, e.error.to_string()));
    })
    .layer(mock);
    let _ = svc.oneshot(Message::new("x")).await;
    let err = "downstream unavailable".to_owned();
    assert_eq!(
        *seen.lock().unwrap(),
        [(1, 100 * MS, err.clone()), (2, 200 * MS, err)]
    );
}

#[test]
fn invalid_configs_are_rejected_with_what_to_change() {
    let cases = [
        (RetryConfig::default().with_max_tries(0), "set it to 1"),
        (
            RetryConfig::default().with_backoff(Backoff::default().with_multiplier(f64::NAN)),
            "multiplier is NaN",
        ),
        (
            RetryConfig::default().with_backoff(Backoff::default().with_multiplier(-1.0)),
            "at least 1.0",
        ),
        (
            RetryConfig::default()
                .with_backoff(Backoff::default().with_jitter(Jitter::Proportional(-0.5))),
            "jitter ratio is -0.5",
        ),
        (
            RetryConfig::default().with_backoff(Backoff::exponential(
                Duration::from_secs(2),
                Duration::from_secs(1),
            )),
            "below its min",
        ),
        (
            RetryConfig::default().with_max_elapsed(Duration::ZERO),
            "`max_elapsed` is 0",
        ),
        (
            RetryConfig::default().with_budget(Budget::default().with_ratio(f64::NAN)),
            "budget ratio",
        ),
    ];
    for (config, want) in cases {
        let err = RetryLayer::new(config).unwrap_err().to_string();
        assert!(err.contains(want), "{err:?} should contain {want:?}");
    }
}

#[test]
fn the_retry_window_must_fit_a_lease_that_cannot_be_extended() {
    // 5 tries: 1 + 2 + 4 + 4 s of sleeps.
    let config = RetryConfig::default()
        .with_backoff(exact(Duration::from_secs(1), Duration::from_secs(4)))
        .with_max_tries(5);
    assert_eq!(config.window(), Duration::from_secs(11));

    let short = Capabilities::new().with_lease(Some(Duration::from_secs(10)), false);
    let err = config.check(&short).unwrap_err().to_string();
    assert!(
        err.contains("cannot be extended") && err.contains("lower `max_elapsed`"),
        "{err}"
    );

    let long = Capabilities::new().with_lease(Some(Duration::from_secs(12)), false);
    assert!(config.check(&long).is_ok());
    let extendable = Capabilities::new().with_lease(Some(Duration::from_secs(10)), true);
    assert!(
        config.check(&extendable).is_ok(),
        "the Worker keeps an extendable lease"
    );
    assert!(config.check(&Capabilities::new()).is_ok(), "no lease");

    // max_elapsed bounds the window.
    let capped = config.with_max_elapsed(Duration::from_secs(5));
    assert_eq!(capped.window(), Duration::from_secs(5));
    assert!(capped.check(&short).is_ok());
}

#[test]
fn the_window_counts_the_largest_jittered_delays() {
    let decorrelated = RetryConfig::default()
        .with_backoff(
            Backoff::exponential(Duration::from_secs(1), Duration::from_secs(10))
                .with_multiplier(3.0)
                .with_jitter(Jitter::Decorrelated),
        )
        .with_max_tries(3)
        .with_max_elapsed(Duration::MAX);
    // Up to 3 s, then up to 9 s.
    assert_eq!(decorrelated.window(), Duration::from_secs(12));
}

#[test]
fn the_futures_are_send_so_a_worker_can_run_them() {
    fn assert_send<T: Send + 'static>(_: &T) {}
    let mut svc = layer(RetryConfig::default()).layer(Mock::failing());
    let future = svc.call(Message::new("x"));
    assert_send(&future);
    assert_send(&svc);
}
