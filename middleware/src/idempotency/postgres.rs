//! [`PostgresStore`]: idempotency keys in a PostgreSQL table.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OnceCell;
use tokio_postgres::{Client, GenericClient, NoTls, Statement, ToStatement, Transaction};

use super::store::millis_ceil;
use super::{
    CommitStatus, ConfigError, IdempotencyStore, IdempotencyToken, Reservation, StoreError,
    StoreFuture, Token,
};

/// The SQL of each operation, for one table.
struct Sql {
    reserve: String,
    lookup: String,
    commit: String,
    committed_by: String,
    release: String,
    extend: String,
}

impl Sql {
    fn new(t: &str) -> Self {
        Sql {
            // A new key, or an expired reservation or commit, becomes this reservation;
            // a live one is left alone (no row returned).
            reserve: format!(
                "INSERT INTO {t} AS t (key, token, committed, expires_at) \
                 VALUES ($1, $2, FALSE, now() + $3::bigint * INTERVAL '1 millisecond') \
                 ON CONFLICT (key) DO UPDATE \
                 SET token = EXCLUDED.token, committed = FALSE, expires_at = EXCLUDED.expires_at \
                 WHERE t.expires_at <= now() \
                 RETURNING 1"
            ),
            lookup: format!(
                "SELECT committed, \
                 GREATEST(CEIL(EXTRACT(EPOCH FROM (expires_at - now())) * 1000), 0)::bigint \
                 FROM {t} WHERE key = $1 AND expires_at > now()"
            ),
            commit: format!(
                "UPDATE {t} SET committed = TRUE, \
                 expires_at = now() + $3::bigint * INTERVAL '1 millisecond' \
                 WHERE key = $1 AND token = $2 AND NOT committed AND expires_at > now()"
            ),
            committed_by: format!("SELECT 1 FROM {t} WHERE key = $1 AND token = $2 AND committed"),
            release: format!("DELETE FROM {t} WHERE key = $1 AND token = $2 AND NOT committed"),
            extend: format!(
                "UPDATE {t} SET expires_at = now() + $3::bigint * INTERVAL '1 millisecond' \
                 WHERE key = $1 AND token = $2 AND NOT committed AND expires_at > now()"
            ),
        }
    }
}

struct Statements {
    reserve: Statement,
    lookup: Statement,
    commit: Statement,
    committed_by: Statement,
    release: Statement,
    extend: Statement,
}

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
/// # Exactly-once effects
/// With [`CommitMode::Handler`](super::CommitMode::Handler), a handler whose effect is
/// in the same database commits the key in its own transaction with
/// [`commit_in`](Self::commit_in): effect and key commit together or not at all, and
/// the layer's own commit afterwards is a no-op.
///
/// ```no_run
/// use std::sync::Arc;
/// use std::time::Duration;
/// use redrive_core::{handler, BoxError, Message};
/// use redrive_middleware::idempotency::{
///     CommitMode, IdempotencyConfig, IdempotencyLayer, IdempotencyToken, PostgresStore,
/// };
/// use tokio::sync::Mutex;
/// use tower::ServiceBuilder;
///
/// # async fn run() -> Result<(), BoxError> {
/// let params = "host=127.0.0.1 user=postgres dbname=shop";
/// let store = Arc::new(PostgresStore::connect(params).await?);
/// store.migrate().await?;
///
/// // The handler's own connection, for its transactions.
/// let (db, conn) = tokio_postgres::connect(params, tokio_postgres::NoTls).await?;
/// tokio::spawn(conn);
/// let db = Arc::new(Mutex::new(db));
///
/// let ttl = Duration::from_secs(24 * 3600);
/// let config = IdempotencyConfig::default()
///     .with_ttl(ttl)
///     .with_commit_mode(CommitMode::Handler);
/// let layer = IdempotencyLayer::new(store.clone(), config)?;
/// let service = ServiceBuilder::new().layer(layer).service(handler::handler_fn(move |msg: Message| {
///     let (db, store) = (db.clone(), store.clone());
///     async move {
///         let reservation = msg.extensions.get::<IdempotencyToken>().expect("set by the layer").clone();
///         let mut db = db.lock().await;
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
    client: Arc<Client>,
    table: String,
    sql: Sql,
    statements: OnceCell<Statements>,
}

impl PostgresStore {
    /// The default table name.
    pub const DEFAULT_TABLE: &'static str = "redrive_idempotency";

    /// A store on `client`, in the table [`DEFAULT_TABLE`](Self::DEFAULT_TABLE).
    ///
    /// The client's connection must be driven (spawned) by the caller, as
    /// `tokio_postgres::connect` documents.
    pub fn new(client: Arc<Client>) -> Self {
        Self::on_table(client, Self::DEFAULT_TABLE.to_owned())
    }

    fn on_table(client: Arc<Client>, table: String) -> Self {
        PostgresStore {
            client,
            sql: Sql::new(&table),
            table,
            statements: OnceCell::new(),
        }
    }

    /// Connects with `params` (`host=… user=… dbname=…` or a `postgresql://` URL),
    /// without TLS, and drives the connection on a spawned task.
    ///
    /// # Errors
    /// When the parameters are invalid or the server cannot be reached.
    pub async fn connect(params: &str) -> Result<Self, StoreError> {
        let (client, connection) = tokio_postgres::connect(params, NoTls)
            .await
            .map_err(StoreError::backend)?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::error!(error = %e, "the idempotency store's PostgreSQL connection failed");
            }
        });
        Ok(Self::new(Arc::new(client)))
    }

    /// Uses `table` (`name` or `schema.name`; letters, digits and `_`) instead.
    ///
    /// # Errors
    /// [`ConfigError`] when `table` is not such a name.
    pub fn with_table(self, table: &str) -> Result<Self, ConfigError> {
        check_table(table)?;
        Ok(Self::on_table(self.client, table.to_owned()))
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Creates the table and its index if they do not exist. Safe to call from every
    /// consumer at start-up: concurrent calls are serialised by an advisory lock.
    ///
    /// # Errors
    /// When the database refuses (permissions, for one). An existing table of that name
    /// is left as it is, whatever its columns.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let t = &self.table;
        let index = format!("{}_expires_at_idx", t.rsplit('.').next().unwrap_or(t));
        self.client
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
            .map_err(StoreError::backend)
    }

    /// Deletes expired rows; returns how many.
    ///
    /// # Errors
    /// When the query fails.
    pub async fn purge_expired(&self) -> Result<u64, StoreError> {
        self.client
            .execute(
                &format!("DELETE FROM {} WHERE expires_at <= now()", self.table),
                &[],
            )
            .await
            .map_err(StoreError::backend)
    }

    /// Commits the key of `reservation` for `ttl` inside `txn`, the handler's own
    /// transaction, so the key commits if and only if the handler's effect does.
    ///
    /// `txn` may be on any connection to the same database. Until `txn` ends, the row
    /// is locked: a consumer reserving the same key waits for it, then finds the key
    /// committed (or, if `txn` rolled back, reserved or expired as before).
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
    }

    async fn statements(&self) -> Result<&Statements, StoreError> {
        self.statements
            .get_or_try_init(|| async {
                let prepare = |sql: &str| {
                    let sql = sql.to_owned();
                    async move {
                        self.client.prepare(&sql).await.map_err(|e| {
                            StoreError::backend(format!(
                                "preparing a statement on table `{}` failed (did you run \
                                 `PostgresStore::migrate`?): {e}",
                                self.table
                            ))
                        })
                    }
                };
                Ok(Statements {
                    reserve: prepare(&self.sql.reserve).await?,
                    lookup: prepare(&self.sql.lookup).await?,
                    commit: prepare(&self.sql.commit).await?,
                    committed_by: prepare(&self.sql.committed_by).await?,
                    release: prepare(&self.sql.release).await?,
                    extend: prepare(&self.sql.extend).await?,
                })
            })
            .await
    }
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
        return Err(ConfigError(format!(
            "`{table}` is not a table name; use `name` or `schema.name` with letters, \
             digits and `_` (at most 63 each)"
        )));
    }
    Ok(())
}

fn millis_param(d: Duration) -> i64 {
    i64::try_from(millis_ceil(d)).unwrap_or(i64::MAX)
}

async fn commit_on<C, T>(
    client: &C,
    commit: &T,
    committed_by: &T,
    key: &str,
    token: &Token,
    ttl: Duration,
) -> Result<CommitStatus, StoreError>
where
    C: GenericClient + Sync,
    T: ?Sized + ToStatement + Sync + Send,
{
    let ms = millis_param(ttl);
    let updated = client
        .execute(commit, &[&key, &token.as_str(), &ms])
        .await
        .map_err(StoreError::backend)?;
    if updated == 1 {
        return Ok(CommitStatus::Committed);
    }
    let mine = client
        .query_opt(committed_by, &[&key, &token.as_str()])
        .await
        .map_err(StoreError::backend)?;
    match mine {
        Some(_) => Ok(CommitStatus::AlreadyCommitted),
        None => Err(StoreError::lease_lost(key)),
    }
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

/// How many times reserve retries when the key changes between its two statements.
const RESERVE_TRIES: usize = 3;

impl IdempotencyStore for PostgresStore {
    fn reserve<'a>(&'a self, key: &'a str, lease: Duration) -> StoreFuture<'a, Reservation> {
        Box::pin(async move {
            let st = self.statements().await?;
            let ms = millis_param(lease);
            for _ in 0..RESERVE_TRIES {
                let token = Token::random();
                let inserted = self
                    .client
                    .query_opt(&st.reserve, &[&key, &token.as_str(), &ms])
                    .await
                    .map_err(StoreError::backend)?;
                if inserted.is_some() {
                    return Ok(Reservation::Fresh(token));
                }
                // A live row is there; read it. It may expire or be released before we
                // look, in which case the insert is tried again.
                let row = self
                    .client
                    .query_opt(&st.lookup, &[&key])
                    .await
                    .map_err(StoreError::backend)?;
                if let Some(row) = row {
                    let committed: bool = row.try_get(0).map_err(StoreError::backend)?;
                    if committed {
                        return Ok(Reservation::Committed);
                    }
                    let ms: i64 = row.try_get(1).map_err(StoreError::backend)?;
                    return Ok(Reservation::Reserved {
                        remaining: Duration::from_millis(u64::try_from(ms).unwrap_or(0)),
                    });
                }
            }
            // The key keeps changing hands: report it busy, to be tried again soon.
            Ok(Reservation::Reserved {
                remaining: Duration::ZERO,
            })
        })
    }

    fn commit<'a>(
        &'a self,
        key: &'a str,
        token: &'a Token,
        ttl: Duration,
    ) -> StoreFuture<'a, CommitStatus> {
        Box::pin(async move {
            let st = self.statements().await?;
            commit_on(&*self.client, &st.commit, &st.committed_by, key, token, ttl).await
        })
    }

    fn extend<'a>(
        &'a self,
        key: &'a str,
        token: &'a Token,
        lease: Duration,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let st = self.statements().await?;
            let updated = self
                .client
                .execute(&st.extend, &[&key, &token.as_str(), &millis_param(lease)])
                .await
                .map_err(StoreError::backend)?;
            if updated == 1 {
                Ok(())
            } else {
                Err(StoreError::lease_lost(key))
            }
        })
    }

    fn release<'a>(&'a self, key: &'a str, token: &'a Token) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let st = self.statements().await?;
            let deleted = self
                .client
                .execute(&st.release, &[&key, &token.as_str()])
                .await
                .map_err(StoreError::backend)?;
            if deleted == 1 {
                return Ok(());
            }
            let mine = self
                .client
                .query_opt(&st.committed_by, &[&key, &token.as_str()])
                .await
                .map_err(StoreError::backend)?;
            match mine {
                Some(_) => Ok(()),
                None => Err(StoreError::lease_lost(key)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::idempotency::contract;

    #[tokio::test]
    async fn passes_the_store_contract() {
        let store = contract::postgres_store().await;
        contract::run_all(&store, Duration::from_millis(300)).await;
    }

    #[tokio::test]
    async fn migrate_is_idempotent_and_purge_deletes_expired_rows() {
        use crate::idempotency::{IdempotencyStore, Reservation};
        let store = contract::postgres_store().await;
        store.migrate().await.unwrap();
        let Reservation::Fresh(_) = store.reserve("k", Duration::from_millis(1)).await.unwrap()
        else {
            panic!("fresh key");
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(store.purge_expired().await.unwrap(), 1);
        assert_eq!(store.purge_expired().await.unwrap(), 0);
    }

    #[test]
    fn table_names_are_checked() {
        for ok in ["t", "_t1", "public.redrive_idempotency", "S.T"] {
            assert!(super::check_table(ok).is_ok(), "{ok}");
        }
        let long = "t".repeat(64);
        for bad in [
            "",
            "1t",
            "a.b.c",
            "t;drop table x",
            "a-b",
            "\"t\"",
            ".t",
            long.as_str(),
        ] {
            let err = super::check_table(bad).unwrap_err();
            assert!(
                err.to_string().contains("is not a table name"),
                "{bad}: {err}"
            );
        }
    }
}
