//! The contract every [`IdempotencyStore`] keeps, as a suite a store's author runs from
//! their own tests; the in-memory, Redis and PostgreSQL stores run it too.
//!
//! Call [`run_all`] with the store and a lease, or run the checks one by one as separate
//! tests. Each check reserves keys of its own, unique to the run (`redrive-contract:`
//! then the check's name and 64 random bits), so the store may be shared with other
//! checks, other tests and earlier runs.
//!
//! ```
//! use std::time::Duration;
//! use redrive_middleware::idempotency::{
//!     CommitStatus, IdempotencyStore, MemoryStore, Reservation, StoreFuture, Token, testkit,
//! };
//!
//! /// A store of your own (this one hands every call to a `MemoryStore`).
//! struct MyStore(MemoryStore);
//!
//! impl IdempotencyStore for MyStore {
//!     fn reserve<'a>(&'a self, key: &'a str, lease: Duration) -> StoreFuture<'a, Reservation> {
//!         self.0.reserve(key, lease)
//!     }
//!     fn commit<'a>(
//!         &'a self,
//!         key: &'a str,
//!         token: &'a Token,
//!         ttl: Duration,
//!     ) -> StoreFuture<'a, CommitStatus> {
//!         self.0.commit(key, token, ttl)
//!     }
//!     fn release<'a>(&'a self, key: &'a str, token: &'a Token) -> StoreFuture<'a, ()> {
//!         self.0.release(key, token)
//!     }
//!     fn extend<'a>(
//!         &'a self,
//!         key: &'a str,
//!         token: &'a Token,
//!         lease: Duration,
//!     ) -> StoreFuture<'a, ()> {
//!         self.0.extend(key, token, lease)
//!     }
//! }
//!
//! // In the store's crate, `tests/contract.rs`, under
//! // `#[tokio::test(start_paused = true)]` (a store on tokio's clock; paused time needs
//! // tokio's `test-util` feature):
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! testkit::run_all(&MyStore(MemoryStore::new()), Duration::from_secs(1)).await;
//! # }
//! ```
//!
//! A store on a server (a database, a cache) keeps the server's time, so its test runs
//! in real time (`#[tokio::test]`) with a lease of a few round trips: 300 ms for a local
//! Redis or PostgreSQL, and the whole suite then takes about two and a half seconds.
//!
//! ```no_run
//! # use std::time::Duration;
//! # use redrive_middleware::idempotency::{MemoryStore, testkit};
//! # async fn connect() -> MemoryStore { MemoryStore::new() }
//! # async fn f() {
//! let store = connect().await; // your store, on a test server
//! testkit::run_all(&store, Duration::from_millis(300)).await;
//! # }
//! ```
//!
//! # Checks
//! | check | the store keeps its promise that |
//! |---|---|
//! | [`reserve_commit_skip`] | a reserved key answers `Reserved` with at most the lease left; a commit is `Committed`, then `AlreadyCommitted`; a committed key answers `Committed`, also after its token releases it |
//! | [`release_frees_the_key`] | a released key is reserved again, under a new token; the old token cannot release the new reservation |
//! | [`foreign_tokens_change_nothing`] | a token that holds no reservation cannot commit or release the key, nor commit a key nobody reserved |
//! | [`expired_lease_is_taken_over_and_the_late_owner_loses`] | once its lease expires a key is reserved anew; the late owner can neither commit nor release it |
//! | [`committed_key_expires_after_its_ttl`] | a committed key is free again after its TTL |
//! | [`racing_reservations_have_one_winner`] | of eight reservations racing for a key, exactly one is `Fresh` |
//! | [`extend_keeps_the_key_past_its_first_lease`] | `extend` keeps a key reserved past its first lease, and it then commits |
//! | [`extend_needs_a_live_reservation`] | `extend` fails with `lease_lost` for a stranger's token, a committed key and an expired lease |
//! | [`a_late_commit_fails_even_when_nobody_took_the_key`] | a commit after the lease expired fails with `lease_lost` |
//! | [`keys_are_independent`] | what happens to one key leaves another (whose name starts with the first's) alone |
//! | [`answers_at_once_agree_with_the_futures`] | `reserve_now`, `commit_now` and `release_now`, where a store gives them, answer as `reserve`, `commit` and `release` do |
//!
//! # Time
//! Checks wait for leases and TTLs to run out with [`tokio::time::sleep`]. Under paused
//! time a store on tokio's clock, as [`MemoryStore`](super::MemoryStore) is, runs the
//! suite at once; under real time the suite takes about eight leases. Each check fails
//! after [`CHECK_TIMEOUT`] and four leases.

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;

use super::{CommitStatus, IdempotencyStore, Reservation, StoreError, Token};

/// How long one check may take, beyond four leases, before it fails as timed out.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// The TTL of keys the checks commit and do not wait out.
const LONG_TTL: Duration = Duration::from_secs(3600);

/// Runs every check against `store`, one after another, with leases of `lease` (long
/// enough for a few round trips to the store); panics naming each check that failed
/// and why.
///
/// Each check's result is also written to standard error as it ends (`idempotency
/// contract: <check> ... ok`), which a test shows when it fails.
pub async fn run_all<S: IdempotencyStore + ?Sized>(store: &S, lease: Duration) {
    let limit = CHECK_TIMEOUT.saturating_add(lease.saturating_mul(4));
    let mut failed: Vec<(&str, String)> = Vec::new();
    macro_rules! check {
        ($name:ident) => {
            let name = stringify!($name);
            match run_one($name(store, lease), limit).await {
                Ok(()) => eprintln!("idempotency contract: {name} ... ok"),
                Err(why) => {
                    eprintln!("idempotency contract: {name} ... FAILED: {why}");
                    failed.push((name, why));
                }
            }
        };
    }
    check!(reserve_commit_skip);
    check!(release_frees_the_key);
    check!(foreign_tokens_change_nothing);
    check!(expired_lease_is_taken_over_and_the_late_owner_loses);
    check!(committed_key_expires_after_its_ttl);
    check!(racing_reservations_have_one_winner);
    check!(extend_keeps_the_key_past_its_first_lease);
    check!(extend_needs_a_live_reservation);
    check!(a_late_commit_fails_even_when_nobody_took_the_key);
    check!(keys_are_independent);
    check!(answers_at_once_agree_with_the_futures);
    if !failed.is_empty() {
        panic!("{}", Failures(&failed));
    }
}

/// Runs one check within `limit`: `Err` says why it failed (its panic's message).
async fn run_one(check: impl Future<Output = ()>, limit: Duration) -> Result<(), String> {
    match tokio::time::timeout(limit, AssertUnwindSafe(check).catch_unwind()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(panic)) => Err(panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "panicked".to_owned())),
        Err(_) => Err(format!("timed out after {limit:?}")),
    }
}

/// The failed checks, as `run_all`'s panic message.
struct Failures<'a>(&'a [(&'a str, String)]);

impl fmt::Display for Failures<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the store broke the idempotency store contract in {} check(s):",
            self.0.len()
        )?;
        for (name, why) in self.0 {
            write!(f, "\n- {name}: {why}")?;
        }
        Ok(())
    }
}

/// A key no other check, test or run uses.
fn unique(check: &str) -> String {
    format!("redrive-contract:{check}:{:016x}", fastrand::u64(..))
}

/// The value of a store call that must succeed.
#[track_caller]
fn must<T>(answer: Result<T, StoreError>, what: &str) -> T {
    match answer {
        Ok(v) => v,
        Err(e) => panic!("{what}: the store failed: {e}"),
    }
}

/// The token of a reservation that must be fresh.
#[track_caller]
fn fresh(answer: Result<Reservation, StoreError>, what: &str) -> Token {
    match must(answer, what) {
        Reservation::Fresh(t) => t,
        other => panic!("{what}: expected Reservation::Fresh, got {other:?}"),
    }
}

/// The lease left of a reservation that must be held elsewhere.
#[track_caller]
fn remaining(answer: Result<Reservation, StoreError>, what: &str) -> Duration {
    match must(answer, what) {
        Reservation::Reserved { remaining } => remaining,
        other => panic!("{what}: expected Reservation::Reserved, got {other:?}"),
    }
}

/// Checks that a store call failed with [`StoreError::lease_lost`].
#[track_caller]
fn lost<T: fmt::Debug>(answer: Result<T, StoreError>, what: &str) {
    match answer {
        Err(e) if e.is_lease_lost() => {}
        Err(e) => panic!("{what}: expected StoreError::lease_lost, got the error {e}"),
        Ok(v) => panic!("{what}: expected StoreError::lease_lost, got Ok({v:?})"),
    }
}

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
