//! A minute-long outage of what a handler depends on, under load, on a quorum queue
//! with the default Stack as the README shows it (retry, idempotency, dead letter; the
//! Stack's default circuit breaker): the idempotency store (a private Redis, then a
//! private PostgreSQL, stopped and started again) or the handler's downstream. Nothing
//! may reach the dead-letter queue, every message must be processed exactly once after
//! the outage, and the messages that arrive during it must wait in the broker.
//!
//! Needs RabbitMQ (`AMQP_URL`), `redis-server`, and PostgreSQL's programs (`initdb`,
//! `pg_ctl`): each test fails saying how to get what is missing. Each runs about two
//! minutes of real time. Run with `--nocapture` to see the figures.

mod common;

#[path = "../../../middleware/tests/support/services.rs"]
mod services;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redrive_core::{BoxError, Message, OutgoingMessage, Publisher, Worker, handler_fn};
use redrive_middleware::Stack;
use redrive_middleware::dead_letter::{DeadLetterConfig, DeadLetterLayer};
use redrive_middleware::idempotency::{
    self, IdempotencyConfig, IdempotencyLayer, IdempotencyStore, PostgresStore, RedisStore,
};
use redrive_middleware::retry::{RetryConfig, RetryLayer};
use redrive_rabbitmq::QueueKind;
use tokio::sync::Notify;

/// When the outage starts and how long it lasts.
const OUTAGE_AT: Duration = Duration::from_secs(10);
const OUTAGE: Duration = Duration::from_secs(60);
/// Messages published, four a second from the start to ten seconds after the outage.
const MESSAGES: usize = 320;
const RATE: Duration = Duration::from_millis(250);

/// What goes down.
enum Down {
    /// The idempotency store's server.
    Store(Box<dyn FnMut(bool) + Send>),
    /// The handler's downstream: the handler fails while this is set.
    Downstream(Arc<AtomicBool>),
}

impl Down {
    fn set(&mut self, down: bool) {
        match self {
            Down::Store(switch) => tokio::task::block_in_place(|| switch(down)),
            Down::Downstream(flag) => flag.store(down, Ordering::SeqCst),
        }
    }
}

/// Messages ready in `queue`, which exists.
async fn ready(queue: &str) -> u32 {
    common::ready(queue)
        .await
        .unwrap_or_else(|| panic!("queue {queue} is gone"))
}

/// Runs the outage against a Worker whose idempotency store is `store`; `failing` is
/// the downstream's switch when the downstream is what goes down.
async fn outage<St: IdempotencyStore>(
    name: &str,
    store: St,
    mut down: Down,
    failing: Arc<AtomicBool>,
) {
    let queue = common::unique(name);
    let topology = common::topology(&queue, QueueKind::Quorum);
    common::declare(&topology).await;

    // The README's Stack, on this store and this broker.
    let stack = Stack::new()
        .retry(RetryLayer::new(RetryConfig::default()).unwrap())
        .idempotency_layer(
            IdempotencyLayer::new(Arc::new(store), IdempotencyConfig::default()).unwrap(),
        )
        .dead_letter_layer(
            DeadLetterLayer::new(
                Arc::new(common::publisher().await),
                DeadLetterConfig::default(),
            )
            .unwrap(),
        );
    let consumer = common::consumer(&topology, name, 16).await;
    stack
        .check(&redrive_core::Consumer::capabilities(&consumer))
        .unwrap();

    let start = Instant::now();
    let successes: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let calls_during = Arc::new(AtomicU64::new(0));
    let handler = {
        let successes = successes.clone();
        let calls_during = calls_during.clone();
        handler_fn(move |m: Message| {
            let successes = successes.clone();
            let at = start.elapsed();
            if at > OUTAGE_AT + Duration::from_secs(2) && at < OUTAGE_AT + OUTAGE {
                calls_during.fetch_add(1, Ordering::Relaxed);
            }
            let failing = failing.load(Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                if failing {
                    return Err::<(), BoxError>("downstream: 503 service unavailable".into());
                }
                let id = m
                    .headers
                    .get_str(idempotency::MESSAGE_ID)
                    .unwrap_or("")
                    .to_owned();
                *successes.lock().unwrap().entry(id).or_default() += 1;
                Ok(())
            }
        })
    };
    let worker = Worker::builder(consumer)
        .service(stack.service(handler))
        .build()
        .unwrap();
    let stop = Arc::new(Notify::new());
    let stopper = stop.clone();
    let run = tokio::spawn(worker.run_until(async move { stopper.notified().await }));

    let producer = {
        let queue = queue.clone();
        tokio::spawn(async move {
            let publisher = common::publisher().await;
            let mut tick = tokio::time::interval(RATE);
            for i in 0..MESSAGES {
                tick.tick().await;
                let msg = OutgoingMessage::new(format!("{{\"order\":{i}}}"))
                    .with_header(idempotency::MESSAGE_ID, format!("m{i}"))
                    .unwrap();
                publisher.publish(&queue, msg).await.expect("publish");
            }
            publisher.close().await;
        })
    };

    tokio::time::sleep_until((start + OUTAGE_AT).into()).await;
    down.set(true);
    tokio::time::sleep_until((start + OUTAGE_AT + OUTAGE - Duration::from_secs(1)).into()).await;
    let waiting = ready(&queue).await;
    let dead_during = ready(topology.dead_letter_queue().unwrap()).await;
    down.set(false);
    let back = start.elapsed();
    producer.await.unwrap();

    // Every message processed, within two minutes of the outage's end.
    let deadline = Instant::now() + Duration::from_secs(120);
    while successes.lock().unwrap().len() < MESSAGES && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let done = start.elapsed();
    // Let late settles and any stray redelivery show.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.notify_one();
    let report = run.await.unwrap();
    let dead = ready(topology.dead_letter_queue().unwrap()).await;
    let left = ready(&queue).await;
    common::cleanup(&[topology]).await;

    let successes = successes.lock().unwrap();
    let twice: Vec<_> = successes.iter().filter(|(_, n)| **n > 1).collect();
    let published_during = OUTAGE.as_millis() / RATE.as_millis();
    println!(
        "{name}: {MESSAGES} messages, {}s outage; dead-lettered {dead} ({dead_during} during it); \
         processed {} ({} more than once); waiting in the broker at the outage's end {waiting} \
         of ~{published_during} published during it; handler calls during it {}; all done \
         {:.1}s after the outage ended; {report:?}",
        OUTAGE.as_secs(),
        successes.len(),
        twice.len(),
        calls_during.load(Ordering::Relaxed),
        (done - back).as_secs_f64(),
    );
    assert_eq!(dead, 0, "nothing reaches the dead-letter queue");
    assert_eq!(successes.len(), MESSAGES, "every message processed");
    assert!(twice.is_empty(), "processed more than once: {twice:?}");
    assert_eq!(left, 0, "the queue is empty");
    // Intake paused: all but a Worker's worth of what came during the outage waited in
    // the broker (prefetch 16 and 16 calls).
    assert!(
        u128::from(waiting) + 40 >= published_during,
        "{waiting} of ~{published_during} waited in the broker"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_without_redis_sends_nothing_to_the_dlq() {
    let mut redis = tokio::task::block_in_place(services::PrivateRedis::new);
    let store = RedisStore::connect(&redis.url())
        .await
        .expect("private redis");
    let switch = move |down: bool| if down { redis.stop() } else { redis.start() };
    outage(
        "outage-redis",
        store,
        Down::Store(Box::new(switch)),
        Arc::new(AtomicBool::new(false)),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_without_postgres_sends_nothing_to_the_dlq() {
    let mut pg = tokio::task::block_in_place(services::PrivatePostgres::new);
    let store = PostgresStore::connect(&pg.params())
        .await
        .expect("private postgres");
    store.migrate().await.expect("migrate");
    let switch = move |down: bool| if down { pg.stop() } else { pg.start() };
    outage(
        "outage-postgres",
        store,
        Down::Store(Box::new(switch)),
        Arc::new(AtomicBool::new(false)),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_of_a_failing_downstream_sends_nothing_to_the_dlq() {
    let redis = tokio::task::block_in_place(services::PrivateRedis::new);
    let store = RedisStore::connect(&redis.url())
        .await
        .expect("private redis");
    let failing = Arc::new(AtomicBool::new(false));
    outage(
        "outage-downstream",
        store,
        Down::Downstream(failing.clone()),
        failing,
    )
    .await;
    drop(redis);
}
