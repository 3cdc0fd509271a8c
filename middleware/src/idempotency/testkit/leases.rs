//! The checks that wait for leases and TTLs to run out: take-over, expiry, `extend`
//! and late commits.

use std::time::Duration;

use super::expect::{fresh, lost, must, remaining, unique};
use crate::idempotency::{CommitStatus, IdempotencyStore, Reservation, Token};

/// Once its lease expires a key is reserved anew; the late owner can neither commit
/// nor release it, and the current reservation still holds and commits.
pub async fn expired_lease_is_taken_over_and_the_late_owner_loses<S: IdempotencyStore + ?Sized>(
    store: &S,
    lease: Duration,
) {
    let key = unique("expired");
    let late = fresh(store.reserve(&key, lease).await, "reserving a new key");
    tokio::time::sleep(lease + lease / 2).await;
    let current = fresh(
        store.reserve(&key, lease).await,
        "reserving a key whose lease expired",
    );
    lost(
        store.commit(&key, &late, Duration::from_secs(60)).await,
        "the late owner committing a key taken over",
    );
    lost(
        store.release(&key, &late).await,
        "the late owner releasing a key taken over",
    );
    remaining(
        store.reserve(&key, lease).await,
        "reserving a key the late owner tried to commit and release",
    );
    assert_eq!(
        must(
            store.commit(&key, &current, Duration::from_secs(60)).await,
            "the current owner committing"
        ),
        CommitStatus::Committed,
        "the current owner committing after the late owner tried"
    );
}

/// A committed key answers `Committed` until its TTL is over, then is free again.
pub async fn committed_key_expires_after_its_ttl<S: IdempotencyStore + ?Sized>(
    store: &S,
    lease: Duration,
) {
    let key = unique("ttl");
    let token = fresh(store.reserve(&key, lease).await, "reserving a new key");
    must(
        store.commit(&key, &token, lease).await,
        "committing with a TTL of one lease",
    );
    assert_eq!(
        must(
            store.reserve(&key, lease).await,
            "reserving a committed key"
        ),
        Reservation::Committed,
        "reserving a key committed a moment ago"
    );
    tokio::time::sleep(lease + lease / 2).await;
    fresh(
        store.reserve(&key, lease).await,
        "reserving a committed key past its TTL",
    );
}

/// `extend` keeps a key reserved past its first lease, and the key then commits.
pub async fn extend_keeps_the_key_past_its_first_lease<S: IdempotencyStore + ?Sized>(
    store: &S,
    lease: Duration,
) {
    let key = unique("extend");
    let token = fresh(store.reserve(&key, lease).await, "reserving a new key");
    for _ in 0..3 {
        tokio::time::sleep(lease / 2).await;
        must(
            store.extend(&key, &token, lease).await,
            "extending a live reservation",
        );
    }
    // Past one and a half first leases, the key is still held, and commits.
    remaining(
        store.reserve(&key, lease).await,
        "reserving a key extended past its first lease",
    );
    assert_eq!(
        must(
            store.commit(&key, &token, Duration::from_secs(60)).await,
            "committing an extended reservation"
        ),
        CommitStatus::Committed,
        "committing an extended reservation"
    );
}

/// `extend` fails with `lease_lost` for a stranger's token, for a committed key and for
/// an expired lease (which it does not renew).
pub async fn extend_needs_a_live_reservation<S: IdempotencyStore + ?Sized>(
    store: &S,
    lease: Duration,
) {
    let key = unique("extend-lost");
    let owner = fresh(store.reserve(&key, lease).await, "reserving a new key");
    let stranger = Token::random();
    lost(
        store.extend(&key, &stranger, lease).await,
        "extending a key reserved by another token",
    );
    must(store.commit(&key, &owner, lease * 4).await, "committing");
    lost(
        store.extend(&key, &owner, lease).await,
        "extending a committed key (it is not a reservation any more)",
    );
    let expired = unique("extend-expired");
    let late = fresh(store.reserve(&expired, lease).await, "reserving a new key");
    tokio::time::sleep(lease + lease / 2).await;
    lost(
        store.extend(&expired, &late, lease).await,
        "extending an expired lease",
    );
    fresh(
        store.reserve(&expired, lease).await,
        "reserving a key whose expired lease its owner tried to extend",
    );
}

/// A commit after the lease expired fails with `lease_lost`, even when nobody reserved
/// the key since; the key is then free.
pub async fn a_late_commit_fails_even_when_nobody_took_the_key<S: IdempotencyStore + ?Sized>(
    store: &S,
    lease: Duration,
) {
    let key = unique("late");
    let late = fresh(store.reserve(&key, lease).await, "reserving a new key");
    tokio::time::sleep(lease + lease / 2).await;
    lost(
        store.commit(&key, &late, Duration::from_secs(60)).await,
        "committing after the lease expired, with nobody holding the key",
    );
    fresh(
        store.reserve(&key, lease).await,
        "reserving a key whose late owner tried to commit",
    );
}
