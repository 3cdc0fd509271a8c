//! [`BatchingPublisher`]: concurrent publishes to one queue gathered into
//! `SendMessageBatch` calls.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use redrive_core::{OutgoingMessage, Publisher};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use super::{Prepared, SqsPublisher, entry_error};
use crate::acker::MAX_BATCH;
use crate::client::is_fifo_name;
use crate::{Error, Result};

/// `SendMessageBatch` calls in flight at once per standard queue. A FIFO queue has one,
/// so its calls arrive in the order they were gathered.
const BATCHES_IN_FLIGHT: usize = 8;

/// An [`SqsPublisher`] whose concurrent publishes to one queue go out together, up to 10
/// in one `SendMessageBatch` call, instead of one `SendMessage` call each. Made by
/// [`SqsPublisher::batched`]; cheap to clone, and every clone shares the batching.
///
/// Each queue published to gets a task that takes the publishes waiting for it, up to 10
/// and at most the publisher's `max_message_bytes` together (SQS's request limit, 256 KiB
/// by default), waiting at most `linger` from the first one's arrival for more to come
/// (zero: only those already waiting), and sends them in one call. Up to 8 calls per
/// standard queue are in flight at once; a FIFO queue has one at a time. The tasks end
/// when the last clone is dropped.
///
/// Worth it where many publishes wait at once (a replay with several in flight, many
/// producers sharing one publisher); a lone publish waits up to `linger` for nothing.
///
/// ```no_run
/// use std::time::Duration;
/// use redrive_core::{OutgoingMessage, Publisher};
/// use redrive_sqs::Sqs;
///
/// # async fn run(sqs: Sqs) -> Result<(), redrive_core::Error> {
/// let publisher = sqs.publisher().batched(Duration::from_millis(5));
/// let (a, b) = tokio::join!(
///     publisher.publish("orders", OutgoingMessage::new("one")),
///     publisher.publish("orders", OutgoingMessage::new("two")),
/// );
/// a?;
/// b?;
/// println!("{} SendMessageBatch calls", publisher.requests());
/// # Ok(())
/// # }
/// ```
///
/// # Guarantees
/// - **Each publish gets its own answer**: a publish returns once SQS accepted its entry,
///   and fails with its entry's error alone ([`Error::BatchEntry`], mapped as
///   [`SqsPublisher::send`]'s errors are: a rejection is
///   [`redrive_core::Error::Rejected`]); the others in the call are not affected. A
///   failed call fails every publish in it.
/// - **Checked before batching**: a queue name, size, header or key SQS cannot take
///   fails that publish alone, before any request, as with [`SqsPublisher::send`].
/// - **Order**: publishes enter a call in the order they were made, and a FIFO queue's
///   calls go one at a time, so one caller's publishes to a message group keep their
///   order. Group and deduplication ids are set as [`SqsPublisher`] sets them.
/// - **At least once**: a publish dropped before its answer may still be sent.
#[derive(Clone, Debug)]
pub struct BatchingPublisher {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    publisher: SqsPublisher,
    linger: Duration,
    /// The batching task of each queue, by the destination as given.
    queues: Mutex<HashMap<String, mpsc::UnboundedSender<Entry>>>,
    requests: Arc<AtomicU64>,
}

/// One publish waiting for its call.
struct Entry {
    prepared: Prepared,
    size: usize,
    queued: Instant,
    done: oneshot::Sender<Result<String>>,
}

impl BatchingPublisher {
    pub(super) fn new(publisher: SqsPublisher, linger: Duration) -> Self {
        BatchingPublisher {
            inner: Arc::new(Inner {
                publisher,
                linger,
                queues: Mutex::default(),
                requests: Arc::default(),
            }),
        }
    }

    /// How long a publish waits for others to join its call.
    pub fn linger(&self) -> Duration {
        self.inner.linger
    }

    /// The `SendMessageBatch` calls made so far, by this publisher and its clones.
    pub fn requests(&self) -> u64 {
        self.inner.requests.load(Ordering::Relaxed)
    }

    /// Sends one message in a `SendMessageBatch` call shared with the publishes waiting
    /// at the same time, and returns SQS's message id.
    ///
    /// # Errors
    /// As [`SqsPublisher::send`], or [`Error::BatchEntry`] for this message's entry, which
    /// SQS refused, or which went unanswered.
    pub async fn send(&self, queue: &str, message: &OutgoingMessage) -> Result<String> {
        let publisher = &self.inner.publisher;
        let url = publisher.sqs.queue_url(queue).await?;
        let fifo = is_fifo_name(&url);
        let prepared = publisher.prepare(fifo, message)?;
        let (done, answer) = oneshot::channel();
        let entry = Entry {
            size: prepared.encoded.size(),
            prepared,
            queued: Instant::now(),
            done,
        };
        if self.batcher(queue, url, fifo).send(entry).is_err() {
            return Err(unanswered("the batching task stopped"));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(unanswered("the batching task stopped before SQS answered")))
    }

    /// The sender to `queue`'s batching task, started if it is not running.
    fn batcher(&self, queue: &str, url: String, fifo: bool) -> mpsc::UnboundedSender<Entry> {
        let mut queues = self
            .inner
            .queues
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(tx) = queues.get(queue).filter(|tx| !tx.is_closed()) {
            return tx.clone();
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let calls = Calls {
            client: self.inner.publisher.sqs.client().clone(),
            queue: queue.to_owned(),
            url,
            requests: self.inner.requests.clone(),
        };
        tokio::spawn(gather(
            calls,
            rx,
            self.inner.linger,
            self.inner.publisher.max_message_bytes,
            if fifo { 1 } else { BATCHES_IN_FLIGHT },
        ));
        queues.insert(queue.to_owned(), tx.clone());
        tx
    }
}

impl Publisher for BatchingPublisher {
    async fn publish(
        &self,
        destination: &str,
        message: OutgoingMessage,
    ) -> redrive_core::Result<()> {
        self.send(destination, &message).await?;
        Ok(())
    }

    /// As [`SqsPublisher`]'s.
    fn check_destination(&self, destination: &str) -> redrive_core::Result<()> {
        self.inner.publisher.check_destination(destination)
    }
}

/// An entry SQS gave no answer for; worth trying again.
fn unanswered(why: &str) -> Error {
    Error::BatchEntry {
        operation: "SendMessageBatch",
        code: "Unanswered".into(),
        message: why.to_owned(),
        sender_fault: false,
    }
}

/// What one queue's calls need.
#[derive(Clone)]
struct Calls {
    client: aws_sdk_sqs::Client,
    queue: String,
    url: String,
    requests: Arc<AtomicU64>,
}

/// Gathers a queue's publishes into calls of up to 10 entries and `max_bytes`, each
/// waiting at most `linger` from its first entry's arrival, with at most `in_flight`
/// calls at once; ends when every sender is gone.
async fn gather(
    calls: Calls,
    mut rx: mpsc::UnboundedReceiver<Entry>,
    linger: Duration,
    max_bytes: usize,
    in_flight: usize,
) {
    let permits = Arc::new(Semaphore::new(in_flight));
    // An entry that did not fit the last call: the first of the next.
    let mut carried = None;
    loop {
        let first = match carried.take() {
            Some(entry) => entry,
            None => match rx.recv().await {
                Some(entry) => entry,
                None => return,
            },
        };
        // Taken before gathering, so what arrives while every call is in flight joins
        // the next one.
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let flush_at = first.queued + linger;
        let mut size = first.size;
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            let next = match rx.try_recv() {
                Ok(entry) => entry,
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    match tokio::time::timeout_at(flush_at, rx.recv()).await {
                        Ok(Some(entry)) => entry,
                        Ok(None) | Err(_) => break,
                    }
                }
            };
            if size + next.size > max_bytes {
                carried = Some(next);
                break;
            }
            size += next.size;
            batch.push(next);
        }
        let calls = calls.clone();
        tokio::spawn(async move {
            calls.send(batch).await;
            drop(permit);
        });
    }
}

impl Calls {
    /// Sends one `SendMessageBatch` call and answers every entry's publish.
    async fn send(&self, batch: Vec<Entry>) {
        let mut answers = Vec::with_capacity(batch.len());
        let entries = batch
            .into_iter()
            .enumerate()
            .map(|(i, entry)| {
                answers.push(Some(entry.done));
                entry.prepared.into_entry(i.to_string())
            })
            .collect();
        self.requests.fetch_add(1, Ordering::Relaxed);
        let out = self
            .client
            .send_message_batch()
            .queue_url(&self.url)
            .set_entries(Some(entries))
            .send()
            .await;
        let out = match out {
            Ok(out) => out,
            Err(e) => {
                let err = Error::for_queue(&self.queue, "SendMessageBatch", e);
                for answer in answers.into_iter().flatten() {
                    let _ = answer.send(Err(err.clone()));
                }
                return;
            }
        };
        let mut answer = |id: &str, result: Result<String>| {
            if let Some(done) = id
                .parse::<usize>()
                .ok()
                .and_then(|i| answers.get_mut(i))
                .and_then(Option::take)
            {
                let _ = done.send(result);
            }
        };
        for ok in out.successful() {
            answer(ok.id(), Ok(ok.message_id().to_owned()));
        }
        for failed in out.failed() {
            answer(failed.id(), Err(entry_error(failed)));
        }
        for done in answers.into_iter().flatten() {
            let _ = done.send(Err(unanswered(
                "SQS reported neither success nor failure for this entry",
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_task_ends_when_its_last_sender_is_gone() {
        let config = aws_sdk_sqs::Config::builder()
            .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
            .region(aws_sdk_sqs::config::Region::new("us-east-1"))
            .build();
        let calls = Calls {
            client: aws_sdk_sqs::Client::from_conf(config),
            queue: "q".into(),
            url: "http://127.0.0.1:1/000000000000/q".into(),
            requests: Arc::default(),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(gather(calls, rx, Duration::from_secs(60), 1024, 1));
        let second = tx.clone();
        drop(tx);
        tokio::task::yield_now().await;
        assert!(!task.is_finished(), "a sender is left");
        drop(second);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the task ended")
            .expect("no panic");
    }
}
