//! What a layer's services share: the GCRA script, the pool of permits Redis granted,
//! the connection and the outage state.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::Duration;

use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::OnceCell;
use tokio::time::Instant;

use super::config::{OnUnreachable, RedisRateLimitConfig};
use crate::rate_limit::clock::DirectLimiter;
use crate::redis_client::Target;

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

pub(super) struct Shared {
    pub(super) client: redis::Client,
    /// Where `client` connects, for errors.
    pub(super) target: Target,
    pub(super) conn: OnceCell<ConnectionManager>,
    pub(super) config: RedisRateLimitConfig,
    /// The emission interval in µs.
    pub(super) interval: u64,
    /// The burst tolerance in µs.
    pub(super) tau: u64,
    pub(super) fallback: Option<DirectLimiter>,
    /// Permits Redis granted that no service has taken yet.
    pub(super) pool: AtomicU32,
    pub(super) degraded: AtomicBool,
    /// When the next Redis call may be made during an outage.
    pub(super) outage: Mutex<Option<Instant>>,
    pub(super) redis_calls: AtomicU64,
    pub(super) degraded_permits: AtomicU64,
    pub(super) outages: AtomicU64,
    /// Whether a Stack's metrics layer reports this limit already.
    pub(super) reported: AtomicBool,
}

/// Permits granted by one script call, usable after `wait`.
pub(super) struct Grant {
    pub(super) granted: u32,
    pub(super) wait: Duration,
}

pub(super) type Fetch = Pin<Box<dyn Future<Output = Result<Grant, String>> + Send>>;

impl Shared {
    pub(super) fn manager_config(&self) -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_connection_timeout(self.config.timeout)
            .set_response_timeout(self.config.timeout)
            .set_number_of_retries(0)
    }

    /// Runs the script once, within the timeout.
    pub(super) async fn fetch(self: Arc<Self>) -> Result<Grant, String> {
        self.redis_calls.fetch_add(1, Ordering::Relaxed);
        let call = async {
            let conn = self
                .conn
                .get_or_try_init(|| {
                    self.client
                        .get_connection_manager_with_config(self.manager_config())
                })
                .await
                .map_err(|e| self.target.cannot_connect(&e))?;
            let mut conn = conn.clone();
            let mut invocation = GCRA.key(&self.config.key);
            invocation
                .arg(self.interval)
                .arg(self.tau)
                .arg(self.config.prefetch);
            invocation
                .invoke_async::<(i64, i64)>(&mut conn)
                .await
                .map_err(|e| e.to_string())
        };
        match tokio::time::timeout(self.config.timeout, call).await {
            Ok(Ok((granted, wait_ms))) => Ok(Grant {
                granted: u32::try_from(granted).unwrap_or(0),
                wait: Duration::from_millis(u64::try_from(wait_ms).unwrap_or(0)),
            }),
            Ok(Err(e)) => Err(e),
            // Never connected with TLS: perhaps no TLS server on that port.
            Err(_) if self.target.is_tls() && self.conn.get().is_none() => Err(format!(
                "cannot connect to Redis at {}: no answer within {:?} (the limit's timeout); {}",
                self.target,
                self.config.timeout,
                self.target.plaintext_port_hint()
            )),
            Err(_) => Err(format!(
                "no answer within {:?} (the limit's timeout)",
                self.config.timeout
            )),
        }
    }

    pub(super) fn outage(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.outage.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a failed call: starts an outage (logged once) or keeps it going.
    pub(super) fn failed(&self, error: &str) {
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
    pub(super) fn answered(&self) {
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
    pub(super) fn degraded_until(&self, now: Instant) -> Option<Instant> {
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

    pub(super) fn take_pooled(&self) -> bool {
        self.pool
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
    }
}
