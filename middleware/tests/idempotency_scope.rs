//! Whose keys meet whose, and keys that outlive their first lease: the idempotency
//! layer with the in-memory store under paused time, and with the real local Redis and
//! PostgreSQL (`REDIS_URL`, `DATABASE_URL`), each failing with how to start it.
#![cfg(feature = "idempotency")]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use redrive_core::classify::{Classifier, ErrorKind};
use redrive_core::{BoxError, Headers, Message, Outcome, Source};
use redrive_middleware::idempotency::{
    self, IdempotencyConfig, IdempotencyLayer, IdempotencyStore, KeyReserved, MemoryStore,
    MissingKey, Unkeyed,
};
use tower::{Layer, Service, ServiceExt, service_fn};

/// A message with producer id `id`, delivered from `destination` (to `group`).
fn delivered(id: &str, system: &'static str, destination: &str, group: Option<&str>) -> Message {
    let mut headers = Headers::new();
    headers.insert(idempotency::MESSAGE_ID, id).unwrap();
    let mut msg = Message::new("charge").with_headers(headers);
    msg.metadata.source = Source {
        system,
        destination: destination.into(),
        group: group.map(Into::into),
        ..Source::default()
    };
    msg
}

/// Counts its runs; each takes `work`.
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

/// Two consumers of one store each see the same producer id once: one fanout
/// exchange feeding two queues, then two Kafka groups on one topic.
async fn consumers_sharing_a_store_each_process_their_own<St>(store: Arc<St>)
where
    St: IdempotencyStore + ?Sized,
{
    let id = format!("order-{:016x}", fastrand::u64(..));
    let layer = IdempotencyLayer::new(store, IdempotencyConfig::default()).unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let deliveries = [
        delivered(&id, "rabbitmq", "billing", None),
        delivered(&id, "rabbitmq", "shipping", None),
        delivered(&id, "kafka", "orders", Some("billing")),
        delivered(&id, "kafka", "orders", Some("shipping")),
    ];
    for msg in deliveries {
        let outcome = layer
            .layer(handler(runs.clone(), Duration::ZERO))
            .oneshot(msg)
            .await
            .unwrap();
        assert_eq!(outcome, Outcome::Processed);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 4, "each consumer ran its copy");
    // A redelivery to one of them is still a duplicate.
    let again = layer
        .layer(handler(runs.clone(), Duration::ZERO))
        .oneshot(delivered(&id, "kafka", "orders", Some("billing")))
        .await
        .unwrap();
    assert_eq!(again, Outcome::Deduplicated);
    assert_eq!(layer.stats().deduplicated, 1);
}

/// A handler three times slower than the lease keeps its key: a redelivery meanwhile
/// finds it reserved, and the first call commits.
async fn a_slow_handler_keeps_its_key<St>(store: Arc<St>, lease: Duration)
where
    St: IdempotencyStore + ?Sized,
{
    let id = format!("slow-{:016x}", fastrand::u64(..));
    let config = IdempotencyConfig::default().with_lease(lease);
    let layer = IdempotencyLayer::new(store, config).unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let first = tokio::spawn(
        layer
            .layer(handler(runs.clone(), lease * 3))
            .oneshot(delivered(&id, "memory", "orders", None)),
    );
    tokio::time::sleep(lease * 2).await;
    let err = layer
        .layer(handler(runs.clone(), Duration::ZERO))
        .oneshot(delivered(&id, "memory", "orders", None))
        .await
        .unwrap_err();
    assert!(KeyReserved::find(&*err).is_some(), "{err}");
    assert_eq!(first.await.unwrap().unwrap(), Outcome::Processed);
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran once");
    assert_eq!(layer.stats().commit_failures, 0);
    assert_eq!(layer.stats().leases_lost, 0);
}

#[tokio::test(start_paused = true)]
async fn memory_consumers_sharing_a_store_each_process_their_own() {
    consumers_sharing_a_store_each_process_their_own(Arc::new(MemoryStore::new())).await;
}

#[tokio::test(start_paused = true)]
async fn memory_a_slow_handler_keeps_its_key() {
    a_slow_handler_keeps_its_key(Arc::new(MemoryStore::new()), Duration::from_secs(30)).await;
}

#[tokio::test(start_paused = true)]
async fn a_named_namespace_deduplicates_across_consumers() {
    let id = "order-7";
    let layer = IdempotencyLayer::new(
        Arc::new(MemoryStore::new()),
        IdempotencyConfig::default().with_namespace("billing"),
    )
    .unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let a = layer
        .layer(handler(runs.clone(), Duration::ZERO))
        .oneshot(delivered(id, "rabbitmq", "eu-orders", None))
        .await
        .unwrap();
    let b = layer
        .layer(handler(runs.clone(), Duration::ZERO))
        .oneshot(delivered(id, "rabbitmq", "us-orders", None))
        .await
        .unwrap();
    assert_eq!((a, b), (Outcome::Processed, Outcome::Deduplicated));
    assert!(
        IdempotencyLayer::new(
            Arc::new(MemoryStore::new()),
            IdempotencyConfig::default().with_namespace("")
        )
        .is_err()
    );
}

#[tokio::test(start_paused = true)]
async fn unkeyed_messages_are_processed_or_rejected_as_configured_and_counted() {
    let runs = Arc::new(AtomicU32::new(0));
    let process =
        IdempotencyLayer::new(Arc::new(MemoryStore::new()), IdempotencyConfig::default()).unwrap();
    let outcome = process
        .layer(handler(runs.clone(), Duration::ZERO))
        .oneshot(Message::new("no id"))
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Processed);
    assert_eq!(process.stats().unkeyed, 1);

    let reject = IdempotencyLayer::new(
        Arc::new(MemoryStore::new()),
        IdempotencyConfig::default().with_unkeyed(Unkeyed::Reject),
    )
    .unwrap();
    let err = reject
        .layer(handler(runs.clone(), Duration::ZERO))
        .oneshot(Message::new("no id"))
        .await
        .unwrap_err();
    assert_eq!(
        Classifier::default().classify(&*err).kind,
        ErrorKind::Permanent
    );
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&*err);
    let mut found = false;
    while let Some(e) = source {
        found |= e.is::<MissingKey>();
        source = e.source();
    }
    assert!(found, "{err}");
    assert_eq!(reject.stats().unkeyed, 1);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the rejected one did not run"
    );
}

#[cfg(feature = "redis")]
mod redis_store {
    use super::*;
    use redrive_middleware::idempotency::RedisStore;

    /// The default prefix, as a new user would have it: keys of earlier runs cannot
    /// clash, since every id is random.
    async fn store() -> Arc<RedisStore> {
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        match tokio::time::timeout(Duration::from_secs(10), RedisStore::connect(&url)).await {
            Ok(Ok(store)) => Arc::new(store),
            Ok(Err(e)) => panic!(
                "cannot reach Redis at {url} ({e}); start it with `redis-server --daemonize yes` \
                 or set REDIS_URL"
            ),
            Err(_) => panic!(
                "Redis at {url} did not answer within 10 s; start it with \
                 `redis-server --daemonize yes` or set REDIS_URL"
            ),
        }
    }

    #[tokio::test]
    async fn consumers_sharing_the_default_prefix_each_process_their_own() {
        consumers_sharing_a_store_each_process_their_own(store().await).await;
    }

    #[tokio::test]
    async fn a_slow_handler_keeps_its_key() {
        // Renewed at half its length: 2 s holds through the scheduling stalls of a
        // busy 2-core machine, where 600 ms was seen to lapse.
        super::a_slow_handler_keeps_its_key(store().await, Duration::from_secs(2)).await;
    }
}

#[cfg(feature = "postgres")]
mod postgres_store {
    use super::*;
    use redrive_middleware::idempotency::PostgresStore;

    /// The default table, migrated, as a new user would have it.
    async fn store() -> Arc<PostgresStore> {
        let params = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into());
        let store =
            match tokio::time::timeout(Duration::from_secs(10), PostgresStore::connect(&params))
                .await
            {
                Ok(Ok(store)) => store,
                Ok(Err(e)) => panic!(
                    "cannot reach PostgreSQL at `{params}` ({e}); start it with \
                     `pg_ctlcluster 15 main start` or set DATABASE_URL"
                ),
                Err(_) => panic!(
                    "PostgreSQL at `{params}` did not answer within 10 s; start it with \
                     `pg_ctlcluster 15 main start` or set DATABASE_URL"
                ),
            };
        store.migrate().await.unwrap();
        Arc::new(store)
    }

    #[tokio::test]
    async fn consumers_sharing_the_default_table_each_process_their_own() {
        consumers_sharing_a_store_each_process_their_own(store().await).await;
    }

    #[tokio::test]
    async fn a_slow_handler_keeps_its_key() {
        // Renewed at half its length: 2 s holds through the scheduling stalls of a
        // busy 2-core machine, where 600 ms was seen to lapse.
        super::a_slow_handler_keeps_its_key(store().await, Duration::from_secs(2)).await;
    }
}
