//! The circuit breaker, polled by hand on paused tokio time.
#![cfg(feature = "circuit-breaker")]

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use redrive_core::{BoxError, Message};
use redrive_middleware::circuit_breaker::{
    CircuitBreaker, CircuitBreakerConfig, CircuitBreakerLayer, CircuitOpen, CircuitState,
    FailureRate, OnCircuitOpen, OpenReason,
};
use tower::{Layer, Service, ServiceExt};

#[path = "support/mock.rs"]
mod mock;

use mock::{Answer, Mock, counter, wakes};

fn poll_ready<S: Service<Message>>(svc: &mut S, waker: &Waker) -> Poll<Result<(), S::Error>> {
    svc.poll_ready(&mut Context::from_waker(waker))
}

async fn send(svc: &mut CircuitBreaker<Mock>) -> Result<(), BoxError> {
    svc.ready().await?.call(Message::new("x")).await
}

fn breaker(config: CircuitBreakerConfig, mock: &Mock) -> CircuitBreaker<Mock> {
    CircuitBreakerLayer::new(config)
        .unwrap()
        .layer(mock.clone())
}

const OPEN_FOR: Duration = Duration::from_secs(10);

/// Trips on three failures in a row; a failure goes up as it happens (no holding), so
/// the state machine shows in the callers' results.
fn three_in_a_row() -> CircuitBreakerConfig {
    holding_three_in_a_row().without_hold()
}

/// Trips on three failures in a row and holds what fails as it opens, as by default.
fn holding_three_in_a_row() -> CircuitBreakerConfig {
    CircuitBreakerConfig::default()
        .with_consecutive_failures(3)
        .with_open_for(OPEN_FOR)
}

#[tokio::test(start_paused = true)]
async fn opens_after_n_transient_failures_in_a_row_and_tells_the_hook() {
    let mock = Mock::new();
    let opened = Arc::new(Mutex::new(Vec::new()));
    let record = opened.clone();
    let mut svc = CircuitBreakerLayer::new(three_in_a_row())
        .unwrap()
        .on_circuit_open(move |e: &CircuitOpen| record.lock().unwrap().push(*e))
        .layer(mock.clone());
    mock.answer(Answer::Transient);
    for _ in 0..2 {
        assert!(send(&mut svc).await.is_err());
    }
    assert_eq!(svc.state(), CircuitState::Closed);
    assert!(opened.lock().unwrap().is_empty());
    assert!(send(&mut svc).await.is_err());
    assert_eq!(svc.state(), CircuitState::Open);
    let events = opened.lock().unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].reason, OpenReason::ConsecutiveFailures(3));
    assert_eq!(events[0].open_for, OPEN_FOR);
}

#[tokio::test(start_paused = true)]
async fn a_success_resets_the_run_of_failures() {
    let mock = Mock::new();
    let mut svc = breaker(three_in_a_row(), &mock);
    for answer in [
        Answer::Transient,
        Answer::Transient,
        Answer::Ok,
        Answer::Transient,
        Answer::Transient,
    ] {
        mock.answer(answer);
        let _ = send(&mut svc).await;
    }
    assert_eq!(svc.state(), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn permanent_errors_never_trip_it() {
    let mock = Mock::new();
    let mut svc = breaker(three_in_a_row(), &mock);
    mock.answer(Answer::Permanent);
    for _ in 0..50 {
        assert!(send(&mut svc).await.is_err());
    }
    assert_eq!(svc.state(), CircuitState::Closed);
    // Nor do they reset a run of transient failures: they say nothing about the downstream.
    for answer in [
        Answer::Transient,
        Answer::Transient,
        Answer::Permanent,
        Answer::Transient,
    ] {
        mock.answer(answer);
        let _ = send(&mut svc).await;
    }
    assert_eq!(svc.state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn while_open_poll_ready_is_pending_and_wakes_when_the_period_ends() {
    let mock = Mock::new();
    let mut svc = breaker(three_in_a_row(), &mock);
    mock.answer(Answer::Transient);
    for _ in 0..3 {
        let _ = send(&mut svc).await;
    }
    let (count, waker) = counter();
    assert!(poll_ready(&mut svc, &waker).is_pending());
    tokio::time::advance(OPEN_FOR - Duration::from_millis(1)).await;
    assert_eq!(wakes(&count), 0, "not woken before the period ends");
    assert!(poll_ready(&mut svc, &waker).is_pending());
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(wakes(&count), 1, "woken by the breaker's own timer");
    assert!(poll_ready(&mut svc, &waker).is_ready());
    assert_eq!(svc.state(), CircuitState::HalfOpen);
    assert_eq!(mock.count(), 3, "nothing called while open");
}

/// Trips `svc` and waits out the open period.
async fn trip_and_wait(svc: &mut CircuitBreaker<Mock>, mock: &Mock) {
    mock.answer(Answer::Transient);
    for _ in 0..3 {
        let _ = send(svc).await;
    }
    assert_eq!(svc.state(), CircuitState::Open);
    tokio::time::advance(OPEN_FOR).await;
}

#[tokio::test(start_paused = true)]
async fn half_open_lets_the_probes_through_and_closes_when_they_succeed() {
    let mock = Mock::new();
    let mut a = breaker(three_in_a_row().with_half_open_probes(2), &mock);
    let (mut b, mut c) = (a.clone(), a.clone());
    trip_and_wait(&mut a, &mock).await;
    mock.answer(Answer::Ok);

    let (count, waker) = counter();
    assert!(poll_ready(&mut a, &waker).is_ready(), "probe 1");
    assert!(poll_ready(&mut b, &waker).is_ready(), "probe 2");
    assert!(poll_ready(&mut c, &waker).is_pending(), "no third probe");
    assert_eq!(a.state(), CircuitState::HalfOpen);

    a.call(Message::new("1")).await.unwrap();
    assert_eq!(a.state(), CircuitState::HalfOpen, "one probe is not enough");
    assert!(poll_ready(&mut c, &waker).is_pending());
    let before = wakes(&count);
    b.call(Message::new("2")).await.unwrap();
    assert_eq!(a.state(), CircuitState::Closed);
    assert!(wakes(&count) > before, "the waiting caller is woken");
    assert!(poll_ready(&mut c, &waker).is_ready());
}

#[tokio::test(start_paused = true)]
async fn a_failed_probe_opens_it_again() {
    let mock = Mock::new();
    let mut svc = breaker(three_in_a_row(), &mock);
    trip_and_wait(&mut svc, &mock).await;
    assert!(send(&mut svc).await.is_err(), "the probe fails");
    assert_eq!(svc.state(), CircuitState::Open);
    let (_, waker) = counter();
    assert!(poll_ready(&mut svc, &waker).is_pending());
    tokio::time::advance(OPEN_FOR).await;
    mock.answer(Answer::Ok);
    send(&mut svc).await.unwrap();
    assert_eq!(svc.state(), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_or_permanent_probe_gives_its_slot_back() {
    let mock = Mock::new();
    let mut a = breaker(three_in_a_row(), &mock);
    let mut b = a.clone();
    trip_and_wait(&mut a, &mock).await;
    let (_, waker) = counter();

    // A probe slot taken by poll_ready, then dropped with its service.
    let mut probe = a.clone();
    assert!(poll_ready(&mut probe, &waker).is_ready());
    assert!(poll_ready(&mut b, &waker).is_pending());
    drop(probe);
    // A probe whose call future is dropped unfinished.
    assert!(poll_ready(&mut b, &waker).is_ready());
    drop(b.call(Message::new("x")));
    // A probe that ends with a permanent error.
    mock.answer(Answer::Permanent);
    assert!(send(&mut a).await.is_err());
    assert_eq!(a.state(), CircuitState::HalfOpen);
    // The slot is still there for a real probe.
    mock.answer(Answer::Ok);
    send(&mut a).await.unwrap();
    assert_eq!(a.state(), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn trips_on_a_failure_rate_over_the_window() {
    let mock = Mock::new();
    let reasons = Arc::new(Mutex::new(Vec::new()));
    let record = reasons.clone();
    let config = CircuitBreakerConfig::default()
        .without_hold()
        .without_consecutive_failures()
        .with_failure_rate(
            FailureRate::new(0.5)
                .with_min_calls(6)
                .with_window(Duration::from_secs(10)),
        );
    let mut svc = CircuitBreakerLayer::new(config)
        .unwrap()
        .on_circuit_open(move |e: &CircuitOpen| record.lock().unwrap().push(e.reason))
        .layer(mock.clone());
    // 2 of 5 failed, and too few calls for the rate to count anyway.
    for answer in [
        Answer::Transient,
        Answer::Ok,
        Answer::Transient,
        Answer::Ok,
        Answer::Ok,
    ] {
        mock.answer(answer);
        let _ = send(&mut svc).await;
        assert_eq!(svc.state(), CircuitState::Closed);
    }
    mock.answer(Answer::Transient);
    let _ = send(&mut svc).await;
    assert_eq!(svc.state(), CircuitState::Open, "3 of 6 calls failed");
    assert_eq!(
        *reasons.lock().unwrap(),
        [OpenReason::FailureRate {
            rate: 0.5,
            calls: 6
        }]
    );
}

#[tokio::test(start_paused = true)]
async fn old_calls_leave_the_window() {
    let mock = Mock::new();
    let config = CircuitBreakerConfig::default()
        .without_hold()
        .without_consecutive_failures()
        .with_failure_rate(
            FailureRate::new(0.5)
                .with_min_calls(4)
                .with_window(Duration::from_secs(10)),
        );
    let mut svc = breaker(config, &mock);
    mock.answer(Answer::Transient);
    for _ in 0..3 {
        let _ = send(&mut svc).await;
    }
    // Those three failures age out; then one failure among four calls is 25 %.
    tokio::time::advance(Duration::from_secs(11)).await;
    for answer in [Answer::Ok, Answer::Ok, Answer::Ok, Answer::Transient] {
        mock.answer(answer);
        let _ = send(&mut svc).await;
    }
    assert_eq!(svc.state(), CircuitState::Closed);
    // Two more failures: 3 of 6.
    mock.answer(Answer::Transient);
    let _ = send(&mut svc).await;
    assert_eq!(svc.state(), CircuitState::Closed, "2 of 5 calls failed");
    let _ = send(&mut svc).await;
    assert_eq!(svc.state(), CircuitState::Open, "3 of 6 calls failed");
}

#[tokio::test(start_paused = true)]
async fn state_changes_reach_the_hook_and_the_handle() {
    #[derive(Clone, Default)]
    struct Changes(Arc<Mutex<Vec<(CircuitState, CircuitState)>>>);
    impl OnCircuitOpen for Changes {
        fn on_circuit_open(&self, _: &CircuitOpen) {}
        fn on_state_change(&self, from: CircuitState, to: CircuitState) {
            self.0.lock().unwrap().push((from, to));
        }
    }
    let changes = Changes::default();
    let mock = Mock::new();
    let layer = CircuitBreakerLayer::new(three_in_a_row())
        .unwrap()
        .on_circuit_open(changes.clone());
    let handle = layer.handle();
    let mut svc = layer.layer(mock.clone());
    trip_and_wait(&mut svc, &mock).await;
    assert_eq!(
        handle.state(),
        CircuitState::HalfOpen,
        "period over: the next caller probes"
    );
    mock.answer(Answer::Ok);
    send(&mut svc).await.unwrap();
    assert_eq!(handle.state(), CircuitState::Closed);
    use CircuitState::*;
    assert_eq!(
        *changes.0.lock().unwrap(),
        [(Closed, Open), (Open, HalfOpen), (HalfOpen, Closed)]
    );
}

#[test]
fn invalid_configs_are_rejected_with_what_to_change() {
    let cases = [
        (
            CircuitBreakerConfig::default().with_consecutive_failures(0),
            "set it to 1",
        ),
        (
            CircuitBreakerConfig::default().with_failure_rate(FailureRate::new(f64::NAN)),
            "threshold is NaN",
        ),
        (
            CircuitBreakerConfig::default().with_failure_rate(FailureRate::new(1.5)),
            "at most 1.0",
        ),
        (
            CircuitBreakerConfig::default()
                .with_failure_rate(FailureRate::new(0.5).with_min_calls(0)),
            "`min_calls` is 0",
        ),
        (
            CircuitBreakerConfig::default().without_consecutive_failures(),
            "nothing can trip",
        ),
        (
            CircuitBreakerConfig::default().with_open_for(Duration::ZERO),
            "`open_for` is 0",
        ),
        (
            CircuitBreakerConfig::default().with_half_open_probes(0),
            "never close",
        ),
    ];
    for (config, want) in cases {
        let err = CircuitBreakerLayer::new(config).unwrap_err().to_string();
        assert!(err.contains(want), "{err:?} should contain {want:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn an_open_breaker_pauses_a_running_workers_intake() {
    use redrive_core::memory::MemoryBroker;
    use redrive_core::{OutgoingMessage, Publisher, Redelivery, Worker, handler};
    use tokio::time::Instant;

    let broker = MemoryBroker::new();
    for i in 0..5 {
        broker
            .publish("orders", OutgoingMessage::new(format!("{i}")))
            .await
            .unwrap();
    }
    let t0 = Instant::now();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let seen = calls.clone();
    // The downstream is down for the first three calls.
    let handler = handler::handler_fn(move |_m: Message| {
        let mut calls = seen.lock().unwrap();
        calls.push(t0.elapsed());
        let failing = calls.len() <= 3;
        async move {
            if failing {
                Err::<(), BoxError>("connection refused".into())
            } else {
                Ok(())
            }
        }
    });
    let layer = CircuitBreakerLayer::new(holding_three_in_a_row()).unwrap();
    let handle = layer.handle();
    let worker = Worker::builder(broker.consumer("orders"))
        .service(layer.layer(handler))
        .concurrency(1)
        .redelivery(Redelivery::constant(Duration::ZERO))
        .build()
        .unwrap();
    let run = tokio::spawn(worker.run_until(tokio::time::sleep(Duration::from_secs(30))));

    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(handle.state(), CircuitState::Open);
    assert_eq!(calls.lock().unwrap().len(), 3, "no intake while open");
    // The failure that tripped the breaker is held, unsettled; the rest wait in the
    // broker.
    assert_eq!(handle.held(), 1);
    assert_eq!(broker.depth("orders"), 4, "the messages wait in the broker");

    let report = run.await.unwrap();
    assert_eq!(report.acked, 5);
    assert_eq!(
        report.nacked, 2,
        "the two failures before the trip were nacked"
    );
    assert_eq!(handle.held(), 0);
    assert_eq!(handle.state(), CircuitState::Closed);
    let calls = calls.lock().unwrap();
    assert!(
        calls[..3].iter().all(|t| *t < Duration::from_secs(1)),
        "{calls:?}"
    );
    assert!(calls[3..].iter().all(|t| *t >= OPEN_FOR), "{calls:?}");
}

#[tokio::test(start_paused = true)]
async fn results_of_calls_admitted_before_a_change_do_not_count() {
    let inner = tower::service_fn(|msg: Message| async move {
        match &msg.payload[..] {
            b"slow" => {
                tokio::time::sleep(Duration::from_secs(15)).await;
                Err::<(), BoxError>("late failure".into())
            }
            b"fail" => Err("connection refused".into()),
            _ => Ok(()),
        }
    });
    let mut svc = CircuitBreakerLayer::new(three_in_a_row())
        .unwrap()
        .layer(inner);
    // Admitted while closed; fails 15 s later.
    let mut slow = svc.clone();
    let late = tokio::spawn(slow.ready().await.unwrap().call(Message::new("slow")));
    for _ in 0..3 {
        let _ = svc.ready().await.unwrap().call(Message::new("fail")).await;
    }
    assert_eq!(svc.state(), CircuitState::Open);
    tokio::time::advance(OPEN_FOR).await;
    svc.ready().await.unwrap(); // takes the probe slot
    assert_eq!(svc.state(), CircuitState::HalfOpen);
    assert!(late.await.unwrap().is_err());
    assert_eq!(
        svc.state(),
        CircuitState::HalfOpen,
        "the late failure is not a probe"
    );
    svc.call(Message::new("ok")).await.unwrap();
    assert_eq!(svc.state(), CircuitState::Closed);
}

/// A Worker on the in-memory broker, fed `messages` evenly until 10 s after the outage,
/// whose handler's downstream is down from `down.0` to `down.1` (seconds from the
/// start), behind a dead-letter layer (5 attempts) and `breaker`; returns the handler's
/// calls, what reached the DLQ, and the Worker's report.
#[cfg(feature = "dead-letter")]
mod outage {
    use super::*;
    use redrive_core::memory::{MemoryBroker, QueueConfig};
    use redrive_core::{OutgoingMessage, Publisher, Redelivery, Report, Worker, handler};
    use redrive_middleware::Stack;
    use redrive_middleware::circuit_breaker::CircuitHandle;
    use redrive_middleware::dead_letter::{DeadLetterConfig, DeadLetterLayer};
    use tokio::time::Instant;
    use tower::util::BoxCloneService;

    pub(super) struct Run {
        pub(super) calls: Vec<(Duration, String)>,
        pub(super) dead_lettered: usize,
        pub(super) report: Report,
        pub(super) held_during: u64,
    }

    pub(super) async fn run(
        messages: usize,
        down: (u64, u64),
        breaker: Option<CircuitBreakerConfig>,
    ) -> Run {
        let broker = MemoryBroker::new();
        broker.declare("orders", QueueConfig::default());
        // A steady stream from before the outage to after it.
        let period = Duration::from_secs(down.1 + 10) / u32::try_from(messages).unwrap();
        let producer = broker.clone();
        tokio::spawn(async move {
            for i in 0..messages {
                producer
                    .publish("orders", OutgoingMessage::new(format!("m{i}")))
                    .await
                    .unwrap();
                tokio::time::sleep(period).await;
            }
        });
        let t0 = Instant::now();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let seen = calls.clone();
        let handler = handler::handler_fn(move |m: Message| {
            let at = t0.elapsed();
            seen.lock()
                .unwrap()
                .push((at, String::from_utf8_lossy(&m.payload).into_owned()));
            let failing = at >= Duration::from_secs(down.0) && at < Duration::from_secs(down.1);
            async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if failing {
                    Err::<(), BoxError>("downstream: 503 service unavailable".into())
                } else {
                    Ok(())
                }
            }
        });
        let dead_letter = DeadLetterLayer::new(
            Arc::new(broker.clone()),
            DeadLetterConfig::default().with_max_attempts(5),
        )
        .unwrap();
        let stack = Stack::new().dead_letter_layer(dead_letter);
        let (service, handle) = match breaker {
            Some(config) => {
                let layer = CircuitBreakerLayer::new(config).unwrap();
                let handle = layer.handle();
                let service = stack.circuit_breaker(layer).service(handler);
                (BoxCloneService::new(service), Some(handle))
            }
            None => {
                let service = stack.without_circuit_breaker().service(handler);
                (BoxCloneService::new(service), None)
            }
        };
        let worker = Worker::builder(broker.consumer("orders"))
            .service(service)
            .concurrency(4)
            // The Worker's default redelivery: 1 s doubling.
            .redelivery(Redelivery::default())
            .build()
            .unwrap();
        let run =
            tokio::spawn(worker.run_until(tokio::time::sleep(Duration::from_secs(down.1 + 120))));
        tokio::time::sleep(Duration::from_secs((down.0 + down.1) / 2)).await;
        let held_during = handle.as_ref().map_or(0, CircuitHandle::held);
        let report = run.await.unwrap();
        let calls = calls.lock().unwrap().clone();
        Run {
            calls,
            dead_lettered: broker.depth("orders-dlq"),
            report,
            held_during,
        }
    }
}

#[cfg(feature = "dead-letter")]
#[tokio::test(start_paused = true)]
async fn without_a_breaker_a_downstream_outage_dead_letters_what_it_meets() {
    let run = outage::run(140, (10, 70), None).await;
    assert!(
        run.dead_lettered > 0,
        "the outage sent {} to the DLQ",
        run.dead_lettered
    );
}

#[cfg(feature = "dead-letter")]
#[tokio::test(start_paused = true)]
async fn a_downstream_outage_of_a_minute_sends_nothing_to_the_dlq_and_pauses_intake() {
    let run = outage::run(140, (10, 70), Some(CircuitBreakerConfig::default())).await;
    assert_eq!(run.dead_lettered, 0);
    assert_eq!(run.report.acked, 140);
    // Every message succeeded exactly once.
    let mut ok: Vec<&str> = run
        .calls
        .iter()
        .filter(|(at, _)| *at < Duration::from_secs(10) || *at >= Duration::from_secs(70))
        .map(|(_, m)| m.as_str())
        .collect();
    ok.sort_unstable();
    let succeeded = ok.len();
    ok.dedup();
    assert_eq!((ok.len(), succeeded), (140, 140));
    // Intake paused: during the outage only the calls that tripped the breaker and one
    // probe per open period ran.
    let during = run
        .calls
        .iter()
        .filter(|(at, _)| *at >= Duration::from_secs(10) && *at < Duration::from_secs(70))
        .count();
    assert!(during <= 12, "{during} calls during the outage");
    assert!(
        run.held_during >= 1,
        "the failures that tripped it were held"
    );
}

#[cfg(feature = "dead-letter")]
#[tokio::test(start_paused = true)]
async fn failed_probes_use_no_delivery_attempt() {
    // A 1 s open period against a 30 s outage: about thirty failed probes, each of
    // which used to cost its message a delivery attempt.
    let config = CircuitBreakerConfig::default().with_open_for(Duration::from_secs(1));
    let run = outage::run(40, (2, 32), Some(config)).await;
    assert_eq!(run.dead_lettered, 0);
    assert_eq!(run.report.acked, 40);
    let probes = run
        .calls
        .iter()
        .filter(|(at, _)| *at >= Duration::from_secs(3) && *at < Duration::from_secs(32))
        .count();
    assert!(probes >= 20, "{probes} probes");
}

#[cfg(feature = "dead-letter")]
#[tokio::test(start_paused = true)]
async fn a_held_message_goes_back_with_its_error_after_max_hold() {
    let config = CircuitBreakerConfig::default().with_max_hold(Duration::from_secs(20));
    let run = outage::run(20, (2, 400), Some(config)).await;
    // Held for 20 s at a time, each hold costs one attempt: the outage outlasts five.
    assert!(run.dead_lettered > 0);
}

/// A message fails as the breaker opens and is held. When the open period ends, an
/// idle caller (the Worker's intake, ready for a delivery that may never come) must not
/// take the probe slot first and keep it: the held message is the probe.
#[tokio::test(start_paused = true)]
async fn a_held_message_is_the_probe_before_an_idle_caller() {
    let mock = Mock::new();
    let mut svc = breaker(
        CircuitBreakerConfig::default()
            .with_consecutive_failures(1)
            .with_open_for(OPEN_FOR),
        &mock,
    );
    let handle = svc.handle();
    let mut intake = svc.clone();
    mock.answer(Answer::Transient);
    let held = tokio::spawn(async move { send(&mut svc).await });
    // The call fails, the breaker opens, the message is held.
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(handle.held(), 1);
    mock.answer(Answer::Ok);
    // The open period ends; the idle caller asks before the held message runs.
    tokio::time::advance(OPEN_FOR).await;
    let (_, waker) = counter();
    let intake_ready = poll_ready(&mut intake, &waker);
    // The held message runs as the probe, succeeds, and closes the breaker.
    let result = tokio::time::timeout(Duration::from_secs(60), held)
        .await
        .expect("the held message never ran again: an idle caller kept the probe slot")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(handle.held(), 0);
    assert_eq!(handle.state(), CircuitState::Closed);
    assert!(
        intake_ready.is_pending(),
        "the idle caller took the probe slot ahead of the held message"
    );
    assert!(poll_ready(&mut intake, &waker).is_ready());
}
