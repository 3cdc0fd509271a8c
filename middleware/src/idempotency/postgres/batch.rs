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
//! up, a commit whose lease was lost, a statement that failed) goes through the
//! single-key statements, in a task and on a connection of its own (at most
//! [`ALONE_AT_ONCE`] such at once), and reports its own error.
//!
//! A request whose caller stopped waiting (its timeout passed, or its future was
//! dropped) is not sent; a key reserved for a caller that stopped waiting meanwhile is
//! released.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{Object, Pool};
use tokio::sync::{Semaphore, oneshot};
use tokio::time::{Instant, timeout_at};
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

use super::sql::{Failure, Sql, commit_with, millis_param, prepared, release_on, reserve_on};
use super::{connection, op_failed};
use crate::idempotency::{CommitStatus, Reservation, StoreError, Token};

/// The most keys one statement takes.
pub(super) const MAX_BATCH: usize = 64;

/// How long a batch statement waits for a row another transaction holds before its
/// keys go one at a time.
const LOCK_WAIT: &str = "100ms";

/// Keys going alone at once, each holding a connection of the pool (which handlers'
/// own transactions may share).
const ALONE_AT_ONCE: usize = 4;

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
pub(super) struct Batcher {
    reserves: Queue<ReserveRequest>,
    commits: Queue<CommitRequest>,
    /// Permits for keys going alone.
    alone: Arc<Semaphore>,
}

impl Default for Batcher {
    fn default() -> Self {
        Batcher {
            reserves: Queue::default(),
            commits: Queue::default(),
            alone: Arc::new(Semaphore::new(ALONE_AT_ONCE)),
        }
    }
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

    /// Whether the caller stopped waiting: its deadline passed, or it was dropped.
    fn abandoned(&self) -> bool;
}

struct ReserveRequest {
    key: String,
    lease: Duration,
    deadline: Instant,
    reply: oneshot::Sender<Result<Reservation, StoreError>>,
}

impl Keyed for ReserveRequest {
    fn key(&self) -> &str {
        &self.key
    }

    fn abandoned(&self) -> bool {
        self.reply.is_closed() || Instant::now() >= self.deadline
    }
}

struct CommitRequest {
    key: String,
    token: Token,
    ttl: Duration,
    deadline: Instant,
    reply: oneshot::Sender<Result<CommitStatus, StoreError>>,
}

impl Keyed for CommitRequest {
    fn key(&self) -> &str {
        &self.key
    }

    fn abandoned(&self) -> bool {
        self.reply.is_closed() || Instant::now() >= self.deadline
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
    /// the others left waiting; requests whose callers stopped waiting are dropped.
    /// Empty (and the queue marked idle) when none waits.
    fn take(&self) -> Vec<R> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.waiting.retain(|r| !r.abandoned());
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

/// Marks its queue idle if the runner ends without emptying it.
struct Runner<'a, R> {
    queue: &'a Queue<R>,
    finished: bool,
}

impl<R> Drop for Runner<'_, R> {
    fn drop(&mut self) {
        if !self.finished {
            let mut s = self.queue.state.lock().unwrap_or_else(|p| p.into_inner());
            s.waiting.clear();
            s.running = false;
        }
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
            deadline: Instant::now() + target.timeout,
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
            deadline: Instant::now() + target.timeout,
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
    let mut runner = Runner {
        queue: &batcher.reserves,
        finished: false,
    };
    loop {
        let batch = batcher.reserves.take();
        if batch.is_empty() {
            runner.finished = true;
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
                reply_reserved(
                    &target,
                    &batcher,
                    r.key,
                    r.reply,
                    Ok(Reservation::Fresh(token)),
                );
            } else {
                // A live row to read, a row held, or a failed statement: alone,
                // without holding up the next batch.
                let (target, batcher) = (target.clone(), batcher.clone());
                tokio::spawn(async move {
                    let result = alone(&target, &batcher, async |client: &Object| {
                        reserve_on(client, &target.sql, &r.key, r.lease).await
                    })
                    .await;
                    reply_reserved(&target, &batcher, r.key, r.reply, result);
                });
            }
        }
    }
}

/// Answers a reserve; a key reserved for a caller that stopped waiting is released,
/// or it would stay reserved for its whole lease with no one to process it.
fn reply_reserved(
    target: &Target,
    batcher: &Arc<Batcher>,
    key: String,
    reply: oneshot::Sender<Result<Reservation, StoreError>>,
    result: Result<Reservation, StoreError>,
) {
    if let Err(Ok(Reservation::Fresh(token))) = reply.send(result) {
        let (target, batcher) = (target.clone(), batcher.clone());
        tokio::spawn(async move {
            let released = alone(&target, &batcher, async |client: &Object| {
                release_on(client, &target.sql, &key, &token).await
            })
            .await;
            if let Err(e) = released {
                tracing::debug!(key, error = %e, "releasing a key reserved for a caller that stopped waiting failed; it expires with its lease");
            }
        });
    }
}

/// Runs batches of commits until none waits.
async fn run_commits(batcher: Arc<Batcher>, target: Target) {
    let mut runner = Runner {
        queue: &batcher.commits,
        finished: false,
    };
    loop {
        let batch = batcher.commits.take();
        if batch.is_empty() {
            runner.finished = true;
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
                // Committed by this token before, lost, or a failed statement: the
                // single-key commit tells.
                let (target, batcher) = (target.clone(), batcher.clone());
                tokio::spawn(async move {
                    let result = alone(&target, &batcher, async |client: &Object| {
                        commit_with(client, &target.sql, &r.key, &r.token, r.ttl).await
                    })
                    .await;
                    let _ = r.reply.send(result);
                });
            }
        }
    }
}

/// A connection that leaves the pool when dropped before [`done`](Self::done): a
/// statement cancelled between `BEGIN` and `COMMIT` would hand it back inside a
/// transaction, holding its rows.
struct Checked(Option<Object>);

impl Checked {
    fn client(&self) -> &Object {
        self.0.as_ref().expect("held until done or dropped")
    }

    /// Back to the pool.
    fn done(mut self) {
        drop(self.0.take());
    }
}

impl Drop for Checked {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            drop(Object::take(client));
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
    let client = Checked(Some(client));
    let rows = match timeout_at(deadline, statement(client.client())).await {
        Ok(Ok(rows)) => rows,
        // Dropped, out of time the connection may be dead without knowing it.
        Ok(Err(failure)) => return Err(op_failed(&target.table, failure).to_string()),
        Err(_) => return Err(timed_out(target.timeout).to_string()),
    };
    client.done();
    rows.iter()
        .map(|row| row.try_get::<_, String>(0))
        .collect::<Result<_, _>>()
        .map_err(|e| op_failed(&target.table, Failure::Query("reading keys", e)).to_string())
}

/// Runs a single-key operation on a connection of the pool, within the store's
/// timeout, with at most [`ALONE_AT_ONCE`] such at once.
async fn alone<T>(
    target: &Target,
    batcher: &Batcher,
    operation: impl AsyncFnOnce(&Object) -> Result<T, Failure>,
) -> Result<T, StoreError> {
    let deadline = Instant::now() + target.timeout;
    let Ok(Ok(_permit)) = timeout_at(deadline, batcher.alone.acquire()).await else {
        return Err(timed_out(target.timeout));
    };
    let client = connection(&target.pool, deadline, target.timeout, &target.tls).await?;
    let client = Checked(Some(client));
    match timeout_at(deadline, operation(client.client())).await {
        Ok(result) => {
            client.done();
            result.map_err(|f| op_failed(&target.table, f))
        }
        Err(_) => Err(timed_out(target.timeout)),
    }
}

/// Runs a batch statement in a transaction (read committed, whatever the database's
/// default) that waits at most [`LOCK_WAIT`] for a row. When the statement fails (a row
/// held longer, or a key the server refuses), no row: each key then goes alone, waits
/// as long as it must, and reports its own error.
async fn in_batch(
    client: &Object,
    statement: &tokio_postgres::Statement,
    params: &[&(dyn ToSql + Sync)],
    doing: &'static str,
) -> Result<Vec<Row>, Failure> {
    let failed = |e| Failure::Query(doing, e);
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL READ COMMITTED; SET LOCAL lock_timeout = '{LOCK_WAIT}'"
        ))
        .await
        .map_err(failed)?;
    match client.query(statement, params).await {
        Ok(rows) => {
            client.batch_execute("COMMIT").await.map_err(failed)?;
            Ok(rows)
        }
        Err(e) => {
            client.batch_execute("ROLLBACK").await.map_err(failed)?;
            if e.code() != Some(&SqlState::LOCK_NOT_AVAILABLE) {
                tracing::debug!(error = %e, "a batch statement failed; its keys go alone");
            }
            Ok(Vec::new())
        }
    }
}
