//! Rate limits with [`governor`]: a direct limit that holds intake back through
//! `poll_ready`, and a keyed limit (per header value, say per tenant) that delays only
//! the messages of a busy key. With the `redis` feature, `RedisRateLimitLayer` is the
//! direct limit shared by every replica through Redis (over TLS with `rediss://` URLs
//! and the `redis-tls` feature).
//!
//! ```
//! use std::time::Duration;
//! use redrive_core::{handler, BoxError, Message};
//! use redrive_middleware::rate_limit::{KeyedRateLimitLayer, RateLimitConfig, RateLimitLayer};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), BoxError> {
//! let service = ServiceBuilder::new()
//!     // At most 100 messages a second overall, in bursts of at most 10…
//!     .layer(RateLimitLayer::new(RateLimitConfig::per_second(100).with_burst(10))?)
//!     // …and 5 a second per tenant.
//!     .layer(KeyedRateLimitLayer::by_header("x-tenant", RateLimitConfig::per_second(5))?)
//!     .service(handler::handler_fn(|_msg: Message| async { Ok::<_, BoxError>(()) }));
//!
//! service.oneshot(Message::new("x")).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Guarantees
//! - **Direct** ([`RateLimitLayer`]): `poll_ready` takes a permit from the limiter
//!   before it asks the inner service; while none is available it is pending, with a
//!   timer set for the instant the limiter names (no polling loop). The Worker stops
//!   taking deliveries meanwhile, so messages wait in the broker. A permit taken by
//!   `poll_ready` is used by the next `call`; a service dropped in between wastes it.
//! - **Keyed** ([`KeyedRateLimitLayer`]): the key is known only once the message is
//!   there, so the wait happens inside the call's future, not in `poll_ready`
//!   (which would stop every key). While it waits, the future holds only the message
//!   and a fresh clone of the inner service that has not been asked to be ready:
//!   no concurrency permit or other readiness is held, and other keys flow on. The
//!   Worker's own concurrency slot stays taken during the wait; size concurrency with
//!   that in mind, or use `OrderingMode::PerKey` so a busy key queues its messages.
//!   A message without a key (the key function returns `None`) is not limited.
//! - Limits are per layer: every service a layer builds, and every clone, shares its
//!   limiter. [`RateLimitLayer`] and [`KeyedRateLimitLayer`] are per process: several
//!   consumers each get the full rate.
//! - **Cluster-wide** (`RedisRateLimitLayer`, feature `redis`): the direct limit, held
//!   in `poll_ready` the same way, but its state is one Redis key that every replica
//!   naming it shares, updated by one atomic script (GCRA, the algorithm governor
//!   uses) on Redis's clock, so the replicas' clocks do not matter. Ten replicas
//!   together get the rate, not ten times it. Each permit costs a Redis round trip
//!   unless the layer prefetches a batch (then a replica may spend up to a batch at
//!   once, beyond the burst); while Redis is unreachable the layer fails closed (intake
//!   stops) or open (per-process fallback rate, or none), as configured, and says so
//!   through `is_degraded`.
//! - Time is tokio's, so tests can pause and advance it; the cluster-wide limit counts
//!   on Redis's clock and sleeps on tokio's.
//!
//! # Order
//! Inside the circuit breaker, outside retries: each delivery attempt takes one
//! permit, however many tries it makes.

mod clock;
mod config;
mod direct;
mod keyed;
#[cfg(feature = "redis")]
mod redis;

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use self::redis::{OnUnreachable, RedisRateLimit, RedisRateLimitConfig, RedisRateLimitLayer};
pub use crate::error::ConfigError;
pub use config::RateLimitConfig;
pub use direct::{RateLimit, RateLimitLayer, ResponseFuture};
pub use keyed::{KeyedRateLimit, KeyedRateLimitLayer, KeyedResponseFuture};
