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
mod report;
mod shutdown;
mod state;
mod tasks;

use std::collections::{HashMap, VecDeque};
use std::future::{Future, poll_fn};
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt as _};
use tokio::sync::watch;
use tower::Service;

use builder::Plan;
pub use builder::{NoService, Pipeline, Staged, WorkerBuilder};
use call::{TaskCtx, logged, run_one};
use config::Config;
pub use config::{Execution, LeaseKeeping, OrderingMode, Redelivery};
pub use report::Report;
pub use shutdown::Shutdown;
use shutdown::Stop;
use state::{State, order_key};
use tasks::Tasks;

use crate::{BoxError, Capabilities, Consumer, Extensions, Message, Outcome};

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
