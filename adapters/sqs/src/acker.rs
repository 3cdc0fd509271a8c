//! Settlement: acks batched into `DeleteMessageBatch`, nacks and lease extensions as
//! `ChangeMessageVisibility`.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::Client;
use aws_sdk_sqs::error::ProvideErrorMetadata;
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
};
use redrive_core::Acker;
use redrive_core::delivery::SettleFuture;
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

/// Delete batches in flight at once, per consumer.
const DELETES_IN_FLIGHT: usize = 8;

/// One queue's settlement context, shared by its consumer and every acker.
#[derive(Debug)]
pub(crate) struct Settler {
    pub(crate) client: Client,
    pub(crate) url: String,
    acks: mpsc::UnboundedSender<AckRequest>,
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
        Arc::new(Settler { client, url, acks })
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
///
/// A message whose visibility timeout ran out before it was settled fails with
/// [`redrive_core::Error::LeaseExpired`] where SQS says so.
#[derive(Debug)]
pub(crate) struct SqsAcker {
    pub(crate) settler: Arc<Settler>,
    pub(crate) receipt: String,
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
                Ok(r) => r.map_err(Into::into),
                Err(_) => Err(redrive_core::Error::broker(
                    "the delete batcher dropped an ack without an answer",
                )),
            }
        })
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
            tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
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
    fn visibility_rounds_up_and_caps_at_twelve_hours() {
        assert_eq!(visibility_secs(Duration::ZERO), 0);
        assert_eq!(visibility_secs(Duration::from_millis(1)), 1);
        assert_eq!(visibility_secs(Duration::from_millis(2500)), 3);
        assert_eq!(visibility_secs(Duration::from_secs(13 * 3600)), 43_200);
    }
}
