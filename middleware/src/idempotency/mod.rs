//! Idempotent processing: each idempotency key is processed once, across redeliveries,
//! replicas and producers that send twice.
//!
//! Two steps around the inner service: **reserve** the message's key with a lease, call
//! the inner service, then **commit** the key (on success) or **release** it (on
//! failure). A message whose key is committed is skipped.
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use redrive_core::{handler, BoxError, Headers, Message, Outcome};
//! use redrive_middleware::idempotency::{self, IdempotencyConfig, IdempotencyLayer, MemoryStore};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let runs = Arc::new(AtomicU32::new(0));
//! let counted = runs.clone();
//! let layer = IdempotencyLayer::new(Arc::new(MemoryStore::new()), IdempotencyConfig::default())?;
//! let mut service = ServiceBuilder::new()
//!     .layer(layer.clone())
//!     .service(handler::handler_fn(move |_msg: Message| {
//!         let counted = counted.clone();
//!         async move {
//!             counted.fetch_add(1, Ordering::SeqCst);
//!             Ok::<(), BoxError>(())
//!         }
//!     }));
//!
//! let charge = || {
//!     let mut headers = Headers::new();
//!     headers.insert(idempotency::IDEMPOTENCY_KEY, "charge-42").unwrap();
//!     Message::new("charge").with_headers(headers)
//! };
//! assert_eq!(service.ready().await?.call(charge()).await?, Outcome::Processed);
//! assert_eq!(service.ready().await?.call(charge()).await?, Outcome::Deduplicated);
//! assert_eq!(runs.load(Ordering::SeqCst), 1);
//! assert_eq!(layer.deduplicated(), 1);
//! # Ok(())
//! # }
//! ```
//!
//! # Guarantees
//! - **One consumer at a time per key.** Of consumers racing for a key, exactly one
//!   reserves it and runs the inner service. The others fail with a transient
//!   [`KeyReserved`] error wrapped in [`retry_after`](redrive_core::classify::retry_after)
//!   with the lease left, so the Worker redelivers once the key is committed (then the
//!   message is skipped) or the lease has expired (then it is processed).
//! - **Skip after success.** A message whose key is committed (within `ttl`) is not
//!   passed to the inner service: the layer answers `Ok(`[`Outcome::Deduplicated`]`)`,
//!   the Worker acks it, and it is logged and counted ([`IdempotencyLayer::stats`]).
//! - **Failure frees the key.** When the inner service fails, the key is released and
//!   the error goes up unchanged, so a redelivery can try again.
//! - **Store errors never run the handler unguarded.** If `reserve` fails, the call
//!   fails (transient): the circuit breaker counts it, and the Worker nacks or the
//!   breaker holds the message.
//! - **A success is a success.** If `commit` fails after the inner service succeeded
//!   (tried three times over about a second), the message was processed all the same:
//!   the call answers its outcome, so the Worker acks it, and the failure is logged at
//!   `error` and counted (`commit_failures`). Nacking it instead would have the broker
//!   deliver it again and run its effect a second time (or, on its last attempt, put a
//!   message whose effect happened into the dead-letter queue). Only a duplicate that
//!   arrives after the reservation lapses is processed again.
//! - **Keys are the consumer's own.** A key is reserved in the namespace of the
//!   consumer the message was delivered to (messaging system, destination, consumer
//!   group; see [`Namespace`]), so two queues fed by one exchange, two Kafka groups on
//!   one topic, or two services sharing one Redis or table never skip each other's
//!   messages. [`IdempotencyConfig::with_namespace`] shares keys across consumers on
//!   purpose.
//! - **A running call keeps its key.** The reservation is renewed every third of the
//!   lease while the inner service runs, however long it takes.
//! - **No key: an explicit policy.** A message without a key (see [`DefaultKey`]) is
//!   processed without deduplication, or rejected as permanent ([`Unkeyed`]); either
//!   way it is counted (`unkeyed`) and logged at `warn` (the first, then each power of
//!   two).
//!
//! ## Duplicate window
//! The handler's effect happens before the commit. If the process dies, or the commit
//! fails, between the two, or the store cannot be reached to renew a reservation for a
//! whole lease, the key is free again once the lease expires and the message is
//! processed a second time: at-least-once, with duplicates only in that window. To close it, commit the key in the same
//! database transaction as the effect: [`CommitMode::Handler`] with
//! `PostgresStore::commit_in`, which the handler reaches through the
//! [`IdempotencyToken`] the layer puts into the message's extensions. Then the effect
//! happens exactly once.
//!
//! If the call is dropped before it completes (the Worker's shutdown deadline), a store
//! that answers at once (the in-memory store) has the key released, so a redelivery
//! can run it again; with other stores the reservation is left to expire with its
//! lease.
//!
//! A message answered without running the inner service (a duplicate, a key held
//! elsewhere, a failed reservation) leaves that service as `poll_ready` left it: with a
//! store that answers at once, whatever readiness holds (a rate-limit permit, a
//! half-open breaker's probe slot) goes to the next message; with other stores the
//! ready service is dropped with the call, and what it held with it.
//!
//! # Stores
//! [`MemoryStore`] (one process only), `RedisStore` (feature `redis`) and
//! `PostgresStore` (feature `postgres`), or your own [`IdempotencyStore`].
//!
//! # Order
//! Inside `dead_letter` and the circuit breaker (so an unreachable store trips the
//! breaker, which holds the message instead of using its delivery attempts), outside
//! the rate limit, retry and timeout: in-process retries run under one reservation.
//! A message whose key another consumer holds fails with a transient error; on its last
//! delivery attempt, the dead-letter layer would dead-letter it as exhausted, so keep
//! such errors out of the DLQ with a filter:
//!
//! ```
//! use redrive_middleware::dead_letter::DeadLetterConfig;
//! use redrive_middleware::idempotency::KeyReserved;
//!
//! let config = DeadLetterConfig::default().with_filter(|err, _| KeyReserved::find(err).is_none());
//! # let _ = config;
//! ```

mod error;
pub mod future;
mod key;
mod layer;
mod memory;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
mod postgres;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
mod redis;
mod store;
#[cfg(feature = "testkit")]
#[cfg_attr(docsrs, doc(cfg(feature = "testkit")))]
pub mod testkit;

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use redrive_core::{BoxError, Message, Outcome, classify};
use tower::Service;

pub use crate::error::ConfigError;
pub use error::{KeyReserved, MissingKey, StoreError};
/// The most bytes of an idempotency key a log line carries (a producer chooses it).
const MAX_LOGGED_KEY: usize = 128;

/// `key` for a log line, cut to [`MAX_LOGGED_KEY`] bytes.
fn logged_key(key: &str) -> std::borrow::Cow<'_, str> {
    redrive_core::text::truncate(key, MAX_LOGGED_KEY)
}

/// The pool crate [`PostgresStore::new`] takes a pool of, re-exported so its version
/// always matches.
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use deadpool_postgres;
pub use key::{DefaultKey, IDEMPOTENCY_KEY, MESSAGE_ID, MakeKey};
pub use layer::{
    CommitMode, IdempotencyConfig, IdempotencyLayer, IdempotencyStats, Namespace, Unkeyed,
};
pub use memory::{DEFAULT_CAPACITY as MEMORY_STORE_CAPACITY, MemoryStore};
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use postgres::PostgresStore;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use redis::RedisStore;
pub use store::{CommitStatus, IdempotencyStore, Reservation, StoreFuture, Token};

use future::{Reserved, ResponseFuture};
use layer::{Counters, Shared};

/// The reservation a message is processed under, put into its
/// [`extensions`](redrive_core::Message::extensions) before the inner service is called.
///
/// A handler that commits the key in its own transaction reads it from there:
/// `msg.extensions.get::<IdempotencyToken>()`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencyToken {
    key: Arc<str>,
    token: Token,
}

impl IdempotencyToken {
    /// The reservation of `key` under `token`.
    pub fn new(key: impl Into<Arc<str>>, token: Token) -> Self {
        IdempotencyToken {
            key: key.into(),
            token,
        }
    }

    /// The idempotency key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The reservation's token.
    pub fn token(&self) -> &Token {
        &self.token
    }
}

impl KeyReserved {
    /// The [`KeyReserved`] in `err`'s source chain, if there is one.
    pub fn find<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a KeyReserved> {
        crate::error::find_in_chain(err)
    }
}

/// Processes each idempotency key once. See the [module docs](self).
pub struct Idempotency<S, St: ?Sized> {
    inner: S,
    shared: Arc<Shared<St>>,
}

impl<S, St: ?Sized> Idempotency<S, St> {
    /// What this service and the other services of its layer have done so far.
    pub fn stats(&self) -> IdempotencyStats {
        self.shared.stats()
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, St: ?Sized> Clone for Idempotency<S, St> {
    fn clone(&self) -> Self {
        Idempotency {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug, St: ?Sized> fmt::Debug for Idempotency<S, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency")
            .field("inner", &self.inner)
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl<S, St> Service<Message> for Idempotency<S, St>
where
    S: Service<Message> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Into<Outcome>,
    S::Error: Into<BoxError>,
    St: IdempotencyStore + ?Sized,
{
    type Response = Outcome;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, St>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut msg: Message) -> Self::Future {
        let Some(key) = self.shared.config.key.make_key(&msg) else {
            return match unkeyed(&self.shared, &msg) {
                Unkeyed::Reject => ResponseFuture::ready(Err(classify::permanent(MissingKey))),
                _ => ResponseFuture::calling(self.inner.call(msg), None),
            };
        };
        let key = self.shared.config.namespace.scope(&msg, &key);
        let shared = &self.shared;
        match shared.store.reserve_now(&key, shared.config.lease) {
            // The store answered at once: the inner service, ready, runs the message now.
            Some(Ok(reservation)) => match fresh(shared, &key, reservation) {
                Ok(token) => {
                    msg.extensions
                        .insert(IdempotencyToken::new(key.clone(), token.clone()));
                    let reserved = Reserved {
                        shared: shared.clone(),
                        key,
                        token,
                    };
                    ResponseFuture::calling(self.inner.call(msg), Some(reserved))
                }
                Err(answer) => ResponseFuture::ready(answer),
            },
            Some(Err(err)) => ResponseFuture::ready(Err(err.into())),
            None => {
                // The clone takes the place of the service that was driven to
                // readiness, which runs the message once the store has reserved the key.
                let clone = self.inner.clone();
                let ready = std::mem::replace(&mut self.inner, clone);
                ResponseFuture::boxed(process(shared.clone(), ready, key, msg))
            }
        }
    }
}

/// Counts a message without a key and says so: at `warn` for the first and for each
/// power of two, since a redelivery of such a message runs its handler again.
fn unkeyed<St: ?Sized>(shared: &Shared<St>, msg: &Message) -> Unkeyed {
    let policy = shared.config.unkeyed;
    let seen = shared.counters.unkeyed.fetch_add(1, Ordering::Relaxed) + 1;
    if seen.is_power_of_two() {
        let source = &msg.metadata.source;
        let fate = match policy {
            Unkeyed::Reject => "rejected as permanent (it goes to the dead-letter queue unrun)",
            _ => "processed without deduplication (a redelivery runs it again)",
        };
        tracing::warn!(
            unkeyed = seen,
            destination = %source.destination,
            "message without an idempotency key {fate}; have producers set a `message-id` or \
             `idempotency-key` header, or give the layer a key function (logged for the first \
             such message and each power of two; see the `unkeyed` count)"
        );
    }
    policy
}

/// The token of a fresh reservation of `key`, or the call's answer when the key is
/// taken: a skipped duplicate, or a transient error while another consumer holds it.
fn fresh<St: ?Sized>(
    shared: &Shared<St>,
    key: &Arc<str>,
    reservation: Reservation,
) -> Result<Token, Result<Outcome, BoxError>> {
    let counters = &shared.counters;
    match reservation {
        Reservation::Fresh(token) => Ok(token),
        Reservation::Committed => {
            Counters::bump(&counters.deduplicated);
            tracing::info!(idempotency_key = %logged_key(key), "duplicate skipped: key already committed");
            Err(Ok(Outcome::Deduplicated))
        }
        Reservation::Reserved { remaining } => {
            Counters::bump(&counters.reserved_elsewhere);
            tracing::debug!(idempotency_key = %logged_key(key), ?remaining, "key reserved by another consumer");
            Err(Err(classify::retry_after(
                KeyReserved {
                    key: key.to_string(),
                    remaining,
                },
                remaining,
            )))
        }
    }
}

/// Reserves `key`: at once where the store can answer so, else through its future.
async fn reserve_key<St: IdempotencyStore + ?Sized>(
    store: &St,
    key: &Arc<str>,
    lease: Duration,
) -> Result<Reservation, StoreError> {
    match store.reserve_now(key, lease) {
        Some(answer) => answer,
        None => store.reserve(key, lease).await,
    }
}

/// Commits `key`: at once where the store can answer so, else through its future.
async fn commit_key<St: IdempotencyStore + ?Sized>(
    store: &St,
    key: &str,
    token: &Token,
    ttl: Duration,
) -> Result<CommitStatus, StoreError> {
    match store.commit_now(key, token, ttl) {
        Some(answer) => answer,
        None => commit_retrying(store, key, token, ttl).await,
    }
}

/// The call's answer once the inner service succeeded with `outcome` and the commit of
/// `key` came back with `status`.
fn committed<St: ?Sized>(
    shared: &Shared<St>,
    key: Arc<str>,
    status: Result<CommitStatus, StoreError>,
    outcome: Outcome,
) -> Result<Outcome, BoxError> {
    match status {
        Ok(CommitStatus::Committed) => {
            if shared.config.commit_mode == CommitMode::Handler {
                tracing::warn!(
                    idempotency_key = %logged_key(&key),
                    "the handler succeeded without committing the idempotency key in its \
                     transaction; committed it afterwards, so effect and key were not atomic"
                );
            }
            Ok(outcome)
        }
        Ok(CommitStatus::AlreadyCommitted) => Ok(outcome),
        Err(e) => {
            Counters::bump(&shared.counters.commit_failures);
            tracing::error!(
                idempotency_key = %logged_key(&key), error = %e,
                "the handler succeeded but its idempotency key could not be committed; the \
                 message is acked, since its effect happened, and a duplicate of it that \
                 arrives once the reservation lapses is processed again"
            );
            Ok(outcome)
        }
    }
}

/// Delays between commit tries: a store that blinked gets a second chance before a
/// success goes unrecorded.
const COMMIT_RETRIES: [Duration; 2] = [Duration::from_millis(200), Duration::from_millis(800)];

/// Commits `key` through the store's future, trying again after a backend error (a
/// lost lease is final).
pub(crate) async fn commit_retrying<St: IdempotencyStore + ?Sized>(
    store: &St,
    key: &str,
    token: &Token,
    ttl: Duration,
) -> Result<CommitStatus, StoreError> {
    let mut delays = COMMIT_RETRIES.iter();
    loop {
        match store.commit(key, token, ttl).await {
            Err(e) if !e.is_lease_lost() => match delays.next() {
                Some(delay) => {
                    tracing::warn!(
                        idempotency_key = %logged_key(key), error = %e, ?delay,
                        "committing the idempotency key failed; trying again"
                    );
                    tokio::time::sleep(*delay).await;
                }
                None => return Err(e),
            },
            answer => return answer,
        }
    }
}

/// Frees `key` after the inner service failed, so a redelivery can try again.
async fn release<St: IdempotencyStore + ?Sized>(shared: &Shared<St>, key: &str, token: &Token) {
    if let Err(release) = shared.store.release(key, token).await {
        tracing::warn!(
            idempotency_key = %logged_key(key),
            error = %release,
            "could not release the idempotency key; it stays reserved until its lease expires"
        );
    }
}

/// Renews the reservation of `key` every third of the lease, for as long as it is
/// polled (while the inner service runs). Never completes.
pub(crate) async fn keep_reserved<St: IdempotencyStore + ?Sized>(
    shared: Arc<Shared<St>>,
    key: Arc<str>,
    token: Token,
) {
    let lease = shared.config.lease;
    let every = lease / 3;
    loop {
        tokio::time::sleep(every).await;
        match shared.store.extend(&key, &token, lease).await {
            Ok(()) => {}
            Err(e) if e.is_lease_lost() => {
                Counters::bump(&shared.counters.leases_lost);
                tracing::warn!(
                    idempotency_key = %logged_key(&key), error = %e,
                    "the reservation was lost while the handler ran; another consumer may \
                     process this message too"
                );
                return std::future::pending().await;
            }
            Err(e) => tracing::warn!(
                idempotency_key = %logged_key(&key), error = %e, ?every,
                "renewing the reservation failed; trying again, and it lapses with its lease \
                 if the store stays unreachable"
            ),
        }
    }
}

/// Every step through the store's futures, for a store that does not answer at once.
async fn process<S, St>(
    shared: Arc<Shared<St>>,
    mut inner: S,
    key: Arc<str>,
    mut msg: Message,
) -> Result<Outcome, BoxError>
where
    S: Service<Message>,
    S::Response: Into<Outcome>,
    S::Error: Into<BoxError>,
    St: IdempotencyStore + ?Sized,
{
    let reservation = reserve_key(&*shared.store, &key, shared.config.lease).await?;
    let token = match fresh(&shared, &key, reservation) {
        Ok(token) => token,
        Err(answer) => return answer,
    };
    msg.extensions
        .insert(IdempotencyToken::new(key.clone(), token.clone()));
    // Boxed on its own: with the inner future inline this future outgrows the
    // allocator's per-thread cache (about 1 KiB with glibc), and each message then takes
    // the slow path of malloc and free; two smaller boxes stay on the fast one.
    let call = Box::pin(inner.call(msg));
    let keep = keep_reserved(shared.clone(), key.clone(), token.clone());
    let result = tokio::select! {
        biased;
        r = call => r,
        () = keep => unreachable!("keeping a reservation never ends"),
    };
    match result.map(Into::into).map_err(Into::into) {
        Ok(outcome) => {
            let status = commit_key(&*shared.store, &key, &token, shared.config.ttl).await;
            committed(&shared, key, status, outcome)
        }
        Err(err) => {
            release(&shared, &key, &token).await;
            Err(err)
        }
    }
}
