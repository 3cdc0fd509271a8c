//! The steps of an [`Idempotency`](super::Idempotency) call around the store: reserve
//! the key, run the inner service while renewing the reservation, then commit or
//! release the key.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use redrive_core::{BoxError, Message, Outcome, classify};
use tower::Service;

use super::layer::{Counters, Shared};
use super::{
    CommitMode, CommitStatus, IdempotencyStore, IdempotencyToken, KeyReserved, Reservation,
    StoreError, Token, Unkeyed,
};

/// The most bytes of an idempotency key a log line carries (a producer chooses it).
const MAX_LOGGED_KEY: usize = 128;

/// `key` for a log line, cut to [`MAX_LOGGED_KEY`] bytes.
fn logged_key(key: &str) -> std::borrow::Cow<'_, str> {
    redrive_core::text::truncate(key, MAX_LOGGED_KEY)
}

/// Counts a message without a key and says so: at `warn` for the first and for each
/// power of two, since a redelivery of such a message runs its handler again.
pub(super) fn unkeyed<St: ?Sized>(shared: &Shared<St>, msg: &Message) -> Unkeyed {
    let policy = shared.config.unkeyed;
    let seen = shared.counters.unkeyed.fetch_add(1, Ordering::Relaxed) + 1;
    if seen.is_power_of_two() {
        let source = &msg.metadata.source;
        let fate = match policy {
            Unkeyed::Reject => "rejected as permanent (it goes to the dead-letter queue unrun)",
            _ => "processed without deduplication (a redelivery runs it again)",
        };
        tracing::warn!(
            unkeyed = seen,
            destination = %source.destination,
            "message without an idempotency key {fate}; have producers set a `message-id` or \
             `idempotency-key` header, or give the layer a key function (logged for the first \
             such message and each power of two; see the `unkeyed` count)"
        );
    }
    policy
}

/// The token of a fresh reservation of `key`, or the call's answer when the key is
/// taken: a skipped duplicate, or a transient error while another consumer holds it.
pub(super) fn fresh<St: ?Sized>(
    shared: &Shared<St>,
    key: &Arc<str>,
    reservation: Reservation,
) -> Result<Token, Result<Outcome, BoxError>> {
    let counters = &shared.counters;
    match reservation {
        Reservation::Fresh(token) => Ok(token),
        Reservation::Committed => {
            Counters::bump(&counters.deduplicated);
            tracing::info!(idempotency_key = %logged_key(key), "duplicate skipped: key already committed");
            Err(Ok(Outcome::Deduplicated))
        }
        Reservation::Reserved { remaining } => {
            Counters::bump(&counters.reserved_elsewhere);
            tracing::debug!(idempotency_key = %logged_key(key), ?remaining, "key reserved by another consumer");
            Err(Err(classify::retry_after(
                KeyReserved {
                    key: key.to_string(),
                    remaining,
                },
                remaining,
            )))
        }
    }
}

/// Reserves `key`: at once where the store can answer so, else through its future.
async fn reserve_key<St: IdempotencyStore + ?Sized>(
    store: &St,
    key: &Arc<str>,
    lease: Duration,
) -> Result<Reservation, StoreError> {
    match store.reserve_now(key, lease) {
        Some(answer) => answer,
        None => store.reserve(key, lease).await,
    }
}

/// Commits `key`: at once where the store can answer so, else through its future.
async fn commit_key<St: IdempotencyStore + ?Sized>(
    store: &St,
    key: &str,
    token: &Token,
    ttl: Duration,
) -> Result<CommitStatus, StoreError> {
    match store.commit_now(key, token, ttl) {
        Some(answer) => answer,
        None => commit_retrying(store, key, token, ttl).await,
    }
}

/// The call's answer once the inner service succeeded with `outcome` and the commit of
/// `key` came back with `status`.
pub(super) fn committed<St: ?Sized>(
    shared: &Shared<St>,
    key: Arc<str>,
    status: Result<CommitStatus, StoreError>,
    outcome: Outcome,
) -> Result<Outcome, BoxError> {
    match status {
        Ok(CommitStatus::Committed) => {
            if shared.config.commit_mode == CommitMode::Handler {
                tracing::warn!(
                    idempotency_key = %logged_key(&key),
                    "the handler succeeded without committing the idempotency key in its \
                     transaction; committed it afterwards, so effect and key were not atomic"
                );
            }
            Ok(outcome)
        }
        Ok(CommitStatus::AlreadyCommitted) => Ok(outcome),
        Err(e) => {
            Counters::bump(&shared.counters.commit_failures);
            tracing::error!(
                idempotency_key = %logged_key(&key), error = %e,
                "the handler succeeded but its idempotency key could not be committed; the \
                 message is acked, since its effect happened, and a duplicate of it that \
                 arrives once the reservation lapses is processed again"
            );
            Ok(outcome)
        }
    }
}

/// Delays between commit tries: a store that blinked gets a second chance before a
/// success goes unrecorded.
const COMMIT_RETRIES: [Duration; 2] = [Duration::from_millis(200), Duration::from_millis(800)];

/// Commits `key` through the store's future, trying again after a backend error (a
/// lost lease is final).
pub(crate) async fn commit_retrying<St: IdempotencyStore + ?Sized>(
    store: &St,
    key: &str,
    token: &Token,
    ttl: Duration,
) -> Result<CommitStatus, StoreError> {
    let mut delays = COMMIT_RETRIES.iter();
    loop {
        match store.commit(key, token, ttl).await {
            Err(e) if !e.is_lease_lost() => match delays.next() {
                Some(delay) => {
                    tracing::warn!(
                        idempotency_key = %logged_key(key), error = %e, ?delay,
                        "committing the idempotency key failed; trying again"
                    );
                    tokio::time::sleep(*delay).await;
                }
                None => return Err(e),
            },
            answer => return answer,
        }
    }
}

/// Frees `key` after the inner service failed, so a redelivery can try again.
pub(super) async fn release<St: IdempotencyStore + ?Sized>(
    shared: &Shared<St>,
    key: &str,
    token: &Token,
) {
    if let Err(release) = shared.store.release(key, token).await {
        tracing::warn!(
            idempotency_key = %logged_key(key),
            error = %release,
            "could not release the idempotency key; it stays reserved until its lease expires"
        );
    }
}

/// Renews the reservation of `key` every third of the lease, for as long as it is
/// polled (while the inner service runs). Never completes.
pub(crate) async fn keep_reserved<St: IdempotencyStore + ?Sized>(
    shared: Arc<Shared<St>>,
    key: Arc<str>,
    token: Token,
) {
    let lease = shared.config.lease;
    let every = lease / 3;
    loop {
        tokio::time::sleep(every).await;
        match shared.store.extend(&key, &token, lease).await {
            Ok(()) => {}
            Err(e) if e.is_lease_lost() => {
                Counters::bump(&shared.counters.leases_lost);
                tracing::warn!(
                    idempotency_key = %logged_key(&key), error = %e,
                    "the reservation was lost while the handler ran; another consumer may \
                     process this message too"
                );
                return std::future::pending().await;
            }
            Err(e) => tracing::warn!(
                idempotency_key = %logged_key(&key), error = %e, ?every,
                "renewing the reservation failed; trying again, and it lapses with its lease \
                 if the store stays unreachable"
            ),
        }
    }
}

/// Every step through the store's futures, for a store that does not answer at once.
pub(super) async fn process<S, St>(
    shared: Arc<Shared<St>>,
    mut inner: S,
    key: Arc<str>,
    mut msg: Message,
) -> Result<Outcome, BoxError>
where
    S: Service<Message>,
    S::Response: Into<Outcome>,
    S::Error: Into<BoxError>,
    St: IdempotencyStore + ?Sized,
{
    let reservation = reserve_key(&*shared.store, &key, shared.config.lease).await?;
    let token = match fresh(&shared, &key, reservation) {
        Ok(token) => token,
        Err(answer) => return answer,
    };
    msg.extensions
        .insert(IdempotencyToken::new(key.clone(), token.clone()));
    // Boxed on its own: with the inner future inline this future outgrows the
    // allocator's per-thread cache (about 1 KiB with glibc), and each message then takes
    // the slow path of malloc and free; two smaller boxes stay on the fast one.
    let call = Box::pin(inner.call(msg));
    let keep = keep_reserved(shared.clone(), key.clone(), token.clone());
    let result = tokio::select! {
        biased;
        r = call => r,
        () = keep => unreachable!("keeping a reservation never ends"),
    };
    match result.map(Into::into).map_err(Into::into) {
        Ok(outcome) => {
            let status = commit_key(&*shared.store, &key, &token, shared.config.ttl).await;
            committed(&shared, key, status, outcome)
        }
        Err(err) => {
            release(&shared, &key, &token).await;
            Err(err)
        }
    }
}
