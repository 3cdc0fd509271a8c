//! The fault run: redrive's full Stack in consumer processes that are killed and
//! restarted, against a broker and a PostgreSQL that restart and connections that are
//! cut, checked for no lost message and no duplicate effect.
//!
//! This crate holds what the `fault-consumer` binary and the driver
//! (`tests/fault_run.rs`) share: each message's [`Fate`], decided from its id alone so
//! both sides agree on it without talking, the [tables](SCHEMA) the consumer writes its
//! effects into, and the [environment](Config) the driver configures the consumer with.
//!
//! # What the consumer does with a message
//! Its handler counts the try in `tries` (one row per id, kept across restarts), then:
//! - a [`Fate::Poison`] message fails permanently, every time: the dead-letter layer
//!   publishes it to `<queue>-dlq`;
//! - a [`Fate::Transient`] message fails transiently on its first `n` tries (1 or 2),
//!   then goes on as a good one;
//! - otherwise it inserts the id into `effects_plain` (a plain INSERT, outside any
//!   transaction: what at-least-once alone gives), then, in one transaction, inserts it
//!   into `effects` and commits the idempotency key with `PostgresStore::commit_in`
//!   (the exactly-once path).
//!
//! Neither effect table has a unique key: a duplicate is a second row, counted at the end.

pub mod proxy;
use std::time::Duration;

/// What a message's handler does with it, decided by [`fate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fate {
    /// Succeeds on the first try.
    Good,
    /// Fails transiently on its first `n` tries, then succeeds.
    Transient(u32),
    /// Fails permanently on every try.
    Poison,
}

/// The fate of the message `id`: 1 % poison, 10 % transient once, 10 % transient twice,
/// the rest good, by a hash of the id (FNV-1a, the same on every platform and build).
pub fn fate(id: &str) -> Fate {
    let hash = id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    match hash % 100 {
        0 => Fate::Poison,
        1..=10 => Fate::Transient(1),
        11..=20 => Fate::Transient(2),
        _ => Fate::Good,
    }
}

/// The id of the `i`th message of a run.
pub fn message_id(i: usize) -> String {
    format!("m{i:06}")
}

/// The tables the consumer writes into; the driver runs this before it starts them.
pub const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS tries (
        id TEXT PRIMARY KEY,
        n  INTEGER NOT NULL
    );
    CREATE TABLE IF NOT EXISTS effects (
        id       TEXT NOT NULL,
        consumer TEXT NOT NULL,
        at       TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
    );
    CREATE TABLE IF NOT EXISTS effects_plain (
        id       TEXT NOT NULL,
        consumer TEXT NOT NULL,
        at       TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
    );
";

/// How long a committed idempotency key is kept: longer than any run.
pub const KEY_TTL: Duration = Duration::from_secs(24 * 3600);

/// The environment variable naming the broker: [`Broker::name`].
pub const ENV_BROKER: &str = "FAULT_BROKER";
/// The environment variable holding the broker's address: an AMQP URL, an SQS endpoint
/// URL, or Kafka bootstrap servers.
pub const ENV_BROKER_URL: &str = "FAULT_BROKER_URL";
/// The environment variable naming the queue (or topic) to consume.
pub const ENV_QUEUE: &str = "FAULT_QUEUE";
/// The environment variable holding the PostgreSQL connection parameters.
pub const ENV_POSTGRES: &str = "FAULT_POSTGRES";
/// The environment variable naming the consumer: its connections' names start with it,
/// and its effects rows carry it.
pub const ENV_CONSUMER: &str = "FAULT_CONSUMER";

/// The broker a run consumes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Broker {
    /// A RabbitMQ quorum queue.
    RabbitQuorum,
    /// A RabbitMQ classic queue.
    RabbitClassic,
    /// An SQS standard queue.
    Sqs,
    /// A Kafka topic.
    Kafka,
}

impl Broker {
    /// Every broker, in the order the table lists them.
    pub const ALL: [Broker; 4] = [
        Broker::RabbitQuorum,
        Broker::RabbitClassic,
        Broker::Sqs,
        Broker::Kafka,
    ];

    /// The name [`ENV_BROKER`] takes: `rabbitmq-quorum`, `rabbitmq-classic`, `sqs` or
    /// `kafka`.
    pub fn name(self) -> &'static str {
        match self {
            Broker::RabbitQuorum => "rabbitmq-quorum",
            Broker::RabbitClassic => "rabbitmq-classic",
            Broker::Sqs => "sqs",
            Broker::Kafka => "kafka",
        }
    }

    /// How the table names it.
    pub fn title(self) -> &'static str {
        match self {
            Broker::RabbitQuorum => "RabbitMQ quorum queue",
            Broker::RabbitClassic => "RabbitMQ classic queue",
            Broker::Sqs => "SQS (emulator)",
            Broker::Kafka => "Kafka (tansu)",
        }
    }

    /// The broker named `name`, if any.
    pub fn from_name(name: &str) -> Option<Broker> {
        Broker::ALL.into_iter().find(|b| b.name() == name)
    }
}

/// The consumer's configuration, from the environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The broker.
    pub broker: Broker,
    /// The broker's address.
    pub broker_url: String,
    /// The queue or topic; its dead-letter queue is `<queue>-dlq`.
    pub queue: String,
    /// PostgreSQL connection parameters (`host=… port=… user=… dbname=…`).
    pub postgres: String,
    /// The consumer's name.
    pub consumer: String,
}

impl Config {
    /// Reads the configuration from the `ENV_*` variables.
    ///
    /// # Errors
    /// Names the variable that is missing or invalid.
    pub fn from_env() -> Result<Self, String> {
        let var = |name: &str| {
            std::env::var(name).map_err(|_| format!("set {name} (see the redrive-fault-run docs)"))
        };
        let broker = var(ENV_BROKER)?;
        let broker = Broker::from_name(&broker).ok_or_else(|| {
            let names: Vec<&str> = Broker::ALL.iter().map(|b| b.name()).collect();
            format!(
                "{ENV_BROKER} is `{broker}`; use one of {}",
                names.join(", ")
            )
        })?;
        Ok(Config {
            broker,
            broker_url: var(ENV_BROKER_URL)?,
            queue: var(ENV_QUEUE)?,
            postgres: var(ENV_POSTGRES)?,
            consumer: var(ENV_CONSUMER)?,
        })
    }
}

/// An SQS client for `endpoint` (the emulator on loopback), in region `us-east-1`
/// with fixed test credentials unless `AWS_REGION` or `AWS_ACCESS_KEY_ID` are set.
pub async fn sqs_client(endpoint: &str) -> redrive_sqs::Sqs {
    use redrive_sqs::aws_config::{self, BehaviorVersion, Region};
    use redrive_sqs::aws_sdk_sqs::config::Credentials;
    let mut config = aws_config::defaults(BehaviorVersion::latest()).endpoint_url(endpoint);
    if std::env::var_os("AWS_REGION").is_none() {
        config = config.region(Region::new("us-east-1"));
    }
    if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
        config =
            config.credentials_provider(Credentials::new("test", "test", None, None, "fault-run"));
    }
    redrive_sqs::Sqs::from_sdk_config(&config.load().await)
}

/// The consumer group of the consumers of `topic`.
pub fn kafka_group(topic: &str) -> String {
    format!("{topic}-consumers")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fates_come_in_the_planned_shares() {
        let n = 100_000;
        let mut counts = std::collections::HashMap::new();
        for i in 0..n {
            *counts.entry(fate(&message_id(i))).or_insert(0usize) += 1;
        }
        let share = |f| counts.get(&f).copied().unwrap_or(0) as f64 / n as f64;
        assert!((share(Fate::Poison) - 0.01).abs() < 0.003, "{counts:?}");
        assert!(
            (share(Fate::Transient(1)) - 0.10).abs() < 0.01,
            "{counts:?}"
        );
        assert!(
            (share(Fate::Transient(2)) - 0.10).abs() < 0.01,
            "{counts:?}"
        );
    }
}
