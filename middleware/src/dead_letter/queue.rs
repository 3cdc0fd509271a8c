//! Working on a dead-letter queue through any adapter's consumer: reading it, replaying
//! a selection to where it came from, purging a selection ([`DeadLetterQueue`]).

use std::future::Future;
use std::pin::pin;
use std::time::Duration;

use futures_util::FutureExt as _;
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use redrive_core::{Consumer, Delivery, Publisher, Result, Settle};
use tokio::time::Instant;

use super::letter::{Letter, Selection};

/// A dead-letter queue, read through a [`Consumer`] of it.
///
/// Every operation takes each dead letter in turn and holds the ones it keeps (not
/// selected, refused, or a dry run) until it ends, then hands them all back, so one run
/// sees each letter once and leaves the kept ones in the queue. A letter leaves the
/// queue only by an ack: after its replay's publish is confirmed, or when purged. A run
/// stopped at any point, or its process killed, leaves every letter in the DLQ or back
/// at its origin, or (killed between the publish and the ack) both: a duplicate, never
/// a loss; running it again finishes the job.
///
/// The consumer must be able to hold as many letters as the run keeps (a RabbitMQ
/// prefetch that large, an SQS visibility timeout longer than the run; leases the
/// consumer's capabilities declare extendable are extended meanwhile). The queue's end
/// is the first wait for a delivery longer than [`with_idle`](Self::with_idle).
///
/// ```
/// use std::time::Duration;
/// use redrive_core::memory::MemoryBroker;
/// use redrive_core::{OutgoingMessage, Publisher};
/// use redrive_middleware::dead_letter::{DeadLetterQueue, Replay, Selection};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// let broker = MemoryBroker::new();
/// let letter = OutgoingMessage::new("order 7")
///     .with_header("x-redrive-original-destination", "orders")?
///     .with_header("x-redrive-error-kind", "exhausted")?;
/// broker.publish("orders-dlq", letter).await?;
///
/// let mut dlq = DeadLetterQueue::new(broker.consumer("orders-dlq"))
///     .with_idle(Duration::from_millis(50));
/// let selection = Selection::all().with_kind("exhausted");
/// let report = dlq
///     .replay(&broker, &selection, &Replay::default(), |_| {}, std::future::pending())
///     .await?;
/// assert_eq!((report.done, broker.depth("orders")), (1, 1));
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct DeadLetterQueue<C> {
    consumer: C,
    idle: Duration,
}

/// What a replay does: see [`DeadLetterQueue::replay`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Replay {
    /// Where to put the letters back; `None`: each where it came from (its origin).
    pub to: Option<String>,
    /// The loop guard: a letter replayed this many times before is refused (kept in the
    /// DLQ) unless `force`. Default 3.
    pub max_replays: u32,
    /// Replays letters past the loop guard too.
    pub force: bool,
    /// Counts what would be replayed, and replays nothing.
    pub dry_run: bool,
    /// Takes at most this many selected letters.
    pub limit: Option<u64>,
    /// Publishes at most this many letters a second.
    pub rate: Option<f64>,
    /// Letters replayed at once, each a publish waiting for the broker's confirmation,
    /// then its removal from the DLQ (default 16): replayed letters may reach their
    /// destination in another order than the DLQ's, and a run killed mid-way can leave
    /// up to this many letters both replayed and still in the DLQ (each at most once
    /// more).
    pub in_flight: usize,
}

impl Replay {
    /// Puts the letters back into `destination` instead of each one's origin.
    #[must_use]
    pub fn to(mut self, destination: impl Into<String>) -> Self {
        self.to = Some(destination.into());
        self
    }

    /// Refuses letters replayed `n` times before (the loop guard; default 3).
    #[must_use]
    pub fn with_max_replays(mut self, n: u32) -> Self {
        self.max_replays = n;
        self
    }

    /// Replays letters past the loop guard too.
    #[must_use]
    pub fn forced(mut self) -> Self {
        self.force = true;
        self
    }

    /// Counts what would be replayed, and replays nothing.
    #[must_use]
    pub fn dry_run(mut self) -> Self {
        self.dry_run = true;
        self
    }

    /// Takes at most `n` selected letters.
    #[must_use]
    pub fn with_limit(mut self, n: u64) -> Self {
        self.limit = Some(n);
        self
    }

    /// Keeps at most `n` publishes waiting for the broker's confirmation at once
    /// (default 16; 1 replays in the DLQ's order).
    #[must_use]
    pub fn with_in_flight(mut self, n: usize) -> Self {
        self.in_flight = n;
        self
    }

    /// Publishes at most `per_second` letters a second, evenly spaced.
    #[must_use]
    pub fn with_rate(mut self, per_second: f64) -> Self {
        self.rate = Some(per_second);
        self
    }
}

impl Default for Replay {
    fn default() -> Self {
        Replay {
            to: None,
            max_replays: 3,
            force: false,
            dry_run: false,
            limit: None,
            rate: None,
            in_flight: 16,
        }
    }
}

/// What a run did, so far or in all; handed to the progress callback after each
/// letter, and returned at the end.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Progress {
    /// Letters read from the DLQ.
    pub read: u64,
    /// Of those, selected.
    pub selected: u64,
    /// Selected and replayed (publish confirmed, then removed from the DLQ), or purged;
    /// in a dry run, those that would be.
    pub done: u64,
    /// Selected but refused by the loop guard: kept in the DLQ.
    pub refused: u64,
    /// Selected but without an origin to go back to (and no `to`): kept in the DLQ.
    pub no_origin: u64,
    /// Whose publish or removal failed: kept in the DLQ (a removal that failed after
    /// the publish leaves a duplicate; running again replays it once more).
    pub failed: u64,
}

impl<C: Consumer> DeadLetterQueue<C> {
    /// The DLQ `consumer` reads, with an idle wait of 2 s.
    pub fn new(consumer: C) -> Self {
        DeadLetterQueue {
            consumer,
            idle: Duration::from_secs(2),
        }
    }

    /// How long a wait for the next delivery means the queue has been read to its end:
    /// longer than the broker's gap between deliveries of a full queue (an SQS long poll
    /// returns in well under a second when messages are there).
    #[must_use]
    pub fn with_idle(mut self, idle: Duration) -> Self {
        self.idle = idle;
        self
    }

    /// Reads every letter (at most `limit` selected ones) and calls `each` with the
    /// selected ones; removes nothing.
    ///
    /// # Errors
    /// A receive that failed; the letters read so far are handed back first.
    pub async fn scan(
        &mut self,
        selection: &Selection,
        limit: Option<u64>,
        mut each: impl FnMut(&Letter),
    ) -> Result<Progress> {
        let mut held = Vec::new();
        let mut p = Progress::default();
        let stop = pin!(std::future::pending::<()>());
        let result = self
            .take_each(
                &mut held,
                &mut p,
                stop,
                limit,
                async |letter, settle, p, held| {
                    held.push(settle);
                    if selection.matches(&letter) {
                        p.selected += 1;
                        p.done += 1;
                        each(&letter);
                    }
                },
            )
            .await;
        hand_back(held).await;
        result.map(|()| p)
    }

    /// Puts the selected letters back: publishes each through `publisher` (to
    /// [`Replay::to`], or its origin) with [`REPLAYS`](super::REPLAYS) one higher and
    /// without its envelope ([`Letter::replay_message`]), and removes it from the DLQ once
    /// the publish is confirmed. `progress` is called after each letter; the run stops
    /// after the current letter once `stop` completes.
    ///
    /// # Errors
    /// A receive that failed; what was replayed stays replayed, the rest is handed back.
    pub async fn replay<P: Publisher>(
        &mut self,
        publisher: &P,
        selection: &Selection,
        replay: &Replay,
        mut progress: impl FnMut(&Progress),
        stop: impl Future<Output = ()>,
    ) -> Result<Progress> {
        let mut pace = replay.rate.map(Pace::new);
        let in_flight = replay.in_flight.max(1);
        let mut publishing = FuturesUnordered::new();
        let mut held = Vec::new();
        let mut stop = pin!(stop);
        let mut p = Progress::default();
        let result = self
            .take_each(
                &mut held,
                &mut p,
                stop.as_mut(),
                replay.limit,
                async |letter, settle, p, held| {
                    if !selection.matches(&letter) {
                        held.push(settle);
                        return;
                    }
                    p.selected += 1;
                    let to = replay.to.as_deref().or(letter.origin.as_deref());
                    let kept = if letter.replays >= replay.max_replays && !replay.force {
                        Some(&mut p.refused)
                    } else if to.is_none() {
                        Some(&mut p.no_origin)
                    } else if replay.dry_run {
                        Some(&mut p.done)
                    } else {
                        None
                    };
                    if let Some(count) = kept {
                        *count += 1;
                        held.push(settle);
                        progress(p);
                        return;
                    }
                    // Publishes in flight progress only while polled: settle those that
                    // end while the pace holds the next one back.
                    if let Some(pace) = &mut pace {
                        let mut turn = pin!(pace.wait());
                        loop {
                            tokio::select! {
                                () = &mut turn => break,
                                Some(done) = publishing.next(), if !publishing.is_empty() => {
                                    published(done, p, held);
                                    progress(p);
                                }
                            }
                        }
                    }
                    let to = to.unwrap_or_default().to_owned();
                    let id = letter.id().map(str::to_owned);
                    let out = letter.replay_message();
                    // The letter leaves the DLQ as soon as its publish is confirmed, in
                    // the same future: removals run side by side, as the publishes do.
                    publishing.push(async move {
                        let sent = match out {
                            Ok(out) => publisher.publish(&to, out).await,
                            Err(e) => Err(redrive_core::Error::broker(e.to_string())),
                        };
                        let replayed = match sent {
                            Ok(()) => Replayed::Removed(settle.ack().await),
                            Err(e) => Replayed::NotSent(e, settle),
                        };
                        (replayed, id)
                    });
                    // Counts the replays that ended, and sends this one on its way.
                    while let Some(Some(done)) = publishing.next().now_or_never() {
                        published(done, p, held);
                        progress(p);
                    }
                    while publishing.len() >= in_flight {
                        if let Some(done) = publishing.next().await {
                            published(done, p, held);
                            progress(p);
                        }
                    }
                },
            )
            .await;
        // What is still being published finishes, stopped or not.
        while let Some(done) = publishing.next().await {
            published(done, &mut p, &mut held);
            progress(&p);
        }
        hand_back(held).await;
        result.map(|()| p)
    }

    /// Removes the selected letters (at most `limit`) from the DLQ for good.
    ///
    /// # Errors
    /// A receive that failed; the letters kept so far are handed back first.
    pub async fn purge(
        &mut self,
        selection: &Selection,
        limit: Option<u64>,
        mut progress: impl FnMut(&Progress),
        stop: impl Future<Output = ()>,
    ) -> Result<Progress> {
        let mut held = Vec::new();
        let mut stop = pin!(stop);
        let mut p = Progress::default();
        let result = self
            .take_each(&mut held, &mut p, stop.as_mut(), limit, async |letter, settle, p, held| {
                if !selection.matches(&letter) {
                    held.push(settle);
                    return;
                }
                p.selected += 1;
                match settle.ack().await {
                    Ok(()) => p.done += 1,
                    Err(e) => {
                        tracing::warn!(letter = ?letter.id(), error = %e, "purge failed; the letter stays in the DLQ");
                        p.failed += 1;
                    }
                }
                progress(p);
            })
            .await;
        hand_back(held).await;
        result.map(|()| p)
    }

    /// Closes the consumer.
    ///
    /// # Errors
    /// The consumer's close failed.
    pub async fn close(mut self) -> Result<()> {
        self.consumer.close().await
    }

    /// Takes deliveries until the queue is quiet for `idle`, `stop` completes, the
    /// consumer closes, or `limit` letters were selected; hands each to `each` with its
    /// settle handle and the held list. Extends the held letters' leases when the
    /// consumer's capabilities say they run out and can be extended.
    async fn take_each<F>(
        &mut self,
        held: &mut Vec<Settle>,
        p: &mut Progress,
        mut stop: std::pin::Pin<&mut impl Future<Output = ()>>,
        limit: Option<u64>,
        mut each: F,
    ) -> Result<()>
    where
        F: AsyncFnMut(Letter, Settle, &mut Progress, &mut Vec<Settle>),
    {
        let caps = self.consumer.capabilities();
        let lease = caps.lease.filter(|_| caps.extendable);
        let mut extend_at = lease.map(|l| Instant::now() + l / 3);
        loop {
            if limit.is_some_and(|n| p.selected >= n) {
                return Ok(());
            }
            if let (Some(at), Some(lease)) = (extend_at, lease) {
                if Instant::now() >= at {
                    for settle in held.iter() {
                        let _ = settle.extend(lease).await;
                    }
                    extend_at = Some(Instant::now() + lease / 3);
                }
            }
            let next = tokio::select! {
                biased;
                () = stop.as_mut() => return Ok(()),
                next = tokio::time::timeout(self.idle, self.consumer.receive()) => next,
            };
            let delivery: Delivery = match next {
                Err(_) | Ok(Ok(None)) => return Ok(()),
                Ok(Err(e)) => return Err(e),
                Ok(Ok(Some(d))) => d,
            };
            p.read += 1;
            let (message, settle) = delivery.into_parts();
            each(Letter::read(message), settle, p, held).await;
        }
    }
}

/// How a letter's replay ended.
enum Replayed {
    /// Published, then removed from the DLQ (or not: then a duplicate stays there).
    Removed(Result<()>),
    /// Not published: the letter stays in the DLQ, held until the run ends.
    NotSent(redrive_core::Error, Settle),
}

/// Counts a letter whose replay ended, and holds it when it was not published.
fn published((replayed, id): (Replayed, Option<String>), p: &mut Progress, held: &mut Vec<Settle>) {
    match replayed {
        Replayed::Removed(Ok(())) => p.done += 1,
        Replayed::Removed(Err(e)) => {
            tracing::warn!(letter = ?id, error = %e, "replayed, but its removal from the DLQ failed: it stays there, a duplicate");
            p.failed += 1;
        }
        Replayed::NotSent(e, settle) => {
            tracing::warn!(letter = ?id, error = %e, "replay publish failed; the letter stays in the DLQ");
            p.failed += 1;
            held.push(settle);
        }
    }
}

/// Hands every held letter back to the DLQ.
async fn hand_back(held: Vec<Settle>) {
    for settle in held {
        if let Err(e) = settle.hand_back().await {
            // The broker gives it back on its own once its lease or the connection ends.
            tracing::debug!(error = %e, "hand-back failed; the broker returns the letter later");
        }
    }
}

/// Spaces publishes evenly at a rate. A publish that starts late (the broker slowed
/// down, a receive took a while) is made up for by starting the next ones sooner, within
/// a quarter of a second, so the rate over a run holds; a longer stall is not made up
/// in a burst.
struct Pace {
    every: Duration,
    next: Instant,
}

/// How far behind its schedule a pace catches up.
const CATCH_UP: Duration = Duration::from_millis(250);

impl Pace {
    fn new(per_second: f64) -> Self {
        Pace {
            every: Duration::from_secs_f64(1.0 / per_second.max(f64::MIN_POSITIVE)),
            next: Instant::now(),
        }
    }

    async fn wait(&mut self) {
        let now = Instant::now();
        if self.next > now {
            tokio::time::sleep_until(self.next).await;
        }
        let earliest = now.checked_sub(CATCH_UP).unwrap_or(now);
        self.next = self.next.max(earliest) + self.every;
    }
}
