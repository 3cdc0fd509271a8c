//! The consumer: long polling, a bounded prefetch buffer, and the capabilities SQS has.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_sqs::types::{Message as SqsMessage, MessageSystemAttributeName};
use redrive_core::{Capabilities, Consumer, Delivery, Message, Metadata, OrderingScope, Source};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::acker::{MAX_BATCH, MAX_VISIBILITY_TIMEOUT, Settler, SqsAcker};
use crate::{Error, QueueInfo, RedrivePolicy, Result, SYSTEM, Sqs, attributes};

/// The longest long poll SQS allows.
const MAX_WAIT_TIME: Duration = Duration::from_secs(20);

/// The `maxReceiveCount` the warning about a missing redrive policy suggests: above the
/// dead-letter layer's default limit of 5 attempts, with headroom for receives that
/// never reach the handler.
const SUGGESTED_MAX_RECEIVE_COUNT: u32 = 10;

/// Configures an [`SqsConsumer`]; made by [`Sqs::consumer`].
///
/// | setting | default |
/// |---|---|
/// | `wait_time` (long poll) | 20 s, SQS's maximum |
/// | `batch_size` (messages per `ReceiveMessage`) | 10, SQS's maximum |
/// | `visibility_timeout` | the queue's, read at start-up |
/// | `max_buffer_age` | a third of the visibility timeout |
/// | `prefetch` (fetch the next batch while the last is handled) | on |
/// | `ack_flush_interval` (longest wait for a delete batch to fill) | 10 ms |
#[must_use]
#[derive(Debug)]
pub struct SqsConsumerBuilder {
    sqs: Sqs,
    queue: String,
    wait_time: Duration,
    batch_size: usize,
    visibility_timeout: Option<Duration>,
    max_buffer_age: Option<Duration>,
    prefetch: bool,
    ack_flush_interval: Duration,
}

impl SqsConsumerBuilder {
    pub(crate) fn new(sqs: Sqs, queue: String) -> Self {
        SqsConsumerBuilder {
            sqs,
            queue,
            wait_time: MAX_WAIT_TIME,
            batch_size: MAX_BATCH,
            visibility_timeout: None,
            max_buffer_age: None,
            prefetch: true,
            ack_flush_interval: Duration::from_millis(10),
        }
    }

    /// How long one `ReceiveMessage` waits for messages (0 to 20 s; whole seconds).
    pub fn wait_time(mut self, d: Duration) -> Self {
        self.wait_time = d;
        self
    }

    /// Messages asked for per `ReceiveMessage` (1 to 10). Keep it at or below the
    /// Worker's concurrency when handlers are slow, so fetched messages do not wait.
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n;
        self
    }

    /// The visibility timeout to receive with, instead of the queue's (1 s to 12 h).
    /// It is the lease the consumer declares; the Worker extends it for slow handlers.
    pub fn visibility_timeout(mut self, d: Duration) -> Self {
        self.visibility_timeout = Some(d);
        self
    }

    /// How long a fetched message may wait in the buffer before it is handed to the
    /// Worker. Older ones are released (made visible again at once) instead, so none sits
    /// invisible in memory while its visibility timeout runs out. Below half the timeout,
    /// since the Worker first extends the lease half a lease after the handler starts.
    pub fn max_buffer_age(mut self, d: Duration) -> Self {
        self.max_buffer_age = Some(d);
        self
    }

    /// Whether to fetch the next batch as soon as the buffer is empty, while the last
    /// one is being handled (on by default). Off: fetch only when asked for a message.
    pub fn prefetch(mut self, on: bool) -> Self {
        self.prefetch = on;
        self
    }

    /// The longest an ack waits for others to fill its `DeleteMessageBatch`.
    pub fn ack_flush_interval(mut self, d: Duration) -> Self {
        self.ack_flush_interval = d;
        self
    }

    /// Reads the queue's attributes and starts the consumer's delete batcher.
    ///
    /// A queue without a `RedrivePolicy` is logged once per queue and [`Sqs`] handle as
    /// a warning that gives the attribute to set: without one, nothing on SQS's side
    /// ends the deliveries of a message redrive never settles (see [`RedrivePolicy`]).
    /// The policy read is [`SqsConsumer::redrive_policy`].
    ///
    /// # Errors
    /// [`Error::InvalidQueueName`] for a name SQS does not accept (before any request),
    /// [`Error::QueueDoesNotExist`], a failed request, or [`Error::Config`] when a
    /// setting is out of range (the message says what to change).
    pub async fn build(self) -> Result<SqsConsumer> {
        if self.wait_time > MAX_WAIT_TIME {
            return Err(Error::Config(format!(
                "wait_time {:?} is above SQS's maximum long poll of 20 s",
                self.wait_time
            )));
        }
        if !(1..=MAX_BATCH).contains(&self.batch_size) {
            return Err(Error::Config(format!(
                "batch_size {} is outside SQS's range of 1 to 10",
                self.batch_size
            )));
        }
        let info = self.sqs.queue_info(&self.queue).await?;
        let lease = self.visibility_timeout.unwrap_or(info.visibility_timeout);
        if lease < Duration::from_secs(1) || lease > MAX_VISIBILITY_TIMEOUT {
            return Err(Error::Config(format!(
                "a visibility timeout of {lease:?} (queue `{}`) cannot be kept as a lease; use 1 s to 12 h",
                self.queue
            )));
        }
        let max_buffer_age = self.max_buffer_age.unwrap_or(lease / 3);
        if max_buffer_age >= lease / 2 {
            return Err(Error::Config(format!(
                "max_buffer_age {max_buffer_age:?} must be below half the {lease:?} visibility timeout, or buffered \
                 messages could time out before the Worker first extends them; lower it below {:?}",
                lease / 2
            )));
        }
        match &info.redrive_policy {
            Some(policy) => tracing::debug!(
                queue = %self.queue,
                max_receive_count = policy.max_receive_count,
                dead_letter_target_arn = %policy.dead_letter_target_arn,
                "queue has a native redrive policy; keep maxReceiveCount above redrive's dead-letter limit"
            ),
            None if self.sqs.first_unguarded(&info.url) => tracing::warn!(
                queue = %self.queue,
                set = %format_args!(
                    "RedrivePolicy = {}",
                    info.suggested_redrive_policy(SUGGESTED_MAX_RECEIVE_COUNT)
                ),
                "queue has no RedrivePolicy: nothing on SQS's side ends the deliveries of a message \
                 that never gets a fate (no dead-letter layer, a dead-letter publish that keeps failing, \
                 a process that dies before the dead-letter layer sees it), so it is received again \
                 forever; set the queue attribute RedrivePolicy (an existing dead-letter queue, and \
                 maxReceiveCount above the dead-letter layer's max_attempts)"
            ),
            None => {}
        }
        let settler = Settler::start(
            self.sqs.client().clone(),
            info.url.clone(),
            self.ack_flush_interval,
        );
        let caps = Capabilities::new()
            .with_max_nack_delay(MAX_VISIBILITY_TIMEOUT)
            .with_delivery_count(true)
            .with_lease(Some(lease), true)
            .with_ordering(if info.fifo {
                OrderingScope::Key
            } else {
                OrderingScope::None
            });
        Ok(SqsConsumer {
            fetch: Arc::new(Fetch {
                settler,
                wait_time: i32::try_from(self.wait_time.as_secs()).unwrap_or(20),
                batch_size: i32::try_from(self.batch_size).unwrap_or(10),
                visibility: self.visibility_timeout.map(|d| {
                    i32::try_from(d.as_secs() + u64::from(d.subsec_nanos() > 0)).unwrap_or(i32::MAX)
                }),
            }),
            info,
            caps,
            max_buffer_age,
            prefetch: self.prefetch,
            buffer: VecDeque::new(),
            pending: None,
            failures: 0,
        })
    }
}

/// What a fetch task needs.
#[derive(Debug)]
struct Fetch {
    settler: Arc<Settler>,
    wait_time: i32,
    batch_size: i32,
    visibility: Option<i32>,
}

#[derive(Debug)]
struct Fetched {
    at: Instant,
    received_at: SystemTime,
    message: SqsMessage,
}

/// Consumes one SQS queue. Made by [`Sqs::consumer`].
///
/// # Guarantees
/// - `receive` long-polls with `ReceiveMessage` (up to 10 messages, up to 20 s) in a
///   task of its own, so dropping a `receive` future loses nothing: the batch lands in
///   the buffer and the next `receive` hands it out.
/// - A fetched message waits in the buffer at most `max_buffer_age`; older ones are made
///   visible again at once rather than handed out with their lease nearly gone.
/// - `attempt` is SQS's `ApproximateReceiveCount` less the receives of the message this
///   consumer gave back without trying it, `enqueued_at` its `SentTimestamp`, the key
///   the FIFO `MessageGroupId` (or the key attribute on a standard queue).
/// - **Untried receives do not use up attempts** within one consumer: a buffered message
///   released for waiting too long, or one the Worker hands back without running it
///   (`hand_back`), is remembered by message id (up to 10 000 messages, until deleted
///   through this consumer), and its next receive here is not counted as one more
///   attempt. What this consumer cannot know still counts: releases by another consumer
///   or process, and by this one before a restart (close releases the buffer and the
///   Worker hands back waiting messages at shutdown); a message taken by a long poll
///   cut short at close; and SQS's own `maxReceiveCount`, which counts every receive.
///   Leave the dead-letter layer's `max_attempts` and the redrive policy's
///   `maxReceiveCount` room for those.
/// - [`close`](Consumer::close) stops fetching and makes buffered messages visible again;
///   a message taken by a long poll cut short comes back after its visibility timeout.
pub struct SqsConsumer {
    fetch: Arc<Fetch>,
    info: QueueInfo,
    caps: Capabilities,
    max_buffer_age: Duration,
    prefetch: bool,
    buffer: VecDeque<Fetched>,
    pending: Option<JoinHandle<Result<Vec<Fetched>>>>,
    failures: u32,
}

impl fmt::Debug for SqsConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqsConsumer")
            .field("queue", &self.info.name)
            .field("capabilities", &self.caps)
            .field("buffered", &self.buffer.len())
            .finish_non_exhaustive()
    }
}

impl SqsConsumer {
    /// The queue's attributes, as read at start-up.
    pub fn queue(&self) -> &QueueInfo {
        &self.info
    }

    /// The queue's native dead-letter policy, as read at start-up: what ends the
    /// deliveries of a message redrive never settles. `None`: the queue has none (the
    /// consumer warned about it when built).
    pub fn redrive_policy(&self) -> Option<&RedrivePolicy> {
        self.info.redrive_policy.as_ref()
    }

    fn start_fetch(&mut self) {
        if self.pending.is_some() {
            return;
        }
        let fetch = self.fetch.clone();
        let pause = match self.failures {
            0 => Duration::ZERO,
            n => Duration::from_millis(100 << n.min(6)),
        };
        self.pending = Some(tokio::spawn(async move {
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            fetch.receive().await
        }));
    }

    /// Hands out the next fresh buffered message; releases stale ones.
    fn next_buffered(&mut self) -> Option<Delivery> {
        let now = Instant::now();
        let mut stale = Vec::new();
        let mut found = None;
        while let Some(f) = self.buffer.pop_front() {
            if now.duration_since(f.at) > self.max_buffer_age {
                stale.push(f);
                continue;
            }
            found = Some(f);
            break;
        }
        if !stale.is_empty() {
            let stale = self.give_back(stale);
            tracing::debug!(
                queue = %self.info.name,
                count = stale.len(),
                "buffered messages waited too long; released"
            );
            let settler = self.fetch.settler.clone();
            tokio::spawn(async move { settler.release(stale).await });
        }
        let f = found?;
        if self.buffer.is_empty() && self.prefetch {
            self.start_fetch();
        }
        Some(self.delivery(f))
    }

    /// The receipts of `fetched`, given back untried: their receives are remembered as
    /// untried, so this consumer's next receive of each does not count one.
    fn give_back(&self, fetched: impl IntoIterator<Item = Fetched>) -> Vec<String> {
        let fetched: Vec<Fetched> = fetched.into_iter().collect();
        let ids: Vec<Arc<str>> = fetched
            .iter()
            .filter_map(|f| f.message.message_id().map(Arc::from))
            .collect();
        self.fetch.settler.untried_receives(&ids);
        fetched
            .into_iter()
            .filter_map(|f| f.message.receipt_handle().map(str::to_owned))
            .collect()
    }

    fn delivery(&self, f: Fetched) -> Delivery {
        let m = f.message;
        let system = m.attributes();
        let sys = |name: MessageSystemAttributeName| system.and_then(|a| a.get(&name));
        let message_id: Option<Arc<str>> = m.message_id().map(Arc::from);
        let receive_count = sys(MessageSystemAttributeName::ApproximateReceiveCount)
            .and_then(|c| c.parse().ok())
            .unwrap_or(1);
        let (attempt, had_untried) = self
            .fetch
            .settler
            .attempt(message_id.as_deref(), receive_count);
        let enqueued_at = sys(MessageSystemAttributeName::SentTimestamp)
            .and_then(|t| t.parse::<u64>().ok())
            .map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
        let group = sys(MessageSystemAttributeName::MessageGroupId).map(String::as_str);
        let decoded =
            attributes::decode(m.body().unwrap_or_default(), m.message_attributes(), group);
        let message = Message {
            payload: decoded.payload,
            headers: decoded.headers,
            key: decoded.key,
            metadata: Metadata {
                message_id: message_id.clone(),
                source: Source {
                    system: SYSTEM,
                    destination: self.info.name.clone(),
                    partition: None,
                    offset: None,
                    group: None,
                },
                attempt,
                enqueued_at,
                received_at: f.received_at,
            },
            extensions: Default::default(),
        };
        Delivery::new(
            message,
            SqsAcker {
                settler: self.fetch.settler.clone(),
                receipt: m.receipt_handle().unwrap_or_default().to_owned(),
                message_id,
                had_untried,
            },
        )
    }
}

impl Fetch {
    async fn receive(&self) -> Result<Vec<Fetched>> {
        let s = &self.settler;
        let out = s
            .client
            .receive_message()
            .queue_url(&s.url)
            .max_number_of_messages(self.batch_size)
            .wait_time_seconds(self.wait_time)
            .set_visibility_timeout(self.visibility)
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
            .message_system_attribute_names(MessageSystemAttributeName::MessageGroupId)
            .send()
            .await
            .map_err(|e| Error::request("ReceiveMessage", e))?;
        let at = Instant::now();
        let received_at = SystemTime::now();
        Ok(out
            .messages
            .unwrap_or_default()
            .into_iter()
            .map(|message| Fetched {
                at,
                received_at,
                message,
            })
            .collect())
    }
}

impl Consumer for SqsConsumer {
    async fn receive(&mut self) -> redrive_core::Result<Option<Delivery>> {
        loop {
            if let Some(d) = self.next_buffered() {
                return Ok(Some(d));
            }
            self.start_fetch();
            let pending = self.pending.as_mut().expect("a fetch was just started");
            // Cancel-safe: if this future is dropped here, the fetch task keeps running
            // and its batch is picked up by the next call.
            let result = pending.await;
            self.pending = None;
            match result {
                Ok(Ok(batch)) => {
                    self.failures = 0;
                    self.buffer.extend(batch);
                }
                Ok(Err(e)) => {
                    self.failures += 1;
                    return Err(e.into());
                }
                Err(e) => {
                    self.failures += 1;
                    return Err(redrive_core::Error::broker(e));
                }
            }
        }
    }

    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    async fn close(&mut self) -> redrive_core::Result<()> {
        if let Some(pending) = self.pending.take() {
            pending.abort();
        }
        let buffered: Vec<Fetched> = self.buffer.drain(..).collect();
        let receipts = self.give_back(buffered);
        if !receipts.is_empty() {
            tracing::debug!(queue = %self.info.name, count = receipts.len(), "releasing buffered messages");
            self.fetch.settler.release(receipts).await;
        }
        Ok(())
    }
}

impl Drop for SqsConsumer {
    /// Stops fetching; buffered messages are made visible again if a runtime is at hand
    /// (else they come back after their visibility timeout).
    fn drop(&mut self) {
        if let Some(pending) = self.pending.take() {
            pending.abort();
        }
        let buffered: Vec<Fetched> = self.buffer.drain(..).collect();
        let receipts = self.give_back(buffered);
        if let (false, Ok(rt)) = (receipts.is_empty(), tokio::runtime::Handle::try_current()) {
            let settler = self.fetch.settler.clone();
            rt.spawn(async move { settler.release(receipts).await });
        }
    }
}
