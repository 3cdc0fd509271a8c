//! [`RedisStore`]: idempotency keys in Redis.

use std::fmt;
use std::sync::LazyLock;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, Script};

use super::store::millis_ceil;
use super::{CommitStatus, IdempotencyStore, Reservation, StoreError, StoreFuture, Token};
use crate::redis_client::Target;

/// The constructor that takes a CA file, for the error when the platform's roots do
/// not trust the server's certificate.
const WITH_CA: &str = "`RedisStore::connect_with_ca`";

/// Reserves a free key: `{0, 0}`; finds it committed: `{1, 0}`; finds it reserved:
/// `{2, pttl}`. KEYS[1] = key, ARGV[1] = token, ARGV[2] = lease in ms.
static RESERVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], 'r:' .. ARGV[1], 'PX', ARGV[2])
  return {0, 0}
end
if string.sub(v, 1, 2) == 'c:' then
  return {1, 0}
end
return {2, redis.call('PTTL', KEYS[1])}
",
    )
});

/// Commits a key this token reserved: 1; already committed by this token: 2; lost: 0.
/// KEYS[1] = key, ARGV[1] = token, ARGV[2] = ttl in ms.
static COMMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local v = redis.call('GET', KEYS[1])
if v == 'r:' .. ARGV[1] then
  redis.call('SET', KEYS[1], 'c:' .. ARGV[1], 'PX', ARGV[2])
  return 1
end
if v == 'c:' .. ARGV[1] then
  return 2
end
return 0
",
    )
});

/// Deletes a key this token reserved: 1; committed by this token (kept): 2; lost: 0.
/// KEYS[1] = key, ARGV[1] = token.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local v = redis.call('GET', KEYS[1])
if v == 'r:' .. ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
if v == 'c:' .. ARGV[1] then
  return 2
end
return 0
",
    )
});

/// Renews a key this token reserved: 1; anything else: 0.
/// KEYS[1] = key, ARGV[1] = token, ARGV[2] = lease in ms.
static EXTEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == 'r:' .. ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
",
    )
});

/// Idempotency keys in Redis, shared by every consumer that uses the same server and
/// prefix.
///
/// Each key is one Redis string, `<prefix><key>`, holding `r:<token>` while reserved
/// and `c:<token>` once committed, with the lease or TTL as its expiry (`PX`), so Redis
/// forgets expired keys by itself. Reserve is a `SET NX` (and, when the key exists, a
/// Lua script that reads it); commit and release are Lua scripts; each is atomic on
/// the server. Commit and release compare the token, so a consumer whose
/// lease expired cannot commit or release a reservation another consumer has taken
/// since: its commit fails with [`StoreError::lease_lost`]. Once a lease has expired,
/// its key is gone, so a late commit fails even if no one took the key over, as with
/// every store.
///
/// Deduplication is as durable as the Redis server: with persistence off, a restart
/// forgets committed keys. Use one prefix per consumer group: two services that both
/// process the same messages need different prefixes.
///
/// # Connections
/// The store talks to Redis through a [`ConnectionManager`], which opens a new
/// connection when the old one breaks: after a Redis restart, operations fail while the
/// server is away and succeed again once it is back, with nothing done by hand.
/// [`connect`](Self::connect) sets it up with [`manager_config`](Self::manager_config):
/// one connection attempt per failed operation, bounded by
/// [`DEFAULT_TIMEOUT`](Self::DEFAULT_TIMEOUT), and no reconnection backoff of its own
/// (the redis crate's default retries for minutes while every operation waits on it;
/// here the consumer's redelivery delays are the backoff). No operation waits longer
/// than the store's [timeout](Self::with_timeout), whatever the manager's settings.
///
/// A `rediss://` URL connects with TLS (feature `redis-tls`), against the platform's
/// roots, or against a CA file of yours with [`connect_with_ca`](Self::connect_with_ca).
///
/// ```no_run
/// use std::sync::Arc;
/// use redrive_middleware::idempotency::{IdempotencyConfig, IdempotencyLayer, RedisStore};
///
/// # async fn run() -> Result<(), redrive_core::BoxError> {
/// let store = RedisStore::connect("redis://127.0.0.1:6379").await?.with_prefix("billing:idem:");
/// let layer = IdempotencyLayer::new(Arc::new(store), IdempotencyConfig::default())?;
/// # let _ = layer;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    timeout: Duration,
}

impl RedisStore {
    /// The default key prefix.
    pub const DEFAULT_PREFIX: &'static str = "redrive:idempotency:";

    /// How long one operation may take by default, reconnecting included.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

    /// A store on `conn`, with keys under [`DEFAULT_PREFIX`](Self::DEFAULT_PREFIX).
    ///
    /// Build `conn` with [`manager_config`](Self::manager_config) (or settings of your
    /// own that bound its reconnection), as [`connect`](Self::connect) does.
    pub fn new(conn: ConnectionManager) -> Self {
        RedisStore {
            conn,
            prefix: Self::DEFAULT_PREFIX.to_owned(),
            timeout: Self::DEFAULT_TIMEOUT,
        }
    }

    /// The [`ConnectionManager`] settings [`connect`](Self::connect) uses: connection
    /// and response timeouts of [`DEFAULT_TIMEOUT`](Self::DEFAULT_TIMEOUT), and one
    /// connection attempt per reconnection (no retries with backoff, during which
    /// every operation would wait).
    pub fn manager_config() -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_connection_timeout(Self::DEFAULT_TIMEOUT)
            .set_response_timeout(Self::DEFAULT_TIMEOUT)
            .set_number_of_retries(0)
    }

    /// Connects to the server at `url` with a [`ConnectionManager`] set up with
    /// [`manager_config`](Self::manager_config).
    ///
    /// `redis://host:port/db` connects in plaintext; `rediss://host:port/db` with TLS
    /// (feature `redis-tls`), checking the server's certificate against the platform's
    /// roots and the URL's host. For a server whose CA the platform does not trust,
    /// use [`connect_with_ca`](Self::connect_with_ca).
    ///
    /// # Errors
    /// When the URL is invalid, when it is `rediss://` and the `redis-tls` feature is
    /// off, or when the server cannot be reached within
    /// [`DEFAULT_TIMEOUT`](Self::DEFAULT_TIMEOUT). The message shows the URL without
    /// its password, and says what to change when the URL's scheme and the port
    /// disagree (a `redis://` URL to a port that takes TLS only, a `rediss://` URL to a
    /// plaintext port) or the server's certificate is not trusted.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_client(crate::redis_client::open(url, None, WITH_CA)).await
    }

    /// Connects to the server at `url` (`rediss://host:port/db`) as
    /// [`connect`](Self::connect) does, with TLS, trusting the CA certificates in the
    /// PEM file `ca_file` instead of the platform's roots: for a private CA. The
    /// server's certificate must name the URL's host (a DNS name, or an IP address
    /// for `rediss://127.0.0.1`).
    ///
    /// ```no_run
    /// use redrive_middleware::idempotency::RedisStore;
    ///
    /// # async fn run() -> Result<(), redrive_core::BoxError> {
    /// let store = RedisStore::connect_with_ca("rediss://cache.internal:6380", "/etc/redrive/ca.pem")
    ///     .await?
    ///     .with_prefix("billing:idem:");
    /// # let _ = store;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`connect`](Self::connect), and when `url` is not `rediss://`, or `ca_file`
    /// cannot be read or holds no certificate; a server certificate the CA did not
    /// sign fails with a message naming `ca_file`.
    #[cfg(feature = "redis-tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis-tls")))]
    pub async fn connect_with_ca(
        url: &str,
        ca_file: impl AsRef<std::path::Path>,
    ) -> Result<Self, StoreError> {
        let client = crate::redis_client::open(url, Some(ca_file.as_ref()), WITH_CA);
        Self::connect_client(client).await
    }

    async fn connect_client(
        client: Result<(redis::Client, Target), String>,
    ) -> Result<Self, StoreError> {
        let (client, target) = client.map_err(StoreError::backend)?;
        let conn = client
            .get_connection_manager_with_config(Self::manager_config())
            .await
            .map_err(|e| StoreError::backend(target.cannot_connect(&e)))?;
        Ok(Self::new(conn))
    }

    /// Puts keys under `prefix` instead.
    #[must_use]
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Bounds each operation to `timeout`, reconnecting included, instead of
    /// [`DEFAULT_TIMEOUT`](Self::DEFAULT_TIMEOUT). Keep it well under the lease.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn redis_key(&self, key: &str) -> String {
        let mut k = String::with_capacity(self.prefix.len() + key.len());
        k.push_str(&self.prefix);
        k.push_str(key);
        k
    }

    /// Reserves `key` for `token` if it does not exist (`SET NX PX`), within the store's
    /// timeout: whether it did.
    async fn set_new(&self, key: &str, token: &Token, lease: Duration) -> Result<bool, StoreError> {
        let mut value = String::with_capacity(2 + token.as_str().len());
        value.push_str("r:");
        value.push_str(token.as_str());
        let mut set = redis::cmd("SET");
        set.arg(self.redis_key(key))
            .arg(value)
            .arg("NX")
            .arg("PX")
            .arg(millis_ceil(lease));
        let mut conn = self.conn.clone();
        match tokio::time::timeout(self.timeout, set.query_async::<Option<String>>(&mut conn)).await
        {
            Ok(Ok(done)) => Ok(done.is_some()),
            Ok(Err(e)) => Err(StoreError::backend(format!(
                "Redis: reserving a key failed: {e}"
            ))),
            Err(_) => Err(StoreError::backend(format!(
                "Redis: reserving a key failed: no answer within {:?} (the store's timeout)",
                self.timeout
            ))),
        }
    }

    /// Runs `script` on `key` with `args`, within the store's timeout.
    async fn invoke<T: FromRedisValue>(
        &self,
        doing: &str,
        script: &Script,
        key: &str,
        args: (&str, Option<u64>),
    ) -> Result<T, StoreError> {
        let mut invocation = script.key(self.redis_key(key));
        invocation.arg(args.0);
        if let Some(ms) = args.1 {
            invocation.arg(ms);
        }
        let mut conn = self.conn.clone();
        match tokio::time::timeout(self.timeout, invocation.invoke_async(&mut conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(StoreError::backend(format!("Redis: {doing} failed: {e}"))),
            Err(_) => Err(StoreError::backend(format!(
                "Redis: {doing} failed: no answer within {:?} (the store's timeout)",
                self.timeout
            ))),
        }
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl IdempotencyStore for RedisStore {
    fn reserve<'a>(&'a self, key: &'a str, lease: Duration) -> StoreFuture<'a, Reservation> {
        Box::pin(async move {
            let token = Token::random();
            // A new key (the usual case) is one plain `SET NX`; a key that exists goes
            // through the script, which tells committed from reserved.
            if self.set_new(key, &token, lease).await? {
                return Ok(Reservation::Fresh(token));
            }
            let args = (token.as_str(), Some(millis_ceil(lease)));
            let (status, pttl): (i64, i64) =
                self.invoke("reserving a key", &RESERVE, key, args).await?;
            match status {
                0 => Ok(Reservation::Fresh(token)),
                1 => Ok(Reservation::Committed),
                _ => Ok(Reservation::Reserved {
                    remaining: Duration::from_millis(u64::try_from(pttl).unwrap_or(0)),
                }),
            }
        })
    }

    fn commit<'a>(
        &'a self,
        key: &'a str,
        token: &'a Token,
        ttl: Duration,
    ) -> StoreFuture<'a, CommitStatus> {
        Box::pin(async move {
            let args = (token.as_str(), Some(millis_ceil(ttl)));
            let status: i64 = self.invoke("committing a key", &COMMIT, key, args).await?;
            match status {
                1 => Ok(CommitStatus::Committed),
                2 => Ok(CommitStatus::AlreadyCommitted),
                _ => Err(StoreError::lease_lost(key)),
            }
        })
    }

    fn extend<'a>(
        &'a self,
        key: &'a str,
        token: &'a Token,
        lease: Duration,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let args = (token.as_str(), Some(millis_ceil(lease)));
            let status: i64 = self.invoke("extending a lease", &EXTEND, key, args).await?;
            if status == 1 {
                Ok(())
            } else {
                Err(StoreError::lease_lost(key))
            }
        })
    }

    fn release<'a>(&'a self, key: &'a str, token: &'a Token) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let args = (token.as_str(), None);
            let status: i64 = self.invoke("releasing a key", &RELEASE, key, args).await?;
            match status {
                1 | 2 => Ok(()),
                _ => Err(StoreError::lease_lost(key)),
            }
        })
    }
}
