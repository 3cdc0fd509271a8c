//! [`PostgresStore`]: idempotency keys in a PostgreSQL table.

mod batch;
mod params;
mod sql;
mod tls;

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{
    ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime, TimeoutType,
};
use tokio::time::error::Elapsed;
use tokio::time::{Instant, timeout_at};
use tokio_postgres::Transaction;
use tokio_postgres::error::SqlState;

use super::{
    CommitStatus, ConfigError, IdempotencyStore, IdempotencyToken, Reservation, StoreError,
    StoreFuture, Token,
};
use sql::{Failure, Sql, commit_on, extend_on, release_on};

/// Idempotency keys in a PostgreSQL table, shared by every consumer that uses the same
/// database and table.
///
/// One row per key: `key TEXT PRIMARY KEY, token TEXT, committed BOOLEAN, expires_at
/// TIMESTAMPTZ`. Create it with [`migrate`](Self::migrate). Every operation is one
/// atomic statement, timed by the database's clock (`now()`), so consumers' clocks do
/// not matter:
/// - reserve is an `INSERT … ON CONFLICT (key) DO UPDATE … WHERE expires_at <= now()`:
///   it takes a free or expired key and leaves a live one alone;
/// - commit, release and extend compare the token, so a consumer whose lease expired
///   cannot commit it ([`StoreError::lease_lost`]), whether or not another consumer
///   has reserved the key since, as with every store.
///
/// Expired rows are reused by the next reservation of their key, and otherwise stay
/// until [`purge_expired`](Self::purge_expired) deletes them; call it from time to time.
///
/// # Batches
/// Reserves that arrive while one is running go to the server together, in one
/// statement (up to 64 keys), and so do commits: under load a transaction, and the
/// flush of the server's write-ahead log it costs, serves many messages, while a lone
/// operation is sent at once. A batch locks its rows in key order, so batches never
/// deadlock one another, and waits at most 100 ms for a row another transaction holds
/// (a handler's [`commit_in`](Self::commit_in) of the same key) before its keys go one
/// at a time. Release and extend are single statements.
///
/// # Connections
/// The store works through a [`deadpool_postgres`] pool (version 0.14), which replaces a
/// closed connection with a new one: after a PostgreSQL restart or failover, operations
/// fail while the server is away and succeed again once it is back, with nothing done
/// by hand. Each connection prepares the store's statements once (deadpool's statement
/// cache, one per connection). No operation waits longer than the store's
/// [timeout](Self::with_timeout) (default [`DEFAULT_TIMEOUT`](Self::DEFAULT_TIMEOUT)),
/// waiting for a connection included: during an outage it fails with an error that says
/// what went wrong, and the consumer redelivers the message later. A connection whose
/// query ran out of time is closed rather than handed out again.
///
/// [`connect`](Self::connect) builds a pool of
/// [`DEFAULT_POOL_SIZE`](Self::DEFAULT_POOL_SIZE) connections, plaintext or TLS as its
/// parameters' `sslmode` says; [`new`](Self::new) takes a pool of your own (its size,
/// TLS settings of your own such as client certificates, hooks).
///
/// # Exactly-once effects
/// With [`CommitMode::Handler`](super::CommitMode::Handler), a handler whose effect is
/// in the same database commits the key in its own transaction with
/// [`commit_in`](Self::commit_in): effect and key commit together or not at all, and
/// the layer's own commit afterwards is a no-op. The transaction can be on a connection
/// of the store's [`pool`](Self::pool), as below, or on any other connection to the
/// same database. A handler holds its connection while it runs: with long handlers,
/// make the pool larger than the consumer's concurrency, or give them a pool of their
/// own, so the store's operations still find a free connection.
///
/// ```no_run
/// use std::sync::Arc;
/// use std::time::Duration;
/// use redrive_core::{handler, BoxError, Message};
/// use redrive_middleware::idempotency::{
///     CommitMode, IdempotencyConfig, IdempotencyLayer, IdempotencyToken, PostgresStore,
/// };
/// use tower::ServiceBuilder;
///
/// # async fn run() -> Result<(), BoxError> {
/// let store = Arc::new(PostgresStore::connect("host=127.0.0.1 user=postgres dbname=shop").await?);
/// store.migrate().await?;
///
/// let ttl = Duration::from_secs(24 * 3600);
/// let config = IdempotencyConfig::default()
///     .with_ttl(ttl)
///     .with_commit_mode(CommitMode::Handler);
/// let layer = IdempotencyLayer::new(store.clone(), config)?;
/// let service = ServiceBuilder::new().layer(layer).service(handler::handler_fn(move |msg: Message| {
///     let store = store.clone();
///     async move {
///         let reservation = msg.extensions.get::<IdempotencyToken>().expect("set by the layer").clone();
///         // A connection of the store's pool, for the handler's transaction.
///         let mut db = store.pool().get().await?;
///         let txn = db.transaction().await?;
///         txn.execute("INSERT INTO payments (body) VALUES ($1)", &[&&msg.payload[..]]).await?;
///         store.commit_in(&txn, &reservation, ttl).await?;
///         txn.commit().await?;
///         Ok::<(), BoxError>(())
///     }
/// }));
/// # let _ = service;
/// # Ok(())
/// # }
/// ```
pub struct PostgresStore {
    pool: Pool,
    table: String,
    sql: Arc<Sql>,
    timeout: Duration,
    /// Reserves and commits waiting to go to the server together.
    batcher: Arc<batch::Batcher>,
    /// How [`connect`](Self::connect) connects, for error hints.
    tls: tls::Setting,
}

impl PostgresStore {
    /// The default table name.
    pub const DEFAULT_TABLE: &'static str = "redrive_idempotency";

    /// How many connections [`connect`](Self::connect)'s pool holds at most.
    pub const DEFAULT_POOL_SIZE: usize = 16;

    /// How long one operation may take by default, waiting for a connection included.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

    /// A store on `pool`, in the table [`DEFAULT_TABLE`](Self::DEFAULT_TABLE).
    ///
    /// The store's operations are bounded by its own [timeout](Self::with_timeout),
    /// whatever the pool's timeouts are.
    pub fn new(pool: Pool) -> Self {
        Self::on_table(pool, Self::DEFAULT_TABLE.to_owned(), Self::DEFAULT_TIMEOUT)
    }

    fn on_table(pool: Pool, table: String, timeout: Duration) -> Self {
        PostgresStore {
            pool,
            sql: Arc::new(Sql::new(&table)),
            table,
            timeout,
            batcher: Arc::default(),
            tls: tls::Setting::default(),
        }
    }

    /// Connects with `params`, libpq's `key=value` pairs (`host=db user=app
    /// dbname=shop`) or a `postgres://` / `postgresql://` URL, through a pool of up to
    /// [`DEFAULT_POOL_SIZE`](Self::DEFAULT_POOL_SIZE) connections whose waits are bounded
    /// by [`DEFAULT_TIMEOUT`](Self::DEFAULT_TIMEOUT). One connection is opened now, so a
    /// wrong address, a refused certificate or a server that wants TLS fails here rather
    /// than on the first message.
    ///
    /// # TLS
    /// `sslmode` says whether connections use TLS and how the server's certificate is
    /// checked, with libpq's values; all but `disable` and `prefer` need the
    /// `postgres-tls` feature (rustls with ring; the process's default crypto provider
    /// is neither needed nor changed).
    ///
    /// | `sslmode` | TLS | the server's certificate |
    /// |---|---|---|
    /// | absent, `disable` | no | — |
    /// | `prefer` | when the server takes it (with `postgres-tls`; plaintext without) | not checked |
    /// | `require` | yes | not checked; with `sslrootcert=<file>`, as `verify-ca` (as libpq) |
    /// | `verify-ca` | yes | signed by a CA of `sslrootcert` |
    /// | `verify-full` | yes | signed by a CA of `sslrootcert`, for the `host` connected to |
    ///
    /// `sslrootcert=<file>` is a PEM file of CA certificates (in a URL, percent-encode its
    /// path's special characters); `sslrootcert=system`, or none, is the platform's
    /// trusted roots (libpq reads `~/.postgresql/root.crt` instead). As with libpq,
    /// `sslrootcert=system` asks for `verify-full` and refuses a weaker mode; a CA file
    /// without any `sslmode` is refused rather than left unused. Unlike libpq, an absent
    /// `sslmode` is plaintext, as `disable`: a server that takes TLS only refuses such a
    /// connection, and the error says to add `sslmode`. `verify-full` checks the name in
    /// `host` (an IP address needs the certificate to hold that address); with
    /// `hostaddr` beside `host`, the connection goes to `hostaddr` and `host` is the name
    /// checked. Client certificates (`sslcert`, `sslkey`) are not read here: build a pool
    /// with a TLS connector of your own and give it to [`new`](Self::new).
    ///
    /// ```no_run
    /// # use redrive_middleware::idempotency::PostgresStore;
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = PostgresStore::connect(
    ///     "host=db.internal user=app dbname=shop sslmode=verify-full sslrootcert=/etc/ssl/db-ca.pem",
    /// )
    /// .await?;
    /// let store = PostgresStore::connect(
    ///     "postgresql://app@db.internal/shop?sslmode=verify-full&sslrootcert=system",
    /// )
    /// .await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// When the parameters are invalid (the message shows them, with any password as
    /// `***`), when `sslmode` needs the `postgres-tls` feature, when the CA file cannot
    /// be read, or when no connection is made within
    /// [`DEFAULT_TIMEOUT`](Self::DEFAULT_TIMEOUT): the message says what to change when
    /// the server refused a plaintext connection or a certificate failed its check.
    pub async fn connect(params: &str) -> Result<Self, StoreError> {
        let (manager, tls) = tls::manager(
            params,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        )
        .map_err(StoreError::backend)?;
        let timeout = Some(Self::DEFAULT_TIMEOUT);
        let pool = Pool::builder(manager)
            .max_size(Self::DEFAULT_POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(timeout)
            .create_timeout(timeout)
            .recycle_timeout(timeout)
            .build()
            .map_err(|e| StoreError::backend(format!("building the connection pool: {e}")))?;
        let store = Self {
            tls,
            ..Self::new(pool)
        };
        drop(store.client(store.deadline()).await?);
        Ok(store)
    }

    /// Uses `table` (`name` or `schema.name`; letters, digits and `_`) instead.
    ///
    /// # Errors
    /// [`ConfigError`] when `table` is not such a name.
    pub fn with_table(self, table: &str) -> Result<Self, ConfigError> {
        check_table(table)?;
        Ok(Self {
            tls: self.tls,
            ..Self::on_table(self.pool, table.to_owned(), self.timeout)
        })
    }

    /// Bounds each operation (reserve, commit, release, extend) to `timeout`, waiting
    /// for a connection included, instead of [`DEFAULT_TIMEOUT`](Self::DEFAULT_TIMEOUT).
    /// Keep it well under the lease, and long enough for a row lock held by a
    /// handler's [`commit_in`](Self::commit_in) transaction, which a reserve of the same
    /// key waits for.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The store's connection pool, for a handler's own transactions (see
    /// [`commit_in`](Self::commit_in)).
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Creates the table and its index if they do not exist. Safe to call from every
    /// consumer at start-up: concurrent calls are serialised by an advisory lock.
    ///
    /// # Errors
    /// When no connection can be had within the store's timeout, or the database
    /// refuses (permissions, for one). An existing table of that name is left as it is,
    /// whatever its columns.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let t = &self.table;
        let index = format!("{}_expires_at_idx", t.rsplit('.').next().unwrap_or(t));
        let client = self.client(self.deadline()).await?;
        client
            .batch_execute(&format!(
                "SELECT pg_advisory_xact_lock(hashtext('redrive idempotency migrate {t}'));
                 CREATE TABLE IF NOT EXISTS {t} (
                     key        TEXT PRIMARY KEY,
                     token      TEXT NOT NULL,
                     committed  BOOLEAN NOT NULL DEFAULT FALSE,
                     expires_at TIMESTAMPTZ NOT NULL
                 );
                 CREATE INDEX IF NOT EXISTS {index} ON {t} (expires_at);"
            ))
            .await
            .map_err(|e| failed(&self.table, "creating the table", &e))
    }

    /// Deletes expired rows; returns how many. Only waiting for a connection is bounded
    /// by the store's timeout: the deletion takes as long as it takes.
    ///
    /// # Errors
    /// When no connection can be had within the store's timeout, or the query fails.
    pub async fn purge_expired(&self) -> Result<u64, StoreError> {
        let client = self.client(self.deadline()).await?;
        client
            .execute(
                &format!("DELETE FROM {} WHERE expires_at <= now()", self.table),
                &[],
            )
            .await
            .map_err(|e| failed(&self.table, "purging expired keys", &e))
    }

    /// Commits the key of `reservation` for `ttl` inside `txn`, the handler's own
    /// transaction, so the key commits if and only if the handler's effect does.
    ///
    /// `txn` may be on a connection of the store's [`pool`](Self::pool) (a
    /// `deadpool_postgres::Transaction` derefs to one) or on any other connection to
    /// the same database. Until `txn` ends, the row is locked: a consumer reserving the
    /// same key waits for it, then finds the key committed (or, if `txn` rolled back,
    /// reserved or expired as before).
    ///
    /// # Errors
    /// [`StoreError::lease_lost`] when another consumer has reserved the key since the
    /// lease expired: return the error so `txn` rolls back, and the other consumer's
    /// processing is the one that counts. A backend error when a query fails.
    pub async fn commit_in(
        &self,
        txn: &Transaction<'_>,
        reservation: &IdempotencyToken,
        ttl: Duration,
    ) -> Result<CommitStatus, StoreError> {
        commit_on(
            txn,
            self.sql.commit.as_str(),
            self.sql.committed_by.as_str(),
            reservation.key(),
            reservation.token(),
            ttl,
        )
        .await
        .map_err(|e| self.op_failed(e))
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.timeout
    }

    /// A connection of the pool, by `deadline`.
    async fn client(&self, deadline: Instant) -> Result<Object, StoreError> {
        connection(&self.pool, deadline, self.timeout, &self.tls).await
    }

    /// What a batch of reserves or commits runs against.
    fn target(&self) -> batch::Target {
        batch::Target {
            pool: self.pool.clone(),
            sql: self.sql.clone(),
            table: self.table.clone(),
            timeout: self.timeout,
            tls: self.tls.clone(),
        }
    }

    /// `result` of an operation run on `client` until the deadline: a connection that
    /// ran out of time may be dead without knowing it, so it leaves the pool.
    fn finish<T>(
        &self,
        client: Object,
        result: Result<Result<T, Failure>, Elapsed>,
    ) -> Result<T, StoreError> {
        match result {
            Ok(result) => result.map_err(|e| self.op_failed(e)),
            Err(_) => {
                drop(Object::take(client));
                Err(StoreError::backend(format!(
                    "PostgreSQL did not answer within {:?} (the store's timeout)",
                    self.timeout
                )))
            }
        }
    }

    fn op_failed(&self, failure: Failure) -> StoreError {
        op_failed(&self.table, failure)
    }
}

/// A connection of `pool`, by `deadline`; errors that say what to change.
async fn connection(
    pool: &Pool,
    deadline: Instant,
    timeout: Duration,
    tls: &tls::Setting,
) -> Result<Object, StoreError> {
    match tokio::time::timeout_at(deadline, pool.get()).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(PoolError::Backend(e))) => {
            let mut message = format!("cannot connect to PostgreSQL: {}", describe(&e));
            if let Some(hint) = tls::hint(&e, tls) {
                message.push_str("; ");
                message.push_str(&hint);
            }
            Err(StoreError::backend(message))
        }
        Ok(Err(PoolError::Timeout(TimeoutType::Wait))) => Err(StoreError::backend(
            "no PostgreSQL connection of the pool came free in time; make the pool \
             larger than the consumer's concurrency",
        )),
        Ok(Err(PoolError::Timeout(_))) | Err(_) => Err(StoreError::backend(format!(
            "PostgreSQL did not answer within {timeout:?} (the store's timeout)"
        ))),
        Ok(Err(e)) => Err(StoreError::backend(format!(
            "the PostgreSQL connection pool failed: {e}"
        ))),
    }
}

/// The error of an operation on `table`.
fn op_failed(table: &str, failure: Failure) -> StoreError {
    match failure {
        Failure::LeaseLost(key) => StoreError::lease_lost(key),
        Failure::Query(doing, e) => failed(table, doing, &e),
    }
}

/// A query's error, with its causes and, for a missing table, what to do.
fn failed(table: &str, doing: &str, e: &tokio_postgres::Error) -> StoreError {
    let hint = if e.code() == Some(&SqlState::UNDEFINED_TABLE) {
        format!(" (did you run `PostgresStore::migrate` for table `{table}`?)")
    } else {
        String::new()
    };
    StoreError::backend(format!("PostgreSQL: {doing} failed: {}{hint}", describe(e)))
}

/// `e` and each of its causes, `: `-separated, each said once (tokio-postgres words a
/// kind, "db error", and leaves the detail to the cause).
fn describe(e: &(dyn StdError + 'static)) -> String {
    let mut text = e.to_string();
    let mut last = text.clone();
    let mut cause = e.source();
    while let Some(c) = cause {
        let said = c.to_string();
        if said != last {
            text.push_str(": ");
            text.push_str(&said);
        }
        last = said;
        cause = c.source();
    }
    text
}

/// Table names go into SQL text, so only plain identifiers are accepted.
fn check_table(table: &str) -> Result<(), ConfigError> {
    let valid_part = |p: &str| {
        let mut chars = p.chars();
        matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
            && p.len() <= 63
    };
    let parts: Vec<&str> = table.split('.').collect();
    if parts.len() > 2 || !parts.iter().all(|p| valid_part(p)) {
        return Err(ConfigError::new(
            "idempotency",
            format!(
                "`{table}` is not a table name; use `name` or `schema.name` with letters, \
             digits and `_` (at most 63 each)"
            ),
        ));
    }
    Ok(())
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("table", &self.table)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl IdempotencyStore for PostgresStore {
    fn reserve<'a>(&'a self, key: &'a str, lease: Duration) -> StoreFuture<'a, Reservation> {
        Box::pin(async move { self.batcher.reserve(&self.target(), key, lease).await })
    }

    fn commit<'a>(
        &'a self,
        key: &'a str,
        token: &'a Token,
        ttl: Duration,
    ) -> StoreFuture<'a, CommitStatus> {
        Box::pin(async move { self.batcher.commit(&self.target(), key, token, ttl).await })
    }

    fn extend<'a>(
        &'a self,
        key: &'a str,
        token: &'a Token,
        lease: Duration,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let deadline = self.deadline();
            let client = self.client(deadline).await?;
            let result =
                timeout_at(deadline, extend_on(&client, &self.sql, key, token, lease)).await;
            self.finish(client, result)
        })
    }

    fn release<'a>(&'a self, key: &'a str, token: &'a Token) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let deadline = self.deadline();
            let client = self.client(deadline).await?;
            let result = timeout_at(deadline, release_on(&client, &self.sql, key, token)).await;
            self.finish(client, result)
        })
    }
}

#[cfg(test)]
mod tests;
