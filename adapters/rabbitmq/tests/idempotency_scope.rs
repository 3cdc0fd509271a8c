//! Idempotency keys scoped by the queue, end to end: one fanout exchange feeds two
//! queues, the producer gives each message an id, and each queue's Worker, with the
//! full Stack over the local Redis store under its default prefix (two services sharing
//! one Redis, as a new user would set them up), runs its handler for every message. A
//! message has the same id in both queues: only the queue in the key's scope keeps one
//! queue's commits from being the other's duplicates.
//!
//! Against the local RabbitMQ (`AMQP_URL`) and Redis (`REDIS_URL`, default
//! `redis://127.0.0.1:6379`).

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redrive_core::{BoxError, Consumer, Message, OutgoingMessage, Report, Worker};
use redrive_middleware::Stack;
use redrive_middleware::dead_letter::{DeadLetterConfig, DeadLetterLayer};
use redrive_middleware::idempotency::{IdempotencyConfig, IdempotencyLayer, RedisStore};
use redrive_middleware::metrics::MetricsLayer;
use redrive_middleware::retry::{RetryConfig, RetryLayer};
use redrive_middleware::timeout::TimeoutLayer;
use redrive_middleware::trace::TraceLayer;
use redrive_rabbitmq::lapin::ExchangeKind;
use redrive_rabbitmq::lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
};
use redrive_rabbitmq::lapin::types::FieldTable;
use redrive_rabbitmq::mapping::MESSAGE_ID;
use redrive_rabbitmq::{QueueKind, Topology};

const MESSAGES: usize = 50;

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

/// Declares the fanout `exchange` and binds the queue of each of `topologies` to it.
async fn bind_to_fanout(exchange: &str, topologies: &[&Topology]) {
    let conn = common::connection("redrive-test-fanout").await;
    let ch = conn.create_channel().await.expect("channel");
    ch.exchange_declare(
        exchange,
        ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare the exchange");
    for t in topologies {
        ch.queue_bind(
            t.queue(),
            exchange,
            "",
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind a queue");
    }
    let _ = conn.close(200, "done").await;
}

/// Deletes `exchange`.
async fn delete_exchange(exchange: &str) {
    let conn = common::connection("redrive-test-cleanup").await;
    let ch = conn.create_channel().await.expect("channel");
    let _ = ch
        .exchange_delete(exchange, ExchangeDeleteOptions::default())
        .await;
    let _ = conn.close(200, "done").await;
}

/// What one queue's Worker did with its messages.
struct QueueRun {
    /// The message ids its handler ran for.
    ids: HashSet<String>,
    /// Messages acked as duplicates without running the handler.
    deduplicated: u64,
    report: Report,
}

/// Runs a Worker on `topology`'s queue, with the full Stack and its own connection to
/// Redis, until every message was handled or skipped as a duplicate, or 20 s passed.
async fn run_queue(topology: &Topology) -> QueueRun {
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
                Arc::new(common::publisher().await),
                DeadLetterConfig::default(),
            )
            .expect("dead-letter layer"),
        )
        .idempotency_layer(idempotency.clone())
        .retry(RetryLayer::new(RetryConfig::default()).expect("retry layer"))
        .timeout(TimeoutLayer::new(Duration::from_secs(10)).expect("timeout layer"));
    let consumer = common::consumer(topology, "redrive-test-idempotency-scope", 32).await;
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
                if handled + layer.deduplicated() >= MESSAGES as u64 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
    let ids = std::mem::take(&mut *ids.lock().unwrap());
    QueueRun {
        ids,
        deduplicated: idempotency.deduplicated(),
        report,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_queues_fed_by_one_fanout_exchange_each_run_every_message() {
    let exchange = common::unique("scope-fanout");
    let billing = common::topology(&common::unique("scope-billing"), QueueKind::Quorum);
    let shipping = common::topology(&common::unique("scope-shipping"), QueueKind::Quorum);
    common::declare(&billing).await;
    common::declare(&shipping).await;
    bind_to_fanout(&exchange, &[&billing, &shipping]).await;

    let p = common::publisher().await;
    let mut published = HashSet::new();
    for i in 0..MESSAGES {
        // Unique per run: the default prefix is shared with every earlier run.
        let id = format!("{exchange}-order-{i}");
        let message = OutgoingMessage::new(format!("order-{i}"))
            .with_header(MESSAGE_ID, id.as_str())
            .expect("header");
        p.publish_to(&exchange, "", &message)
            .await
            .expect("publish");
        published.insert(id);
    }
    p.close().await;

    // Billing drains its queue first; shipping, a second service, afterwards, through
    // the same Redis.
    let billing_run = run_queue(&billing).await;
    let shipping_run = run_queue(&shipping).await;
    common::cleanup(&[billing.clone(), shipping.clone()]).await;
    delete_exchange(&exchange).await;

    for (queue, run) in [("billing", &billing_run), ("shipping", &shipping_run)] {
        assert_eq!(
            run.ids.len(),
            MESSAGES,
            "queue {queue}'s handler ran for {} of {MESSAGES} messages; {} were acked as \
             duplicates ({:?})",
            run.ids.len(),
            run.deduplicated,
            run.report
        );
        assert_eq!(
            run.ids, published,
            "queue {queue}'s handler saw the producer's ids"
        );
        assert_eq!(run.deduplicated, 0, "queue {queue}: {:?}", run.report);
        assert_eq!(
            run.report.dead_lettered, 0,
            "queue {queue}: {:?}",
            run.report
        );
    }
}
