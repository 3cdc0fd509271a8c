//! The per-try timeout, on paused tokio time.
#![cfg(feature = "timeout")]

use std::time::Duration;

use redrive_core::{BoxError, Classifier, Message, handler};
use redrive_middleware::timeout::{Elapsed, TimeoutLayer};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

fn sleeper(
    d: Duration,
) -> impl tower::Service<Message, Response = redrive_core::Outcome, Error = BoxError, Future: Send> + Clone
{
    handler::handler_fn(move |_m: Message| async move {
        tokio::time::sleep(d).await;
        Ok::<_, BoxError>(())
    })
}

#[tokio::test(start_paused = true)]
async fn a_slow_try_fails_with_a_transient_elapsed_at_its_deadline() {
    let svc = TimeoutLayer::new(Duration::from_secs(2))
        .unwrap()
        .layer(sleeper(Duration::from_secs(60)));
    let t0 = Instant::now();
    let err = svc.oneshot(Message::new("x")).await.unwrap_err();
    assert_eq!(t0.elapsed(), Duration::from_secs(2));
    let elapsed = err.downcast_ref::<Elapsed>().expect("an Elapsed error");
    assert_eq!(elapsed.after(), Duration::from_secs(2));
    assert!(err.to_string().contains("2s timeout"), "{err}");
    assert!(!Classifier::default().classify(&*err).is_permanent());
}

#[tokio::test(start_paused = true)]
async fn a_fast_try_passes_through_with_its_result() {
    let svc = TimeoutLayer::new(Duration::from_secs(2))
        .unwrap()
        .layer(sleeper(Duration::from_millis(1999)));
    assert!(svc.oneshot(Message::new("x")).await.is_ok());

    let failing =
        handler::handler_fn(|_m: Message| async { Err::<(), _>(std::io::Error::other("boom")) });
    let err = TimeoutLayer::default()
        .layer(failing)
        .oneshot(Message::new("x"))
        .await
        .unwrap_err();
    assert!(
        err.is::<std::io::Error>(),
        "the inner error goes up unchanged: {err}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_deadline_runs_from_the_first_wait_and_a_synchronous_try_sets_none() {
    let mut svc = TimeoutLayer::new(Duration::from_secs(2))
        .unwrap()
        .layer(sleeper(Duration::from_millis(1500)));
    let call = svc.ready().await.unwrap().call(Message::new("x"));
    // Queued behind other work for longer than the deadline before its first poll.
    tokio::time::advance(Duration::from_secs(5)).await;
    let t0 = Instant::now();
    assert!(call.await.is_ok(), "the try ran 1.5 s of its 2 s");
    assert_eq!(t0.elapsed(), Duration::from_millis(1500));

    // A try that completes on its first poll is never timed, however late it is polled.
    let mut sync = TimeoutLayer::new(Duration::from_secs(1))
        .unwrap()
        .layer(handler::handler_fn(|_m: Message| async {
            Ok::<_, BoxError>(())
        }));
    let call = sync.ready().await.unwrap().call(Message::new("x"));
    tokio::time::advance(Duration::from_secs(5)).await;
    assert!(call.await.is_ok());
}

#[test]
fn a_zero_timeout_is_rejected() {
    let err = TimeoutLayer::new(Duration::ZERO).unwrap_err();
    assert!(err.to_string().contains("every try would fail"), "{err}");
    assert_eq!(TimeoutLayer::default().timeout(), Duration::from_secs(30));
}

#[cfg(feature = "retry")]
#[tokio::test(start_paused = true)]
async fn inside_retry_each_try_gets_its_own_deadline() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use redrive_middleware::retry::{Backoff, RetryConfig, RetryLayer};

    let tries = Arc::new(AtomicU32::new(0));
    let seen = tries.clone();
    // Hangs on the first two tries, answers at once on the third.
    let inner = handler::handler_fn(move |_m: Message| {
        let n = seen.fetch_add(1, Ordering::SeqCst);
        async move {
            if n < 2 {
                std::future::pending::<()>().await;
            }
            Ok::<_, BoxError>(())
        }
    });
    let svc = tower::ServiceBuilder::new()
        .layer(
            RetryLayer::new(
                RetryConfig::default()
                    .with_backoff(Backoff::constant(Duration::from_millis(100)))
                    .with_max_tries(3),
            )
            .unwrap(),
        )
        .layer(TimeoutLayer::new(Duration::from_secs(1)).unwrap())
        .service(inner);
    let t0 = Instant::now();
    svc.oneshot(Message::new("x")).await.unwrap();
    assert_eq!(tries.load(Ordering::SeqCst), 3);
    assert_eq!(t0.elapsed(), Duration::from_millis(2200));
}
