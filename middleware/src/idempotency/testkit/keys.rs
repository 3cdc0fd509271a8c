//! The checks that need no lease to run out: reservations, commits, releases and
//! tokens, races, independent keys, and the answers given at once.

use std::sync::Arc;
use std::time::Duration;

use super::LONG_TTL;
use super::expect::{fresh, lost, must, remaining, unique};
use crate::idempotency::{CommitStatus, IdempotencyStore, Reservation, Token};

/// A reserved key answers `Reserved` with at most the lease left; committing it is
/// `Committed`, committing again with the same token `AlreadyCommitted`; a committed key
/// answers `Committed`, also after its token releases it.
pub async fn reserve_commit_skip<S: IdempotencyStore + ?Sized>(store: &S, lease: Duration) {
    let key = unique("commit");
    let token = fresh(store.reserve(&key, lease).await, "reserving a new key");
    let left = remaining(
        store.reserve(&key, lease).await,
        "reserving a key reserved a moment ago",
    );
    assert!(
        left > Duration::ZERO && left <= lease,
        "a reservation of {lease:?} has {left:?} left: not within (0, lease]"
    );
    assert_eq!(
        must(store.commit(&key, &token, LONG_TTL).await, "committing"),
        CommitStatus::Committed,
        "committing a reserved key with its token"
    );
    assert_eq!(
        must(
            store.commit(&key, &token, LONG_TTL).await,
            "committing again"
        ),
        CommitStatus::AlreadyCommitted,
        "committing again with the token that committed"
    );
    assert_eq!(
        must(
            store.reserve(&key, lease).await,
            "reserving a committed key"
        ),
        Reservation::Committed,
        "reserving a committed key"
    );
    must(
        store.release(&key, &token).await,
        "releasing a key this token committed",
    );
    assert_eq!(
        must(
            store.reserve(&key, lease).await,
            "reserving a committed key its token released"
        ),
        Reservation::Committed,
        "releasing a key this token committed keeps it committed"
    );
}

/// A released key is reserved again, under a new token; the released token cannot
/// release the new reservation.
pub async fn release_frees_the_key<S: IdempotencyStore + ?Sized>(store: &S, lease: Duration) {
    let key = unique("release");
    let first = fresh(store.reserve(&key, lease).await, "reserving a new key");
    must(
        store.release(&key, &first).await,
        "releasing a key with its token",
    );
    let second = fresh(
        store.reserve(&key, lease).await,
        "reserving a key just released",
    );
    assert_ne!(first, second, "each reservation has its own token");
    lost(
        store.release(&key, &first).await,
        "a released token releasing the next reservation",
    );
    remaining(
        store.reserve(&key, lease).await,
        "reserving a key whose reservation a released token tried to release",
    );
}

/// A token that holds no reservation of a key can neither commit nor release it, and
/// changes nothing; nor can it commit a key nobody reserved.
pub async fn foreign_tokens_change_nothing<S: IdempotencyStore + ?Sized>(
    store: &S,
    lease: Duration,
) {
    let key = unique("foreign");
    let owner = fresh(store.reserve(&key, lease).await, "reserving a new key");
    let stranger = Token::random();
    lost(
        store.commit(&key, &stranger, Duration::from_secs(60)).await,
        "committing a key reserved by another token",
    );
    lost(
        store.release(&key, &stranger).await,
        "releasing a key reserved by another token",
    );
    remaining(
        store.reserve(&key, lease).await,
        "reserving a key a stranger tried to commit and release",
    );
    assert_eq!(
        must(
            store.commit(&key, &owner, Duration::from_secs(60)).await,
            "the owner committing after a stranger tried"
        ),
        CommitStatus::Committed,
        "the owner committing after a stranger tried"
    );
    let missing = unique("missing");
    lost(
        store
            .commit(&missing, &owner, Duration::from_secs(60))
            .await,
        "committing a key nobody reserved",
    );
}

/// Of eight reservations racing for one key, exactly one is `Fresh`.
pub async fn racing_reservations_have_one_winner<S: IdempotencyStore + ?Sized>(
    store: &S,
    lease: Duration,
) {
    let key = unique("race");
    let results = futures_util::future::join_all((0..8).map(|_| store.reserve(&key, lease))).await;
    let winners = results
        .into_iter()
        .map(|r| must(r, "reserving a key others race for"))
        .filter(|r| matches!(r, Reservation::Fresh(_)))
        .count();
    assert_eq!(
        winners, 1,
        "reservations of 8 racing for one key that were Fresh"
    );
}

/// Reserving, committing and releasing one key leaves another alone, even one whose
/// name starts with the first's, and a token of one key acts on no other.
pub async fn keys_are_independent<S: IdempotencyStore + ?Sized>(store: &S, lease: Duration) {
    let a = unique("independent");
    let b = format!("{a}/b");
    let ta = fresh(store.reserve(&a, lease).await, "reserving a new key");
    let tb = fresh(
        store.reserve(&b, lease).await,
        "reserving a second key (the first's name and `/b`) while the first is reserved",
    );
    lost(
        store.commit(&b, &ta, LONG_TTL).await,
        "committing a key with the token of another key",
    );
    must(store.commit(&a, &ta, LONG_TTL).await, "committing");
    remaining(
        store.reserve(&b, lease).await,
        "reserving a key after another key was committed",
    );
    must(store.release(&b, &tb).await, "releasing with the token");
    assert_eq!(
        must(store.reserve(&a, lease).await, "reserving a committed key"),
        Reservation::Committed,
        "a committed key after another key was released"
    );
    fresh(
        store.reserve(&b, lease).await,
        "reserving a released key whose neighbour is committed",
    );
}

/// `reserve_now`, `commit_now` and `release_now`, where the store gives them (they
/// answer `Some`), agree with `reserve`, `commit` and `release`. A store that gives
/// none passes at once.
pub async fn answers_at_once_agree_with_the_futures<S: IdempotencyStore + ?Sized>(
    store: &S,
    lease: Duration,
) {
    let key: Arc<str> = unique("now").into();
    let token = match store.reserve_now(&key, lease) {
        Some(answer) => {
            let token = fresh(answer, "reserve_now of a new key");
            remaining(
                store.reserve(&key, lease).await,
                "reserve of a key reserve_now reserved",
            );
            token
        }
        None => fresh(store.reserve(&key, lease).await, "reserving a new key"),
    };
    if let Some(answer) = store.reserve_now(&key, lease) {
        remaining(answer, "reserve_now of a key reserved a moment ago");
    }
    if let Some(answer) = store.commit_now(&key, &Token::random(), LONG_TTL) {
        lost(answer, "commit_now of a key reserved by another token");
    }
    match store.commit_now(&key, &token, LONG_TTL) {
        Some(answer) => {
            assert_eq!(
                must(answer, "commit_now of a reserved key"),
                CommitStatus::Committed,
                "commit_now of a reserved key with its token"
            );
            assert_eq!(
                must(
                    store.reserve(&key, lease).await,
                    "reserve of a key commit_now committed"
                ),
                Reservation::Committed,
                "reserve of a key commit_now committed"
            );
            assert_eq!(
                store
                    .commit_now(&key, &token, LONG_TTL)
                    .map(|a| must(a, "commit_now again")),
                Some(CommitStatus::AlreadyCommitted),
                "commit_now again with the token that committed"
            );
        }
        None => {
            must(store.commit(&key, &token, LONG_TTL).await, "committing");
        }
    }
    if let Some(answer) = store.reserve_now(&key, lease) {
        assert_eq!(
            must(answer, "reserve_now of a committed key"),
            Reservation::Committed,
            "reserve_now of a committed key"
        );
    }

    let other = unique("now-release");
    let held = fresh(store.reserve(&other, lease).await, "reserving a new key");
    if let Some(answer) = store.release_now(&other, &Token::random()) {
        lost(answer, "release_now of a key reserved by another token");
    }
    if let Some(answer) = store.release_now(&other, &held) {
        must(answer, "release_now of a key with its token");
        fresh(
            store.reserve(&other, lease).await,
            "reserve of a key release_now released",
        );
    }
}
