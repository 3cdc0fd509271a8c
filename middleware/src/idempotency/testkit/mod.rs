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
//! in real time (`#[tokio::test]`) with a lease far longer than a round trip and than a
//! scheduling stall of the test machine: the checks renew a lease at half its length, so
//! a 300 ms lease fails a busy 2-core machine now and then. 1 s for a local Redis or
//! PostgreSQL holds, and the whole suite then takes about eight seconds.
//!
//! ```no_run
//! # use std::time::Duration;
//! # use redrive_middleware::idempotency::{MemoryStore, testkit};
//! # async fn connect() -> MemoryStore { MemoryStore::new() }
//! # async fn f() {
//! let store = connect().await; // your store, on a test server
//! testkit::run_all(&store, Duration::from_secs(1)).await;
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

/// Reading a store's answers, and keys unique to the run.
mod expect;
/// The checks that need no lease to run out.
mod keys;
/// The checks that wait for leases and TTLs to run out.
mod leases;

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::FutureExt;

use super::IdempotencyStore;
pub use keys::{
    answers_at_once_agree_with_the_futures, foreign_tokens_change_nothing, keys_are_independent,
    racing_reservations_have_one_winner, release_frees_the_key, reserve_commit_skip,
};
pub use leases::{
    a_late_commit_fails_even_when_nobody_took_the_key, committed_key_expires_after_its_ttl,
    expired_lease_is_taken_over_and_the_late_owner_loses,
    extend_keeps_the_key_past_its_first_lease, extend_needs_a_live_reservation,
};

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
