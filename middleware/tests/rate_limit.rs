//! The rate limits, polled by hand on paused tokio time.
#![cfg(feature = "rate-limit")]

use std::sync::Arc;
use std::task::{Context, Waker};
use std::time::Duration;

use redrive_core::{Headers, Message};
use redrive_middleware::rate_limit::{KeyedRateLimitLayer, RateLimitConfig, RateLimitLayer};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

#[path = "support/mock.rs"]
mod mock;

use mock::{Counter, Mock};

const MS: Duration = Duration::from_millis(1);
const TENANT: &str = "x-tenant";

fn tenant(payload: &str, tenant: &str) -> Message {
    let mut headers = Headers::new();
    headers.insert(TENANT, tenant).unwrap();
    Message::new(payload.to_owned()).with_headers(headers)
}

#[tokio::test(start_paused = true)]
async fn direct_holds_poll_ready_back_after_the_burst_and_wakes_on_time() {
    let mock = Mock::new();
    let mut svc = RateLimitLayer::new(RateLimitConfig::per_second(2))
        .unwrap()
        .layer(mock.clone());
    let count = Arc::new(Counter::default());
    let waker = Waker::from(count.clone());
    let mut cx = Context::from_waker(&waker);

    for i in 0..2 {
        assert!(
            svc.poll_ready(&mut cx).is_ready(),
            "call {} is within the burst",
            i + 1
        );
        svc.call(Message::new("x")).await.unwrap();
    }
    assert!(svc.poll_ready(&mut cx).is_pending(), "the third waits");
    tokio::time::advance(499 * MS).await;
    assert_eq!(mock::wakes(&count), 0);
    assert!(svc.poll_ready(&mut cx).is_pending());
    tokio::time::advance(MS).await;
    assert_eq!(mock::wakes(&count), 1, "woken by the timer, once");
    assert!(svc.poll_ready(&mut cx).is_ready());
    svc.call(Message::new("x")).await.unwrap();
    assert_eq!(
        mock.readies().len(),
        3,
        "the inner service is asked only with a permit"
    );
}

#[tokio::test(start_paused = true)]
async fn direct_spaces_calls_evenly_after_the_burst_across_clones() {
    let t0 = Instant::now();
    let mock = Mock::new();
    let svc = RateLimitLayer::new(RateLimitConfig::new(10, Duration::from_secs(1)).with_burst(2))
        .unwrap()
        .layer(mock.clone());
    for i in 0..5 {
        svc.clone()
            .oneshot(Message::new(i.to_string()))
            .await
            .unwrap();
    }
    let times = mock.offsets(t0);
    assert_eq!(
        times,
        [Duration::ZERO, Duration::ZERO, 100 * MS, 200 * MS, 300 * MS]
    );
}

#[tokio::test(start_paused = true)]
async fn keyed_limits_each_key_on_its_own() {
    let t0 = Instant::now();
    let mock = Mock::new();
    let svc = KeyedRateLimitLayer::by_header(TENANT, RateLimitConfig::per_second(1))
        .unwrap()
        .layer(mock.clone());
    let mut calls = Vec::new();
    for (payload, key) in [
        ("a1", "a"),
        ("a2", "a"),
        ("a3", "a"),
        ("b1", "b"),
        ("b2", "b"),
    ] {
        calls.push(tokio::spawn(svc.clone().oneshot(tenant(payload, key))));
    }
    // A message with no tenant is not limited.
    calls.push(tokio::spawn(svc.clone().oneshot(Message::new("none"))));
    for call in calls {
        call.await.unwrap().unwrap();
    }
    let secs = |p| mock.offsets_of(p, t0)[0].as_secs_f64();
    assert_eq!((secs("a1"), secs("b1"), secs("none")), (0.0, 0.0, 0.0));
    let mut a = [secs("a2"), secs("a3")];
    a.sort_by(f64::total_cmp);
    assert_eq!(a, [1.0, 2.0], "key a waits for its own permits");
    assert_eq!(secs("b2"), 1.0, "key b is not slowed by key a");
}

#[tokio::test(start_paused = true)]
async fn a_waiting_keyed_call_holds_no_readiness() {
    let t0 = Instant::now();
    let mock = Mock::new();
    let mut svc = KeyedRateLimitLayer::by_message_key(RateLimitConfig::per_second(1))
        .unwrap()
        .layer(mock.clone());
    svc.ready()
        .await
        .unwrap()
        .call(Message::new("1").with_key("k"))
        .await
        .unwrap();
    let waiting = svc
        .ready()
        .await
        .unwrap()
        .call(Message::new("2").with_key("k"));
    let readies = || -> Vec<Duration> { mock.readies().iter().map(|t| *t - t0).collect() };
    assert_eq!(readies(), [Duration::ZERO, Duration::ZERO]);
    waiting.await.unwrap();
    // The waiting call asked its own clone for readiness only once its wait was over.
    assert_eq!(
        readies(),
        [Duration::ZERO, Duration::ZERO, Duration::from_secs(1)]
    );
    assert_eq!(
        mock.offsets(t0).last().copied(),
        Some(Duration::from_secs(1))
    );
}

#[test]
fn invalid_rates_are_rejected_with_what_to_change() {
    let cases = [
        (RateLimitConfig::per_second(0), "limit is 0"),
        (RateLimitConfig::per_second(5).with_burst(0), "burst is 0"),
        (
            RateLimitConfig::new(10, Duration::from_nanos(5)),
            "less than a nanosecond",
        ),
    ];
    for (config, want) in cases {
        let err = RateLimitLayer::new(config).unwrap_err().to_string();
        assert!(err.contains(want), "{err:?} should contain {want:?}");
        let err = KeyedRateLimitLayer::by_message_key(config)
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{err:?} should contain {want:?}");
    }
}
