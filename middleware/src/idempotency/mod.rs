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
//! [`MemoryStore`] (one process only), `RedisStore` (feature `redis`; over TLS with
//! `rediss://` URLs and the `redis-tls` feature) and `PostgresStore` (feature
//! `postgres`), or your own [`IdempotencyStore`].
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
mod steps;
mod store;
#[cfg(feature = "testkit")]
#[cfg_attr(docsrs, doc(cfg(feature = "testkit")))]
pub mod testkit;

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use redrive_core::{BoxError, Message, Outcome, classify};
use tower::Service;

pub use crate::error::ConfigError;
pub use error::{KeyReserved, MissingKey, StoreError};

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
use layer::Shared;
use steps::{fresh, process, unkeyed};

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
