//! Idempotency keys scoped by the consumer group, end to end: two groups read one
//! topic, each through the full Stack over the local Redis store under its default
//! prefix (two services sharing one Redis, as a new user would set them up), and each
//! group's handler runs for every record. The records carry no message-id header, so
//! a record has the same fallback id (`<topic>-<partition>-<offset>@<timestamp ms>`) in
//! both groups: only the group in the key's scope keeps one group's commits from being
//! the other's duplicates.
//!
//! On librdkafka's mock cluster, with Redis at `REDIS_URL` (default
//! `redis://127.0.0.1:6379`).

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Env;
use redrive_core::testkit::unique_name;
use redrive_core::{BoxError, Consumer, Message, OutgoingMessage, Publisher, Report, Worker};
use redrive_middleware::Stack;
use redrive_middleware::dead_letter::{DeadLetterConfig, DeadLetterLayer};
use redrive_middleware::idempotency::{IdempotencyConfig, IdempotencyLayer, RedisStore};
use redrive_middleware::metrics::MetricsLayer;
use redrive_middleware::retry::{RetryConfig, RetryLayer};
use redrive_middleware::timeout::TimeoutLayer;
use redrive_middleware::trace::TraceLayer;

const RECORDS: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_groups_on_one_topic_each_run_every_record_on_the_mock_cluster() {
    two_groups_on_one_topic_each_run_every_record(&Env::mock()).await;
}

/// A store on the local Redis under the default prefix, or a failure that says how to
/// start Redis.
async fn redis_store() -> Arc<RedisStore> {
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

/// What one group's Worker did with the topic.
struct GroupRun {
    /// The message ids its handler ran for.
    ids: HashSet<String>,
    /// Records acked as duplicates without running the handler.
    deduplicated: u64,
    report: Report,
}

/// Runs a Worker of `group` on `topic`, with the full Stack and its own connection to
/// Redis, until every record was handled or skipped as a duplicate, or 20 s passed.
async fn run_group(brokers: &str, topic: &str, group: &str) -> GroupRun {
    // Committed keys expire after 10 minutes instead of a day: the shared Redis keeps
    // less of each run, and the scope does not depend on it.
    let idempotency = IdempotencyLayer::new(
        redis_store().await,
        IdempotencyConfig::default().with_ttl(Duration::from_secs(600)),
    )
    .expect("idempotency layer");
    let stack = Stack::new()
        .trace(TraceLayer::new())
        .metrics(MetricsLayer::new(&opentelemetry::global::meter(
            "idempotency-scope",
        )))
        .dead_letter_layer(
            DeadLetterLayer::new(
                Arc::new(common::publisher(brokers)),
                DeadLetterConfig::default(),
            )
            .expect("dead-letter layer"),
        )
        .idempotency_layer(idempotency.clone())
        .retry(RetryLayer::new(RetryConfig::default()).expect("retry layer"))
        .timeout(TimeoutLayer::new(Duration::from_secs(10)).expect("timeout layer"));
    let consumer = common::consumer(brokers, group, topic);
    stack.check(&consumer.capabilities()).expect("stack");

    let ids: Arc<Mutex<HashSet<String>>> = Arc::default();
    let seen = ids.clone();
    let handler = redrive_core::handler_fn(move |m: Message| {
        let seen = seen.clone();
        async move {
            let id = m.metadata.message_id.as_deref().unwrap_or_default();
            seen.lock().unwrap().insert(id.to_owned());
            Ok::<_, BoxError>(())
        }
    });
    let (watched, layer) = (ids.clone(), idempotency.clone());
    let report = Worker::builder(consumer)
        .service(stack.service(handler))
        .build()
        .expect("worker")
        .run_until(async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                let handled = watched.lock().unwrap().len() as u64;
                if handled + layer.deduplicated() >= RECORDS as u64 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
    let ids = std::mem::take(&mut *ids.lock().unwrap());
    GroupRun {
        ids,
        deduplicated: idempotency.deduplicated(),
        report,
    }
}

async fn two_groups_on_one_topic_each_run_every_record(env: &Env) {
    let brokers = env.brokers.clone();
    let topic = unique_name("idempotency-scope");
    env.create_topic(&topic, 1).await;
    let p = common::publisher(&brokers);
    for i in 0..RECORDS {
        // No message-id header: each record's id is the adapter's fallback.
        let record = OutgoingMessage::new(format!("order-{i}")).with_key(format!("c{}", i % 10));
        p.publish(&topic, record).await.expect("publish");
    }
    // Billing reads the topic first; shipping, a second service with its own group,
    // reads it from the start afterwards, through the same Redis.
    let billing = run_group(&brokers, &topic, &unique_name("g1")).await;
    let shipping = run_group(&brokers, &topic, &unique_name("g2")).await;

    for (group, run) in [("g1", &billing), ("g2", &shipping)] {
        assert_eq!(
            run.ids.len(),
            RECORDS,
            "group {group}'s handler ran for {} of {RECORDS} records; {} were acked as \
             duplicates ({:?})",
            run.ids.len(),
            run.deduplicated,
            run.report
        );
        assert_eq!(run.deduplicated, 0, "group {group}: {:?}", run.report);
        assert_eq!(
            run.report.dead_lettered, 0,
            "group {group}: {:?}",
            run.report
        );
    }
    let fallback = format!("{topic}-0-");
    assert!(
        billing
            .ids
            .iter()
            .all(|id| id.starts_with(&fallback) && id.contains('@')),
        "every id is the fallback `<topic>-<partition>-<offset>@<ts>`: {:?}",
        billing.ids.iter().take(3).collect::<Vec<_>>()
    );
    assert_eq!(
        billing.ids, shipping.ids,
        "both groups saw the same id for each record"
    );
}
