//! The idempotency layer on the real local Redis (`REDIS_URL`, default
//! `redis://127.0.0.1:6379`). Fails, saying how to start Redis, when it is not running.
#![cfg(feature = "redis")]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use redrive_core::{BoxError, Headers, Message, Outcome};
use redrive_middleware::idempotency::{
    self, CommitFailed, IdempotencyConfig, IdempotencyLayer, IdempotencyStore, KeyReserved,
    Namespace, RedisStore, Reservation,
};
use tower::{Layer, Service, ServiceExt, service_fn};

fn url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

async fn store(prefix: &str) -> RedisStore {
    let url = url();
    let connect = async {
        let client = redis::Client::open(url.as_str())?;
        client.get_multiplexed_async_connection().await?;
        client.get_connection_manager().await
    };
    match tokio::time::timeout(Duration::from_secs(5), connect).await {
        Ok(Ok(conn)) => RedisStore::new(conn).with_prefix(prefix),
        Ok(Err(e)) => panic!(
            "cannot reach Redis at {url} ({e}); start it with `redis-server --daemonize yes` \
             or set REDIS_URL"
        ),
        Err(_) => panic!(
            "Redis at {url} did not answer within 5 s; start it with \
             `redis-server --daemonize yes` or set REDIS_URL"
        ),
    }
}

fn prefix(test: &str) -> String {
    format!("redrive-test:{test}:{:016x}:", fastrand::u64(..))
}

/// `key` as the layer stores it for a message from [`keyed`].
fn stored(key: &str) -> String {
    Namespace::Consumer.scope(&keyed(key), key).to_string()
}

fn keyed(key: &str) -> Message {
    let mut headers = Headers::new();
    headers.insert(idempotency::IDEMPOTENCY_KEY, key).unwrap();
    Message::new("charge").with_headers(headers)
}

/// A handler that takes `work` (real time) and counts its runs.
fn handler(
    runs: Arc<AtomicU32>,
    work: Duration,
) -> impl Service<Message, Response = Outcome, Error = BoxError, Future: Send> + Clone + Send + 'static
{
    service_fn(move |_msg: Message| {
        let runs = runs.clone();
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(work).await;
            Ok::<_, BoxError>(Outcome::Processed)
        }
    })
}

fn config(lease: Duration) -> IdempotencyConfig {
    IdempotencyConfig::default()
        .with_lease(lease)
        .with_ttl(Duration::from_secs(60))
}

#[tokio::test]
async fn two_consumers_racing_for_one_key_run_the_handler_once() {
    let prefix = prefix("race");
    // Two replicas, each with its own connection.
    let a = IdempotencyLayer::new(
        Arc::new(store(&prefix).await),
        config(Duration::from_secs(5)),
    )
    .unwrap();
    let b = IdempotencyLayer::new(
        Arc::new(store(&prefix).await),
        config(Duration::from_secs(5)),
    )
    .unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let work = Duration::from_millis(200);
    let (ra, rb) = tokio::join!(
        a.layer(handler(runs.clone(), work)).oneshot(keyed("k")),
        b.layer(handler(runs.clone(), work)).oneshot(keyed("k")),
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "both consumers ran the handler"
    );
    let err = match (ra, rb) {
        (Ok(Outcome::Processed), Err(e)) | (Err(e), Ok(Outcome::Processed)) => e,
        other => panic!("expected one success and one refusal, got {other:?}"),
    };
    let reserved = KeyReserved::find(&*err).expect("KeyReserved");
    assert!(reserved.remaining() > Duration::from_secs(4), "{reserved}");

    // The refused consumer's redelivery is skipped.
    let again = b
        .layer(handler(runs.clone(), work))
        .oneshot(keyed("k"))
        .await
        .unwrap();
    assert_eq!(again, Outcome::Deduplicated);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(b.stats().deduplicated, 1);
}

#[tokio::test]
async fn a_reservation_lost_mid_processing_cannot_be_committed_over_the_next_owner() {
    let prefix = prefix("lease");
    let lease = Duration::from_millis(300);
    let shared = Arc::new(store(&prefix).await);
    let slow = IdempotencyLayer::new(shared.clone(), config(lease)).unwrap();
    let fast = IdempotencyLayer::new(Arc::new(store(&prefix).await), config(lease)).unwrap();
    let runs = Arc::new(AtomicU32::new(0));

    let late = tokio::spawn(
        slow.layer(handler(runs.clone(), Duration::from_millis(700)))
            .oneshot(keyed("k")),
    );
    // While the call runs its key is held, renewed past the lease.
    tokio::time::sleep(lease * 2).await;
    let refused = fast
        .layer(handler(runs.clone(), Duration::ZERO))
        .oneshot(keyed("k"))
        .await
        .unwrap_err();
    assert!(KeyReserved::find(&*refused).is_some(), "{refused}");
    // The reservation lapses behind the slow call's back (renewing could not reach
    // the store, say); the next consumer takes the key.
    let mut conn = redis::Client::open(url().as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(format!("{prefix}{}", stored("k")))
        .query_async(&mut conn)
        .await
        .unwrap();
    let outcome = fast
        .layer(handler(runs.clone(), Duration::ZERO))
        .oneshot(keyed("k"))
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Processed);

    let err = late.await.unwrap().unwrap_err();
    let failed = err.downcast_ref::<CommitFailed>().expect("CommitFailed");
    assert!(failed.store_error().is_lease_lost(), "{err}");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "the duplicate window ran it twice"
    );
    // The next owner's commit stands.
    assert_eq!(
        shared.reserve(&stored("k"), lease).await.unwrap(),
        Reservation::Committed
    );
    assert_eq!(slow.stats().commit_failures, 1);
    assert_eq!(slow.stats().leases_lost, 1, "renewing found the key taken");
}
