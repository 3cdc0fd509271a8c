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

mod error;
mod sections;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use figment::providers::{Env, Format, Toml};
use figment::{Figment, Provider};
use redrive_core::{Capabilities, Publisher, WorkerBuilder};
use redrive_middleware::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer};
use redrive_middleware::dead_letter::{DeadLetterConfig, DeadLetterLayer};
use redrive_middleware::idempotency::{
    IdempotencyConfig, IdempotencyLayer, IdempotencyStore, MemoryStore,
};
use redrive_middleware::rate_limit::{RateLimitConfig, RateLimitLayer};
use redrive_middleware::retry::{RetryConfig, RetryLayer};
use redrive_middleware::timeout::TimeoutLayer;
use serde::Deserialize;

pub use error::SettingsError;
use error::{EnvSource, Kind, Sources};
use sections::{
    CircuitBreakerSection, DeadLetterSection, IdempotencySection, Only, RateLimitSection,
    RetrySection, TimeoutSection, WorkerSection,
};

/// The prefix of the environment variables [`Settings::load`] reads.
pub const ENV_PREFIX: &str = "REDRIVE_";

/// Between a section and its key in a variable's name: `REDRIVE_RETRY__MAX_TRIES`.
const ENV_SEPARATOR: &str = "__";

/// The sections, which the environment variables read must start with.
const SECTIONS: [&str; 7] = [
    "worker",
    "retry",
    "timeout",
    "circuit_breaker",
    "rate_limit",
    "idempotency",
    "dead_letter",
];

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
            .field("sources", &self.sources)
            .finish()
    }
}

impl Settings {
    /// Reads the TOML file at `path`, then the `REDRIVE_` environment variables over
    /// it, and checks every section.
    ///
    /// # Errors
    /// [`SettingsError`] when the file cannot be read or is not TOML, or a key or value
    /// is wrong; it names the key, and the line or the variable it came from.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, SettingsError> {
        Self::load_with_prefix(path, ENV_PREFIX)
    }

    /// [`load`](Self::load), with the environment variables that start with `prefix`
    /// (`ORDERS_` reads `ORDERS_RETRY__MAX_TRIES`).
    ///
    /// # Errors
    /// As [`load`](Self::load).
    pub fn load_with_prefix(path: impl AsRef<Path>, prefix: &str) -> Result<Self, SettingsError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| SettingsError::read(path, e))?;
        let env = Env::prefixed(prefix)
            .filter(|key| {
                let key = key.as_str().to_ascii_lowercase();
                SECTIONS.iter().any(|s| key.starts_with(s))
            })
            .split(ENV_SEPARATOR);
        Self::extract(Some(path.to_owned()), text, Some((prefix, env)))
    }

    /// Settings from TOML text alone, without the environment.
    ///
    /// # Errors
    /// As [`load`](Self::load).
    pub fn from_toml_str(toml: &str) -> Result<Self, SettingsError> {
        Self::extract(None, toml.to_owned(), None)
    }

    fn extract(
        file: Option<PathBuf>,
        text: String,
        env: Option<(&str, Env)>,
    ) -> Result<Self, SettingsError> {
        // figment's TOML errors carry no line; toml_edit's do.
        if let Err(e) = toml_edit::ImDocument::parse(text.as_str()) {
            return Err(SettingsError::syntax(file, &text, &e));
        }
        let mut figment = Figment::from(Toml::string(&text));
        let mut env_source = None;
        if let Some((prefix, env)) = env {
            env_source = Some(EnvSource {
                prefix: prefix.to_owned(),
                name: env.metadata().name.into_owned(),
            });
            figment = figment.merge(env);
        }
        let extracted = figment.extract::<Settings>();
        let sources = Sources {
            file,
            text: Some(text),
            figment: Some(figment),
            env: env_source,
        };
        let mut settings = extracted.map_err(|e| sources.extract_error(&e))?;
        settings.sources = sources;
        settings.check()?;
        Ok(settings)
    }

    /// Checks every section present, so that a wrong value stops the start.
    fn check(&self) -> Result<(), SettingsError> {
        if let Some(w) = &self.worker {
            self.check_worker(w)?;
        }
        self.retry()?;
        self.timeout()?;
        self.circuit_breaker()?;
        if self.rate_limit.is_some() {
            self.rate_limit()?;
        }
        self.idempotency_config()?;
        self.dead_letter_config()?;
        Ok(())
    }

    /// An error about `key` of `section`, or about the whole section.
    fn invalid(&self, path: &[&str], detail: impl fmt::Display) -> SettingsError {
        self.sources
            .error(Kind::Invalid, path, path.len() == 1, detail.to_string())
    }

    /// Builds a layer from its section. When the layer refuses the section, the error
    /// names the key to blame: the one whose removal lets it build, or else the first
    /// that fails alone as the whole did; the section when there is none.
    fn build<T, E: fmt::Display>(
        &self,
        section: &'static str,
        keys: &[&'static str],
        make: impl Fn(Only) -> Result<T, E>,
    ) -> Result<T, SettingsError> {
        let whole = match make(Only::All) {
            Ok(t) => return Ok(t),
            Err(e) => e.to_string(),
        };
        if let Some(key) = keys.iter().find(|k| make(Only::Except(k)).is_ok()) {
            return Err(self.invalid(&[section, key], whole));
        }
        for key in keys {
            if let Err(e) = make(Only::Key(key)) {
                if e.to_string() == whole {
                    return Err(self.invalid(&[section, key], whole));
                }
            }
        }
        Err(self.invalid(&[section], whole))
    }

    fn check_worker(&self, w: &WorkerSection) -> Result<(), SettingsError> {
        if w.concurrency == Some(0) {
            return Err(self.invalid(
                &["worker", "concurrency"],
                "0 would run nothing; set it to 1 or more",
            ));
        }
        if w.max_parked == Some(0) {
            return Err(self.invalid(
                &["worker", "max_parked"],
                "0 would hold no failed message; set it to 1 or more (1024 by default)",
            ));
        }
        if let Some(d) = w.settle_timeout {
            if d < std::time::Duration::from_millis(1) {
                return Err(self.invalid(
                    &["worker", "settle_timeout"],
                    format!(
                        "{d:?} would give up every ack at once; set at least 1ms (10s by default)"
                    ),
                ));
            }
        }
        if let Some(sections::LeaseKeepingSetting(redrive_core::LeaseKeeping::Every(d))) =
            w.lease_keeping
        {
            if d.is_zero() {
                return Err(self.invalid(
                    &["worker", "lease_keeping"],
                    "an interval of 0 cannot keep a lease; give one shorter than the lease, or \"auto\"",
                ));
            }
        }
        if let Some(r) = &w.redelivery {
            if let Some(m) = r.multiplier {
                if !(m.is_finite() && m >= 1.0) {
                    return Err(self.invalid(
                        &["worker", "redelivery", "multiplier"],
                        format!(
                            "{m} is not a finite number of at least 1.0 (2.0 doubles the delay)"
                        ),
                    ));
                }
            }
            let (initial, max) = r.bounds();
            if max < initial {
                return Err(self.invalid(
                    &["worker", "redelivery"],
                    format!(
                        "`max` ({max:?}) is below `initial` ({initial:?}); raise the max or lower \
                         the initial delay"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Applies `[worker]` to `builder`: `Worker::builder(consumer).stack(stack)
    /// .handler(handler)`, before `build`. Keys left out keep the builder's settings.
    ///
    /// # Errors
    /// [`SettingsError`] naming the key when a value cannot work (a concurrency of 0, a
    /// redelivery max below its initial delay). The checks against the broker come at
    /// `build`.
    pub fn worker<C, S>(
        &self,
        mut builder: WorkerBuilder<C, S>,
    ) -> Result<WorkerBuilder<C, S>, SettingsError> {
        let Some(w) = &self.worker else {
            return Ok(builder);
        };
        self.check_worker(w)?;
        if let Some(name) = &w.name {
            builder = builder.name(name.clone());
        }
        if let Some(n) = w.concurrency {
            builder = builder.concurrency(n);
        }
        if let Some(e) = w.execution {
            builder = builder.execution(e.into());
        }
        if let Some(o) = w.ordering {
            builder = builder.ordering(o.into());
        }
        if let Some(n) = w.max_waiting {
            builder = builder.max_waiting(n);
        }
        if let Some(n) = w.max_parked {
            builder = builder.max_parked(n);
        }
        if let Some(r) = &w.redelivery {
            builder = builder.redelivery(r.redelivery());
        }
        if let Some(k) = w.lease_keeping {
            builder = builder.lease_keeping(k.0);
        }
        if let Some(d) = w.shutdown_timeout {
            builder = builder.shutdown_timeout(d);
        }
        if let Some(d) = w.settle_timeout {
            builder = builder.settle_timeout(d);
        }
        Ok(builder)
    }

    /// `[retry]` as a configuration, to add what only code gives (a classifier) before
    /// [`RetryLayer::new`].
    ///
    /// # Errors
    /// [`SettingsError`] naming the key the retry layer refuses.
    pub fn retry_config(&self) -> Result<RetryConfig, SettingsError> {
        let section = self.retry.clone().unwrap_or_default();
        self.build("retry", RetrySection::KEYS, |only| {
            let config = section.config(only);
            RetryLayer::new(config.clone()).map(|_| config)
        })
    }

    /// The retry layer `[retry]` sets.
    ///
    /// # Errors
    /// [`SettingsError`] naming the key the retry layer refuses.
    pub fn retry(&self) -> Result<RetryLayer, SettingsError> {
        let section = self.retry.clone().unwrap_or_default();
        self.build("retry", RetrySection::KEYS, |only| {
            RetryLayer::new(section.config(only))
        })
    }

    /// The per-try timeout `[timeout]` sets (`per_try`; 30 s without it).
    ///
    /// # Errors
    /// [`SettingsError`] naming `timeout.per_try` when it is 0.
    pub fn timeout(&self) -> Result<TimeoutLayer, SettingsError> {
        match self.timeout.as_ref().and_then(|t| t.per_try) {
            Some(d) => TimeoutLayer::new(d).map_err(|e| self.invalid(&["timeout", "per_try"], e)),
            None => Ok(TimeoutLayer::default()),
        }
    }

    /// `[circuit_breaker]` as a configuration, to add a classifier before
    /// [`CircuitBreakerLayer::new`].
    ///
    /// # Errors
    /// [`SettingsError`] naming the key the circuit breaker refuses.
    pub fn circuit_breaker_config(&self) -> Result<CircuitBreakerConfig, SettingsError> {
        let section = self.circuit_breaker.clone().unwrap_or_default();
        self.build("circuit_breaker", CircuitBreakerSection::KEYS, |only| {
            let config = section.config(only);
            CircuitBreakerLayer::new(config.clone()).map(|_| config)
        })
    }

    /// The circuit breaker `[circuit_breaker]` sets.
    ///
    /// # Errors
    /// [`SettingsError`] naming the key the circuit breaker refuses.
    pub fn circuit_breaker(&self) -> Result<CircuitBreakerLayer, SettingsError> {
        let section = self.circuit_breaker.clone().unwrap_or_default();
        self.build("circuit_breaker", CircuitBreakerSection::KEYS, |only| {
            CircuitBreakerLayer::new(section.config(only))
        })
    }

    /// `[rate_limit]` as a rate, for a
    /// [`KeyedRateLimitLayer`](crate::middleware::rate_limit::KeyedRateLimitLayer).
    ///
    /// # Errors
    /// [`SettingsError`] when there is no `[rate_limit]` section, or naming the key
    /// the rate limit refuses.
    pub fn rate_limit_config(&self) -> Result<RateLimitConfig, SettingsError> {
        let section = self.rate_limit_section()?;
        self.build("rate_limit", RateLimitSection::KEYS, |only| {
            let config = section.config(only);
            RateLimitLayer::new(config).map(|_| config)
        })
    }

    /// The rate limit `[rate_limit]` sets. Unlike the other layers', it has no default:
    /// a stack that holds a rate limit needs the section.
    ///
    /// # Errors
    /// [`SettingsError`] when there is no `[rate_limit]` section, or naming the key
    /// the rate limit refuses.
    pub fn rate_limit(&self) -> Result<RateLimitLayer, SettingsError> {
        let section = self.rate_limit_section()?;
        self.build("rate_limit", RateLimitSection::KEYS, |only| {
            RateLimitLayer::new(section.config(only))
        })
    }

    fn rate_limit_section(&self) -> Result<&RateLimitSection, SettingsError> {
        self.rate_limit.as_ref().ok_or_else(|| {
            SettingsError::new(
                Kind::Missing,
                Some("rate_limit".into()),
                None,
                "the stack holds a rate limit, so the settings need its rate: add a \
                 [rate_limit] section with `limit` (messages per `per`, 1s by default)",
            )
        })
    }

    /// `[idempotency]` as a configuration, to add a key function before
    /// [`IdempotencyLayer::new`].
    ///
    /// # Errors
    /// [`SettingsError`] naming the key the idempotency layer refuses.
    pub fn idempotency_config(&self) -> Result<IdempotencyConfig, SettingsError> {
        // A throwaway store: the configuration's checks are the layer's.
        let store = Arc::new(MemoryStore::with_shards(1));
        let section = self.idempotency.clone().unwrap_or_default();
        self.build("idempotency", IdempotencySection::KEYS, |only| {
            let config = section.config(only);
            IdempotencyLayer::new(store.clone(), config.clone()).map(|_| config)
        })
    }

    /// The idempotency layer `[idempotency]` sets, over `store`.
    ///
    /// # Errors
    /// [`SettingsError`] naming the key the idempotency layer refuses.
    pub fn idempotency<St: IdempotencyStore + ?Sized>(
        &self,
        store: Arc<St>,
    ) -> Result<IdempotencyLayer<St>, SettingsError> {
        let section = self.idempotency.clone().unwrap_or_default();
        self.build("idempotency", IdempotencySection::KEYS, |only| {
            IdempotencyLayer::new(store.clone(), section.config(only))
        })
    }

    /// `[dead_letter]` as a configuration, to add a classifier or a filter before
    /// [`DeadLetterLayer::new`].
    ///
    /// # Errors
    /// [`SettingsError`] naming the key the dead-letter layer refuses.
    pub fn dead_letter_config(&self) -> Result<DeadLetterConfig, SettingsError> {
        // A broker that counts deliveries: the check's warning about one that does not
        // belongs to the Worker's build, where the broker is known.
        let caps = Capabilities::new().with_delivery_count(true);
        let section = self.dead_letter.clone().unwrap_or_default();
        self.build("dead_letter", DeadLetterSection::KEYS, |only| {
            let config = section.config(only);
            config.check(&caps).map(|()| config)
        })
    }

    /// The dead-letter layer `[dead_letter]` sets, publishing through `publisher`
    /// (which also checks the destination's name).
    ///
    /// # Errors
    /// [`SettingsError`] naming the key the dead-letter layer or the publisher refuses.
    pub fn dead_letter<P: Publisher>(
        &self,
        publisher: Arc<P>,
    ) -> Result<DeadLetterLayer<P>, SettingsError> {
        let section = self.dead_letter.clone().unwrap_or_default();
        self.build("dead_letter", DeadLetterSection::KEYS, |only| {
            DeadLetterLayer::new(publisher.clone(), section.config(only))
        })
    }
}
