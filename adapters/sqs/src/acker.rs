//! Settlement: acks batched into `DeleteMessageBatch`, nacks and lease extensions as
//! `ChangeMessageVisibility`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use aws_sdk_sqs::Client;
use aws_sdk_sqs::error::ProvideErrorMetadata;
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
};
use redrive_core::delivery::SettleFuture;
use redrive_core::{Acker, Backoff, Jitter};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use crate::error::is_not_in_flight;
use crate::{Error, Result};

/// The longest visibility timeout SQS accepts: 12 hours.
pub const MAX_VISIBILITY_TIMEOUT: Duration = Duration::from_secs(12 * 3600);

/// Entries in one SQS batch call.
pub(crate) const MAX_BATCH: usize = 10;

/// Tries of one delete entry that SQS failed on its side (the SDK retries whole requests
/// on its own as well).
const DELETE_TRIES: u32 = 4;

/// The pause before each retry of those entries: 100, 200, 400 ms. Short and few, so
/// not jittered.
const DELETE_BACKOFF: Backoff =
    Backoff::exponential(Duration::from_millis(100), Duration::from_millis(400))
        .with_jitter(Jitter::None);

/// Delete batches in flight at once, per consumer.
const DELETES_IN_FLIGHT: usize = 8;

/// Messages [`Untried`] remembers at most; past it the oldest are forgotten.
const MAX_UNTRIED: usize = 10_000;

/// One queue's settlement context, shared by its consumer and every acker.
#[derive(Debug)]
pub(crate) struct Settler {
    pub(crate) client: Client,
    pub(crate) url: String,
    acks: mpsc::UnboundedSender<AckRequest>,
    untried: Mutex<Untried>,
}

/// Receives this consumer gave back without a handler trying the message (released
/// from the buffer, handed back by the Worker), by message id. SQS counts each in
/// `ApproximateReceiveCount`; a later receive of the message takes them off its attempt.
///
/// Kept until the message is deleted through this consumer, and for at most
/// [`MAX_UNTRIED`] messages (the oldest go first): one deleted by another consumer, or
/// moved by the queue's redrive policy, is forgotten only then.
#[derive(Debug, Default)]
pub(crate) struct Untried {
    /// Untried receives by message id, and the id's place in `order`.
    counts: HashMap<Arc<str>, (u32, u64)>,
    /// Ids by the place they were first counted at. An id forgotten and counted again
    /// is listed again at a new place; only its current listing evicts it.
    order: VecDeque<(Arc<str>, u64)>,
    next: u64,
}

impl Untried {
    /// Counts one untried receive of `id`.
    pub(crate) fn add(&mut self, id: Arc<str>) {
        let next = &mut self.next;
        let (count, _) = self.counts.entry(id.clone()).or_insert_with(|| {
            self.order.push_back((id, *next));
            *next += 1;
            (0, *next - 1)
        });
        *count = count.saturating_add(1);
        while self.counts.len() > MAX_UNTRIED {
            let Some((oldest, place)) = self.order.pop_front() else {
                break;
            };
            if self.counts.get(&oldest).is_some_and(|&(_, p)| p == place) {
                self.counts.remove(&oldest);
            }
        }
        if self.order.len() > 2 * MAX_UNTRIED {
            let counts = &self.counts;
            self.order
                .retain(|(id, place)| counts.get(id).is_some_and(|&(_, p)| p == *place));
        }
    }

    /// The untried receives of `id` counted so far.
    pub(crate) fn get(&self, id: &str) -> u32 {
        self.counts.get(id).map_or(0, |&(count, _)| count)
    }

    /// Forgets `id`: the message was deleted.
    pub(crate) fn forget(&mut self, id: &str) {
        self.counts.remove(id);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.counts.len()
    }
}

#[derive(Debug)]
struct AckRequest {
    receipt: String,
    done: oneshot::Sender<Result<()>>,
}

impl Settler {
    /// Starts the queue's delete batcher, which runs until the settler and every acker
    /// holding it are gone.
    pub(crate) fn start(client: Client, url: String, flush_interval: Duration) -> Arc<Self> {
        let (acks, rx) = mpsc::unbounded_channel();
        tokio::spawn(delete_batcher(
            client.clone(),
            url.clone(),
            rx,
            flush_interval,
        ));
        Arc::new(Settler {
            client,
            url,
            acks,
            untried: Mutex::default(),
        })
    }

    fn untried(&self) -> std::sync::MutexGuard<'_, Untried> {
        self.untried.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The delivery attempt of a message SQS received `receive_count` times: less the
    /// receives this consumer gave back untried, at least 1. Also whether any were.
    pub(crate) fn attempt(&self, id: Option<&str>, receive_count: u32) -> (u32, bool) {
        let untried = id.map_or(0, |id| self.untried().get(id));
        (receive_count.saturating_sub(untried).max(1), untried > 0)
    }

    /// Counts one untried receive of each message of `ids`, given back now.
    pub(crate) fn untried_receives<'a>(&self, ids: impl IntoIterator<Item = &'a Arc<str>>) {
        let mut untried = self.untried();
        for id in ids {
            untried.add(id.clone());
        }
    }

    /// Sets the visibility timeout of one message.
    async fn change_visibility(&self, receipt: &str, timeout: Duration) -> Result<()> {
        self.client
            .change_message_visibility()
            .queue_url(&self.url)
            .receipt_handle(receipt)
            .visibility_timeout(visibility_secs(timeout))
            .send()
            .await
            .map(drop)
            .map_err(|e| {
                if is_not_in_flight(e.code(), e.message()) {
                    Error::NotInFlight
                } else {
                    Error::request("ChangeMessageVisibility", e)
                }
            })
    }

    /// Makes messages visible again at once (buffered messages given back unprocessed).
    pub(crate) async fn release(&self, receipts: Vec<String>) {
        for chunk in receipts.chunks(MAX_BATCH) {
            let entries = chunk.iter().enumerate().map(|(i, r)| {
                ChangeMessageVisibilityBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(r)
                    .visibility_timeout(0)
                    .build()
                    .expect("id and receipt handle are set")
            });
            let r = self
                .client
                .change_message_visibility_batch()
                .queue_url(&self.url)
                .set_entries(Some(entries.collect()))
                .send()
                .await;
            match r {
                Ok(out) if out.failed().is_empty() => {}
                Ok(out) => tracing::debug!(
                    failed = out.failed().len(),
                    "some released messages were no longer in flight"
                ),
                Err(e) => tracing::warn!(
                    error = %Error::request("ChangeMessageVisibilityBatch", e),
                    "releasing buffered messages failed; they come back after their visibility timeout"
                ),
            }
        }
    }
}

/// Whole seconds, rounded up (SQS's granularity), at most 12 hours.
fn visibility_secs(d: Duration) -> i32 {
    let d = d.min(MAX_VISIBILITY_TIMEOUT);
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    i32::try_from(secs).unwrap_or(i32::MAX)
}

/// Settles one SQS message, by its receipt handle.
///
/// - `ack` queues a delete; deletes are sent in `DeleteMessageBatch` calls of up to 10,
///   flushed when 10 are waiting or after the consumer's flush interval. The future
///   resolves when SQS has confirmed this message's delete. Entries SQS fails on its
///   side are retried; what still fails is reported as an error.
/// - `nack(delay)` sets the visibility timeout to `delay` (rounded up to whole seconds,
///   at most 12 hours): the message comes back after it. Zero makes it visible at once.
/// - `extend(lease)` sets the visibility timeout to `lease` from now.
/// - `hand_back()` makes the message visible at once, as `nack(0)` does, and remembers
///   the receive as untried: this consumer's next receive of the message does not
///   count it as an attempt ([`Untried`]).
///
/// A message whose visibility timeout ran out before it was settled fails with
/// [`redrive_core::Error::LeaseExpired`] where SQS says so.
#[derive(Debug)]
pub(crate) struct SqsAcker {
    pub(crate) settler: Arc<Settler>,
    pub(crate) receipt: String,
    pub(crate) message_id: Option<Arc<str>>,
    /// Whether receives of the message given back untried are remembered, to forget
    /// once it is deleted.
    pub(crate) had_untried: bool,
}

impl Acker for SqsAcker {
    fn ack(&self) -> SettleFuture<'_> {
        SettleFuture::new(async move {
            let (done, rx) = oneshot::channel();
            let request = AckRequest {
                receipt: self.receipt.clone(),
                done,
            };
            if self.settler.acks.send(request).is_err() {
                return Err(Error::Config("the delete batcher stopped".into()).into());
            }
            match rx.await {
                Ok(r) => {
                    if let (Ok(()), true, Some(id)) = (&r, self.had_untried, &self.message_id) {
                        self.settler.untried().forget(id);
                    }
                    r.map_err(Into::into)
                }
                Err(_) => Err(redrive_core::Error::broker(
                    "the delete batcher dropped an ack without an answer",
                )),
            }
        })
    }

    fn hand_back(&self) -> SettleFuture<'_> {
        // Counted before the release, so a receive that follows at once finds it; and
        // whether or not the release works: the message comes back (at once or after its
        // visibility timeout) with this receive counted.
        self.settler.untried_receives(&self.message_id);
        self.nack(Duration::ZERO)
    }

    fn nack(&self, delay: Duration) -> SettleFuture<'_> {
        SettleFuture::new(async move {
            self.settler
                .change_visibility(&self.receipt, delay)
                .await
                .map_err(Into::into)
        })
    }

    fn extend(&self, lease: Duration) -> SettleFuture<'_> {
        SettleFuture::new(async move {
            self.settler
                .change_visibility(&self.receipt, lease)
                .await
                .map_err(Into::into)
        })
    }
}

/// Collects acks into batches of up to 10 and sends each as one `DeleteMessageBatch`.
async fn delete_batcher(
    client: Client,
    url: String,
    mut rx: mpsc::UnboundedReceiver<AckRequest>,
    flush_interval: Duration,
) {
    let in_flight = Arc::new(Semaphore::new(DELETES_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let flush_at = Instant::now() + flush_interval;
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    match tokio::time::timeout_at(flush_at, rx.recv()).await {
                        Ok(Some(r)) => batch.push(r),
                        Ok(None) | Err(_) => break,
                    }
                }
            }
        }
        let permit = in_flight
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let client = client.clone();
        let url = url.clone();
        tokio::spawn(async move {
            delete_batch(&client, &url, batch).await;
            drop(permit);
        });
    }
}

/// Deletes one batch, retrying entries SQS failed on its side, and answers every ack.
async fn delete_batch(client: &Client, url: &str, batch: Vec<AckRequest>) {
    let mut pending: Vec<(String, AckRequest)> = batch
        .into_iter()
        .enumerate()
        .map(|(i, r)| (i.to_string(), r))
        .collect();
    let mut last_error: Option<Error> = None;
    for attempt in 0..DELETE_TRIES {
        if attempt > 0 {
            tokio::time::sleep(DELETE_BACKOFF.delay_for(attempt)).await;
        }
        let entries = pending.iter().map(|(id, r)| {
            DeleteMessageBatchRequestEntry::builder()
                .id(id)
                .receipt_handle(&r.receipt)
                .build()
                .expect("id and receipt handle are set")
        });
        let out = match client
            .delete_message_batch()
            .queue_url(url)
            .set_entries(Some(entries.collect()))
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) => {
                let err = Error::request("DeleteMessageBatch", e);
                tracing::debug!(error = %err, attempt, "DeleteMessageBatch failed");
                last_error = Some(err);
                continue;
            }
        };
        for ok in out.successful() {
            if let Some(i) = pending.iter().position(|(id, _)| id == ok.id()) {
                let (_, r) = pending.swap_remove(i);
                let _ = r.done.send(Ok(()));
            }
        }
        for failed in out.failed() {
            let Some(i) = pending.iter().position(|(id, _)| id == failed.id()) else {
                continue;
            };
            let err = if is_not_in_flight(Some(failed.code()), failed.message()) {
                Error::NotInFlight
            } else {
                Error::BatchEntry {
                    operation: "DeleteMessageBatch",
                    code: failed.code().to_owned(),
                    message: failed.message().unwrap_or_default().to_owned(),
                    sender_fault: failed.sender_fault(),
                }
            };
            if failed.sender_fault() || matches!(err, Error::NotInFlight) {
                let (_, r) = pending.swap_remove(i);
                let _ = r.done.send(Err(err));
            } else {
                last_error = Some(err);
            }
        }
        if pending.is_empty() {
            return;
        }
    }
    let err = last_error.unwrap_or_else(|| Error::BatchEntry {
        operation: "DeleteMessageBatch",
        code: "Unanswered".into(),
        message: "SQS reported neither success nor failure for this entry".into(),
        sender_fault: false,
    });
    tracing::warn!(error = %err, count = pending.len(), "acks failed after {DELETE_TRIES} tries; SQS will deliver those messages again");
    for (_, r) in pending {
        let _ = r.done.send(Err(err.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untried_receives_are_counted_per_message_until_forgotten() {
        let mut u = Untried::default();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        u.add(a.clone());
        u.add(a.clone());
        u.add(b.clone());
        assert_eq!((u.get("a"), u.get("b"), u.get("c")), (2, 1, 0));
        u.forget("a");
        assert_eq!(u.get("a"), 0);
        u.add(a);
        assert_eq!(u.get("a"), 1);
    }

    #[test]
    fn untried_receives_are_bounded_oldest_first() {
        let mut u = Untried::default();
        for i in 0..MAX_UNTRIED + 5 {
            u.add(Arc::from(i.to_string()));
        }
        assert_eq!(u.len(), MAX_UNTRIED);
        assert_eq!(u.get("0"), 0, "the oldest went");
        assert_eq!(u.get("5"), 1);
        // Ids forgotten and counted again do not grow the order past twice the bound.
        for _ in 0..3 {
            for i in 0..MAX_UNTRIED {
                let id = i.to_string();
                u.forget(&id);
                u.add(Arc::from(id));
            }
        }
        assert!(u.order.len() <= 2 * MAX_UNTRIED, "{}", u.order.len());
        assert_eq!(u.len(), MAX_UNTRIED);
    }

    #[test]
    fn visibility_rounds_up_and_caps_at_twelve_hours() {
        assert_eq!(visibility_secs(Duration::ZERO), 0);
        assert_eq!(visibility_secs(Duration::from_millis(1)), 1);
        assert_eq!(visibility_secs(Duration::from_millis(2500)), 3);
        assert_eq!(visibility_secs(Duration::from_secs(13 * 3600)), 43_200);
    }
}
