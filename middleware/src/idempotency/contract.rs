//! The contract every [`IdempotencyStore`] passes (see the trait's docs), run against
//! the in-memory store under paused time and against the real Redis and PostgreSQL.

use std::time::Duration;

use super::{CommitStatus, IdempotencyStore, Reservation, Token};

/// A key no earlier run used.
pub(crate) fn unique(name: &str) -> String {
    format!("{name}-{:016x}", fastrand::u64(..))
}

fn fresh(r: Reservation) -> Token {
    match r {
        Reservation::Fresh(t) => t,
        other => panic!("expected a fresh reservation, got {other:?}"),
    }
}

fn remaining(r: Reservation) -> Duration {
    match r {
        Reservation::Reserved { remaining } => remaining,
        other => panic!("expected a reservation held elsewhere, got {other:?}"),
    }
}

/// Runs every check with leases of `lease` (long enough for a few round trips).
pub(crate) async fn run_all(store: &dyn IdempotencyStore, lease: Duration) {
    reserve_commit_skip(store, lease).await;
    release_frees_the_key(store, lease).await;
    foreign_tokens_change_nothing(store, lease).await;
    expired_lease_is_taken_over_and_the_late_owner_loses(store, lease).await;
    committed_key_expires_after_its_ttl(store, lease).await;
    racing_reservations_have_one_winner(store, lease).await;
    extend_keeps_the_key_past_its_first_lease(store, lease).await;
    extend_needs_a_live_reservation(store, lease).await;
    a_late_commit_fails_even_when_nobody_took_the_key(store, lease).await;
}

async fn reserve_commit_skip(store: &dyn IdempotencyStore, lease: Duration) {
    let key = unique("commit");
    let token = fresh(store.reserve(&key, lease).await.unwrap());
    let left = remaining(store.reserve(&key, lease).await.unwrap());
    assert!(
        left > Duration::ZERO && left <= lease,
        "{left:?} of {lease:?}"
    );
    let ttl = Duration::from_secs(3600);
    assert_eq!(
        store.commit(&key, &token, ttl).await.unwrap(),
        CommitStatus::Committed
    );
    assert_eq!(
        store.commit(&key, &token, ttl).await.unwrap(),
        CommitStatus::AlreadyCommitted
    );
    assert_eq!(
        store.reserve(&key, lease).await.unwrap(),
        Reservation::Committed
    );
    // Releasing a key this token committed keeps it committed.
    store.release(&key, &token).await.unwrap();
    assert_eq!(
        store.reserve(&key, lease).await.unwrap(),
        Reservation::Committed
    );
}

async fn release_frees_the_key(store: &dyn IdempotencyStore, lease: Duration) {
    let key = unique("release");
    let first = fresh(store.reserve(&key, lease).await.unwrap());
    store.release(&key, &first).await.unwrap();
    let second = fresh(store.reserve(&key, lease).await.unwrap());
    assert_ne!(first, second, "each reservation has its own token");
    assert!(
        store
            .release(&key, &first)
            .await
            .unwrap_err()
            .is_lease_lost(),
        "a released token cannot release the next reservation"
    );
    remaining(store.reserve(&key, lease).await.unwrap());
}

async fn foreign_tokens_change_nothing(store: &dyn IdempotencyStore, lease: Duration) {
    let key = unique("foreign");
    let owner = fresh(store.reserve(&key, lease).await.unwrap());
    let stranger = Token::random();
    let err = store
        .commit(&key, &stranger, Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(err.is_lease_lost(), "{err}");
    assert!(
        store
            .release(&key, &stranger)
            .await
            .unwrap_err()
            .is_lease_lost()
    );
    remaining(store.reserve(&key, lease).await.unwrap());
    assert_eq!(
        store
            .commit(&key, &owner, Duration::from_secs(60))
            .await
            .unwrap(),
        CommitStatus::Committed
    );
    let missing = unique("missing");
    assert!(
        store
            .commit(&missing, &owner, Duration::from_secs(60))
            .await
            .unwrap_err()
            .is_lease_lost()
    );
}

async fn expired_lease_is_taken_over_and_the_late_owner_loses(
    store: &dyn IdempotencyStore,
    lease: Duration,
) {
    let key = unique("expired");
    let late = fresh(store.reserve(&key, lease).await.unwrap());
    tokio::time::sleep(lease + lease / 2).await;
    let current = fresh(store.reserve(&key, lease).await.unwrap());
    let err = store
        .commit(&key, &late, Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(err.is_lease_lost(), "{err}");
    assert!(
        store
            .release(&key, &late)
            .await
            .unwrap_err()
            .is_lease_lost()
    );
    // The late owner changed nothing: the current reservation still holds and commits.
    remaining(store.reserve(&key, lease).await.unwrap());
    assert_eq!(
        store
            .commit(&key, &current, Duration::from_secs(60))
            .await
            .unwrap(),
        CommitStatus::Committed
    );
}

async fn committed_key_expires_after_its_ttl(store: &dyn IdempotencyStore, lease: Duration) {
    let key = unique("ttl");
    let token = fresh(store.reserve(&key, lease).await.unwrap());
    store.commit(&key, &token, lease).await.unwrap();
    assert_eq!(
        store.reserve(&key, lease).await.unwrap(),
        Reservation::Committed
    );
    tokio::time::sleep(lease + lease / 2).await;
    fresh(store.reserve(&key, lease).await.unwrap());
}

async fn racing_reservations_have_one_winner(store: &dyn IdempotencyStore, lease: Duration) {
    let key = unique("race");
    let results = futures_util::future::join_all((0..8).map(|_| store.reserve(&key, lease))).await;
    let winners = results
        .into_iter()
        .map(Result::unwrap)
        .filter(|r| matches!(r, Reservation::Fresh(_)))
        .count();
    assert_eq!(winners, 1);
}

async fn extend_keeps_the_key_past_its_first_lease(store: &dyn IdempotencyStore, lease: Duration) {
    let key = unique("extend");
    let token = fresh(store.reserve(&key, lease).await.unwrap());
    for _ in 0..3 {
        tokio::time::sleep(lease / 2).await;
        store.extend(&key, &token, lease).await.unwrap();
    }
    // Past one and a half first leases, the key is still held, and commits.
    remaining(store.reserve(&key, lease).await.unwrap());
    assert_eq!(
        store
            .commit(&key, &token, Duration::from_secs(60))
            .await
            .unwrap(),
        CommitStatus::Committed
    );
}

async fn extend_needs_a_live_reservation(store: &dyn IdempotencyStore, lease: Duration) {
    let key = unique("extend-lost");
    let owner = fresh(store.reserve(&key, lease).await.unwrap());
    let stranger = Token::random();
    assert!(
        store
            .extend(&key, &stranger, lease)
            .await
            .unwrap_err()
            .is_lease_lost()
    );
    store.commit(&key, &owner, lease * 4).await.unwrap();
    assert!(
        store
            .extend(&key, &owner, lease)
            .await
            .unwrap_err()
            .is_lease_lost(),
        "a committed key is not a reservation any more"
    );
    let expired = unique("extend-expired");
    let late = fresh(store.reserve(&expired, lease).await.unwrap());
    tokio::time::sleep(lease + lease / 2).await;
    assert!(
        store
            .extend(&expired, &late, lease)
            .await
            .unwrap_err()
            .is_lease_lost(),
        "an expired lease is not renewed"
    );
    fresh(store.reserve(&expired, lease).await.unwrap());
}

async fn a_late_commit_fails_even_when_nobody_took_the_key(
    store: &dyn IdempotencyStore,
    lease: Duration,
) {
    let key = unique("late");
    let late = fresh(store.reserve(&key, lease).await.unwrap());
    tokio::time::sleep(lease + lease / 2).await;
    let err = store
        .commit(&key, &late, Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(err.is_lease_lost(), "{err}");
    fresh(store.reserve(&key, lease).await.unwrap());
}

/// A store on the local Redis (`REDIS_URL`, default `redis://127.0.0.1:6379`) under a
/// fresh prefix; panics, saying how to start Redis, when it cannot be reached.
#[cfg(feature = "redis")]
pub(crate) async fn redis_store() -> super::RedisStore {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let connect = async {
        let client = redis::Client::open(url.as_str())?;
        // Fail fast: the connection manager would retry for seconds.
        client.get_multiplexed_async_connection().await?;
        client.get_connection_manager().await
    };
    match tokio::time::timeout(Duration::from_secs(5), connect).await {
        Ok(Ok(conn)) => super::RedisStore::new(conn).with_prefix(unique("redrive-test") + ":"),
        Ok(Err(e)) => panic!(
            "cannot reach Redis at {url} ({e}); start it with `redis-server --daemonize yes` \
             or set REDIS_URL"
        ),
        Err(_) => panic!(
            "Redis at {url} did not answer within 5 s; start it with \
             `redis-server --daemonize yes` or set REDIS_URL"
        ),
    }
}

/// A store on the local PostgreSQL (`DATABASE_URL`, default
/// `host=127.0.0.1 user=postgres dbname=test`) in a fresh, migrated table; panics,
/// saying how to start PostgreSQL, when it cannot be reached.
#[cfg(feature = "postgres")]
pub(crate) async fn postgres_store() -> super::PostgresStore {
    let params = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into());
    let store = match tokio::time::timeout(
        Duration::from_secs(5),
        super::PostgresStore::connect(&params),
    )
    .await
    {
        Ok(Ok(store)) => store,
        Ok(Err(e)) => panic!(
            "cannot reach PostgreSQL with `{params}` ({e}); start it with \
             `pg_ctlcluster 15 main start` or set DATABASE_URL"
        ),
        Err(_) => panic!(
            "PostgreSQL with `{params}` did not answer within 5 s; start it with \
             `pg_ctlcluster 15 main start` or set DATABASE_URL"
        ),
    };
    let store = store
        .with_table(&unique("redrive_test").replace('-', "_"))
        .unwrap();
    store.migrate().await.unwrap();
    store
}
