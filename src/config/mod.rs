//! Settings for the Worker and every layer, from a TOML file and environment variables.
//!
//! The code composes, the file configures: which layers a [`Stack`] holds is chosen in
//! code (their types are the Stack's), and [`Settings`] hands out each one set as the
//! file says. This file reproduces the README's quickstart:
//!
//! ```toml
//! # redrive.toml
//! [worker]
//! concurrency = 32
//! ordering = "per_key"    # same key in order; a failed key parks, others flow
//! shutdown_timeout = "30s"
//!
//! [retry]                 # RetryConfig::default(), written out
//! max_tries = 3
//! max_elapsed = "30s"
//! backoff = { initial = "100ms", max = "10s", jitter = "full" }
//!
//! [idempotency]
//! lease = "30s"
//! ttl = "24h"
//!
//! [dead_letter]
//! max_attempts = 5
//! ```
//!
//! ```
//! # const REDRIVE_TOML: &str = r#"
//! # [worker]
//! # concurrency = 32
//! # ordering = "per_key"
//! # shutdown_timeout = "30s"
//! # [retry]
//! # max_tries = 3
//! # max_elapsed = "30s"
//! # backoff = { initial = "100ms", max = "10s", jitter = "full" }
//! # [idempotency]
//! # lease = "30s"
//! # ttl = "24h"
//! # [dead_letter]
//! # max_attempts = 5
//! # "#;
//! use std::sync::Arc;
//! use redrive::config::Settings;
//! use redrive::memory::MemoryBroker;
//! use redrive::middleware::idempotency::MemoryStore;
//! use redrive::middleware::trace::{TraceLayer, TracedPublisher};
//! use redrive::middleware::Stack;
//! use redrive::{handler, BoxError, Message, Worker};
//!
//! # fn main() -> Result<(), BoxError> {
//! # let dir = std::env::temp_dir().join(format!("redrive-config-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir)?;
//! # let path = dir.join("redrive.toml");
//! # std::fs::write(&path, REDRIVE_TOML)?;
//! let settings = Settings::load(&path)?; // redrive.toml, then REDRIVE_* variables
//!
//! let broker = MemoryBroker::new();
//! let handler = handler::handler_fn(|_msg: Message| async { Ok::<_, BoxError>(()) });
//! let stack = Stack::new()
//!     .retry(settings.retry()?)
//!     .idempotency_layer(settings.idempotency(Arc::new(MemoryStore::new()))?)
//!     .dead_letter_layer(settings.dead_letter(Arc::new(TracedPublisher::new(broker.clone())))?)
//!     .trace(TraceLayer::new());
//! assert_eq!(
//!     stack.describe(),
//!     "trace -> dead_letter(max_attempts=5, to=<source>-dlq) -> \
//!      circuit_breaker(consecutive_failures=5, open_for=30s) -> \
//!      idempotency(lease=30s, ttl=86400s) -> retry(max_tries=3, window=300ms, budget) -> handler"
//! );
//! let worker = settings
//!     .worker(Worker::builder(broker.consumer("orders")).stack(stack).handler(handler))?
//!     .build()?;
//! # let _ = worker;
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(())
//! # }
//! ```
//!
//! # The environment
//! [`Settings::load`] reads the file, then environment variables over it: `REDRIVE_`,
//! the section, `__`, the key (and `__` again into a nested table), in capitals:
//!
//! ```sh
//! REDRIVE_WORKER__CONCURRENCY=64
//! REDRIVE_RETRY__BACKOFF__MAX=2s
//! REDRIVE_CIRCUIT_BREAKER__MAX_HOLD=off
//! ```
//!
//! A value that reads as a number or a boolean is one; anything else is a string
//! (quote a string that reads as a number: `REDRIVE_WORKER__NAME='"42"'`). Only the
//! variables whose name goes on from the prefix with a section's name are read, so
//! others that share the prefix (`REDRIVE_LOG`) are left alone, while a misspelt key
//! of a section (`REDRIVE_RETRY__MAX_TRIE`) is an error. Another prefix, for a second
//! Worker in the same process: [`Settings::load_with_prefix`].
//!
//! # Keys
//! Every section and every key is optional, a key left out keeps its layer's default
//! (the tables on [`RetryConfig`], [`CircuitBreakerConfig`] and the others), except
//! `rate_limit.limit`. Durations are written in human form: `"250ms"`, `"30s"`,
//! `"5m"`, `"24h"`.
//!
//! | section | key | value |
//! |---|---|---|
//! | `[worker]` | `name` | string |
//! | | `concurrency`, `max_waiting`, `max_parked` | number |
//! | | `execution` | `"spawned"` or `"in_task"` |
//! | | `ordering` | `"unordered"`, `"per_key"` or `"per_partition"` |
//! | | `lease_keeping` | `"auto"`, `"off"` or an interval |
//! | | `shutdown_timeout`, `settle_timeout` | duration |
//! | `[worker.redelivery]` | `initial`, `max` | duration |
//! | | `multiplier` | number |
//! | | `jitter` | boolean |
//! | `[retry]` | `max_tries` | number |
//! | | `max_elapsed` | duration, or `"off"` for no limit |
//! | `[retry.backoff]` | `initial`, `max` | duration |
//! | | `multiplier` | number |
//! | | `jitter` | `"none"`, `"full"`, `"equal"`, `"decorrelated"`, or a ratio from 0.0 to 1.0 |
//! | `[retry.budget]` (or `budget = "off"`) | `window` | duration |
//! | | `ratio` | number |
//! | | `min_per_second` | number |
//! | `[timeout]` | `per_try` | duration |
//! | `[circuit_breaker]` | `consecutive_failures` | number, or `"off"` |
//! | | `open_for` | duration |
//! | | `half_open_probes` | number |
//! | | `max_hold` | duration, or `"off"` |
//! | `[circuit_breaker.failure_rate]` | `threshold` | number above 0, at most 1 |
//! | | `window` | duration |
//! | | `min_calls` | number |
//! | `[rate_limit]` | `limit` (required) | number of messages per `per` |
//! | | `per` | duration (1 s) |
//! | | `burst` | number (`limit`) |
//! | `[idempotency]` | `lease`, `ttl` | duration |
//! | | `namespace` | string (keys scoped by this name, not by the consumer) |
//! | | `unkeyed` | `"process"` or `"reject"` |
//! | | `commit_mode` | `"layer"` or `"handler"` |
//! | `[dead_letter]` | `max_attempts`, `abandon_margin`, `max_error_len` | number |
//! | | `destination`, `consumer_name` | string |
//! | | `rejected_delay` | duration |
//! | `[replay]` | `max_replays` | number (3): the loop guard |
//! | | `rate` | letters a second, above 0 (no limit) |
//! | | `in_flight` | number, at least 1 (16) |
//! | | `destination` | string (each letter's origin) |
//!
//! `[replay]` sets what a dead-letter replay does unless told otherwise: the `redrive`
//! command-line tool reads it from the file its `--config` names (its flags win), and
//! [`Settings::replay`] hands it to [`DeadLetterQueue::replay`].
//!
//! What only code can give (a classifier, a hook, a key function, a dead-letter filter)
//! goes on the configurations [`Settings`] hands out: [`Settings::retry_config`] and
//! the other `*_config` methods.
//!
//! # Errors
//! Loading checks every section: a key no section has, a value of the wrong type, or
//! one its layer would refuse is a [`SettingsError`] naming the key, the file and line
//! or the environment variable it came from, and what to change. The checks against
//! the broker (a retry window longer than its lease) come when the Worker is built.
//!
//! [`Stack`]: crate::middleware::Stack
//! [`RetryConfig`]: crate::middleware::retry::RetryConfig
//! [`CircuitBreakerConfig`]: crate::middleware::circuit_breaker::CircuitBreakerConfig
//! [`DeadLetterQueue::replay`]: crate::middleware::dead_letter::DeadLetterQueue::replay

/// `SettingsError`: what went wrong, and where the value came from.
mod error;
/// The sections: one struct each, and how each becomes its layer's configuration.
mod sections;
/// The forms a value takes: names, durations in human form, `"off"`.
mod values;

// `Settings`' methods, one file per job, declared in the order the methods are
// documented in (rustdoc lists impl blocks in module order).

/// Reading the file and the environment variables, then checking every section.
mod load;

/// The `[worker]` section's checks, and how it sets a `WorkerBuilder`.
mod worker;

/// The layers `Settings` hands out, each built from its section.
mod layers;

/// The defaults of a dead-letter replay (`redrive dlq replay`), from `[replay]`.
mod replay;

use std::fmt;

use serde::Deserialize;

pub use error::SettingsError;
use error::Sources;
use sections::{
    CircuitBreakerSection, DeadLetterSection, IdempotencySection, RateLimitSection, ReplaySection,
    RetrySection, TimeoutSection, WorkerSection,
};

/// The prefix of the environment variables [`Settings::load`] reads.
pub const ENV_PREFIX: &str = "REDRIVE_";

/// The Worker's and every layer's settings: see the [module docs](self) for the file,
/// its keys and the environment variables.
///
/// Each method hands out one layer (or its configuration) set by its section, or with
/// the layer's defaults when the section is absent; [`rate_limit`](Self::rate_limit)
/// alone needs its section, since a rate is the workload's own. `Settings` can also be
/// part of an application's own configuration (it implements `Deserialize`); its
/// errors then name the key but not the line.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    worker: Option<WorkerSection>,
    retry: Option<RetrySection>,
    timeout: Option<TimeoutSection>,
    circuit_breaker: Option<CircuitBreakerSection>,
    rate_limit: Option<RateLimitSection>,
    idempotency: Option<IdempotencySection>,
    dead_letter: Option<DeadLetterSection>,
    replay: Option<ReplaySection>,
    #[serde(skip)]
    sources: Sources,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("worker", &self.worker)
            .field("retry", &self.retry)
            .field("timeout", &self.timeout)
            .field("circuit_breaker", &self.circuit_breaker)
            .field("rate_limit", &self.rate_limit)
            .field("idempotency", &self.idempotency)
            .field("dead_letter", &self.dead_letter)
            .field("replay", &self.replay)
            .field("sources", &self.sources)
            .finish()
    }
}
