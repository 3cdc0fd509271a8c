//! Reading a store's answers: the value a call must give, or a panic that says what the
//! store gave instead; and keys unique to the run.

use std::fmt;
use std::time::Duration;

use crate::idempotency::{Reservation, StoreError, Token};

/// A key no other check, test or run uses.
pub(super) fn unique(check: &str) -> String {
    format!("redrive-contract:{check}:{:016x}", fastrand::u64(..))
}

/// The value of a store call that must succeed.
#[track_caller]
pub(super) fn must<T>(answer: Result<T, StoreError>, what: &str) -> T {
    match answer {
        Ok(v) => v,
        Err(e) => panic!("{what}: the store failed: {e}"),
    }
}

/// The token of a reservation that must be fresh.
#[track_caller]
pub(super) fn fresh(answer: Result<Reservation, StoreError>, what: &str) -> Token {
    match must(answer, what) {
        Reservation::Fresh(t) => t,
        other => panic!("{what}: expected Reservation::Fresh, got {other:?}"),
    }
}

/// The lease left of a reservation that must be held elsewhere.
#[track_caller]
pub(super) fn remaining(answer: Result<Reservation, StoreError>, what: &str) -> Duration {
    match must(answer, what) {
        Reservation::Reserved { remaining } => remaining,
        other => panic!("{what}: expected Reservation::Reserved, got {other:?}"),
    }
}

/// Checks that a store call failed with [`StoreError::lease_lost`].
#[track_caller]
pub(super) fn lost<T: fmt::Debug>(answer: Result<T, StoreError>, what: &str) {
    match answer {
        Err(e) if e.is_lease_lost() => {}
        Err(e) => panic!("{what}: expected StoreError::lease_lost, got the error {e}"),
        Ok(v) => panic!("{what}: expected StoreError::lease_lost, got Ok({v:?})"),
    }
}
