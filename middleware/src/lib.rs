//! redrive's tower layers, one module each, and the [`Stack`] builder that
//! assembles them in their canonical order.
//!
//! Canonical order, outermost first: `trace`, `metrics`, `dead_letter`, `idempotency`,
//! `circuit_breaker`, `rate_limit`, `retry`, `timeout`. Layers see the
//! [`Message`](redrive_core::Message) and the handler's result; they never settle a
//! delivery (the Worker does).
//!
//! # TLS to Redis
//! With the `redis-tls` feature, the Redis idempotency store and rate limit take
//! `rediss://` URLs (`RedisStore::connect`, `RedisRateLimitLayer::from_url`), trusting
//! the platform's roots, or a CA file of yours (`RedisStore::connect_with_ca`,
//! `RedisRateLimitLayer::from_url_with_ca`). TLS is rustls with its ring crypto
//! provider, which the first `rediss://` client installs as the process's default
//! unless the application installed one before: to use another provider, install it
//! before building that client.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod error;
pub mod stack;

pub use error::{ConfigError, Error, Result};
pub use stack::{Stack, StackPart};

#[cfg(feature = "circuit-breaker")]
#[cfg_attr(docsrs, doc(cfg(feature = "circuit-breaker")))]
pub mod circuit_breaker;
#[cfg(feature = "dead-letter")]
#[cfg_attr(docsrs, doc(cfg(feature = "dead-letter")))]
pub mod dead_letter;
#[cfg(feature = "idempotency")]
#[cfg_attr(docsrs, doc(cfg(feature = "idempotency")))]
pub mod idempotency;
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub mod metrics;
#[cfg(feature = "rate-limit")]
#[cfg_attr(docsrs, doc(cfg(feature = "rate-limit")))]
pub mod rate_limit;
#[cfg(feature = "redis")]
mod redis_client;
#[cfg(feature = "retry")]
#[cfg_attr(docsrs, doc(cfg(feature = "retry")))]
pub mod retry;
#[cfg(any(feature = "metrics", feature = "retry", feature = "idempotency"))]
mod shard;
#[cfg(feature = "timeout")]
#[cfg_attr(docsrs, doc(cfg(feature = "timeout")))]
pub mod timeout;
#[cfg(feature = "trace")]
#[cfg_attr(docsrs, doc(cfg(feature = "trace")))]
pub mod trace;
#[cfg(any(feature = "retry", feature = "circuit-breaker"))]
mod window;
