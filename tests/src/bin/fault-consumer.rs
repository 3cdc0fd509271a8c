//! The fault run's consumer: redrive's full Stack (dead letter to `<queue>-dlq`, the
//! default circuit breaker, idempotency over PostgreSQL with the key committed in the
//! handler's transaction, retry) on a RabbitMQ queue, an SQS queue or a Kafka topic,
//! with the handler the [crate docs](redrive_fault_run) describe. Configured by the
//! `FAULT_*` environment variables ([`Config`]); stops on SIGTERM or Ctrl-C, and prints
//! the Worker's report.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use redrive_core::{
    BoxError, Consumer, Message, OrderingMode, Publisher, Redelivery, Worker, classify, handler_fn,
    shutdown_signal,
};
use redrive_fault_run::{Broker, Config, Fate, KEY_TTL, fate};
use redrive_kafka::rdkafka::ClientConfig;
use redrive_kafka::{KafkaConsumer, KafkaPublisher};
use redrive_middleware::Stack;
use redrive_middleware::dead_letter::{DeadLetterConfig, DeadLetterLayer};
use redrive_middleware::idempotency::{
    CommitMode, IdempotencyConfig, IdempotencyLayer, IdempotencyToken, KeyReserved, MESSAGE_ID,
    PostgresStore,
};
use redrive_middleware::retry::{RetryConfig, RetryLayer};
use redrive_rabbitmq::{QueueKind, RabbitConsumer, RabbitPublisher, Reconnect, Topology};

/// How long a reservation lasts unrenewed: short, so a killed consumer's keys come
/// free soon.
const LEASE: Duration = Duration::from_secs(5);

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::INFO)
        .init();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fault-consumer: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), BoxError> {
    let config = Config::from_env()?;
    let store = PostgresStore::connect(&config.postgres).await?;
    store.migrate().await?;
    match config.broker {
        Broker::RabbitQuorum | Broker::RabbitClassic => {
            let kind = if config.broker == Broker::RabbitQuorum {
                QueueKind::Quorum
            } else {
                QueueKind::Classic
            };
            let topology = Topology::new(&config.queue)
                .with_kind(kind)
                .with_dead_letter_queue(format!("{}-dlq", config.queue))
                .with_max_delay(Duration::from_secs(600));
            let consumer = RabbitConsumer::builder(&config.broker_url, topology)
                .connection_name(&config.consumer)
                .prefetch(16)
                .reconnect(Reconnect::new(
                    Duration::from_millis(200),
                    Duration::from_secs(2),
                ))
                .connect()
                .await?;
            let monitor = consumer.monitor();
            let publisher = RabbitPublisher::connect_named(
                &config.broker_url,
                format!("{}-dlq", config.consumer),
            )
            .await?;
            serve(&config, store, consumer, publisher, OrderingMode::Unordered).await?;
            println!("reconnects {}", monitor.reconnects());
        }
        Broker::Sqs => {
            let sqs = redrive_fault_run::sqs_client(&config.broker_url).await;
            let consumer = sqs
                .consumer(&config.queue)
                .wait_time(Duration::from_secs(1))
                .build()
                .await?;
            serve(
                &config,
                store,
                consumer,
                sqs.publisher(),
                OrderingMode::Unordered,
            )
            .await?;
        }
        Broker::Kafka => {
            let consumer = KafkaConsumer::builder(
                &config.broker_url,
                &redrive_fault_run::kafka_group(&config.queue),
                [config.queue.as_str()],
            )
            // A killed member's partitions move to the other one within seconds.
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "1000")
            .build()?;
            // One record per batch, as the driver's producer: the driver counts the
            // dead-letter topic by its latest offset, which tansu reports per batch.
            let mut producer = ClientConfig::new();
            producer
                .set("bootstrap.servers", &config.broker_url)
                .set("batch.num.messages", "1");
            let publisher = KafkaPublisher::from_config(producer)?;
            serve(&config, store, consumer, publisher, OrderingMode::PerKey).await?;
        }
    }
    Ok(())
}

/// Runs the Stack over `consumer` until SIGTERM or Ctrl-C, dead-lettering with
/// `publisher`; prints the Worker's report.
async fn serve<C: Consumer, P: Publisher>(
    config: &Config,
    store: PostgresStore,
    consumer: C,
    publisher: P,
    ordering: OrderingMode,
) -> Result<(), BoxError> {
    let store = Arc::new(store);
    let stack = Stack::new()
        .retry(RetryLayer::new(RetryConfig::default())?)
        .idempotency_layer(IdempotencyLayer::new(
            store.clone(),
            IdempotencyConfig::default()
                .with_lease(LEASE)
                .with_ttl(KEY_TTL)
                .with_commit_mode(CommitMode::Handler),
        )?)
        .dead_letter_layer(DeadLetterLayer::new(
            Arc::new(publisher),
            DeadLetterConfig::default()
                .with_consumer_name(&config.consumer)
                // A key another consumer holds is no reason to dead-letter a message.
                .with_filter(|err, _| KeyReserved::find(err).is_none()),
        )?);
    tracing::info!(
        pipeline = %stack.describe(),
        consumer = %config.consumer,
        broker = config.broker.name(),
        "starting"
    );

    let name: Arc<str> = config.consumer.clone().into();
    let handler = handler_fn(move |msg: Message| handle(store.clone(), name.clone(), msg));
    let worker = Worker::builder(consumer)
        .stack(stack)
        .handler(handler)
        .concurrency(8)
        .ordering(ordering)
        .redelivery(Redelivery::exponential(
            Duration::from_millis(200),
            Duration::from_secs(5),
        ))
        .shutdown_timeout(Duration::from_secs(10))
        .build()?;
    let report = worker.run_until(shutdown_signal()).await;
    println!("fault-consumer {}: {report:?}", config.consumer);
    Ok(())
}

/// The handler: counts the try, fails as the message's [`Fate`] says, else writes the
/// plain effect, then the transactional one with the idempotency key.
async fn handle(
    store: Arc<PostgresStore>,
    consumer: Arc<str>,
    msg: Message,
) -> Result<(), BoxError> {
    let id = msg
        .headers
        .get_str(MESSAGE_ID)
        .ok_or_else(|| classify::permanent("the message has no message-id header"))?
        .to_owned();
    let mut db = store.pool().get().await?;
    let tries: i32 = db
        .query_one(
            "INSERT INTO tries (id, n) VALUES ($1, 1) \
             ON CONFLICT (id) DO UPDATE SET n = tries.n + 1 RETURNING n",
            &[&id],
        )
        .await?
        .get(0);
    match fate(&id) {
        Fate::Poison => return Err(classify::permanent(format!("{id} is poison"))),
        Fate::Transient(n) if u32::try_from(tries).unwrap_or(0) <= n => {
            return Err(
                format!("{id}: downstream unavailable (try {tries} of {n} that fail)").into(),
            );
        }
        Fate::Transient(_) | Fate::Good => {}
    }
    let consumer: &str = &consumer;
    db.execute(
        "INSERT INTO effects_plain (id, consumer) VALUES ($1, $2)",
        &[&id, &consumer],
    )
    .await?;
    let reservation = msg
        .extensions
        .get::<IdempotencyToken>()
        .ok_or("no IdempotencyToken: the idempotency layer must run before the handler")?
        .clone();
    let txn = db.transaction().await?;
    txn.execute(
        "INSERT INTO effects (id, consumer) VALUES ($1, $2)",
        &[&id, &consumer],
    )
    .await?;
    store.commit_in(&txn, &reservation, KEY_TTL).await?;
    txn.commit().await?;
    Ok(())
}
