//! The Worker's bookkeeping: what its tasks report back ([`Done`]), the slots, parked
//! messages and ordering keys they hold, and the [`Report`] the counts go to.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::time::Duration;

use super::call::{TaskCtx, bounded, log_settle, park};
use super::config::Config;
use super::tasks::Tasks;
use super::{OrderingMode, Report};
use crate::{Delivery, Message, Outcome, Settle};

pub(super) enum Done {
    /// A handler call ended and its delivery was settled.
    Settled {
        key: Option<KeyId>,
        settled: Settled,
        panicked: bool,
        settle_error: bool,
    },
    /// A handler call failed; the message is to be parked.
    Park(Box<Parking>),
    /// A parked message's delay passed.
    Unpark(Box<(Message, Settle)>),
    /// A task panicked outside the handler (a Worker or adapter bug, a user's hook).
    /// Its message is not settled here (its acker is gone); the broker delivers it
    /// again. What the task held is freed.
    Crashed { panic: String, held: Held },
    /// Messages were handed back unprocessed at shutdown: one parked message (which
    /// held `key`), or a batch of waiting ones.
    HandedBack {
        key: Option<KeyId>,
        parked: bool,
        count: u64,
        settle_errors: u64,
    },
}

/// What a task holds while it runs, freed by the Worker if the task panics.
#[derive(Clone, Copy, Debug)]
pub(super) struct Held {
    /// A concurrency slot (a handler call).
    pub(super) call: bool,
    /// A place among the parked messages.
    pub(super) parked: bool,
    /// An ordering key.
    pub(super) key: Option<KeyId>,
}

/// A message to park for `delay`, boxed in [`Done::Park`]: failures are rare, and every
/// call's [`Done`] (in spawned calls, a task's output and a channel slot) is as large
/// as its largest variant.
pub(super) struct Parking {
    pub(super) key: Option<KeyId>,
    pub(super) message: Message,
    pub(super) settle: Settle,
    pub(super) delay: Duration,
    pub(super) panicked: bool,
}

#[derive(Clone, Copy, Debug)]
pub(super) enum Settled {
    Acked(Outcome),
    Nacked,
    Aborted,
}

/// A message's ordering key as the Worker tracks it: the key's 64-bit hash. Keys that
/// share a hash share one order, which is safe (an order only gets stricter) and, with
/// the map's random seed, rare; tracking hashes copies and compares no key bytes, and
/// a partition's key is never built as text.
pub(super) type KeyId = u64;

pub(super) fn order_key(
    mode: OrderingMode,
    msg: &Message,
    hasher: &foldhash::fast::RandomState,
) -> Option<KeyId> {
    match mode {
        OrderingMode::Unordered => None,
        OrderingMode::PerKey => msg.key.as_deref().map(|k| hasher.hash_one(k)),
        OrderingMode::PerPartition => {
            let source = &msg.metadata.source;
            Some(hasher.hash_one((&*source.destination, source.partition.unwrap_or(-1))))
        }
    }
}

pub(super) struct State {
    pub(super) report: Report,
    /// Handler calls running (they hold concurrency slots).
    pub(super) running: usize,
    /// Messages parked by the Worker.
    pub(super) parked: usize,
    /// Keys (as [`KeyId`]s) with a message running or parked; the queue holds later
    /// messages of the key. Its hasher, foldhash randomly seeded, also makes the key ids:
    /// a fraction of SipHash's cost per delivery. The map holds only keys in flight or
    /// parked and the messages waiting behind them (at most `max_waiting`), so even
    /// chosen collisions slow a bounded set.
    pub(super) busy: HashMap<KeyId, VecDeque<Delivery>, foldhash::fast::RandomState>,
    /// Messages in `busy`'s queues.
    pub(super) waiting: usize,
    /// Messages whose key is reserved for them, ready to run.
    pub(super) runnable: VecDeque<Delivery>,
    pub(super) tasks: Tasks,
    pub(super) intake_open: bool,
    /// How long one settle may take.
    pub(super) settle_timeout: Duration,
}

impl State {
    pub(super) fn new(config: &Config) -> Self {
        State {
            report: Report::default(),
            running: 0,
            parked: 0,
            busy: HashMap::default(),
            waiting: 0,
            runnable: VecDeque::new(),
            tasks: Tasks::new(config.execution),
            intake_open: true,
            settle_timeout: config.settle_timeout,
        }
    }

    pub(super) fn handle_done(&mut self, done: Done, ctx: &TaskCtx) {
        match done {
            Done::Crashed { panic, held } => {
                tracing::error!(
                    panic = %panic, call = held.call, parked = held.parked,
                    "a worker task panicked outside the handler; its message is left to the broker to deliver again"
                );
                // What it held is free again: a key kept by a task that is gone would
                // hold back its key's (or partition's) messages for good.
                self.report.crashed += 1;
                self.running -= usize::from(held.call);
                self.parked -= usize::from(held.parked);
                self.release_key(held.key);
            }
            Done::Settled {
                key,
                settled,
                panicked,
                settle_error,
            } => {
                self.running -= 1;
                self.report.panicked += u64::from(panicked);
                self.report.settle_errors += u64::from(settle_error);
                match settled {
                    Settled::Acked(o) => {
                        // An ack the broker refused is counted in `settle_errors`: the
                        // broker delivers that message again.
                        self.report.acked += u64::from(!settle_error);
                        match o {
                            Outcome::DeadLettered => self.report.dead_lettered += 1,
                            Outcome::Deduplicated => self.report.deduplicated += 1,
                            Outcome::Skipped => self.report.skipped += 1,
                            _ => self.report.processed += 1,
                        }
                    }
                    Settled::Nacked => self.report.nacked += 1,
                    Settled::Aborted => self.report.in_flight_at_deadline += 1,
                }
                self.release_key(key);
            }
            Done::Park(parking) => {
                let Parking {
                    key,
                    message,
                    settle,
                    delay,
                    panicked,
                } = *parking;
                self.running -= 1;
                self.parked += 1;
                self.report.parked += 1;
                self.report.panicked += u64::from(panicked);
                self.tasks.spawn(
                    park(
                        message,
                        settle,
                        key,
                        delay,
                        ctx.settle_timeout,
                        ctx.renew_every,
                        ctx.lease,
                        ctx.shutdown.rx.clone(),
                    ),
                    Held {
                        call: false,
                        parked: true,
                        key,
                    },
                );
            }
            Done::Unpark(unparked) => {
                let (mut message, settle) = *unparked;
                self.parked -= 1;
                message.metadata.attempt = message.metadata.attempt.saturating_add(1);
                self.runnable
                    .push_front(Delivery::from_parts(message, settle));
            }
            Done::HandedBack {
                key,
                parked,
                count,
                settle_errors,
            } => {
                if parked {
                    self.parked -= 1;
                }
                self.report.handed_back += count;
                self.report.settle_errors += settle_errors;
                self.release_key(key);
            }
        }
        if !self.intake_open {
            self.hand_back_waiting();
        }
    }

    /// Frees `key`, or makes its next waiting message runnable.
    fn release_key(&mut self, key: Option<KeyId>) {
        let Some(key) = key else { return };
        let Some(queue) = self.busy.get_mut(&key) else {
            return;
        };
        match queue.pop_front() {
            Some(next) => {
                self.waiting -= 1;
                self.runnable.push_back(next);
            }
            None => {
                self.busy.remove(&key);
            }
        }
    }

    /// Hands deliveries back to the broker without running them; releases `key` after.
    pub(super) fn hand_back(&mut self, back: Vec<Delivery>, key: Option<KeyId>) {
        let held = Held {
            call: false,
            parked: false,
            key,
        };
        let limit = self.settle_timeout;
        self.tasks.spawn(
            async move {
                let count = back.len() as u64;
                let mut settle_errors = 0;
                for d in back {
                    let settled = bounded(d.hand_back(), limit).await;
                    settle_errors += u64::from(log_settle(settled, "hand back"));
                }
                Done::HandedBack {
                    key,
                    parked: false,
                    count,
                    settle_errors,
                }
            },
            held,
        );
    }

    /// At shutdown, everything not yet started goes back to the broker.
    pub(super) fn hand_back_waiting(&mut self) {
        let mut back: Vec<Delivery> = self.runnable.drain(..).collect();
        for queue in self.busy.values_mut() {
            back.extend(queue.drain(..));
        }
        self.waiting = 0;
        if !back.is_empty() {
            self.hand_back(back, None);
        }
    }
}
