//! The SQL of each [`PostgresStore`](super::PostgresStore) operation, and running it
//! on one connection.

use std::time::Duration;

use deadpool_postgres::ClientWrapper;
use tokio_postgres::{GenericClient, Statement, ToStatement};

use crate::idempotency::store::millis_ceil;
use crate::idempotency::{CommitStatus, Reservation, Token};

/// The SQL of each operation, for one table.
pub(super) struct Sql {
    reserve: String,
    /// [`reserve`](Self::reserve) of many keys: `$1` keys, `$2` tokens, `$3` leases
    /// in ms, arrays in step; returns the keys reserved, locking rows in key order.
    pub(super) reserve_many: String,
    /// [`commit`](Self::commit) of many keys, arrays in step; returns the keys
    /// committed, locking rows in key order.
    pub(super) commit_many: String,
    lookup: String,
    pub(super) commit: String,
    pub(super) committed_by: String,
    release: String,
    extend: String,
}

impl Sql {
    pub(super) fn new(t: &str) -> Self {
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
            reserve_many: format!(
                "INSERT INTO {t} AS t (key, token, committed, expires_at) \
                 SELECT u.key, u.token, FALSE, now() + u.ms * INTERVAL '1 millisecond' \
                 FROM unnest($1::text[], $2::text[], $3::bigint[]) AS u(key, token, ms) \
                 ORDER BY u.key \
                 ON CONFLICT (key) DO UPDATE \
                 SET token = EXCLUDED.token, committed = FALSE, expires_at = EXCLUDED.expires_at \
                 WHERE t.expires_at <= now() \
                 RETURNING t.key"
            ),
            commit_many: format!(
                "WITH u AS (SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[]) \
                 AS u(key, token, ms)), \
                 locked AS (SELECT t.key FROM {t} t JOIN u ON t.key = u.key \
                 ORDER BY t.key FOR UPDATE OF t) \
                 UPDATE {t} AS t SET committed = TRUE, \
                 expires_at = now() + u.ms * INTERVAL '1 millisecond' \
                 FROM u WHERE t.key = u.key AND t.key IN (SELECT key FROM locked) \
                 AND t.token = u.token AND NOT t.committed AND t.expires_at > now() \
                 RETURNING t.key"
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

/// How an operation on one connection failed.
pub(super) enum Failure {
    /// The token no longer holds this key.
    LeaseLost(String),
    /// A statement failed while doing this.
    Query(&'static str, tokio_postgres::Error),
}

pub(super) fn millis_param(d: Duration) -> i64 {
    i64::try_from(millis_ceil(d)).unwrap_or(i64::MAX)
}

pub(super) async fn commit_on<C, T>(
    client: &C,
    commit: &T,
    committed_by: &T,
    key: &str,
    token: &Token,
    ttl: Duration,
) -> Result<CommitStatus, Failure>
where
    C: GenericClient + Sync,
    T: ?Sized + ToStatement + Sync + Send,
{
    let ms = millis_param(ttl);
    let updated = client
        .execute(commit, &[&key, &token.as_str(), &ms])
        .await
        .map_err(|e| Failure::Query("committing a key", e))?;
    if updated == 1 {
        return Ok(CommitStatus::Committed);
    }
    let mine = client
        .query_opt(committed_by, &[&key, &token.as_str()])
        .await
        .map_err(|e| Failure::Query("committing a key", e))?;
    match mine {
        Some(_) => Ok(CommitStatus::AlreadyCommitted),
        None => Err(Failure::LeaseLost(key.to_owned())),
    }
}

/// The statement of `sql` on `client`, prepared once per connection.
pub(super) async fn prepared(client: &ClientWrapper, sql: &str) -> Result<Statement, Failure> {
    client
        .prepare_cached(sql)
        .await
        .map_err(|e| Failure::Query("preparing a statement", e))
}

pub(super) async fn reserve_on(
    client: &ClientWrapper,
    sql: &Sql,
    key: &str,
    lease: Duration,
) -> Result<Reservation, Failure> {
    let reserve = prepared(client, &sql.reserve).await?;
    let lookup = prepared(client, &sql.lookup).await?;
    let failed = |e| Failure::Query("reserving a key", e);
    let ms = millis_param(lease);
    for _ in 0..RESERVE_TRIES {
        let token = Token::random();
        let inserted = client
            .query_opt(&reserve, &[&key, &token.as_str(), &ms])
            .await
            .map_err(failed)?;
        if inserted.is_some() {
            return Ok(Reservation::Fresh(token));
        }
        // A live row is there; read it. It may expire or be released before we look,
        // in which case the insert is tried again.
        let row = client.query_opt(&lookup, &[&key]).await.map_err(failed)?;
        if let Some(row) = row {
            let committed: bool = row.try_get(0).map_err(failed)?;
            if committed {
                return Ok(Reservation::Committed);
            }
            let ms: i64 = row.try_get(1).map_err(failed)?;
            return Ok(Reservation::Reserved {
                remaining: Duration::from_millis(u64::try_from(ms).unwrap_or(0)),
            });
        }
    }
    // The key keeps changing hands: report it busy, to be tried again soon.
    Ok(Reservation::Reserved {
        remaining: Duration::ZERO,
    })
}

pub(super) async fn commit_with(
    client: &ClientWrapper,
    sql: &Sql,
    key: &str,
    token: &Token,
    ttl: Duration,
) -> Result<CommitStatus, Failure> {
    let commit = prepared(client, &sql.commit).await?;
    let committed_by = prepared(client, &sql.committed_by).await?;
    commit_on(&**client, &commit, &committed_by, key, token, ttl).await
}

pub(super) async fn extend_on(
    client: &ClientWrapper,
    sql: &Sql,
    key: &str,
    token: &Token,
    lease: Duration,
) -> Result<(), Failure> {
    let extend = prepared(client, &sql.extend).await?;
    let updated = client
        .execute(&extend, &[&key, &token.as_str(), &millis_param(lease)])
        .await
        .map_err(|e| Failure::Query("extending a lease", e))?;
    if updated == 1 {
        Ok(())
    } else {
        Err(Failure::LeaseLost(key.to_owned()))
    }
}

pub(super) async fn release_on(
    client: &ClientWrapper,
    sql: &Sql,
    key: &str,
    token: &Token,
) -> Result<(), Failure> {
    let release = prepared(client, &sql.release).await?;
    let committed_by = prepared(client, &sql.committed_by).await?;
    let failed = |e| Failure::Query("releasing a key", e);
    let deleted = client
        .execute(&release, &[&key, &token.as_str()])
        .await
        .map_err(failed)?;
    if deleted == 1 {
        return Ok(());
    }
    let mine = client
        .query_opt(&committed_by, &[&key, &token.as_str()])
        .await
        .map_err(failed)?;
    match mine {
        Some(_) => Ok(()),
        None => Err(Failure::LeaseLost(key.to_owned())),
    }
}

/// How many times reserve retries when the key changes between its two statements.
const RESERVE_TRIES: usize = 3;
