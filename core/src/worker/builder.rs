//! Building a [`Worker`]: its settings, its service (a stack and a handler, or any
//! tower service), and the checks against the consumer's capabilities.

use std::time::Duration;

use tower::Service;

use super::config::Config;
use super::{Execution, Health, LeaseKeeping, OrderingMode, Redelivery, Worker};
use crate::classify::Classifier;
use crate::{BoxError, Capabilities, Consumer, Error, Message, Result};

/// Builds a [`Worker`]; [`build`](WorkerBuilder::build) checks the configuration
/// against the consumer's [`Capabilities`].
///
/// | setting | default |
/// |---|---|
/// | `concurrency` | 16 |
/// | `execution` | [`Execution::Spawned`] |
/// | `ordering` | [`OrderingMode::Unordered`] |
/// | `max_waiting` (deliveries held for busy keys) | 4 × concurrency |
/// | `max_parked` (failed messages the Worker holds for redelivery) | 1024 |
/// | `redelivery` | [`Redelivery::default`] (1 s doubling to 5 min, jittered) |
/// | `lease_keeping` | [`LeaseKeeping::Auto`] |
/// | `shutdown_timeout` | 30 s |
/// | `settle_timeout` (each ack, nack or hand-back) | 10 s |
#[must_use]
pub struct WorkerBuilder<C, S> {
    consumer: C,
    service: S,
    config: Config,
    /// What the stack's check said, reported by `build`.
    stack_error: Option<String>,
    /// The built Worker's health, made first so a stack can report it.
    health: Health,
}

/// The service slot of a [`WorkerBuilder`] before [`service`](WorkerBuilder::service),
/// [`handler`](WorkerBuilder::handler) or [`stack`](WorkerBuilder::stack) fills it.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoService;

/// The service slot of a [`WorkerBuilder`] holding a stack that waits for its
/// [`handler`](WorkerBuilder::handler).
#[derive(Clone, Debug)]
pub struct Staged<P>(P);

/// Middleware the Worker wraps a handler in and checks against its consumer:
/// `redrive_middleware::Stack` is one. [`WorkerBuilder::stack`] takes it, and
/// [`build`](WorkerBuilder::build) fails with what [`check`](Pipeline::check) says.
pub trait Pipeline<H> {
    /// The handler wrapped in the middleware.
    type Service;

    /// Checks the middleware against the consumer's capabilities (a retry window
    /// longer than the broker's lease, say) and against itself.
    ///
    /// # Errors
    /// What cannot work, naming the part and what to change.
    fn check(&self, caps: &Capabilities) -> std::result::Result<(), BoxError>;

    /// Wraps `handler`.
    fn wrap(&self, handler: H) -> Self::Service;

    /// Hands the pipeline the Worker's [`Health`] as it wraps the handler, for it to
    /// report (a metrics layer's gauges of the Worker's parked messages, say). The
    /// default does nothing.
    fn attach(&self, health: &Health) {
        let _ = health;
    }
}

impl<C: Consumer> Worker<C, NoService> {
    /// Starts building a Worker that feeds `consumer`'s deliveries to a service: a
    /// [`stack`](WorkerBuilder::stack) and a [`handler`](WorkerBuilder::handler), a
    /// bare handler, or any tower [`service`](WorkerBuilder::service).
    ///
    /// ```no_run
    /// # use redrive_core::{memory::MemoryBroker, handler_fn, BoxError, Message, Worker};
    /// # async fn f() -> Result<(), BoxError> {
    /// let broker = MemoryBroker::new();
    /// let handler = handler_fn(|_msg: Message| async { Ok::<_, BoxError>(()) });
    /// let report = Worker::builder(broker.consumer("orders"))
    ///     .handler(handler)
    ///     .concurrency(8)
    ///     .build()?
    ///     .run_until(redrive_core::shutdown_signal())
    ///     .await;
    /// # Ok(()) }
    /// ```
    pub fn builder(consumer: C) -> WorkerBuilder<C, NoService> {
        WorkerBuilder {
            consumer,
            service: NoService,
            config: Config::default(),
            stack_error: None,
            health: Health::new(),
        }
    }
}

impl<C> WorkerBuilder<C, NoService> {
    /// Feeds the deliveries to `service`: any tower service of [`Message`]s (a handler,
    /// a stack's `service(handler)`, or layers of the user's own).
    pub fn service<S>(self, service: S) -> WorkerBuilder<C, S> {
        WorkerBuilder {
            consumer: self.consumer,
            service,
            config: self.config,
            stack_error: self.stack_error,
            health: self.health,
        }
    }

    /// Feeds the deliveries to `handler`, with no middleware around it.
    pub fn handler<H>(self, handler: H) -> WorkerBuilder<C, H> {
        self.service(handler)
    }

    /// Wraps the [`handler`](WorkerBuilder::handler) given next in `stack`, which
    /// [`build`](WorkerBuilder::build) checks against the consumer's capabilities: no
    /// separate check to forget.
    pub fn stack<P>(self, stack: P) -> WorkerBuilder<C, Staged<P>> {
        self.service(Staged(stack))
    }
}

impl<C: Consumer, P> WorkerBuilder<C, Staged<P>> {
    /// Wraps `handler` in the stack; the stack's check runs now, and
    /// [`build`](WorkerBuilder::build) reports what it found.
    pub fn handler<H>(self, handler: H) -> WorkerBuilder<C, P::Service>
    where
        P: Pipeline<H>,
    {
        let Staged(stack) = self.service;
        let stack_error = self.stack_error.or_else(|| {
            stack
                .check(&self.consumer.capabilities())
                .err()
                .map(|e| e.to_string())
        });
        stack.attach(&self.health);
        WorkerBuilder {
            service: stack.wrap(handler),
            consumer: self.consumer,
            config: self.config,
            stack_error,
            health: self.health,
        }
    }
}

impl<C, S> WorkerBuilder<C, S> {
    /// Names the consumer in logs.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.config.name = name.into();
        self
    }

    /// The most handler calls running at once (at least 1).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.config.concurrency = n;
        self
    }

    /// Where handler calls run: each on its own task (the default), or all inside the
    /// Worker's task for throughput with I/O-bound handlers. See [`Execution`].
    pub fn execution(mut self, execution: Execution) -> Self {
        self.config.execution = execution;
        self
    }

    /// The ordering mode.
    pub fn ordering(mut self, mode: OrderingMode) -> Self {
        self.config.ordering = mode;
        self
    }

    /// The most deliveries held back behind a busy key before intake pauses.
    pub fn max_waiting(mut self, n: usize) -> Self {
        self.config.max_waiting = Some(n);
        self
    }

    /// The most failed messages the Worker parks at once (at least 1; calls already
    /// running when the bound is reached may still park, so up to `concurrency` more).
    /// At the bound intake pauses, leaving messages in the broker, until a parked message runs again:
    /// a downstream outage on a broker that cannot nack one message (Kafka) fills the
    /// Worker up to here, not up to the backlog.
    pub fn max_parked(mut self, n: usize) -> Self {
        self.config.max_parked = n;
        self
    }

    /// The backoff for redelivering failed messages.
    pub fn redelivery(mut self, r: Redelivery) -> Self {
        self.config.redelivery = r;
        self
    }

    /// When leases are extended.
    pub fn lease_keeping(mut self, k: LeaseKeeping) -> Self {
        self.config.lease_keeping = k;
        self
    }

    /// How long shutdown waits for in-flight messages.
    pub fn shutdown_timeout(mut self, d: Duration) -> Self {
        self.config.shutdown_timeout = d;
        self
    }

    /// How long one ack, nack or hand-back may take before the Worker gives up on it
    /// (at least 1 ms). A settle that times out is logged and counted as a settle
    /// error, and the broker redelivers the message once its lease or connection ends:
    /// a duplicate at most. It bounds shutdown too: past `shutdown_timeout`, the
    /// Worker waits at most this for the last settles, so a broker that blocks its
    /// connection (a RabbitMQ resource alarm) cannot hold shutdown forever.
    pub fn settle_timeout(mut self, d: Duration) -> Self {
        self.config.settle_timeout = d;
        self
    }

    /// The classifier used to log failures (the same one the stack uses).
    pub fn classifier(mut self, c: Classifier) -> Self {
        self.config.classifier = c;
        self
    }

    /// Checks the configuration, and the stack if there is one, against the
    /// consumer's capabilities and builds the Worker.
    ///
    /// # Errors
    /// [`Error::Config`] when the broker cannot honour the configuration, or the
    /// stack's check failed; the message says what to change.
    pub fn build(self) -> Result<Worker<C, S>>
    where
        C: Consumer,
        S: Service<Message>,
    {
        if let Some(e) = self.stack_error {
            return Err(Error::Config(e));
        }
        let caps = self.consumer.capabilities();
        let plan = Plan::new(&self.config, &caps).map_err(Error::Config)?;
        self.health.named(&self.config.name);
        Ok(Worker {
            consumer: self.consumer,
            service: self.service,
            config: self.config,
            caps,
            plan,
            health: self.health,
        })
    }
}

/// What the Worker will do, worked out once at build time.
#[derive(Clone, Copy, Debug)]
pub(super) struct Plan {
    pub(super) park: bool,
    pub(super) renew_every: Option<Duration>,
    pub(super) max_waiting: usize,
}

impl Plan {
    fn new(config: &Config, caps: &Capabilities) -> std::result::Result<Self, String> {
        if config.concurrency == 0 {
            return Err("concurrency must be at least 1".into());
        }
        if config.max_parked == 0 {
            return Err("max_parked must be at least 1".into());
        }
        if config.settle_timeout < Duration::from_millis(1) {
            return Err(format!(
                "settle_timeout is {:?}; every ack would be given up at once: set at least 1 ms \
                 (10 s by default)",
                config.settle_timeout
            ));
        }
        config.redelivery.validate()?;
        let park = config.ordering != OrderingMode::Unordered || !caps.can_nack;
        let max = config.redelivery.max();
        if !park && max > caps.max_nack_delay {
            return Err(if caps.max_nack_delay.is_zero() {
                format!(
                    "the redelivery backoff delays nacks by up to {max:?}, but this broker cannot delay a nack; \
                     use `Redelivery::constant(Duration::ZERO)`, or an ordered mode so the Worker parks failed messages"
                )
            } else {
                format!(
                    "the redelivery backoff reaches {max:?}, but this broker can delay a nack by at most {:?}; \
                     lower the redelivery maximum to {:?} or less",
                    caps.max_nack_delay, caps.max_nack_delay
                )
            });
        }
        let renew_every = match (config.lease_keeping, caps.lease) {
            (LeaseKeeping::Off, _) | (_, None) => None,
            (LeaseKeeping::Auto, Some(lease)) => caps.extendable.then_some(lease / 2),
            (LeaseKeeping::Every(every), Some(lease)) => {
                if !caps.extendable {
                    return Err(format!(
                        "lease keeping every {every:?} was asked for, but this broker's {lease:?} lease cannot be extended; \
                         use `LeaseKeeping::Off` and a lease longer than the slowest handler"
                    ));
                }
                if every.is_zero() || every >= lease {
                    return Err(format!(
                        "lease keeping every {every:?} cannot keep a {lease:?} lease; extend more often than the lease, e.g. every {:?}",
                        lease / 2
                    ));
                }
                Some(every)
            }
        };
        if park && renew_every.is_none() {
            if let Some(lease) = caps.lease {
                if max >= lease {
                    return Err(format!(
                        "parked messages wait up to {max:?}, but their {lease:?} lease cannot be kept, so the broker would \
                         redeliver them meanwhile; lower the redelivery maximum below {lease:?} or enable lease keeping"
                    ));
                }
            }
        }
        Ok(Plan {
            park,
            renew_every,
            max_waiting: config
                .max_waiting
                .unwrap_or(config.concurrency.saturating_mul(4)),
        })
    }
}
