//! [`IdempotencyLayer`] and its settings.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tower::Layer;

use super::{ConfigError, DefaultKey, Idempotency, IdempotencyStore, MakeKey};

/// Who commits the idempotency key after the handler succeeded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CommitMode {
    /// The layer commits after the handler succeeded. If the handler already committed
    /// the key itself, the layer's commit is a no-op.
    #[default]
    Layer,
    /// The handler commits the key inside its own database transaction (for example
    /// with `PostgresStore::commit_in`), so its effect and the key commit together. The
    /// layer's commit afterwards is then a no-op; if the handler succeeded without
    /// committing, the layer commits and logs a warning, because the effect and the
    /// key were not atomic.
    Handler,
}

/// The idempotency layer's settings, checked by [`IdempotencyLayer::new`].
///
/// | setting | default |
/// |---|---|
/// | `lease` (how long a reservation lasts) | 30 s |
/// | `ttl` (how long a committed key is remembered) | 24 h |
/// | `key` | [`DefaultKey`] |
/// | `commit_mode` | [`CommitMode::Layer`] |
///
/// The lease must outlast the slowest processing of one message (timeouts × in-process
/// retries): a reservation is not extended while the handler runs, and once it expires
/// another consumer may reserve the key and process the message too. The TTL must
/// outlast the longest time a duplicate can arrive (the broker's redelivery window, a
/// producer's retries).
#[derive(Clone)]
pub struct IdempotencyConfig {
    pub(crate) lease: Duration,
    pub(crate) ttl: Duration,
    pub(crate) key: Arc<dyn MakeKey>,
    pub(crate) commit_mode: CommitMode,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        IdempotencyConfig {
            lease: Duration::from_secs(30),
            ttl: Duration::from_secs(24 * 3600),
            key: Arc::new(DefaultKey),
            commit_mode: CommitMode::Layer,
        }
    }
}

impl fmt::Debug for IdempotencyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyConfig")
            .field("lease", &self.lease)
            .field("ttl", &self.ttl)
            .field("commit_mode", &self.commit_mode)
            .finish_non_exhaustive()
    }
}

/// The longest lease or TTL accepted.
const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

impl IdempotencyConfig {
    /// How long a reservation lasts.
    #[must_use]
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How long a committed key is remembered.
    #[must_use]
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Works out keys with `key` instead of [`DefaultKey`].
    #[must_use]
    pub fn with_key(mut self, key: impl MakeKey) -> Self {
        self.key = Arc::new(key);
        self
    }

    /// Who commits the key; see [`CommitMode`].
    #[must_use]
    pub fn with_commit_mode(mut self, mode: CommitMode) -> Self {
        self.commit_mode = mode;
        self
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for (name, d) in [("lease", self.lease), ("ttl", self.ttl)] {
            if d < Duration::from_millis(1) {
                return Err(ConfigError(format!(
                    "`{name}` is {d:?}; stores count in milliseconds, so set at least 1 ms"
                )));
            }
            if d > MAX_DURATION {
                return Err(ConfigError(format!(
                    "`{name}` is {d:?}; set at most 10 years"
                )));
            }
        }
        Ok(())
    }
}

/// What an idempotency layer has done so far, across all its services.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct IdempotencyStats {
    /// Messages skipped because their key was committed.
    pub deduplicated: u64,
    /// Messages sent back because another consumer held their key.
    pub reserved_elsewhere: u64,
    /// Messages processed without deduplication because they had no key.
    pub unkeyed: u64,
    /// Successes whose key could not be committed.
    pub commit_failures: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) deduplicated: AtomicU64,
    pub(crate) reserved_elsewhere: AtomicU64,
    pub(crate) unkeyed: AtomicU64,
    pub(crate) commit_failures: AtomicU64,
    pub(crate) unkeyed_logged: AtomicBool,
}

impl Counters {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> IdempotencyStats {
        IdempotencyStats {
            deduplicated: self.deduplicated.load(Ordering::Relaxed),
            reserved_elsewhere: self.reserved_elsewhere.load(Ordering::Relaxed),
            unkeyed: self.unkeyed.load(Ordering::Relaxed),
            commit_failures: self.commit_failures.load(Ordering::Relaxed),
        }
    }
}

/// What every clone of a layer and its services share.
pub(crate) struct Shared<St: ?Sized> {
    pub(crate) store: Arc<St>,
    pub(crate) config: IdempotencyConfig,
    pub(crate) counters: Counters,
}

impl<St: ?Sized> Shared<St> {
    pub(crate) fn stats(&self) -> IdempotencyStats {
        self.counters.snapshot()
    }
}

/// Wraps a service in [`Idempotency`]. Clones share the store, the settings and the
/// counters.
pub struct IdempotencyLayer<St: ?Sized> {
    shared: Arc<Shared<St>>,
}

impl<St: IdempotencyStore + ?Sized> IdempotencyLayer<St> {
    /// A layer that reserves and commits keys in `store`.
    ///
    /// # Errors
    /// [`ConfigError`] when a lease or TTL is under 1 ms or over 10 years.
    pub fn new(store: Arc<St>, config: IdempotencyConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(IdempotencyLayer {
            shared: Arc::new(Shared {
                store,
                config,
                counters: Counters::default(),
            }),
        })
    }
}

impl<St: ?Sized> IdempotencyLayer<St> {
    /// What the layer's services have done so far.
    pub fn stats(&self) -> IdempotencyStats {
        self.shared.stats()
    }

    /// Messages skipped as duplicates so far.
    pub fn deduplicated(&self) -> u64 {
        self.stats().deduplicated
    }

    /// The layer's settings.
    pub fn config(&self) -> &IdempotencyConfig {
        &self.shared.config
    }
}

impl<St: ?Sized> Clone for IdempotencyLayer<St> {
    fn clone(&self) -> Self {
        IdempotencyLayer {
            shared: self.shared.clone(),
        }
    }
}

impl<St: ?Sized> fmt::Debug for IdempotencyLayer<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("config", &self.shared.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl<S, St: ?Sized> Layer<S> for IdempotencyLayer<St> {
    type Service = Idempotency<S, St>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency {
            inner,
            shared: self.shared.clone(),
        }
    }
}
