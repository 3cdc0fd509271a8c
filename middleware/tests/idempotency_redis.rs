//! The idempotency layer on the real local Redis (`REDIS_URL`, default
//! `redis://127.0.0.1:6379`). Fails, saying how to start Redis, when it is not running.
#![cfg(feature = "redis")]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use redrive_core::{BoxError, Headers, Message, Outcome};
use redrive_middleware::idempotency::{
    self, IdempotencyConfig, IdempotencyLayer, IdempotencyStore, KeyReserved, Namespace,
    RedisStore, Reservation, testkit,
};
use tower::{Layer, Service, ServiceExt, service_fn};

#[path = "support/services.rs"]
mod services;
#[path = "support/store_load.rs"]
mod store_load;

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
async fn the_store_keeps_the_store_contract() {
    let store = store(&prefix("contract")).await;
    // A lease the checks renew at half its length: 1 s holds through the scheduling
    // stalls of a busy 2-core machine, where 300 ms was seen to lapse.
    testkit::run_all(&store, Duration::from_secs(1)).await;
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

    // The late owner's handler succeeded: its message is acked, its commit counted as
    // failed; the next owner's commit is not overwritten.
    assert_eq!(late.await.unwrap().unwrap(), Outcome::Processed);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_recovers_from_a_redis_restart_under_load() {
    let mut redis = tokio::task::block_in_place(services::PrivateRedis::new);
    let store = Arc::new(RedisStore::connect(&redis.url()).await.unwrap());

    let load = store_load::Load::start(store.clone(), 8);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stopping = load.now();
    tokio::task::block_in_place(|| redis.stop());
    let down = load.now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let restarting = load.now();
    tokio::task::block_in_place(|| redis.start());
    let up = load.now();
    let recovered = load.first_success_after(up, store_load::RECOVERY).await;
    if recovered.is_some() {
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let ops = load.finish().await;
    let outage = store_load::Outage {
        stopping,
        down,
        restarting,
        up,
        recovered,
    };
    store_load::check(&ops, &outage, "Redis restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operation_on_a_server_that_does_not_answer_fails_within_the_timeout() {
    let mut redis = tokio::task::block_in_place(services::PrivateRedis::new);
    let store = RedisStore::connect(&redis.url())
        .await
        .unwrap()
        .with_timeout(Duration::from_millis(500));
    let lease = Duration::from_secs(5);
    assert!(matches!(
        store.reserve("before", lease).await.unwrap(),
        Reservation::Fresh(_)
    ));
    tokio::task::block_in_place(|| redis.pause());
    for key in ["paused-1", "paused-2"] {
        let began = std::time::Instant::now();
        let err = tokio::time::timeout(Duration::from_secs(10), store.reserve(key, lease))
            .await
            .expect("the store's operation hung")
            .unwrap_err();
        assert!(
            began.elapsed() < Duration::from_secs(2),
            "{:?}",
            began.elapsed()
        );
        assert!(err.to_string().contains("no answer within 500ms"), "{err}");
    }
    tokio::task::block_in_place(|| redis.resume());
    assert!(matches!(
        store.reserve("after", lease).await.unwrap(),
        Reservation::Fresh(_)
    ));
}
