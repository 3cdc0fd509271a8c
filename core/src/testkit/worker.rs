//! The scenarios that run Workers: retries, order, sharing, restart and shutdown.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::support::{Seen, distinct, next, publish_n, run_worker, wait_until};
use super::{Backend, QUIET_PERIOD};
use crate::{BoxError, Message, OrderingMode, Redelivery, Worker, handler_fn};

/// A message whose handler fails is run again by the Worker, as the next attempt:
/// through a nack where the broker can take one back, else parked by the Worker.
pub async fn worker_retries_failures<B: Backend>(b: &B) {
    let dest = b.destination().await;
    publish_n(&b.publisher(), &dest, 1, 0).await;
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new(Notify::new());
    let (a, d) = (attempts.clone(), done.clone());
    let handler = handler_fn(move |m: Message| {
        let (a, d) = (a.clone(), d.clone());
        async move {
            let mut seen = a.lock().unwrap();
            seen.push(m.attempt());
            if seen.len() == 1 {
                return Err::<(), BoxError>("fails the first time".into());
            }
            d.notify_one();
            Ok(())
        }
    });
    let report = Worker::builder(b.consumer(&dest).await)
        .service(handler)
        .redelivery(Redelivery::constant(Duration::from_millis(200)))
        .shutdown_timeout(Duration::from_secs(10))
        .build()
        .expect("worker config")
        .run_until(async move { done.notified().await })
        .await;
    let attempts = attempts.lock().unwrap().clone();
    assert_eq!(attempts.len(), 2, "handler calls: {attempts:?}");
    assert_eq!(attempts[1], attempts[0] + 1, "attempts: {attempts:?}");
    assert_eq!(report.processed, 1, "{report:?}");
    assert_eq!(report.nacked + report.parked, 1, "{report:?}");
}

/// With `PerKey` ordering and concurrency 16, each key's messages are handled in order.
pub async fn per_key_order<B: Backend>(b: &B) {
    let dest = b.destination().await;
    let n = 200;
    publish_n(&b.publisher(), &dest, n, 8).await;
    let seen: Seen = Arc::default();
    let stop = Arc::new(Notify::new());
    let worker = tokio::spawn(run_worker(
        b.consumer(&dest).await,
        OrderingMode::PerKey,
        16,
        seen.clone(),
        Duration::from_millis(3),
        stop.clone(),
    ));
    wait_until("per_key_order: all handled", || {
        seen.lock().unwrap().len() >= n
    })
    .await;
    stop.notify_one();
    worker.await.expect("worker");
    let seen = seen.lock().unwrap();
    let mut per_key: HashMap<&str, Vec<usize>> = HashMap::new();
    for (k, s) in seen.iter() {
        per_key.entry(k).or_default().push(*s);
    }
    assert_eq!(per_key.len(), 8, "keys seen");
    for (k, seqs) in per_key {
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        assert_eq!(seqs, sorted, "order of key {k}");
    }
}

/// Two Workers on one destination share the work and lose nothing.
pub async fn two_workers_share<B: Backend>(b: &B) {
    let dest = b.destination().await;
    let n = 200;
    let (seen_a, seen_b): (Seen, Seen) = (Arc::default(), Arc::default());
    let stop = Arc::new(Notify::new());
    let d = Duration::from_millis(5);
    let a = tokio::spawn(run_worker(
        b.consumer(&dest).await,
        OrderingMode::Unordered,
        4,
        seen_a.clone(),
        d,
        stop.clone(),
    ));
    let bw = tokio::spawn(run_worker(
        b.consumer(&dest).await,
        OrderingMode::Unordered,
        4,
        seen_b.clone(),
        d,
        stop.clone(),
    ));
    // Both consumers are up and sharing the destination before anything arrives.
    tokio::time::sleep(b.settle_time()).await;
    publish_n(&b.publisher(), &dest, n, 0).await;
    let all = |a: &Seen, b: &Seen| -> HashSet<usize> {
        let mut s: HashSet<usize> = a.lock().unwrap().iter().map(|x| x.1).collect();
        s.extend(b.lock().unwrap().iter().map(|x| x.1));
        s
    };
    wait_until("two_workers_share: all handled", || {
        all(&seen_a, &seen_b).len() >= n
    })
    .await;
    stop.notify_waiters();
    a.await.expect("worker a");
    bw.await.expect("worker b");
    let (na, nb) = (seen_a.lock().unwrap().len(), seen_b.lock().unwrap().len());
    assert!(na > 0 && nb > 0, "work not shared: {na} and {nb}");
    assert_eq!(all(&seen_a, &seen_b).len(), n);
}

/// A Worker stopped mid-stream and a new one started after it lose nothing
/// (duplicates allowed).
pub async fn restart_loses_nothing<B: Backend>(b: &B) {
    let dest = b.destination().await;
    let n = 100;
    publish_n(&b.publisher(), &dest, n, 0).await;
    let seen: Seen = Arc::default();
    let stop = Arc::new(Notify::new());
    let first = tokio::spawn(run_worker(
        b.consumer(&dest).await,
        OrderingMode::Unordered,
        8,
        seen.clone(),
        Duration::from_millis(5),
        stop.clone(),
    ));
    wait_until("restart: first worker handled some", || {
        seen.lock().unwrap().len() >= 30
    })
    .await;
    stop.notify_one();
    let report = first.await.expect("first worker");
    assert!(report.acked >= 30, "{report:?}");
    let stop = Arc::new(Notify::new());
    let second = tokio::spawn(run_worker(
        b.consumer(&dest).await,
        OrderingMode::Unordered,
        8,
        seen.clone(),
        Duration::ZERO,
        stop.clone(),
    ));
    wait_until("restart: all handled", || distinct(&seen) >= n).await;
    stop.notify_one();
    second.await.expect("second worker");
    assert_eq!(distinct(&seen), n);
}

/// Shutdown lets in-flight messages finish and acks them; none come back.
pub async fn shutdown_drains<B: Backend>(b: &B) {
    let dest = b.destination().await;
    publish_n(&b.publisher(), &dest, 5, 0).await;
    let started = Arc::new(AtomicUsize::new(0));
    let s = started.clone();
    let handler = handler_fn(move |_m: Message| {
        let s = s.clone();
        async move {
            s.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(500)).await;
            Ok::<_, BoxError>(())
        }
    });
    let stop = Arc::new(Notify::new());
    let stopper = stop.clone();
    let worker = Worker::builder(b.consumer(&dest).await)
        .service(handler)
        .concurrency(5)
        // Nothing fails here; a zero redelivery delay fits every broker's nack limit.
        .redelivery(Redelivery::constant(Duration::ZERO))
        .shutdown_timeout(Duration::from_secs(10))
        .build()
        .expect("worker");
    let run = tokio::spawn(worker.run_until(async move { stopper.notified().await }));
    wait_until("shutdown_drains: all started", || {
        started.load(Ordering::SeqCst) == 5
    })
    .await;
    stop.notify_one();
    let report = run.await.expect("worker");
    assert_eq!(report.acked, 5, "{report:?}");
    assert_eq!(report.in_flight_at_deadline, 0, "{report:?}");
    let mut c = b.consumer(&dest).await;
    assert!(
        next(&mut c, QUIET_PERIOD).await.is_none(),
        "a drained message came back"
    );
}
