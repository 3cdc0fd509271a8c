//! The cluster-wide direct limit: [`RedisRateLimitLayer`] and [`RedisRateLimit`], GCRA
//! in one Redis script, shared by every replica that names the same key.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use governor::RateLimiter;
use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redrive_core::{BoxError, Message};
use tokio::sync::OnceCell;
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

use super::clock::{DirectLimiter, TokioClock};
use super::direct::ResponseFuture;
use super::{ConfigError, RateLimitConfig};

/// GCRA on Redis's clock. Takes up to ARGV[3] permits from the limit at KEYS[1], whose
/// value is the theoretical arrival time (TAT) in µs of Redis's `TIME`.
/// ARGV[1] = emission interval in µs, ARGV[2] = burst tolerance (burst × interval) in µs,
/// ARGV[3] = permits wanted (at most the burst).
///
/// Returns `{granted, wait_ms}`: when at least one permit conforms now, grants as many
/// as conform, up to the number wanted, with a wait of 0. When none does, reserves the
/// number wanted and returns the wait until they all conform; the caller sleeps that
/// long, then spends them. Either way TAT moves on by `granted` intervals, so Redis
/// never hands out more than the rate allows, and a replica needs one call per batch.
/// The key expires once TAT is past, when it would grant a full burst anyway.
static GCRA: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.replicate_commands then pcall(redis.replicate_commands) end
local interval = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local wanted = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if tat < now then tat = now end
local conforming = math.floor((now + tau - tat) / interval)
local granted = wanted
local wait = 0
if conforming >= 1 then
  if conforming < wanted then granted = conforming end
else
  wait = tat + wanted * interval - tau - now
end
tat = tat + granted * interval
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
return {granted, math.ceil(wait / 1000)}
",
    )
});

/// What a [`RedisRateLimitLayer`] does while Redis cannot be reached (a failed
/// connection, an error, or no answer within the timeout).
///
/// Either way the layer logs one warning when an outage begins and one line when
/// Redis answers again, reports [`is_degraded`](RedisRateLimitLayer::is_degraded)
/// meanwhile, and asks Redis again every
/// [`retry_interval`](RedisRateLimitConfig::with_retry_interval).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnUnreachable {
    /// Stop intake: `poll_ready` stays pending until Redis answers again, and messages
    /// wait in the broker. The downstream never sees more than the limit. The default.
    FailClosed,
    /// Let messages through without Redis: at `fallback`'s rate, per process, when
    /// one is given, or unlimited. Every message let through this way is counted in
    /// [`degraded_permits`](RedisRateLimitLayer::degraded_permits).
    FailOpen {
        /// A per-process limit to apply meanwhile (say the cluster limit divided by
        /// the number of replicas), or `None` for none.
        fallback: Option<RateLimitConfig>,
    },
}

impl OnUnreachable {
    /// [`FailOpen`](Self::FailOpen) with no limit at all while Redis is away.
    pub fn fail_open() -> Self {
        OnUnreachable::FailOpen { fallback: None }
    }

    /// [`FailOpen`](Self::FailOpen) at `fallback`'s rate, per process, while Redis is
    /// away.
    pub fn fail_open_at(fallback: RateLimitConfig) -> Self {
        OnUnreachable::FailOpen {
            fallback: Some(fallback),
        }
    }
}

/// The settings of a [`RedisRateLimitLayer`].
///
/// | setting | default |
/// |---|---|
/// | `key` | (required) the Redis key that holds the limit |
/// | `rate` | (required) the cluster-wide [`RateLimitConfig`] |
/// | `prefetch` | 1 (one Redis call per message) |
/// | `on_unreachable` | [`OnUnreachable::FailClosed`] |
/// | `timeout` | [`DEFAULT_TIMEOUT`](Self::DEFAULT_TIMEOUT) (1 s) |
/// | `retry_interval` | [`DEFAULT_RETRY_INTERVAL`](Self::DEFAULT_RETRY_INTERVAL) (1 s) |
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisRateLimitConfig {
    key: String,
    rate: RateLimitConfig,
    prefetch: u32,
    on_unreachable: OnUnreachable,
    timeout: Duration,
    retry_interval: Duration,
}

impl RedisRateLimitConfig {
    /// How long one Redis call may take by default, connecting included.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

    /// How often Redis is asked again during an outage, by default.
    pub const DEFAULT_RETRY_INTERVAL: Duration = Duration::from_secs(1);

    /// `rate`, shared by every layer, in any process, that uses the Redis key `key`
    /// on the same server. Name the key after what is limited
    /// (`"redrive:rate:billing-api"`), and give every layer on it the same rate and
    /// burst: the key holds a time computed with each caller's own settings.
    pub fn new(key: impl Into<String>, rate: RateLimitConfig) -> Self {
        RedisRateLimitConfig {
            key: key.into(),
            rate,
            prefetch: 1,
            on_unreachable: OnUnreachable::FailClosed,
            timeout: Self::DEFAULT_TIMEOUT,
            retry_interval: Self::DEFAULT_RETRY_INTERVAL,
        }
    }

    /// Takes up to `n` permits per Redis call and spends them locally, so a replica
    /// busy at the limit asks Redis once per `n` messages instead of once per message.
    ///
    /// The cost is burstiness: Redis counts the permits when it hands them out, so
    /// the cluster never takes more than the rate from Redis, but a replica may spend
    /// a batch at once, and keeps the `n - 1` it did not spend for as long as it has
    /// no messages. Over any window the cluster lets through at most what the limit
    /// allows (burst included) plus the permits replicas held unspent when the window
    /// began: up to `n - 1` per batch fetched and not yet spent, so about one batch
    /// per replica. Under load a replica waits for a whole batch of `n` (Redis
    /// reserves it and names the wait), one Redis call per `n` messages; permits
    /// fetched by a service that is dropped before spending them are lost, which
    /// only lowers the rate. `n` must be at least 1 and at most the burst.
    #[must_use]
    pub fn with_prefetch(mut self, n: u32) -> Self {
        self.prefetch = n;
        self
    }

    /// What to do while Redis cannot be reached (default: fail closed).
    #[must_use]
    pub fn with_on_unreachable(mut self, on_unreachable: OnUnreachable) -> Self {
        self.on_unreachable = on_unreachable;
        self
    }

    /// Bounds each Redis call, connecting included, to `timeout`; past it Redis counts
    /// as unreachable.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How often to ask Redis again during an outage.
    #[must_use]
    pub fn with_retry_interval(mut self, retry_interval: Duration) -> Self {
        self.retry_interval = retry_interval;
        self
    }

    /// The Redis key that holds the limit.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The cluster-wide rate.
    pub fn rate(&self) -> &RateLimitConfig {
        &self.rate
    }

    /// Permits taken per Redis call.
    pub fn prefetch(&self) -> u32 {
        self.prefetch
    }

    /// What happens while Redis cannot be reached.
    pub fn on_unreachable(&self) -> OnUnreachable {
        self.on_unreachable
    }

    fn invalid(message: impl Into<String>) -> ConfigError {
        ConfigError::new("rate limit", message)
    }

    /// Checks every setting; returns the interval and the burst tolerance in µs, and
    /// the fallback limiter.
    fn check(&self) -> Result<(u64, u64, Option<DirectLimiter>), ConfigError> {
        self.rate.quota()?;
        if self.key.is_empty() {
            return Err(Self::invalid(
                "the Redis key is empty; name the limit, e.g. \"redrive:rate:billing-api\"",
            ));
        }
        let interval = u64::try_from(self.rate.emission_interval().as_micros()).unwrap_or(0);
        if interval == 0 {
            return Err(Self::invalid(format!(
                "{} leaves less than a microsecond between two messages, finer than the \
                 Redis limit counts; lower the limit or lengthen the period",
                self.rate.describe()
            )));
        }
        let burst = self.rate.burst();
        if self.prefetch == 0 || self.prefetch > burst {
            return Err(Self::invalid(format!(
                "a prefetch of {} cannot work with a burst of {burst}; set the prefetch \
                 between 1 and the burst, or raise the burst",
                self.prefetch
            )));
        }
        if self.timeout.is_zero() {
            return Err(Self::invalid(
                "the Redis timeout is 0; give it 1 ms or more",
            ));
        }
        if self.retry_interval.is_zero() {
            return Err(Self::invalid(
                "the retry interval is 0, which would ask an unreachable Redis in a loop; \
                 give it 1 ms or more",
            ));
        }
        let fallback = match self.on_unreachable {
            OnUnreachable::FailOpen {
                fallback: Some(fallback),
            } => Some(RateLimiter::direct_with_clock(
                fallback.quota()?,
                TokioClock::new(),
            )),
            _ => None,
        };
        Ok((
            interval,
            interval.saturating_mul(u64::from(burst)),
            fallback,
        ))
    }
}

/// Wraps a service in [`RedisRateLimit`]: the direct limit (see
/// [`RateLimitLayer`](super::RateLimitLayer)), shared through Redis by every layer
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
    shared: Arc<Shared>,
}

struct Shared {
    client: redis::Client,
    conn: OnceCell<ConnectionManager>,
    config: RedisRateLimitConfig,
    /// The emission interval in µs.
    interval: u64,
    /// The burst tolerance in µs.
    tau: u64,
    fallback: Option<DirectLimiter>,
    /// Permits Redis granted that no service has taken yet.
    pool: AtomicU32,
    degraded: AtomicBool,
    /// When the next Redis call may be made during an outage.
    outage: Mutex<Option<Instant>>,
    redis_calls: AtomicU64,
    degraded_permits: AtomicU64,
    outages: AtomicU64,
}

impl RedisRateLimitLayer {
    /// A layer on the Redis server `client` points at. Connects on first use, so the
    /// layer builds even while Redis is away (then [`OnUnreachable`] applies).
    ///
    /// # Errors
    /// [`ConfigError`] when a setting cannot work (a limit or burst of 0, an empty
    /// key, a prefetch above the burst, a timeout of 0); the message says what to
    /// change.
    pub fn new(client: redis::Client, config: RedisRateLimitConfig) -> Result<Self, ConfigError> {
        let (interval, tau, fallback) = config.check()?;
        Ok(RedisRateLimitLayer {
            shared: Arc::new(Shared {
                client,
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
            }),
        })
    }

    /// A layer on the Redis server at `url` (`redis://host:port/db`). Connects on first
    /// use.
    ///
    /// # Errors
    /// [`ConfigError`] when the URL is invalid or a setting cannot work.
    pub fn from_url(url: &str, config: RedisRateLimitConfig) -> Result<Self, ConfigError> {
        let client = redis::Client::open(url).map_err(|e| {
            RedisRateLimitConfig::invalid(format!("invalid Redis URL `{url}`: {e}"))
        })?;
        Self::new(client, config)
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
}

/// Permits granted by one script call, usable after `wait`.
struct Grant {
    granted: u32,
    wait: Duration,
}

type Fetch = Pin<Box<dyn Future<Output = Result<Grant, String>> + Send>>;

impl Shared {
    fn manager_config(&self) -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_connection_timeout(self.config.timeout)
            .set_response_timeout(self.config.timeout)
            .set_number_of_retries(0)
    }

    /// Runs the script once, within the timeout.
    async fn fetch(self: Arc<Self>) -> Result<Grant, String> {
        self.redis_calls.fetch_add(1, Ordering::Relaxed);
        let call = async {
            let conn = self
                .conn
                .get_or_try_init(|| {
                    self.client
                        .get_connection_manager_with_config(self.manager_config())
                })
                .await?;
            let mut conn = conn.clone();
            let mut invocation = GCRA.key(&self.config.key);
            invocation
                .arg(self.interval)
                .arg(self.tau)
                .arg(self.config.prefetch);
            invocation.invoke_async::<(i64, i64)>(&mut conn).await
        };
        match tokio::time::timeout(self.config.timeout, call).await {
            Ok(Ok((granted, wait_ms))) => Ok(Grant {
                granted: u32::try_from(granted).unwrap_or(0),
                wait: Duration::from_millis(u64::try_from(wait_ms).unwrap_or(0)),
            }),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "no answer within {:?} (the limit's timeout)",
                self.config.timeout
            )),
        }
    }

    fn outage(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.outage.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a failed call: starts an outage (logged once) or keeps it going.
    fn failed(&self, error: &str) {
        let mut outage = self.outage();
        *outage = Some(Instant::now() + self.config.retry_interval);
        if !self.degraded.swap(true, Ordering::Relaxed) {
            self.outages.fetch_add(1, Ordering::Relaxed);
            let mode = match self.config.on_unreachable {
                OnUnreachable::FailClosed => "failing closed: intake stops",
                OnUnreachable::FailOpen { fallback: None } => {
                    "failing open: messages pass unlimited"
                }
                OnUnreachable::FailOpen { fallback: Some(_) } => {
                    "failing open: messages pass at the per-process fallback rate"
                }
            };
            tracing::warn!(
                key = %self.config.key,
                error = %error,
                "rate limit: Redis unreachable, {mode} until it answers"
            );
        }
    }

    /// Records an answered call: ends an outage, if there was one.
    fn answered(&self) {
        if self.degraded.load(Ordering::Relaxed) {
            let mut outage = self.outage();
            *outage = None;
            if self.degraded.swap(false, Ordering::Relaxed) {
                tracing::info!(key = %self.config.key, "rate limit: Redis answers again");
            }
        }
    }

    /// During an outage, before its next Redis call is due: the instant it is due.
    /// When it is due, claims it (pushes the next one a retry interval away), so one
    /// service asks while the others go on as degraded.
    fn degraded_until(&self, now: Instant) -> Option<Instant> {
        if !self.degraded.load(Ordering::Relaxed) {
            return None;
        }
        let mut outage = self.outage();
        match *outage {
            Some(due) if now < due => Some(due),
            Some(_) => {
                *outage = Some(now + self.config.retry_interval);
                None
            }
            None => None,
        }
    }

    fn take_pooled(&self) -> bool {
        self.pool
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
    }
}

enum State {
    /// Nothing in progress.
    Idle,
    /// A script call in flight.
    Fetching(Fetch),
    /// Sleeping until `granted` reserved permits conform (or, with 0, until Redis may
    /// be asked again, or the fallback limiter has a permit).
    Waiting {
        sleep: Pin<Box<Sleep>>,
        granted: u32,
    },
}

/// Holds `poll_ready` back until the cluster-wide rate allows another message. See
/// [`RedisRateLimitLayer`] and the [module docs](super).
pub struct RedisRateLimit<S> {
    inner: S,
    shared: Arc<Shared>,
    /// A permit taken by `poll_ready`, for the next call.
    permit: bool,
    state: State,
}

impl<S: Clone> Clone for RedisRateLimit<S> {
    fn clone(&self) -> Self {
        RedisRateLimit {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            permit: false,
            state: State::Idle,
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for RedisRateLimit<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRateLimit")
            .field("inner", &self.inner)
            .field("permit", &self.permit)
            .finish_non_exhaustive()
    }
}

impl<S> RedisRateLimit<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Takes `granted` permits: one for the next call, the rest into the pool.
    fn take(&mut self, granted: u32) {
        if granted > 0 {
            self.permit = true;
            self.shared.pool.fetch_add(granted - 1, Ordering::AcqRel);
        }
    }

    /// Moves on from `Idle` without Redis, during an outage, until `due`.
    fn degraded(&mut self, due: Instant, now: Instant) {
        let shared = &self.shared;
        let wait_until = match shared.config.on_unreachable {
            OnUnreachable::FailClosed => due,
            OnUnreachable::FailOpen { .. } => match &shared.fallback {
                None => {
                    shared.degraded_permits.fetch_add(1, Ordering::Relaxed);
                    self.permit = true;
                    return;
                }
                Some(limiter) => match limiter.check() {
                    Ok(()) => {
                        shared.degraded_permits.fetch_add(1, Ordering::Relaxed);
                        self.permit = true;
                        return;
                    }
                    Err(not_until) => limiter.clock().deadline(&not_until).min(due),
                },
            },
        };
        self.state = State::Waiting {
            sleep: Box::pin(tokio::time::sleep_until(wait_until.max(now))),
            granted: 0,
        };
    }
}

impl<S> Service<Message> for RedisRateLimit<S>
where
    S: Service<Message>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        while !self.permit {
            match &mut self.state {
                State::Idle => {
                    if self.shared.take_pooled() {
                        self.permit = true;
                        continue;
                    }
                    let now = Instant::now();
                    if let Some(due) = self.shared.degraded_until(now) {
                        self.degraded(due, now);
                        continue;
                    }
                    self.state = State::Fetching(Box::pin(self.shared.clone().fetch()));
                }
                State::Fetching(fetch) => {
                    let result = ready!(fetch.as_mut().poll(cx));
                    self.state = State::Idle;
                    match result {
                        Ok(Grant { granted, wait }) if wait.is_zero() => {
                            self.shared.answered();
                            self.take(granted);
                        }
                        Ok(Grant { granted, wait }) => {
                            self.shared.answered();
                            self.state = State::Waiting {
                                sleep: Box::pin(tokio::time::sleep(wait)),
                                granted,
                            };
                        }
                        Err(error) => self.shared.failed(&error),
                    }
                }
                State::Waiting { sleep, granted } => {
                    ready!(sleep.as_mut().poll(cx));
                    let granted = *granted;
                    self.state = State::Idle;
                    self.take(granted);
                }
            }
        }
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        assert!(
            std::mem::take(&mut self.permit),
            "RedisRateLimit::call without poll_ready returning Ready first"
        );
        ResponseFuture::new(self.inner.call(msg))
    }
}
