//! The idempotency layer on the real local PostgreSQL (`DATABASE_URL`, default
//! `host=127.0.0.1 user=postgres dbname=test`). Fails, saying how to start PostgreSQL,
//! when it is not running.
#![cfg(feature = "postgres")]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use redrive_core::{BoxError, Headers, Message, Outcome};
use redrive_middleware::idempotency::{
    self, CommitMode, IdempotencyConfig, IdempotencyLayer, IdempotencyStore, IdempotencyToken,
    KeyReserved, Namespace, PostgresStore, Reservation, testkit,
};
use tokio::sync::Mutex;
use tokio_postgres::{Client, NoTls};
use tower::{Layer, Service, ServiceExt, service_fn};

#[path = "support/services.rs"]
mod services;
#[path = "support/store_load.rs"]
mod store_load;

fn params() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into())
}

fn unreachable(e: &dyn std::fmt::Display) -> ! {
    panic!(
        "cannot reach PostgreSQL with `{}` ({e}); start it with `pg_ctlcluster 15 main start` \
         or set DATABASE_URL",
        params()
    )
}

async fn client() -> Client {
    let params = params();
    match tokio::time::timeout(
        Duration::from_secs(5),
        tokio_postgres::connect(&params, NoTls),
    )
    .await
    {
        Ok(Ok((client, conn))) => {
            tokio::spawn(conn);
            client
        }
        Ok(Err(e)) => unreachable(&e),
        Err(_) => unreachable(&"no answer within 5 s"),
    }
}

/// A fresh table name for one test.
fn table(test: &str) -> String {
    format!("redrive_test_{test}_{:016x}", fastrand::u64(..))
}

/// A migrated store on a pool of its own.
async fn store(table: &str) -> PostgresStore {
    let store = match tokio::time::timeout(
        Duration::from_secs(10),
        PostgresStore::connect(&params()),
    )
    .await
    {
        Ok(Ok(store)) => store,
        Ok(Err(e)) => unreachable(&e),
        Err(_) => unreachable(&"no answer within 10 s"),
    };
    let store = store.with_table(table).unwrap();
    store.migrate().await.unwrap();
    store
}

/// `key` as the layer stores it for a message from [`keyed`].
fn stored(key: &str) -> String {
    Namespace::Consumer.scope(&keyed(key), key).to_string()
}

fn keyed(key: &str) -> Message {
    let mut headers = Headers::new();
    headers.insert(idempotency::IDEMPOTENCY_KEY, key).unwrap();
    Message::new("charge").with_headers(headers)
}

fn handler(
    runs: Arc<AtomicU32>,
    work: Duration,
) -> impl Service<Message, Response = Outcome, Error = BoxError, Future: Send> + Clone + Send + 'static
{
    service_fn(move |_msg: Message| {
        let runs = runs.clone();
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(work).await;
            Ok::<_, BoxError>(Outcome::Processed)
        }
    })
}

fn config(lease: Duration) -> IdempotencyConfig {
    IdempotencyConfig::default()
        .with_lease(lease)
        .with_ttl(Duration::from_secs(60))
}

#[tokio::test]
async fn the_store_keeps_the_store_contract() {
    let store = store(&table("contract")).await;
    // A lease the checks renew at half its length: 1 s holds through the scheduling
    // stalls of a busy 2-core machine, where 300 ms was seen to lapse.
    testkit::run_all(&store, Duration::from_secs(1)).await;
}

#[tokio::test]
async fn two_consumers_racing_for_one_key_run_the_handler_once() {
    let table = table("race");
    let a = IdempotencyLayer::new(
        Arc::new(store(&table).await),
        config(Duration::from_secs(5)),
    )
    .unwrap();
    let b = IdempotencyLayer::new(
        Arc::new(store(&table).await),
        config(Duration::from_secs(5)),
    )
    .unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let work = Duration::from_millis(200);
    let (ra, rb) = tokio::join!(
        a.layer(handler(runs.clone(), work)).oneshot(keyed("k")),
        b.layer(handler(runs.clone(), work)).oneshot(keyed("k")),
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "both consumers ran the handler"
    );
    let err = match (ra, rb) {
        (Ok(Outcome::Processed), Err(e)) | (Err(e), Ok(Outcome::Processed)) => e,
        other => panic!("expected one success and one refusal, got {other:?}"),
    };
    let reserved = KeyReserved::find(&*err).expect("KeyReserved");
    assert!(reserved.remaining() > Duration::from_secs(4), "{reserved}");
    let again = b
        .layer(handler(runs.clone(), work))
        .oneshot(keyed("k"))
        .await
        .unwrap();
    assert_eq!(again, Outcome::Deduplicated);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_reservation_lost_mid_processing_cannot_be_committed_over_the_next_owner() {
    let table = table("lease");
    let lease = Duration::from_millis(300);
    let shared = Arc::new(store(&table).await);
    let slow = IdempotencyLayer::new(shared.clone(), config(lease)).unwrap();
    let fast = IdempotencyLayer::new(Arc::new(store(&table).await), config(lease)).unwrap();
    let runs = Arc::new(AtomicU32::new(0));

    let late = tokio::spawn(
        slow.layer(handler(runs.clone(), Duration::from_millis(700)))
            .oneshot(keyed("k")),
    );
    // While the call runs its key is held, renewed past the lease.
    tokio::time::sleep(lease * 2).await;
    let refused = fast
        .layer(handler(runs.clone(), Duration::ZERO))
        .oneshot(keyed("k"))
        .await
        .unwrap_err();
    assert!(KeyReserved::find(&*refused).is_some(), "{refused}");
    // The reservation lapses behind the slow call's back (renewing could not reach
    // the store, say); the next consumer takes the key.
    client()
        .await
        .execute(
            &format!("UPDATE {table} SET expires_at = now() - INTERVAL '1 second' WHERE key = $1"),
            &[&stored("k")],
        )
        .await
        .unwrap();
    let outcome = fast
        .layer(handler(runs.clone(), Duration::ZERO))
        .oneshot(keyed("k"))
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Processed);

    // The late owner's handler succeeded: its message is acked, its commit counted as
    // failed; the next owner's commit is not overwritten.
    assert_eq!(late.await.unwrap().unwrap(), Outcome::Processed);
    assert_eq!(slow.stats().commit_failures, 1);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert_eq!(
        shared.reserve(&stored("k"), lease).await.unwrap(),
        Reservation::Committed
    );
}

/// A handler that records its effect in `effects` and commits the key in the same
/// transaction, on a connection of the store's pool; it fails after `commit_in`
/// (rolling everything back) while `fail` is set.
fn transactional(
    store: Arc<PostgresStore>,
    effects: String,
    fail: Arc<AtomicU32>,
) -> impl Service<Message, Response = Outcome, Error = BoxError, Future: Send> + Clone + Send + 'static
{
    service_fn(move |msg: Message| {
        let (store, effects, fail) = (store.clone(), effects.clone(), fail.clone());
        async move {
            let reservation = msg
                .extensions
                .get::<IdempotencyToken>()
                .expect("the layer puts the reservation into the extensions")
                .clone();
            let mut db = store.pool().get().await?;
            let txn = db.transaction().await?;
            txn.execute(
                &format!("INSERT INTO {effects} (key) VALUES ($1)"),
                &[&reservation.key()],
            )
            .await?;
            store
                .commit_in(&txn, &reservation, Duration::from_secs(60))
                .await?;
            if fail.load(Ordering::SeqCst) > 0 {
                fail.fetch_sub(1, Ordering::SeqCst);
                return Err::<Outcome, BoxError>("crashed before commit".into()); // txn rolls back
            }
            txn.commit().await?;
            Ok(Outcome::Processed)
        }
    })
}

#[tokio::test]
async fn a_handler_commits_the_key_in_its_own_transaction_exactly_once() {
    let table = table("txn");
    let effects = format!("{table}_effects");
    let store = Arc::new(store(&table).await);
    let db = client().await;
    db.batch_execute(&format!("CREATE TABLE {effects} (key TEXT NOT NULL)"))
        .await
        .unwrap();
    let db = Arc::new(Mutex::new(db));
    let config = config(Duration::from_secs(5)).with_commit_mode(CommitMode::Handler);
    let layer = IdempotencyLayer::new(store.clone(), config).unwrap();
    let fail = Arc::new(AtomicU32::new(1));
    let svc = || transactional(store.clone(), effects.clone(), fail.clone());
    let count = || async {
        let row = db
            .lock()
            .await
            .query_one(&format!("SELECT count(*) FROM {effects}"), &[])
            .await
            .unwrap();
        row.get::<_, i64>(0)
    };

    // First delivery: the handler fails after commit_in; effect and key roll back
    // together, and the layer releases the reservation.
    let err = layer.layer(svc()).oneshot(keyed("k")).await.unwrap_err();
    assert_eq!(err.to_string(), "crashed before commit");
    assert_eq!(count().await, 0);
    let rows = db
        .lock()
        .await
        .query_one(
            &format!("SELECT count(*) FROM {table} WHERE key = $1"),
            &[&stored("k")],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(rows, 0, "the reservation was not released");

    // Redelivery: effect and key commit together; the layer's commit is a no-op.
    let o = layer.layer(svc()).oneshot(keyed("k")).await.unwrap();
    assert_eq!(o, Outcome::Processed);
    assert_eq!(count().await, 1);
    assert_eq!(
        store
            .reserve(&stored("k"), Duration::from_secs(5))
            .await
            .unwrap(),
        Reservation::Committed
    );

    // Any later delivery is skipped: the effect happened exactly once.
    let o = layer.layer(svc()).oneshot(keyed("k")).await.unwrap();
    assert_eq!(o, Outcome::Deduplicated);
    assert_eq!(count().await, 1);
}

#[tokio::test]
async fn commit_in_with_a_lost_lease_fails_and_leaves_the_new_owner_alone() {
    let table = table("lost");
    let store = store(&table).await;
    let Reservation::Fresh(stale) = store
        .reserve(&stored("k"), Duration::from_millis(300))
        .await
        .unwrap()
    else {
        panic!("fresh");
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    let Reservation::Fresh(current) = store
        .reserve(&stored("k"), Duration::from_secs(5))
        .await
        .unwrap()
    else {
        panic!("the expired lease was not taken over");
    };

    let mut db = client().await;
    let txn = db.transaction().await.unwrap();
    let err = store
        .commit_in(
            &txn,
            &IdempotencyToken::new("k", stale),
            Duration::from_secs(60),
        )
        .await
        .unwrap_err();
    assert!(err.is_lease_lost(), "{err}");
    drop(txn);
    // The current owner is untouched and commits.
    assert!(matches!(
        store
            .reserve(&stored("k"), Duration::from_secs(5))
            .await
            .unwrap(),
        Reservation::Reserved { .. }
    ));
    store
        .commit(&stored("k"), &current, Duration::from_secs(60))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_recovers_from_a_postgres_restart_under_load() {
    let mut pg = tokio::task::block_in_place(services::PrivatePostgres::new);
    let store = PostgresStore::connect(&pg.params()).await.unwrap();
    store.migrate().await.unwrap();
    let store = Arc::new(store);
    let Reservation::Fresh(token) = store.reserve("kept", Duration::from_secs(5)).await.unwrap()
    else {
        panic!("fresh");
    };
    store
        .commit("kept", &token, Duration::from_secs(600))
        .await
        .unwrap();

    let load = store_load::Load::start(store.clone(), 8);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stopping = load.now();
    tokio::task::block_in_place(|| pg.stop());
    let down = load.now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let restarting = load.now();
    tokio::task::block_in_place(|| pg.start());
    let up = load.now();
    let recovered = load.first_success_after(up, store_load::RECOVERY).await;
    if recovered.is_some() {
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let ops = load.finish().await;
    let outage = store_load::Outage {
        stopping,
        down,
        restarting,
        up,
        recovered,
    };
    store_load::check(&ops, &outage, "PostgreSQL restart");
    assert_eq!(
        store.reserve("kept", Duration::from_secs(5)).await.unwrap(),
        Reservation::Committed,
        "a key committed before the restart"
    );
}

#[tokio::test]
async fn an_operation_on_a_server_that_does_not_answer_fails_within_the_timeout() {
    // Accepts connections (the kernel's backlog does) and never answers, as a hung
    // server or a half-open connection does.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let config: tokio_postgres::Config = format!("host=127.0.0.1 port={port} user=postgres")
        .parse()
        .unwrap();
    // A pool of the user's own, with no timeouts of its own.
    let pool = deadpool_postgres::Pool::builder(deadpool_postgres::Manager::new(config, NoTls))
        .max_size(2)
        .build()
        .unwrap();
    let store = PostgresStore::new(pool).with_timeout(Duration::from_millis(500));
    for _ in 0..2 {
        let began = std::time::Instant::now();
        let err = tokio::time::timeout(
            Duration::from_secs(10),
            store.reserve("k", Duration::from_secs(5)),
        )
        .await
        .expect("the store's operation hung")
        .unwrap_err();
        assert!(
            began.elapsed() < Duration::from_secs(2),
            "{:?}",
            began.elapsed()
        );
        assert!(
            err.to_string().contains("did not answer within 500ms"),
            "{err}"
        );
    }
    drop(silent);
}

/// The write transactions the server has begun (its next transaction id).
async fn next_xid(client: &Client) -> i64 {
    let row = client
        .query_one("SELECT pg_current_xact_id()::text::bigint", &[])
        .await
        .unwrap();
    row.get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reserves_and_commits_share_transactions_and_each_gets_its_answer() {
    // A server of its own: its transaction ids count this test's writes alone.
    let pg = tokio::task::block_in_place(services::PrivatePostgres::new);
    let store = PostgresStore::connect(&pg.params()).await.unwrap();
    store.migrate().await.unwrap();
    let store = Arc::new(store);
    let (client, connection) = tokio_postgres::connect(&pg.params(), NoTls).await.unwrap();
    tokio::spawn(connection);
    let lease = Duration::from_secs(30);
    let keys: Vec<String> = (0..200).map(|i| format!("k{i:03}")).collect();

    let before = next_xid(&client).await;
    // Each key twice at once: one reservation, and one that finds it reserved.
    let reserves = keys.iter().chain(&keys).map(|k| {
        let store = store.clone();
        let k = k.clone();
        tokio::spawn(async move { (k.clone(), store.reserve(&k, lease).await.unwrap()) })
    });
    let mut tokens = std::collections::HashMap::new();
    let mut reserved = 0;
    for r in futures_util::future::join_all(reserves).await {
        match r.unwrap() {
            (k, Reservation::Fresh(token)) => {
                assert!(
                    tokens.insert(k.clone(), token).is_none(),
                    "{k} reserved twice"
                );
            }
            (_, Reservation::Reserved { remaining }) => {
                assert!(remaining > Duration::from_secs(25), "{remaining:?}");
                reserved += 1;
            }
            (k, other) => panic!("{k}: {other:?}"),
        }
    }
    assert_eq!((tokens.len(), reserved), (200, 200));

    // Every commit at once; one with a token that never held its key.
    let commits = tokens.iter().map(|(k, token)| {
        let (store, k, token) = (store.clone(), k.clone(), token.clone());
        tokio::spawn(async move { store.commit(&k, &token, Duration::from_secs(600)).await })
    });
    let not_its_token = idempotency::Token::random();
    let stranger = store.commit("k000", &not_its_token, Duration::from_secs(600));
    let (commits, stranger) = tokio::join!(futures_util::future::join_all(commits), stranger);
    for c in commits {
        assert_eq!(c.unwrap().unwrap(), idempotency::CommitStatus::Committed);
    }
    assert!(stranger.unwrap_err().is_lease_lost());
    let writes = next_xid(&client).await - before;
    // Alone, each reserve and each commit is a transaction of its own: 600 at least.
    assert!(
        writes < 300,
        "{writes} write transactions for 400 reserves and 201 commits"
    );

    for k in &keys {
        assert_eq!(
            store.reserve(k, lease).await.unwrap(),
            Reservation::Committed
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_a_handler_transaction_holds_does_not_hold_up_the_others() {
    let table = table("held");
    let store = Arc::new(store(&table).await);
    let lease = Duration::from_secs(30);
    let Reservation::Fresh(token) = store.reserve("held", lease).await.unwrap() else {
        panic!("fresh");
    };
    // The handler's transaction commits the key and stays open: its row is locked.
    let mut db = store.pool().get().await.unwrap();
    let txn = db.transaction().await.unwrap();
    let reservation = IdempotencyToken::new("held", token);
    store
        .commit_in(&txn, &reservation, Duration::from_secs(600))
        .await
        .unwrap();

    // A duplicate of the held key, among 50 other keys.
    let held = {
        let store = store.clone();
        tokio::spawn(async move { store.reserve("held", lease).await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let started = std::time::Instant::now();
    let others = (0..50).map(|i| {
        let store = store.clone();
        tokio::spawn(async move { store.reserve(&format!("other{i}"), lease).await.unwrap() })
    });
    for r in futures_util::future::join_all(others).await {
        assert!(matches!(r.unwrap(), Reservation::Fresh(_)));
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the other keys waited {:?} for the held one",
        started.elapsed()
    );
    assert!(
        !held.is_finished(),
        "the held key waits for the transaction"
    );
    txn.commit().await.unwrap();
    assert_eq!(held.await.unwrap(), Reservation::Committed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_the_server_refuses_fails_alone() {
    let table = table("refused");
    let store = Arc::new(store(&table).await);
    let lease = Duration::from_secs(30);
    for round in 0..5 {
        // PostgreSQL refuses text with a NUL byte; the keys reserved with it must not
        // share its error.
        let reserves = (0..20).map(|i| {
            let store = store.clone();
            let key = match i {
                10 => format!("bad\0{round}"),
                _ => format!("good-{round}-{i}"),
            };
            tokio::spawn(async move { (key.clone(), store.reserve(&key, lease).await) })
        });
        for r in futures_util::future::join_all(reserves).await {
            match r.unwrap() {
                (key, Err(e)) => assert!(key.starts_with("bad"), "{key:?} failed: {e}"),
                (key, Ok(reservation)) => {
                    assert!(key.starts_with("good"), "{key:?} was reserved");
                    assert!(matches!(reservation, Reservation::Fresh(_)), "{key}");
                }
            }
        }
    }
}
