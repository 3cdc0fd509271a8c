//! The Worker: takes deliveries from a [`Consumer`], runs them through a tower service
//! and settles each exactly once.
//!
//! ```
//! use std::time::Duration;
//! use redrive_core::memory::MemoryBroker;
//! use redrive_core::{handler, Message, OutgoingMessage, Publisher, Worker};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let broker = MemoryBroker::new();
//! broker.publish("orders", OutgoingMessage::new("hello")).await?;
//!
//! let worker = Worker::builder(broker.consumer("orders"))
//!     .handler(handler::handler_fn(|msg: Message| async move {
//!         println!("got {:?}", msg.payload);
//!         Ok::<_, std::io::Error>(())
//!     }))
//!     .concurrency(8)
//!     .build()?;
//!
//! let report = worker.run_until(tokio::time::sleep(Duration::from_millis(50))).await;
//! assert_eq!(report.acked, 1);
//! # Ok(())
//! # }
//! ```
//!
//! # Guarantees
//! - **Backpressure**: the Worker waits for the service's `poll_ready` before it takes
//!   each delivery; a concurrency limit, a rate limit or an open breaker in the stack
//!   stop intake and leave messages in the broker.
//! - **Bounded concurrency**: at most `concurrency` handler calls run at once.
//! - **Settlement**: `Ok` → ack; `Err` → nack with the error's `retry_after` or the
//!   [`Redelivery`] backoff, or park (below). Each delivery is settled exactly once.
//! - **Parking**: in [`OrderingMode::PerKey`] and [`OrderingMode::PerPartition`], and
//!   on any broker that cannot nack one message, a failed message is kept by the
//!   Worker and re-dispatched after its delay as the next attempt; later messages of
//!   its key wait, other keys flow on. A parked message does not hold a concurrency
//!   slot and keeps its lease extended. One that stops being this consumer's (a Kafka
//!   partition revoked) is handed back within 250 ms, freeing its key.
//! - **Leases**: while a message is in flight or parked, its lease is extended before
//!   it runs out ([`LeaseKeeping`]).
//! - **Panics** in the handler become an error for that message.
//! - **Shutdown** ([`Worker::run_until`]): intake stops, parked and waiting messages
//!   are handed back to the broker, in-flight messages get until the deadline to
//!   finish, then are handed back; the returned [`Report`] says what happened.
//! - **Dropping** the Worker's future instead ends its calls at once. With
//!   [`Execution::Spawned`], calls and parked messages are handed back, as at the
//!   shutdown deadline; with [`Execution::InTask`] they go with the future unsettled,
//!   and the broker delivers them again once their lease runs out or the consumer's
//!   connection closes.

mod builder;
mod config;

use std::collections::{HashMap, VecDeque};
use std::future::{Future, poll_fn};
use std::hash::BuildHasher;
use std::panic::AssertUnwindSafe;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use tokio::sync::{mpsc, watch};
use tower::Service;

use builder::Plan;
pub use builder::{NoService, Pipeline, Staged, WorkerBuilder};
use config::Config;
pub use config::{Execution, LeaseKeeping, OrderingMode, Redelivery};

use crate::classify::{Classification, Classifier, ErrorKind};
use crate::handler::Panicked;
use crate::{
    BoxError, Capabilities, Consumer, Delivery, Error, Extensions, Message, Outcome, Result, Settle,
};

/// What a Worker did, returned when it stops.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Report {
    /// Deliveries taken from the consumer.
    pub received: u64,
    /// Deliveries acked (and the ack accepted by the broker).
    pub acked: u64,
    /// Handled successfully (acked, or the ack failed and is in `settle_errors`).
    pub processed: u64,
    /// Dead-lettered by the stack (counted like `processed`).
    pub dead_lettered: u64,
    /// Skipped as duplicates (counted like `processed`).
    pub deduplicated: u64,
    /// Skipped deliberately by a layer (counted like `processed`).
    pub skipped: u64,
    /// Deliveries nacked after a failure.
    pub nacked: u64,
    /// Times a failed message was parked by the Worker.
    pub parked: u64,
    /// Handler calls that panicked.
    pub panicked: u64,
    /// Worker tasks that panicked outside the handler (an adapter's acker, the Worker
    /// itself; a user's classifier or error `Display` is caught where it runs and the
    /// message still settled). Their slot, parked place and ordering key were freed and
    /// their message left to its acker's drop: the broker delivers it again, possibly
    /// after later messages of its key (an order kept forever behind a task that is gone
    /// would stop the key for good).
    pub crashed: u64,
    /// Deliveries handed back unprocessed at shutdown (waiting or parked).
    pub handed_back: u64,
    /// Deliveries still running at the shutdown deadline, handed back.
    pub in_flight_at_deadline: u64,
    /// Settle or lease calls the broker refused (the broker redelivers those messages).
    pub settle_errors: u64,
}

/// The runtime. See the [module docs](self).
pub struct Worker<C, S> {
    consumer: C,
    service: S,
    config: Config,
    caps: Capabilities,
    plan: Plan,
}

impl<C, S> std::fmt::Debug for Worker<C, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("name", &self.config.name)
            .field("capabilities", &self.caps)
            .field("plan", &self.plan)
            .finish_non_exhaustive()
    }
}

/// Tells layers that the Worker's shutdown has begun, so they stop starting new work
/// (a retry layer stops retrying). The Worker puts one in every message's
/// [`extensions`](crate::Message::extensions).
///
/// ```
/// # use redrive_core::{Message, worker::Shutdown};
/// # fn f(msg: &Message) {
/// if msg.extensions.get::<Shutdown>().is_some_and(Shutdown::is_started) {
///     // do not retry
/// }
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct Shutdown {
    rx: watch::Receiver<Stop>,
}

impl Shutdown {
    /// A signal that never fires, for tests and for services run outside a Worker.
    pub fn never() -> Self {
        let (_, rx) = watch::channel(Stop::Running);
        Shutdown { rx }
    }

    /// A signal and the function that fires it, for tests and for custom runtimes.
    pub fn channel() -> (impl Fn() + Send + Sync + 'static, Self) {
        let (tx, rx) = watch::channel(Stop::Running);
        (
            move || {
                let _ = tx.send(Stop::Draining);
            },
            Shutdown { rx },
        )
    }

    /// Whether shutdown has begun.
    pub fn is_started(&self) -> bool {
        *self.rx.borrow() != Stop::Running
    }

    /// Completes when shutdown begins; never, if the signal's source is gone without
    /// having fired.
    pub async fn started(&self) {
        let mut rx = self.rx.clone();
        if rx.wait_for(|s| *s != Stop::Running).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Stop {
    Running,
    Draining,
    Abort,
}

enum Done {
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
struct Held {
    /// A concurrency slot (a handler call).
    call: bool,
    /// A place among the parked messages.
    parked: bool,
    /// An ordering key.
    key: Option<KeyId>,
}

/// A message to park for `delay`, boxed in [`Done::Park`]: failures are rare, and every
/// call's [`Done`] (in spawned calls, a task's output and a channel slot) is as large
/// as its largest variant.
struct Parking {
    key: Option<KeyId>,
    message: Message,
    settle: Settle,
    delay: Duration,
    panicked: bool,
}

#[derive(Clone, Copy, Debug)]
enum Settled {
    Acked(Outcome),
    Nacked,
    Aborted,
}

impl<C, S> Worker<C, S>
where
    C: Consumer,
    S: Service<Message> + Send + 'static,
    S::Response: Into<Outcome> + Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
    S::Future: Send + 'static,
{
    /// What the consumer declared it can do.
    pub fn capabilities(&self) -> Capabilities {
        self.caps
    }

    /// Runs until the consumer closes, then drains.
    pub fn run(self) -> impl Future<Output = Report> + Send {
        self.run_until(std::future::pending())
    }

    /// Runs until `shutdown` completes (or the consumer closes), then shuts down
    /// gracefully: see the module's guarantees.
    ///
    /// ```no_run
    /// # async fn f(worker: redrive_core::Worker<redrive_core::memory::MemoryConsumer, redrive_core::handler::HandlerFn<fn(redrive_core::Message) -> std::future::Ready<Result<(), std::io::Error>>>>) {
    /// let report = worker.run_until(redrive_core::shutdown_signal()).await; // SIGTERM or Ctrl-C
    /// # }
    /// ```
    #[allow(
        clippy::manual_async_fn,
        reason = "the `Send` bound must be stated here, where the service's bounds are known"
    )]
    pub fn run_until<F>(self, shutdown: F) -> impl Future<Output = Report> + Send
    where
        F: Future<Output = ()> + Send,
    {
        // The future is declared `Send` here, where the service's bounds are known, so
        // callers can spawn it whatever the handler's error type.
        async move {
            let Worker {
                mut consumer,
                mut service,
                config,
                caps,
                plan,
            } = self;
            let name = config.name.as_str();
            let (stop_tx, stop_rx) = watch::channel(Stop::Running);
            // Polled only when it has woken, not on every turn of the loop: a shutdown
            // signal built on a `Notify` (a `CancellationToken`, say) takes a lock each
            // time it is polled.
            let mut shutdown = FuturesUnordered::from_iter([shutdown]);
            let mut deadline = pin!(tokio::time::sleep(Duration::MAX));
            let mut deadline_armed = false;
            let mut state = State {
                report: Report::default(),
                running: 0,
                parked: 0,
                busy: HashMap::default(),
                waiting: 0,
                runnable: VecDeque::new(),
                tasks: Tasks::new(config.execution),
                intake_open: true,
                settle_timeout: config.settle_timeout,
            };
            let mut ctx = TaskCtx {
                settle_timeout: config.settle_timeout,
                renew_every: plan.renew_every,
                lease: caps.lease,
                max_nack_delay: caps.max_nack_delay,
                park: plan.park,
                redelivery: config.redelivery,
                classifier: config.classifier.clone(),
                shutdown: Arc::new(Shutdown { rx: stop_rx }),
                signal: Extensions::new(),
            };
            ctx.signal.insert_shared(ctx.shutdown.clone());
            let mut receive_errors = 0u32;
            // After a failed receive, the broker is asked again only once this passes;
            // meanwhile the loop goes on reaping calls and watching for shutdown.
            let mut receive_pause = pin!(tokio::time::sleep(Duration::ZERO));
            let mut receive_paused = false;
            let mut parked_full_logged = false;
            tracing::debug!(worker = name, ?caps, ?plan, "worker started");

            loop {
                if !state.intake_open && !deadline_armed {
                    // Intake just closed: parked and waiting messages go back, the deadline starts.
                    let _ = stop_tx.send(Stop::Draining);
                    deadline
                        .as_mut()
                        .reset(tokio::time::Instant::now() + config.shutdown_timeout);
                    deadline_armed = true;
                    state.hand_back_waiting();
                }
                // Phase A: reap finished tasks; wait for a free slot and a ready service.
                let parked_full = state.parked >= config.max_parked;
                if parked_full && !parked_full_logged {
                    tracing::warn!(
                        worker = name,
                        parked = state.parked,
                        "the Worker holds max_parked failed messages; intake paused until one runs again"
                    );
                }
                parked_full_logged = parked_full;
                let want = state.running < config.concurrency
                    && (!state.runnable.is_empty()
                        || (state.intake_open && state.waiting < plan.max_waiting && !parked_full));
                if !want && state.tasks.is_empty() {
                    break;
                }
                tokio::select! {
                    biased;
                    Some(()) = shutdown.next(), if state.intake_open => {
                        tracing::info!(worker = name, "shutdown requested; intake stopped");
                        state.intake_open = false;
                        continue;
                    }
                    Some(done) = state.tasks.next(), if !state.tasks.is_empty() => {
                        state.handle_done(done, &ctx);
                        continue;
                    }
                    () = &mut deadline, if deadline_armed && *stop_tx.borrow() != Stop::Abort => {
                        tracing::warn!(worker = name, in_flight = state.running, "shutdown deadline reached; handing back in-flight messages");
                        let _ = stop_tx.send(Stop::Abort);
                        continue;
                    }
                    ready = poll_fn(|cx| service.poll_ready(cx)), if want => {
                        if let Err(e) = ready {
                            let e: BoxError = e.into();
                            tracing::error!(worker = name, error = %logged(&e), "service failed; stopping intake");
                            state.intake_open = false;
                            continue;
                        }
                    }
                }

                // Phase B: take the next delivery: a runnable one (its key is already
                // reserved for it) first, else one from the broker.
                let (delivery, reserved) = if let Some(d) = state.runnable.pop_front() {
                    (d, true)
                } else {
                    // Completions matter while waiting for the broker only when they can make
                    // work runnable: a key released, a message parked or unparked. Calls
                    // polled in this task make progress only while it polls them.
                    let listen = state.waiting > 0
                        || state.parked > 0
                        || (plan.park && state.running > 0)
                        || (config.execution == Execution::InTask && !state.tasks.is_empty())
                        || (receive_paused && !state.tasks.is_empty());
                    tokio::select! {
                        biased;
                        Some(()) = shutdown.next(), if state.intake_open => {
                            tracing::info!(worker = name, "shutdown requested; intake stopped");
                            state.intake_open = false;
                            continue;
                        }
                        Some(done) = state.tasks.next(), if listen => {
                            state.handle_done(done, &ctx);
                            continue;
                        }
                        () = &mut receive_pause, if receive_paused => {
                            receive_paused = false;
                            continue;
                        }
                        received = consumer.receive(), if !receive_paused => match received {
                            Ok(Some(d)) => {
                                receive_errors = 0;
                                state.report.received += 1;
                                (d, false)
                            }
                            Ok(None) => {
                                tracing::info!(worker = name, "consumer closed; draining");
                                state.intake_open = false;
                                continue;
                            }
                            Err(e) => {
                                receive_errors += 1;
                                let pause = Duration::from_millis(50 << receive_errors.min(7));
                                tracing::warn!(worker = name, error = %logged(&e), ?pause, "receive failed; trying again");
                                receive_pause.as_mut().reset(tokio::time::Instant::now() + pause);
                                receive_paused = true;
                                continue;
                            }
                        }
                    }
                };

                let key = order_key(config.ordering, &delivery.message, state.busy.hasher());
                if let (Some(k), false) = (key, reserved) {
                    if let Some(queue) = state.busy.get_mut(&k) {
                        queue.push_back(delivery);
                        state.waiting += 1;
                        continue;
                    }
                    state.busy.insert(k, VecDeque::new());
                }
                // Marked running before the check: a revoke that begins in between
                // either sees this run and waits for it, or is seen here.
                delivery.running(true);
                if !delivery.is_current() {
                    // The broker gave it to another consumer: hand it back unrun, and
                    // its key with it.
                    delivery.running(false);
                    tracing::info!(
                        worker = name,
                        message_id = delivery
                            .message
                            .metadata
                            .message_id
                            .as_deref()
                            .unwrap_or(""),
                        "delivery no longer this consumer's (partition revoked); handed back without running"
                    );
                    state.hand_back(vec![delivery], key);
                    continue;
                }
                state.running += 1;
                let call = run_one(&mut service, delivery, key, &ctx);
                if let Some(done) = state.tasks.start(call, key) {
                    state.handle_done(done, &ctx);
                }
            }

            if let Err(e) = consumer.close().await {
                tracing::warn!(worker = name, error = %e, "consumer close failed");
            }
            tracing::info!(worker = name, report = ?state.report, "worker stopped");
            state.report
        }
    }
}

/// A message's ordering key as the Worker tracks it: the key's 64-bit hash. Keys that
/// share a hash share one order, which is safe (an order only gets stricter) and, with
/// the map's random seed, rare; tracking hashes copies and compares no key bytes, and
/// a partition's key is never built as text.
type KeyId = u64;

fn order_key(
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

struct TaskCtx {
    /// How long one settle may take.
    settle_timeout: Duration,
    renew_every: Option<Duration>,
    lease: Option<Duration>,
    max_nack_delay: Duration,
    park: bool,
    redelivery: Redelivery,
    classifier: Classifier,
    /// The signal every message carries, made once and shared; its receiver is also
    /// the one calls and parked messages watch.
    shutdown: Arc<Shutdown>,
    /// Extensions holding only `shutdown`, shared by every message that arrives without
    /// extensions of its own, so handing a message the signal allocates nothing.
    signal: Extensions,
}

struct State {
    report: Report,
    /// Handler calls running (they hold concurrency slots).
    running: usize,
    /// Messages parked by the Worker.
    parked: usize,
    /// Keys (as [`KeyId`]s) with a message running or parked; the queue holds later
    /// messages of the key. Its hasher, foldhash randomly seeded, also makes the key ids:
    /// a fraction of SipHash's cost per delivery. The map holds only keys in flight or
    /// parked and the messages waiting behind them (at most `max_waiting`), so even
    /// chosen collisions slow a bounded set.
    busy: HashMap<KeyId, VecDeque<Delivery>, foldhash::fast::RandomState>,
    /// Messages in `busy`'s queues.
    waiting: usize,
    /// Messages whose key is reserved for them, ready to run.
    runnable: VecDeque<Delivery>,
    tasks: Tasks,
    intake_open: bool,
    /// How long one settle may take.
    settle_timeout: Duration,
}

/// The Worker's running calls and timers, spawned or polled in place by [`Execution`].
///
/// Spawned ones report back through a channel rather than through their join handles:
/// a join handle in a `FuturesUnordered` costs two allocations and two wake-ups per
/// call, a channel send one wake-up and at most an allocation per 32 calls. They are
/// not aborted when the Worker's future is dropped: they watch the Worker's stop
/// signal, whose sender goes with it, and each then ends like a call at the shutdown
/// deadline (the handler future dropped, the message handed back) or a parked message
/// at shutdown (handed back).
struct Tasks {
    execution: Execution,
    /// Polled in the Worker's task ([`Execution::InTask`]).
    local: FuturesUnordered<LocalTask>,
    /// Spawned and not yet reported back.
    spawned: usize,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
}

/// A call or timer polled in the Worker's task.
type LocalTask = Pin<Box<dyn Future<Output = Done> + Send>>;

impl Tasks {
    fn new(execution: Execution) -> Self {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Tasks {
            execution,
            local: FuturesUnordered::new(),
            spawned: 0,
            done_tx,
            done_rx,
        }
    }

    /// Runs a task that holds `held`; a panic in it (the handler's own are caught in
    /// the call) still reports back, as [`Done::Crashed`], in either execution mode, so
    /// the Worker never waits for a task that is gone nor keeps what it held.
    fn spawn(&mut self, fut: impl Future<Output = Done> + Send + 'static, held: Held) {
        let fut = guarded(fut, held);
        match self.execution {
            Execution::InTask => self.local.push(Box::pin(fut)),
            Execution::Spawned => {
                let done = self.done_tx.clone();
                self.spawned += 1;
                // The receiver lives as long as the Worker; a send after it is gone
                // has no one to tell.
                //
                // The call is boxed: tokio moves a task's future by value several times
                // as it spawns and runs it, and a call's is several hundred bytes, which
                // would also put the task's allocation on glibc's slower path for large
                // blocks.
                let fut = Box::pin(fut);
                tokio::spawn(async move {
                    let _ = done.send(fut.await);
                });
            }
        }
    }

    /// Starts a call that holds `key`. In [`Execution::InTask`] it is polled once at
    /// once, and one that completes there (a handler with nothing to wait for, an ack
    /// the broker takes synchronously) is returned without ever entering the set.
    fn start(
        &mut self,
        call: impl Future<Output = Done> + Send + 'static,
        key: Option<KeyId>,
    ) -> Option<Done> {
        let held = Held {
            call: true,
            parked: false,
            key,
        };
        if self.execution == Execution::Spawned {
            self.spawn(call, held);
            return None;
        }
        let mut call: LocalTask = Box::pin(guarded(call, held));
        // Polled with a waker that does nothing: a call still pending is pushed into
        // the set, which polls it again before it waits, with its own waker.
        match call.as_mut().now_or_never() {
            Some(done) => Some(done),
            None => {
                self.local.push(call);
                None
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.local.is_empty() && self.spawned == 0
    }

    /// The next task to end; cancel-safe. `None` when none is running.
    async fn next(&mut self) -> Option<Done> {
        if self.spawned == 0 {
            return self.local.next().await;
        }
        tokio::select! {
            Some(done) = self.local.next(), if !self.local.is_empty() => Some(done),
            // Never `None`: the Worker holds a sender.
            Some(done) = self.done_rx.recv() => {
                self.spawned -= 1;
                Some(done)
            }
        }
    }
}

impl State {
    fn handle_done(&mut self, done: Done, ctx: &TaskCtx) {
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
    fn hand_back(&mut self, back: Vec<Delivery>, key: Option<KeyId>) {
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
    fn hand_back_waiting(&mut self) {
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

fn run_one<S>(
    service: &mut S,
    delivery: Delivery,
    key: Option<KeyId>,
    ctx: &TaskCtx,
) -> impl Future<Output = Done> + Send + 'static
where
    S: Service<Message>,
    S::Response: Into<Outcome> + Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
    S::Future: Send + 'static,
{
    let (mut message, settle) = delivery.into_parts();
    // Copied before the signal goes in: a message from the broker has no extensions,
    // so the copy shares none, and what the service adds is not copied on write.
    // Run again after parking, the copy gets the signal then.
    let parked_copy = ctx.park.then(|| message.clone());
    if message.extensions.is_empty() {
        // A layer that adds an extension copies the shared list first.
        message.extensions = ctx.signal.clone();
    } else {
        message.extensions.insert_shared(ctx.shutdown.clone());
    }
    let attempt = message.metadata.attempt;
    let call = std::panic::catch_unwind(AssertUnwindSafe(|| service.call(message)));
    let renew_every = ctx.renew_every;
    let lease = ctx.lease;
    let max_nack_delay = ctx.max_nack_delay;
    let redelivery = ctx.redelivery;
    let classifier = ctx.classifier.clone();
    let settle_timeout = ctx.settle_timeout;
    let mut stop = ctx.shutdown.rx.clone();

    async move {
        let result: Option<std::result::Result<Outcome, (BoxError, bool)>> = match call {
            Err(panic) => Some(Err((Panicked::from_payload(panic).into(), true))),
            Ok(fut) => {
                // The response's conversion runs inside the catch too: it is user code.
                let fut = AssertUnwindSafe(fut.map(|r| r.map(Into::into).map_err(Into::into)))
                    .catch_unwind();
                let keeper = keep_lease(&settle, renew_every, lease);
                // The call first: one that completes on its first poll never sets up
                // the lease timer or the abort watch (which takes the watch's lock to
                // register, and again to deregister).
                tokio::select! {
                    biased;
                    r = fut => Some(match r {
                        Ok(Ok(outcome)) => Ok(outcome),
                        // A panic the stack caught (and turned into an error every layer
                        // saw) is counted as one all the same.
                        Ok(Err(e)) => {
                            let panicked = is_panic(&*e);
                            Err((e, panicked))
                        }
                        Err(panic) => Err((Panicked::from_payload(panic).into(), true)),
                    }),
                    () = keeper => unreachable!("lease keeping never ends"),
                    _ = stop.wait_for(|s| *s == Stop::Abort) => None,
                }
            }
        };
        match result {
            None => {
                let settled = bounded(settle.nack(Duration::ZERO), settle_timeout).await;
                let settle_error = log_settle(settled, "nack after the shutdown deadline");
                Done::Settled {
                    key,
                    settled: Settled::Aborted,
                    panicked: false,
                    settle_error,
                }
            }
            Some(Ok(outcome)) => {
                let settle_error = log_settle(bounded(settle.ack(), settle_timeout).await, "ack");
                Done::Settled {
                    key,
                    settled: Settled::Acked(outcome),
                    panicked: false,
                    settle_error,
                }
            }
            Some(Err((err, panicked))) => {
                // The classifier and the error's `Display` are user code: a panic in
                // either must not take the message's fate with it.
                let class =
                    std::panic::catch_unwind(AssertUnwindSafe(|| classifier.classify(&*err)))
                        .unwrap_or_else(|panic| {
                            tracing::error!(
                                attempt, panic = %logged(&Panicked::from_payload(panic)),
                                "the classifier panicked; the failure is taken as transient"
                            );
                            Classification::TRANSIENT
                        });
                let delay = class
                    .retry_after
                    .unwrap_or_else(|| redelivery.delay(attempt));
                let error = logged(&*err);
                if class.kind == ErrorKind::Permanent {
                    tracing::error!(
                        attempt, error = %error,
                        "permanent error reached the Worker; add a dead-letter layer to take such messages out of the queue"
                    );
                } else {
                    tracing::warn!(attempt, error = %error, ?delay, "handler failed");
                }
                match parked_copy {
                    Some(message) => {
                        settle.running(false);
                        Done::Park(Box::new(Parking {
                            key,
                            message,
                            settle,
                            delay,
                            panicked,
                        }))
                    }
                    None => {
                        let delay = delay.min(max_nack_delay);
                        let settled = bounded(settle.nack(delay), settle_timeout).await;
                        let settle_error = log_settle(settled, "nack");
                        Done::Settled {
                            key,
                            settled: Settled::Nacked,
                            panicked,
                            settle_error,
                        }
                    }
                }
            }
        }
    }
}

/// Extends the lease every `every` for as long as it is polled.
async fn keep_lease(settle: &Settle, every: Option<Duration>, lease: Option<Duration>) {
    let (Some(every), Some(lease)) = (every, lease) else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(every).await;
        if let Err(e) = settle.extend(lease).await {
            tracing::warn!(error = %e, "lease extension failed; the broker may redeliver this message");
        }
    }
}

/// How often a parked message checks that it is still this consumer's
/// ([`Acker::is_current`](crate::Acker::is_current)): a message whose partition was
/// revoked leaves its park within this, and frees its key for the new assignment.
const PARKED_CURRENT_CHECK: Duration = Duration::from_millis(250);

/// Why a parked message left its park.
enum Unparked {
    /// Its delay passed: it runs again.
    Due,
    /// Shutdown began: it goes back to the broker.
    Shutdown,
    /// It is no longer this consumer's: it goes back untried.
    NotCurrent,
}

#[allow(clippy::too_many_arguments, reason = "one place, called once")]
async fn park(
    message: Message,
    settle: Settle,
    key: Option<KeyId>,
    delay: Duration,
    settle_timeout: Duration,
    renew_every: Option<Duration>,
    lease: Option<Duration>,
    mut stop: watch::Receiver<Stop>,
) -> Done {
    let keeper = keep_lease(&settle, renew_every, lease);
    let unparked = tokio::select! {
        () = tokio::time::sleep(delay) => Unparked::Due,
        () = keeper => unreachable!("lease keeping never ends"),
        _ = stop.wait_for(|s| *s >= Stop::Draining) => Unparked::Shutdown,
        () = no_longer_current(&settle) => Unparked::NotCurrent,
    };
    let settled = match unparked {
        Unparked::Due => return Done::Unpark(Box::new((message, settle))),
        Unparked::Shutdown => bounded(settle.nack(Duration::ZERO), settle_timeout).await,
        Unparked::NotCurrent => {
            tracing::info!(
                message_id = message.metadata.message_id.as_deref().unwrap_or(""),
                "parked delivery no longer this consumer's (partition revoked); handed back before its delay"
            );
            bounded(settle.hand_back(), settle_timeout).await
        }
    };
    Done::HandedBack {
        key,
        parked: true,
        count: 1,
        settle_errors: u64::from(log_settle(settled, "hand back")),
    }
}

/// Completes once `settle`'s message is no longer this consumer's, checking every
/// [`PARKED_CURRENT_CHECK`].
async fn no_longer_current(settle: &Settle) {
    let start = tokio::time::Instant::now() + PARKED_CURRENT_CHECK;
    let mut every = tokio::time::interval_at(start, PARKED_CURRENT_CHECK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if !settle.is_current() {
            return;
        }
    }
}

/// `settle`, given up after `limit`: a broker that does not answer (a connection it
/// blocks) cannot hold a call's slot, or shutdown, for longer.
async fn bounded(settle: impl Future<Output = Result<()>>, limit: Duration) -> Result<()> {
    match tokio::time::timeout(limit, settle).await {
        Ok(settled) => settled,
        Err(_) => Err(Error::broker(format!(
            "the broker did not answer within the settle timeout ({limit:?})"
        ))),
    }
}

fn log_settle(r: Result<()>, what: &str) -> bool {
    match r {
        Ok(()) => false,
        Err(e) => {
            tracing::warn!(settle = what, error = %e, "settling failed; the broker will redeliver the message");
            true
        }
    }
}

/// `future`, with a panic inside it turned into [`Done::Crashed`] for what it `held`.
fn guarded(
    future: impl Future<Output = Done> + Send + 'static,
    held: Held,
) -> impl Future<Output = Done> + Send + 'static {
    AssertUnwindSafe(future).catch_unwind().map(move |r| {
        r.unwrap_or_else(|panic| Done::Crashed {
            panic: Panicked::from_payload(panic).message().to_owned(),
            held,
        })
    })
}

/// Whether `err` or one of its sources is a caught panic.
fn is_panic(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(e) = next {
        if e.is::<Panicked>() {
            return true;
        }
        next = e.source();
    }
    false
}

/// The most bytes of an error's text a Worker log line carries: error text can quote a
/// payload (a decoder's "invalid value" quotes the value).
const MAX_LOGGED_ERROR: usize = 1024;

/// An error for a log line: bounded, and safe from a `Display` that panics.
fn logged<E: std::fmt::Display + ?Sized>(err: &E) -> crate::text::Bounded<'_, E> {
    crate::text::bounded(err, MAX_LOGGED_ERROR)
}
