//! Reserves and commits of concurrent callers, sent to PostgreSQL together.
//!
//! Each reserve and each commit is a write, and each write statement is a transaction
//! of its own: alone, every message costs the server two commits (two flushes of its
//! write-ahead log). Callers that arrive while a statement of their kind is running
//! wait for it, and the next statement takes all of them at once (up to
//! [`MAX_BATCH`] keys): under load one statement, one commit, serves many messages,
//! and a lone caller is served at once, as before.
//!
//! A batch takes each key once (a second request for a key waits for the next batch),
//! and its rows are locked in key order, so two batches (of this process or another)
//! never wait for each other in a cycle. A row another transaction holds (a handler's
//! [`commit_in`](super::PostgresStore::commit_in) of a duplicate's key) would hold up
//! the whole batch: a batch waits at most [`LOCK_WAIT`] for a row, then each of its keys
//! goes alone. A key the batch statement does not settle (a live reservation to look
//! up, a commit whose lease was lost) goes through the single-key statements, on the
//! same connection.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{Object, Pool};
use tokio::sync::oneshot;
use tokio::time::{Instant, timeout_at};
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

use super::sql::{Failure, Sql, commit_with, millis_param, prepared, reserve_on};
use super::{connection, op_failed};
use crate::idempotency::{CommitStatus, Reservation, StoreError, Token};

/// The most keys one statement takes.
pub(super) const MAX_BATCH: usize = 64;

/// How long a batch statement waits for a row another transaction holds before its
/// keys go one at a time.
const LOCK_WAIT: &str = "100ms";

/// What a batch runs against: cloned from the store when a batch starts.
#[derive(Clone)]
pub(super) struct Target {
    pub(super) pool: Pool,
    pub(super) sql: Arc<Sql>,
    pub(super) table: String,
    pub(super) timeout: Duration,
    pub(super) tls: super::tls::Setting,
}

/// The requests waiting for a statement, per kind.
#[derive(Default)]
pub(super) struct Batcher {
    reserves: Queue<ReserveRequest>,
    commits: Queue<CommitRequest>,
}

struct Queue<R> {
    state: Mutex<QueueState<R>>,
}

impl<R> Default for Queue<R> {
    fn default() -> Self {
        Queue {
            state: Mutex::new(QueueState {
                waiting: Vec::new(),
                running: false,
            }),
        }
    }
}

struct QueueState<R> {
    waiting: Vec<R>,
    /// Whether a task is running this kind's statements.
    running: bool,
}

trait Keyed {
    fn key(&self) -> &str;
}

struct ReserveRequest {
    key: String,
    lease: Duration,
    reply: oneshot::Sender<Result<Reservation, StoreError>>,
}

impl Keyed for ReserveRequest {
    fn key(&self) -> &str {
        &self.key
    }
}

struct CommitRequest {
    key: String,
    token: Token,
    ttl: Duration,
    reply: oneshot::Sender<Result<CommitStatus, StoreError>>,
}

impl Keyed for CommitRequest {
    fn key(&self) -> &str {
        &self.key
    }
}

impl<R: Keyed> Queue<R> {
    /// Queues `request`; true when no task runs this queue, so the caller starts one.
    fn push(&self, request: R) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.waiting.push(request);
        !std::mem::replace(&mut s.running, true)
    }

    /// The next batch: up to [`MAX_BATCH`] requests of distinct keys, sorted by key,
    /// the others left waiting. Empty (and the queue marked idle) when none waits.
    fn take(&self) -> Vec<R> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.waiting.is_empty() {
            s.running = false;
            return Vec::new();
        }
        let mut seen = HashSet::new();
        let mut batch = Vec::new();
        let mut rest = Vec::new();
        for r in s.waiting.drain(..) {
            if batch.len() < MAX_BATCH && seen.insert(r.key().to_owned()) {
                batch.push(r);
            } else {
                rest.push(r);
            }
        }
        s.waiting = rest;
        batch.sort_by(|a, b| a.key().cmp(b.key()));
        batch
    }
}

impl Batcher {
    /// Reserves `key` in the next batch of reserves.
    pub(super) async fn reserve(
        self: &Arc<Self>,
        target: &Target,
        key: &str,
        lease: Duration,
    ) -> Result<Reservation, StoreError> {
        let (reply, answer) = oneshot::channel();
        let request = ReserveRequest {
            key: key.to_owned(),
            lease,
            reply,
        };
        if self.reserves.push(request) {
            tokio::spawn(run_reserves(self.clone(), target.clone()));
        }
        wait(answer, target.timeout).await
    }

    /// Commits `key` for `token` in the next batch of commits.
    pub(super) async fn commit(
        self: &Arc<Self>,
        target: &Target,
        key: &str,
        token: &Token,
        ttl: Duration,
    ) -> Result<CommitStatus, StoreError> {
        let (reply, answer) = oneshot::channel();
        let request = CommitRequest {
            key: key.to_owned(),
            token: token.clone(),
            ttl,
            reply,
        };
        if self.commits.push(request) {
            tokio::spawn(run_commits(self.clone(), target.clone()));
        }
        wait(answer, target.timeout).await
    }
}

/// The batch's answer, within the store's timeout.
async fn wait<T>(
    answer: oneshot::Receiver<Result<T, StoreError>>,
    timeout: Duration,
) -> Result<T, StoreError> {
    match tokio::time::timeout(timeout, answer).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(StoreError::backend(
            "PostgreSQL: the batch this operation was in ended without an answer",
        )),
        Err(_) => Err(timed_out(timeout)),
    }
}

fn timed_out(timeout: Duration) -> StoreError {
    StoreError::backend(format!(
        "PostgreSQL did not answer within {timeout:?} (the store's timeout)"
    ))
}

/// Runs batches of reserves until none waits.
async fn run_reserves(batcher: Arc<Batcher>, target: Target) {
    loop {
        let batch = batcher.reserves.take();
        if batch.is_empty() {
            return;
        }
        let keys: Vec<&str> = batch.iter().map(|r| r.key.as_str()).collect();
        let leases: Vec<Duration> = batch.iter().map(|r| r.lease).collect();
        let tokens: Vec<Token> = batch.iter().map(|_| Token::random()).collect();
        let sql = target.sql.clone();
        let statement = async |client: &Object| {
            let statement = prepared(client, &sql.reserve_many).await?;
            let texts: Vec<&str> = tokens.iter().map(Token::as_str).collect();
            let ms: Vec<i64> = leases.iter().map(|l| millis_param(*l)).collect();
            in_batch(client, &statement, &[&keys, &texts, &ms], "reserving keys").await
        };
        let fresh = match settle(&target, statement).await {
            Ok(fresh) => fresh,
            Err(message) => {
                for r in batch {
                    let _ = r.reply.send(Err(StoreError::backend(message.clone())));
                }
                continue;
            }
        };
        for (r, token) in batch.into_iter().zip(tokens) {
            if fresh.contains(&r.key) {
                let _ = r.reply.send(Ok(Reservation::Fresh(token)));
            } else {
                // A live row to read, or a row held: alone, without holding up the
                // next batch.
                let target = target.clone();
                tokio::spawn(async move {
                    let result = alone(&target, async |client: &Object| {
                        reserve_on(client, &target.sql, &r.key, r.lease).await
                    })
                    .await;
                    let _ = r.reply.send(result);
                });
            }
        }
    }
}

/// Runs batches of commits until none waits.
async fn run_commits(batcher: Arc<Batcher>, target: Target) {
    loop {
        let batch = batcher.commits.take();
        if batch.is_empty() {
            return;
        }
        let keys: Vec<&str> = batch.iter().map(|r| r.key.as_str()).collect();
        let tokens: Vec<&str> = batch.iter().map(|r| r.token.as_str()).collect();
        let ms: Vec<i64> = batch.iter().map(|r| millis_param(r.ttl)).collect();
        let sql = target.sql.clone();
        let statement = async |client: &Object| {
            let statement = prepared(client, &sql.commit_many).await?;
            in_batch(
                client,
                &statement,
                &[&keys, &tokens, &ms],
                "committing keys",
            )
            .await
        };
        let committed = match settle(&target, statement).await {
            Ok(committed) => committed,
            Err(message) => {
                for r in batch {
                    let _ = r.reply.send(Err(StoreError::backend(message.clone())));
                }
                continue;
            }
        };
        for r in batch {
            if committed.contains(&r.key) {
                let _ = r.reply.send(Ok(CommitStatus::Committed));
            } else {
                // Committed by this token before, or lost: the single-key commit tells.
                let target = target.clone();
                tokio::spawn(async move {
                    let result = alone(&target, async |client: &Object| {
                        commit_with(client, &target.sql, &r.key, &r.token, r.ttl).await
                    })
                    .await;
                    let _ = r.reply.send(result);
                });
            }
        }
    }
}

/// Runs a batch statement on a connection of the pool, within the store's timeout;
/// the keys of the rows it returned, or the error's message for every request.
async fn settle(
    target: &Target,
    statement: impl AsyncFnOnce(&Object) -> Result<Vec<Row>, Failure>,
) -> Result<HashSet<String>, String> {
    let deadline = Instant::now() + target.timeout;
    let client = connection(&target.pool, deadline, target.timeout, &target.tls)
        .await
        .map_err(|e| e.to_string())?;
    let rows = match timeout_at(deadline, statement(&client)).await {
        Ok(Ok(rows)) => rows,
        Ok(Err(failure)) => return Err(op_failed(&target.table, failure).to_string()),
        Err(_) => {
            // Out of time, the connection may be dead without knowing it.
            drop(Object::take(client));
            return Err(timed_out(target.timeout).to_string());
        }
    };
    rows.iter()
        .map(|row| row.try_get::<_, String>(0))
        .collect::<Result<_, _>>()
        .map_err(|e| op_failed(&target.table, Failure::Query("reading keys", e)).to_string())
}

/// Runs a single-key operation on a connection of the pool, within the store's timeout.
async fn alone<T>(
    target: &Target,
    operation: impl AsyncFnOnce(&Object) -> Result<T, Failure>,
) -> Result<T, StoreError> {
    let deadline = Instant::now() + target.timeout;
    let client = connection(&target.pool, deadline, target.timeout, &target.tls).await?;
    match timeout_at(deadline, operation(&client)).await {
        Ok(result) => result.map_err(|f| op_failed(&target.table, f)),
        Err(_) => {
            drop(Object::take(client));
            Err(timed_out(target.timeout))
        }
    }
}

/// Runs a batch statement in a transaction that waits at most [`LOCK_WAIT`] for a row;
/// when a row stays held longer, no row (so each key goes alone, and waits as long as
/// it must).
async fn in_batch(
    client: &Object,
    statement: &tokio_postgres::Statement,
    params: &[&(dyn ToSql + Sync)],
    doing: &'static str,
) -> Result<Vec<Row>, Failure> {
    let failed = |e| Failure::Query(doing, e);
    client
        .batch_execute(&format!("BEGIN; SET LOCAL lock_timeout = '{LOCK_WAIT}'"))
        .await
        .map_err(failed)?;
    match client.query(statement, params).await {
        Ok(rows) => {
            client.batch_execute("COMMIT").await.map_err(failed)?;
            Ok(rows)
        }
        Err(e) => {
            client.batch_execute("ROLLBACK").await.map_err(failed)?;
            if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) {
                Ok(Vec::new())
            } else {
                Err(failed(e))
            }
        }
    }
}
