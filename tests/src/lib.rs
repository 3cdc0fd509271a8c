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

/// The environment variable holding the broker's address (default
/// `redrive_rabbitmq::DEFAULT_URL`).
pub const ENV_AMQP_URL: &str = "AMQP_URL";
/// The environment variable naming the queue to consume.
pub const ENV_QUEUE: &str = "FAULT_QUEUE";
/// The environment variable holding the queue's kind: `quorum` or `classic`.
pub const ENV_QUEUE_KIND: &str = "FAULT_QUEUE_KIND";
/// The environment variable holding the PostgreSQL connection parameters.
pub const ENV_POSTGRES: &str = "FAULT_POSTGRES";
/// The environment variable naming the consumer: its connections' names start with it,
/// and its effects rows carry it.
pub const ENV_CONSUMER: &str = "FAULT_CONSUMER";

/// The consumer's configuration, from the environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The broker's address.
    pub amqp_url: String,
    /// The queue; its dead-letter queue is `<queue>-dlq`.
    pub queue: String,
    /// `true` for a quorum queue, `false` for a classic one.
    pub quorum: bool,
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
        let quorum = match var(ENV_QUEUE_KIND)?.as_str() {
            "quorum" => true,
            "classic" => false,
            other => {
                return Err(format!(
                    "{ENV_QUEUE_KIND} is `{other}`; use quorum or classic"
                ));
            }
        };
        Ok(Config {
            amqp_url: std::env::var(ENV_AMQP_URL)
                .unwrap_or_else(|_| redrive_rabbitmq::DEFAULT_URL.to_owned()),
            queue: var(ENV_QUEUE)?,
            quorum,
            postgres: var(ENV_POSTGRES)?,
            consumer: var(ENV_CONSUMER)?,
        })
    }
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
