//! The cluster-wide direct limit: [`RedisRateLimitLayer`] and [`RedisRateLimit`], GCRA
//! in one Redis script, shared by every replica that names the same key.

// One file per part:
// - `config.rs`: the settings, and what to do while Redis is away;
// - `layer.rs`: the layer, which owns what its services share;
// - `shared.rs`: the script, the permit pool and the calls to Redis;
// - `service.rs`: the service, which holds `poll_ready` back.
mod config;
mod layer;
mod service;
mod shared;

pub use config::{OnUnreachable, RedisRateLimitConfig};
pub use layer::RedisRateLimitLayer;
pub use service::RedisRateLimit;
