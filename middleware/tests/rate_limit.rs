//! The rate limits, polled by hand on paused tokio time.
#![cfg(feature = "rate-limit")]

use std::future::{Ready, ready};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use redrive_core::{BoxError, Headers, Message};
use redrive_middleware::rate_limit::{KeyedRateLimitLayer, RateLimitConfig, RateLimitLayer};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

const MS: Duration = Duration::from_millis(1);
const TENANT: &str = "x-tenant";

#[derive(Default)]
struct Log {
    calls: Vec<(Duration, String)>,
    readies: Vec<Duration>,
}

/// Logs when each message (by payload) is called and when readiness is asked.
#[derive(Clone)]
struct Mock {
    t0: Instant,
    log: Arc<Mutex<Log>>,
}

impl Mock {
    fn new() -> Self {
        Mock {
            t0: Instant::now(),
            log: Arc::default(),
        }
    }

    fn calls(&self) -> Vec<(Duration, String)> {
        self.log.lock().unwrap().calls.clone()
    }

    fn call_times(&self, payload: &str) -> Vec<Duration> {
        let log = self.log.lock().unwrap();
        log.calls
            .iter()
            .filter(|(_, p)| p == payload)
            .map(|(t, _)| *t)
            .collect()
    }
}

impl Service<Message> for Mock {
    type Response = ();
    type Error = BoxError;
    type Future = Ready<Result<(), BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.log.lock().unwrap().readies.push(self.t0.elapsed());
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        let payload = String::from_utf8(msg.payload.to_vec()).unwrap();
        self.log
            .lock()
            .unwrap()
            .calls
            .push((self.t0.elapsed(), payload));
        ready(Ok(()))
    }
}

#[derive(Default)]
struct Counter(AtomicUsize);

impl Wake for Counter {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

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
    assert_eq!(count.0.load(Ordering::SeqCst), 0);
    assert!(svc.poll_ready(&mut cx).is_pending());
    tokio::time::advance(MS).await;
    assert_eq!(
        count.0.load(Ordering::SeqCst),
        1,
        "woken by the timer, once"
    );
    assert!(svc.poll_ready(&mut cx).is_ready());
    svc.call(Message::new("x")).await.unwrap();
    assert_eq!(
        mock.log.lock().unwrap().readies.len(),
        3,
        "the inner service is asked only with a permit"
    );
}

#[tokio::test(start_paused = true)]
async fn direct_spaces_calls_evenly_after_the_burst_across_clones() {
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
    let times: Vec<_> = mock.calls().into_iter().map(|(t, _)| t).collect();
    assert_eq!(
        times,
        [Duration::ZERO, Duration::ZERO, 100 * MS, 200 * MS, 300 * MS]
    );
}

#[tokio::test(start_paused = true)]
async fn keyed_limits_each_key_on_its_own() {
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
    let secs = |p| mock.call_times(p)[0].as_secs_f64();
    assert_eq!((secs("a1"), secs("b1"), secs("none")), (0.0, 0.0, 0.0));
    let mut a = [secs("a2"), secs("a3")];
    a.sort_by(f64::total_cmp);
    assert_eq!(a, [1.0, 2.0], "key a waits for its own permits");
    assert_eq!(secs("b2"), 1.0, "key b is not slowed by key a");
}

#[tokio::test(start_paused = true)]
async fn a_waiting_keyed_call_holds_no_readiness() {
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
    let readies_before = mock.log.lock().unwrap().readies.clone();
    assert_eq!(readies_before, [Duration::ZERO, Duration::ZERO]);
    waiting.await.unwrap();
    let log = mock.log.lock().unwrap();
    // The waiting call asked its own clone for readiness only once its wait was over.
    assert_eq!(
        log.readies,
        [Duration::ZERO, Duration::ZERO, Duration::from_secs(1)]
    );
    assert_eq!(log.calls.last().unwrap().0, Duration::from_secs(1));
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
