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
mod call;
mod config;
mod health;
mod report;
mod shutdown;
mod state;
mod tasks;

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt as _};
use tokio::sync::watch;
use tokio::time::Sleep;
use tower::Service;

use builder::Plan;
pub use builder::{NoService, Pipeline, Staged, WorkerBuilder};
use call::{TaskCtx, logged, run_one};
use config::Config;
pub use config::{Execution, LeaseKeeping, OrderingMode, Redelivery};
use health::StoppedOnDrop;
pub use health::{Health, HealthReport, Phase};
pub use report::Report;
pub use shutdown::Shutdown;
use shutdown::Stop;
use state::{State, order_key};

use crate::{Backoff, BoxError, Capabilities, Consumer, Delivery, Jitter, Message, Outcome};

/// The pause after receives fail in a row: 100 ms doubling to 6.4 s. Not jittered:
/// the broker clients jitter their own reconnects.
const RECEIVE_BACKOFF: Backoff =
    Backoff::exponential(Duration::from_millis(100), Duration::from_millis(6400))
        .with_jitter(Jitter::None);

/// The runtime. See the [module docs](self).
pub struct Worker<C, S> {
    consumer: C,
    service: S,
    config: Config,
    caps: Capabilities,
    plan: Plan,
    health: Health,
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

    /// A handle on this Worker's state, for liveness and readiness probes: see
    /// [`Health`]. Take it before running the Worker; it stays valid after.
    pub fn health(&self) -> Health {
        self.health.clone()
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
            let mut run = Run::new(self, shutdown);
            loop {
                run.publish_counts();
                run.drain_once_closed();
                let want = run.wants_delivery();
                if !want && run.state.tasks.is_empty() {
                    break;
                }
                if run.reap_or_ready(want).await {
                    run.take_next().await;
                }
            }
            run.finish().await
        }
    }
}

/// One run of a Worker: what its loop holds from turn to turn.
///
/// Each turn of [`Worker::run_until`]'s loop starts the drain once intake has closed
/// ([`drain_once_closed`](Run::drain_once_closed)), works out whether it wants a delivery
/// ([`wants_delivery`](Run::wants_delivery)), waits for a task to end, the shutdown
/// signal or deadline, or the service to be ready ([`reap_or_ready`](Run::reap_or_ready)),
/// then takes the next delivery ([`take_next`](Run::take_next)) and starts it
/// ([`dispatch`](Run::dispatch)). Whatever comes first ends the turn; the next one looks
/// again.
struct Run<C, S, F> {
    // Fields are dropped in the order written, as the loop's locals were: when the
    // Worker's future is dropped, calls polled in its task (in `state`) go before the
    // stop signal, and all of them before the consumer whose deliveries they hold.
    /// After a failed receive, the broker is asked again only once this passes;
    /// meanwhile the loop goes on reaping calls and watching for shutdown.
    receive_pause: Pin<Box<Sleep>>,
    receive_paused: bool,
    /// Receives that failed in a row; they set the length of the pause.
    receive_errors: u32,
    /// Whether the warning that `max_parked` is reached was logged (once per time).
    parked_full_logged: bool,
    ctx: TaskCtx,
    state: State,
    /// When in-flight calls are handed back, armed once intake closes.
    deadline: Pin<Box<Sleep>>,
    deadline_armed: bool,
    /// The caller's shutdown future, polled only when it has woken, not on every turn of
    /// the loop: a shutdown signal built on a `Notify` (a `CancellationToken`, say) takes
    /// a lock each time it is polled.
    shutdown: FuturesUnordered<F>,
    /// The stop stage every call and parked message watches.
    stop: watch::Sender<Stop>,
    plan: Plan,
    config: Config,
    service: S,
    consumer: C,
    /// What probes read; marks the Worker stopped when the run ends or is dropped.
    health: StoppedOnDrop,
}

impl<C, S, F> Run<C, S, F>
where
    C: Consumer,
    S: Service<Message> + Send + 'static,
    S::Response: Into<Outcome> + Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
    S::Future: Send + 'static,
    F: Future<Output = ()> + Send,
{
    fn new(worker: Worker<C, S>, shutdown: F) -> Self {
        let Worker {
            consumer,
            service,
            config,
            caps,
            plan,
            health,
        } = worker;
        health.set_phase(Phase::Consuming);
        let (stop, stop_rx) = watch::channel(Stop::Running);
        let state = State::new(&config);
        let ctx = TaskCtx::new(&config, caps, plan, Shutdown { rx: stop_rx });
        tracing::debug!(
            worker = config.name.as_str(),
            ?caps,
            ?plan,
            "worker started"
        );
        Run {
            receive_pause: Box::pin(tokio::time::sleep(Duration::ZERO)),
            receive_paused: false,
            receive_errors: 0,
            parked_full_logged: false,
            ctx,
            state,
            deadline: Box::pin(tokio::time::sleep(Duration::MAX)),
            deadline_armed: false,
            shutdown: FuturesUnordered::from_iter([shutdown]),
            stop,
            plan,
            config,
            service,
            consumer,
            health: StoppedOnDrop(health),
        }
    }

    /// Copies the counts probes read into the Worker's [`Health`]: a few plain stores
    /// per turn.
    #[inline]
    fn publish_counts(&self) {
        let state = &self.state;
        self.health
            .0
            .counts(state.running, state.parked, state.waiting);
    }

    /// Once intake has closed: tells calls and parked messages, hands waiting messages
    /// back (parked ones go back themselves) and starts the shutdown deadline.
    #[inline]
    fn drain_once_closed(&mut self) {
        if self.state.intake_open || self.deadline_armed {
            return;
        }
        let _ = self.stop.send(Stop::Draining);
        self.health.0.set_phase(Phase::Draining);
        self.deadline
            .as_mut()
            .reset(tokio::time::Instant::now() + self.config.shutdown_timeout);
        self.deadline_armed = true;
        self.state.hand_back_waiting();
    }

    /// Whether the loop wants a delivery: a concurrency slot is free, and one is runnable
    /// or intake is open with room to wait and to park.
    // Left out of line, it costs a call on every turn (about 20 instructions a message
    // in the in-task bench, under callgrind).
    #[inline]
    fn wants_delivery(&mut self) -> bool {
        let state = &self.state;
        let parked_full = state.parked >= self.config.max_parked;
        if parked_full && !self.parked_full_logged {
            tracing::warn!(
                worker = self.config.name.as_str(),
                parked = state.parked,
                "the Worker holds max_parked failed messages; intake paused until one runs again"
            );
        }
        self.parked_full_logged = parked_full;
        state.running < self.config.concurrency
            && (!state.runnable.is_empty()
                || (state.intake_open && state.waiting < self.plan.max_waiting && !parked_full))
    }

    /// Reaps a finished task, or watches for shutdown and its deadline, or, when `want`,
    /// waits for the service to be ready. True once the service is ready for the next
    /// delivery; false when something else came first.
    async fn reap_or_ready(&mut self, want: bool) -> bool {
        let name = self.config.name.as_str();
        let state = &mut self.state;
        tokio::select! {
            biased;
            Some(()) = self.shutdown.next(), if state.intake_open => {
                tracing::info!(worker = name, "shutdown requested; intake stopped");
                state.intake_open = false;
                false
            }
            Some(done) = state.tasks.next(), if !state.tasks.is_empty() => {
                state.handle_done(done, &self.ctx);
                false
            }
            () = &mut self.deadline, if self.deadline_armed && *self.stop.borrow() != Stop::Abort => {
                tracing::warn!(worker = name, in_flight = state.running, "shutdown deadline reached; handing back in-flight messages");
                let _ = self.stop.send(Stop::Abort);
                false
            }
            ready = poll_fn(|cx| self.service.poll_ready(cx)), if want => match ready {
                Ok(()) => true,
                Err(e) => {
                    let e: BoxError = e.into();
                    tracing::error!(worker = name, error = %logged(&e), "service failed; stopping intake");
                    state.intake_open = false;
                    false
                }
            }
        }
    }

    /// Takes the next delivery and [`dispatch`](Run::dispatch)es it: a runnable one (its
    /// key is already reserved for it) first, else one from the broker. Returns without
    /// one when something else came first: a shutdown, a task's end, the end of a receive
    /// pause, a failed receive or the consumer's close.
    ///
    /// The delivery is dispatched here, not returned: handed out through this future's
    /// output, it would be copied once more per message.
    async fn take_next(&mut self) {
        let name = self.config.name.as_str();
        let state = &mut self.state;
        if let Some(delivery) = state.runnable.pop_front() {
            self.dispatch(delivery, true);
            return;
        }
        // Completions matter while waiting for the broker only when they can make
        // work runnable: a key released, a message parked or unparked. Calls
        // polled in this task make progress only while it polls them.
        let listen = state.waiting > 0
            || state.parked > 0
            || (self.plan.park && state.running > 0)
            || (self.config.execution == Execution::InTask && !state.tasks.is_empty())
            || (self.receive_paused && !state.tasks.is_empty());
        tokio::select! {
            biased;
            Some(()) = self.shutdown.next(), if state.intake_open => {
                tracing::info!(worker = name, "shutdown requested; intake stopped");
                state.intake_open = false;
            }
            Some(done) = state.tasks.next(), if listen => {
                state.handle_done(done, &self.ctx);
            }
            () = &mut self.receive_pause, if self.receive_paused => {
                self.receive_paused = false;
            }
            received = self.consumer.receive(), if !self.receive_paused => match received {
                Ok(Some(delivery)) => {
                    if self.receive_errors != 0 {
                        self.receive_errors = 0;
                        self.health.0.receive_failures(0);
                    }
                    self.health.0.received();
                    state.report.received += 1;
                    self.dispatch(delivery, false);
                }
                Ok(None) => {
                    tracing::info!(worker = name, "consumer closed; draining");
                    state.intake_open = false;
                }
                Err(e) => {
                    self.receive_errors += 1;
                    self.health.0.receive_failures(self.receive_errors);
                    let pause = RECEIVE_BACKOFF.delay_for(self.receive_errors);
                    tracing::warn!(worker = name, error = %logged(&e), ?pause, "receive failed; trying again");
                    self.receive_pause.as_mut().reset(tokio::time::Instant::now() + pause);
                    self.receive_paused = true;
                }
            }
        }
    }

    /// Starts `delivery`'s call, unless its key is busy (it waits behind it) or it is no
    /// longer this consumer's (it goes back unrun). `reserved`: its key is already
    /// reserved for it.
    fn dispatch(&mut self, delivery: Delivery, reserved: bool) {
        let state = &mut self.state;
        let key = order_key(self.config.ordering, &delivery.message, state.busy.hasher());
        if let (Some(k), false) = (key, reserved) {
            if let Some(queue) = state.busy.get_mut(&k) {
                queue.push_back(delivery);
                state.waiting += 1;
                return;
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
                worker = self.config.name.as_str(),
                message_id = delivery
                    .message
                    .metadata
                    .message_id
                    .as_deref()
                    .unwrap_or(""),
                "delivery no longer this consumer's (partition revoked); handed back without running"
            );
            state.hand_back(vec![delivery], key);
            return;
        }
        state.running += 1;
        let call = run_one(&mut self.service, delivery, key, &self.ctx);
        if let Some(done) = state.tasks.start(call, key) {
            state.handle_done(done, &self.ctx);
        }
    }

    /// Closes the consumer once every task has ended, and returns the report.
    async fn finish(mut self) -> Report {
        let name = self.config.name.as_str();
        if let Err(e) = self.consumer.close().await {
            tracing::warn!(worker = name, error = %e, "consumer close failed");
        }
        self.publish_counts();
        self.health.0.set_phase(Phase::Stopped);
        tracing::info!(worker = name, report = ?self.state.report, "worker stopped");
        self.state.report
    }
}
