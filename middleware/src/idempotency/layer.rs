//! [`IdempotencyLayer`] and its settings.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redrive_core::Message;
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

/// What the layer does with a message that has no idempotency key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Unkeyed {
    /// Run it without deduplication: a redelivery runs it again. Each such message is
    /// counted (`unkeyed`), and a warning names the first one and each power of two.
    #[default]
    Process,
    /// Fail it with a permanent [`MissingKey`](super::MissingKey) error, so the
    /// dead-letter layer takes it out of the queue unrun: for handlers whose effect must
    /// never happen twice. Counted as `unkeyed` too.
    Reject,
}

/// Whose keys a layer's keys may meet in its store.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Namespace {
    /// Each key is scoped by the consumer the message was delivered to: its messaging
    /// system, destination (queue or topic) and, where the broker has them, consumer
    /// group ([`Source`](redrive_core::Source)). Two queues bound to one exchange, two
    /// Kafka consumer groups on one topic, or two services sharing one Redis or one
    /// table each process every message of their own.
    #[default]
    Consumer,
    /// Every key is scoped by this name alone, whatever delivered the message: a
    /// message processed by any consumer with the same name is a duplicate for all of
    /// them (one service reading the same operations from two queues, say).
    Named(Arc<str>),
}

impl Namespace {
    /// `key`, the key of `msg`, as the layer reserves and commits it in the store:
    /// `<system>:<destination>/<key>`, `<system>:<destination>@<group>/<key>` where the
    /// message came to a consumer group, or `<name>/<key>` for a named namespace.
    pub fn scope(&self, msg: &Message, key: &str) -> Arc<str> {
        match self {
            Namespace::Named(name) => format!("{name}/{key}").into(),
            Namespace::Consumer => {
                let source = &msg.metadata.source;
                // Kafka topic names cannot hold `@`, and only Kafka has groups, so no
                // destination of one system reads as another's destination and group.
                match &source.group {
                    Some(group) => {
                        format!("{}:{}@{group}/{key}", source.system, source.destination)
                    }
                    None => format!("{}:{}/{key}", source.system, source.destination),
                }
                .into()
            }
        }
    }
}

/// The idempotency layer's settings, checked by [`IdempotencyLayer::new`].
///
/// | setting | default |
/// |---|---|
/// | `lease` (how long a reservation lasts unrenewed) | 30 s |
/// | `ttl` (how long a committed key is remembered) | 24 h |
/// | `key` | [`DefaultKey`] |
/// | `namespace` | [`Namespace::Consumer`] |
/// | `unkeyed` | [`Unkeyed::Process`] |
/// | `commit_mode` | [`CommitMode::Layer`] |
///
/// The layer renews a reservation every third of its lease while the inner service
/// runs, so a slow handler keeps its key. The lease is what is left when renewing fails
/// (the store unreachable, the process gone): once it expires, another consumer may
/// reserve the key and process the message too. The TTL must outlast the longest time
/// a duplicate can arrive (the broker's redelivery window, a producer's retries).
#[derive(Clone)]
pub struct IdempotencyConfig {
    pub(crate) lease: Duration,
    pub(crate) ttl: Duration,
    pub(crate) key: Arc<dyn MakeKey>,
    pub(crate) namespace: Namespace,
    pub(crate) unkeyed: Unkeyed,
    pub(crate) commit_mode: CommitMode,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        IdempotencyConfig {
            lease: Duration::from_secs(30),
            ttl: Duration::from_secs(24 * 3600),
            key: Arc::new(DefaultKey),
            namespace: Namespace::Consumer,
            unkeyed: Unkeyed::Process,
            commit_mode: CommitMode::Layer,
        }
    }
}

impl fmt::Debug for IdempotencyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyConfig")
            .field("lease", &self.lease)
            .field("ttl", &self.ttl)
            .field("namespace", &self.namespace)
            .field("unkeyed", &self.unkeyed)
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

    /// Scopes every key by `name` instead of by the consumer; see [`Namespace::Named`].
    #[must_use]
    pub fn with_namespace(mut self, name: impl Into<Arc<str>>) -> Self {
        self.namespace = Namespace::Named(name.into());
        self
    }

    /// What to do with a message that has no key; see [`Unkeyed`].
    #[must_use]
    pub fn with_unkeyed(mut self, unkeyed: Unkeyed) -> Self {
        self.unkeyed = unkeyed;
        self
    }

    /// How long a reservation lasts unrenewed.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// How long a committed key is remembered.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Namespace::Named(name) = &self.namespace {
            if name.is_empty() {
                return Err(ConfigError::new(
                    "idempotency",
                    "`namespace` is empty; name the service whose keys these are",
                ));
            }
        }
        for (name, d) in [("lease", self.lease), ("ttl", self.ttl)] {
            if d < Duration::from_millis(1) {
                return Err(ConfigError::new(
                    "idempotency",
                    format!(
                        "`{name}` is {d:?}; stores count in milliseconds, so set at least 1 ms"
                    ),
                ));
            }
            if d > MAX_DURATION {
                return Err(ConfigError::new(
                    "idempotency",
                    format!("`{name}` is {d:?}; set at most 10 years"),
                ));
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
    /// Messages without a key: processed without deduplication, or rejected (see
    /// [`Unkeyed`]).
    pub unkeyed: u64,
    /// Successes whose key could not be committed.
    pub commit_failures: u64,
    /// Reservations found taken over while their handler still ran (renewing came too
    /// late), each a possible duplicate.
    pub leases_lost: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) deduplicated: AtomicU64,
    pub(crate) reserved_elsewhere: AtomicU64,
    pub(crate) unkeyed: AtomicU64,
    pub(crate) commit_failures: AtomicU64,
    pub(crate) leases_lost: AtomicU64,
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
            leases_lost: self.leases_lost.load(Ordering::Relaxed),
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
