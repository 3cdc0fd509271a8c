//! [`RedisRateLimitLayer`], which builds [`RedisRateLimit`] services sharing one pool.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::OnceCell;
use tower::Layer;

use super::config::RedisRateLimitConfig;
use super::service::{RedisRateLimit, State};
use super::shared::Shared;
use crate::rate_limit::ConfigError;
use crate::redis_client::{self, Target};

/// The constructor that takes a CA file, for the error when the platform's roots do
/// not trust the server's certificate.
const WITH_CA: &str = "`RedisRateLimitLayer::from_url_with_ca`";

/// Wraps a service in [`RedisRateLimit`]: the direct limit (see
/// [`RateLimitLayer`](crate::rate_limit::RateLimitLayer)), shared through Redis by every layer
/// in any process that names the same key. Clones share one connection, one pool of
/// prefetched permits and one outage state.
///
/// ```no_run
/// use redrive_core::{handler, BoxError, Message};
/// use redrive_middleware::rate_limit::{
///     OnUnreachable, RateLimitConfig, RedisRateLimitConfig, RedisRateLimitLayer,
/// };
/// use tower::ServiceBuilder;
///
/// # fn main() -> Result<(), BoxError> {
/// // 200 messages a second across every replica, 10 permits per Redis call; at
/// // most 50 a second per replica while Redis is away.
/// let limit = RedisRateLimitLayer::from_url(
///     "redis://127.0.0.1:6379",
///     RedisRateLimitConfig::new("redrive:rate:billing-api", RateLimitConfig::per_second(200))
///         .with_prefetch(10)
///         .with_on_unreachable(OnUnreachable::fail_open_at(RateLimitConfig::per_second(50))),
/// )?;
/// let service = ServiceBuilder::new()
///     .layer(limit.clone())
///     .service(handler::handler_fn(|_msg: Message| async { Ok::<_, BoxError>(()) }));
/// # let _ = service;
/// // For a gauge: is the limit running without Redis right now?
/// let _degraded = limit.is_degraded();
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisRateLimitLayer {
    pub(super) shared: Arc<Shared>,
}

impl RedisRateLimitLayer {
    /// A layer on the Redis server `client` points at. Connects on first use, so the
    /// layer builds even while Redis is away (then [`OnUnreachable`](super::OnUnreachable) applies).
    ///
    /// For settings the URL cannot carry (a client certificate, say), build `client`
    /// yourself, with `redis::Client::build_with_tls` for TLS.
    ///
    /// # Errors
    /// [`ConfigError`] when a setting cannot work (a limit or burst of 0, an empty
    /// key, a prefetch above the burst, a timeout of 0); the message says what to
    /// change.
    pub fn new(client: redis::Client, config: RedisRateLimitConfig) -> Result<Self, ConfigError> {
        let target = Target::of(&client, None, WITH_CA);
        Self::build(client, target, config)
    }

    fn build(
        client: redis::Client,
        target: Target,
        config: RedisRateLimitConfig,
    ) -> Result<Self, ConfigError> {
        let (interval, tau, fallback) = config.check()?;
        Ok(RedisRateLimitLayer {
            shared: Arc::new(Shared {
                client,
                target,
                conn: OnceCell::new(),
                config,
                interval,
                tau,
                fallback,
                pool: AtomicU32::new(0),
                degraded: AtomicBool::new(false),
                outage: Mutex::new(None),
                redis_calls: AtomicU64::new(0),
                degraded_permits: AtomicU64::new(0),
                outages: AtomicU64::new(0),
                reported: AtomicBool::new(false),
            }),
        })
    }

    /// A layer on the Redis server at `url`. Connects on first use.
    ///
    /// `redis://host:port/db` connects in plaintext; `rediss://host:port/db` with TLS
    /// (feature `redis-tls`), checking the server's certificate against the platform's
    /// roots and the URL's host. For a server whose CA the platform does not trust,
    /// use [`from_url_with_ca`](Self::from_url_with_ca). When the first connection
    /// fails, the logged error says what to change if the URL's scheme and the port
    /// disagree (a `redis://` URL to a port that takes TLS only, a `rediss://` URL to a
    /// plaintext port) or the server's certificate is not trusted.
    ///
    /// # Errors
    /// [`ConfigError`] when the URL is invalid (the message shows it without its
    /// password), when it is `rediss://` and the `redis-tls` feature is off, or when a
    /// setting cannot work.
    pub fn from_url(url: &str, config: RedisRateLimitConfig) -> Result<Self, ConfigError> {
        let (client, target) =
            redis_client::open(url, None, WITH_CA).map_err(RedisRateLimitConfig::invalid)?;
        Self::build(client, target, config)
    }

    /// A layer on the Redis server at `url` (`rediss://host:port/db`) as
    /// [`from_url`](Self::from_url) builds it, with TLS, trusting the CA certificates
    /// in the PEM file `ca_file` instead of the platform's roots: for a private CA. The
    /// server's certificate must name the URL's host (a DNS name, or an IP address for
    /// `rediss://127.0.0.1`). Reads `ca_file` now; connects on first use.
    ///
    /// ```no_run
    /// use redrive_middleware::rate_limit::{RateLimitConfig, RedisRateLimitConfig, RedisRateLimitLayer};
    ///
    /// # fn main() -> Result<(), redrive_core::BoxError> {
    /// let limit = RedisRateLimitLayer::from_url_with_ca(
    ///     "rediss://cache.internal:6380",
    ///     "/etc/redrive/ca.pem",
    ///     RedisRateLimitConfig::new("redrive:rate:billing-api", RateLimitConfig::per_second(200)),
    /// )?;
    /// # let _ = limit;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`from_url`](Self::from_url), and when `url` is not `rediss://`, or `ca_file`
    /// cannot be read or holds no certificate.
    #[cfg(feature = "redis-tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis-tls")))]
    pub fn from_url_with_ca(
        url: &str,
        ca_file: impl AsRef<std::path::Path>,
        config: RedisRateLimitConfig,
    ) -> Result<Self, ConfigError> {
        let (client, target) = redis_client::open(url, Some(ca_file.as_ref()), WITH_CA)
            .map_err(RedisRateLimitConfig::invalid)?;
        Self::build(client, target, config)
    }

    /// The layer's settings.
    pub fn config(&self) -> &RedisRateLimitConfig {
        &self.shared.config
    }

    /// Whether Redis is unreachable right now, so the layer is failing closed or open:
    /// for a gauge.
    pub fn is_degraded(&self) -> bool {
        self.shared.degraded.load(Ordering::Relaxed)
    }

    /// Messages let through without Redis while failing open, since the layer was
    /// built: for a counter.
    pub fn degraded_permits(&self) -> u64 {
        self.shared.degraded_permits.load(Ordering::Relaxed)
    }

    /// Outages begun (Redis reachable, or never reached, then not) since the layer was
    /// built: for a counter.
    pub fn outages(&self) -> u64 {
        self.shared.outages.load(Ordering::Relaxed)
    }

    /// Calls of the limit's script made, answered or not, since the layer was built:
    /// for a counter, and to see what prefetching saves.
    pub fn redis_calls(&self) -> u64 {
        self.shared.redis_calls.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for RedisRateLimitLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRateLimitLayer")
            .field("config", &self.shared.config)
            .field("degraded", &self.is_degraded())
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for RedisRateLimitLayer {
    type Service = RedisRateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RedisRateLimit {
            inner,
            shared: self.shared.clone(),
            permit: false,
            state: State::Idle,
        }
    }
}

impl crate::StackPart for RedisRateLimitLayer {
    fn describe(&self) -> Option<String> {
        let config = &self.shared.config;
        Some(format!(
            "rate_limit_redis({} on {}, prefetch {})",
            config.rate.describe(),
            config.key,
            config.prefetch
        ))
    }

    /// Once per limit: a Stack built into several Workers reports its limit once.
    #[cfg(feature = "metrics")]
    fn report_into(&self, metrics: &crate::metrics::MetricsLayer) {
        if !self.shared.reported.swap(true, Ordering::Relaxed) {
            metrics.observe_rate_limit(self);
        }
    }
}
