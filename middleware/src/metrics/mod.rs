//! OpenTelemetry metrics per destination: consumed, acked, nacked, retried,
//! dead-lettered, deduplicated, in flight, processing time, message age, circuit state,
//! the figures of queues as their broker reports them (depth, consumers, in flight,
//! delayed), and a consumer group's lag and oldest unfinished record per partition.
//!
//! ```
//! use redrive_core::{handler_fn, BoxError, Message};
//! use redrive_middleware::metrics::MetricsLayer;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let meter = opentelemetry::global::meter("orders-consumer");
//! let mut svc = ServiceBuilder::new()
//!     .layer(MetricsLayer::new(&meter))
//!     .service(handler_fn(|_msg: Message| async { Ok::<_, BoxError>(()) }));
//! svc.ready().await?.call(Message::new("hi")).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Instruments
//! Every instrument carries `messaging.system` and `messaging.destination.name`; the
//! per-partition gauges also carry `messaging.destination.partition.id` and
//! `messaging.consumer.group.name`.
//! Counts are kept in atomics and reported when the meter provider collects, so the
//! per-message cost is two histogram recordings and a few relaxed atomic adds. Each
//! thread adds into a shard of its own, so calls running on several cores at once do
//! not pass the counters' cache lines back and forth (`cargo bench -p
//! redrive-middleware --bench parallel`).
//!
//! Names follow the OpenTelemetry messaging conventions where they define one.
//!
//! | name | kind | unit | counts |
//! |---|---|---|---|
//! | `messaging.client.consumed.messages` | observable counter | `{message}` | deliveries handed to the stack |
//! | `messaging.process.duration` | histogram | `s` | time in the stack per delivery ([`DURATION_BUCKETS`]) |
//! | `redrive.messages.acked` | observable counter | `{message}` | deliveries the stack finished (`Ok`), so the Worker acks |
//! | `redrive.messages.nacked` | observable counter | `{message}` | deliveries that failed, so the Worker nacks or parks |
//! | `redrive.messages.retried` | observable counter | `{message}` | in-process retries (through [`RetryCounter`]) |
//! | `redrive.messages.dead_lettered` | observable counter | `{message}` | of the acked: dead-lettered |
//! | `redrive.messages.deduplicated` | observable counter | `{message}` | of the acked: skipped duplicates |
//! | `redrive.messages.in_flight` | observable up-down counter | `{message}` | deliveries in the stack now |
//! | `redrive.message.age` | histogram | `s` | the broker's enqueue time to when the delivery enters the stack (each attempt, waits in this process included; [`AGE_BUCKETS`]) |
//! | `redrive.circuit.state` | gauge | `1` | 0 closed, 1 half-open, 2 open: a [`Stack`](crate::Stack)'s breaker for each destination it measures ([`MetricsLayer::circuit_state`]), or another breaker ([`MetricsLayer::observe_circuit`]) |
//! | `redrive.worker.parked` | gauge | `{message}` | failed messages the Worker holds until their next attempt, by `redrive.worker.name` ([`MetricsLayer::observe_worker`]; a [`Stack`](crate::Stack) wires it) |
//! | `redrive.worker.waiting` | gauge | `{message}` | messages the Worker holds behind a busy ordering key ([`MetricsLayer::observe_worker`]) |
//! | `redrive.worker.receive_failures` | gauge | `{failure}` | receives that failed in a row ([`MetricsLayer::observe_worker`]) |
//! | `redrive.queue.depth` | gauge | `{message}` | messages ready in a queue, as its broker reports them ([`MetricsLayer::observe_queue`]) |
//! | `redrive.queue.consumers` | gauge | `{consumer}` | consumers on a queue, as its broker reports them ([`MetricsLayer::observe_queue`]) |
//! | `redrive.queue.in_flight` | gauge | `{message}` | messages received and not yet settled, as the broker reports them (SQS; [`MetricsLayer::observe_queue`]) |
//! | `redrive.queue.delayed` | gauge | `{message}` | messages sent with a delay and not yet ready, as the broker reports them (SQS; [`MetricsLayer::observe_queue`]) |
//! | `redrive.consumer.lag` | gauge | `{message}` | per partition: the high watermark less the group's committed offset (Kafka; [`MetricsLayer::observe_partitions`]) |
//! | `redrive.consumer.oldest_incomplete_age` | gauge | `s` | per partition this consumer owns: time since it received the oldest record it has not finished, which holds the commit (Kafka; [`MetricsLayer::observe_partitions`]) |
//!
//! # Bound histograms (feature `metrics-bound`)
//! A histogram recording looks its attribute set up in the SDK each time (hashing every
//! attribute); that is most of this layer's cost per message. The feature
//! `metrics-bound` adds [`MetricsLayer::with_bound_histograms`], which binds each
//! destination's histograms to its attributes once, through OpenTelemetry's bound
//! instruments (`experimental_metrics_bound_instruments`, which the feature turns on
//! in `opentelemetry` and `opentelemetry_sdk` 0.33), so a recording skips the lookup.
//! The SDK's meter provider implements binding; a meter provider of your own must
//! implement `SyncInstrument::bind` too, or the histograms it binds record nothing.
//! That is why binding is asked for, not the default, and the feature alone changes
//! nothing.
//!
//! # Order
//! Second from the outside, under `trace`: it times the dead-letter publish,
//! idempotency and every retry, and sees each delivery's final result.

mod future;
mod instruments;
mod layer;
#[cfg(all(feature = "rate-limit", feature = "redis"))]
mod rate_limit;
mod worker;

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use redrive_core::{BoxError, Message, Outcome};
use tower::Service;

pub use future::ResponseFuture;

pub use layer::{MetricsLayer, PartitionReading, QueueReading, RetryCounter};
#[cfg(all(feature = "rate-limit", feature = "redis"))]
pub use rate_limit::ATTR_RATE_LIMIT_KEY;
pub use worker::ATTR_WORKER;

use future::InFlight;
use instruments::{Count, Destination, Instruments};

/// The bucket boundaries of `messaging.process.duration`, in seconds: those
/// OpenTelemetry's messaging conventions recommend, fine from 5 ms to 10 s, with one at
/// 1 s for an SLO. Other boundaries:
/// [`MetricsLayer::with_buckets`].
pub const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// The bucket boundaries of `redrive.message.age`, in seconds: from 10 ms (a message
/// taken at once) to a day (a backlog, or a message parked for its retries).
pub const AGE_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 21600.0,
    86400.0,
];

/// `messaging.system`.
pub const ATTR_SYSTEM: &str = "messaging.system";
/// `messaging.destination.name`.
pub const ATTR_DESTINATION: &str = "messaging.destination.name";
/// `messaging.destination.partition.id`, on the per-partition gauges.
pub const ATTR_PARTITION: &str = "messaging.destination.partition.id";
/// `messaging.consumer.group.name`, on the per-partition gauges.
pub const ATTR_CONSUMER_GROUP: &str = "messaging.consumer.group.name";

/// The metrics service; see the [module docs](self).
#[derive(Clone)]
pub struct Metrics<S> {
    inner: S,
    instruments: Arc<Instruments>,
    /// The destination of the last call: a consumer's messages mostly come from one,
    /// which is then found without the shared list's lock.
    last: Option<Arc<Destination>>,
}

impl<S: fmt::Debug> fmt::Debug for Metrics<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S> Service<Message> for Metrics<S>
where
    S: Service<Message>,
    S::Response: Into<Outcome>,
    S::Error: Into<BoxError>,
{
    type Response = Outcome;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        let dest = match &self.last {
            Some(d) if d.holds(&msg) => d.clone(),
            _ => {
                let d = self.instruments.destination(&msg);
                self.last = Some(d.clone());
                d
            }
        };
        dest.add(Count::Consumed);
        if let Some(age) = msg
            .metadata
            .enqueued_at
            .and_then(|t| SystemTime::now().duration_since(t).ok())
        {
            dest.age.record(age.as_secs_f64(), &dest.attrs);
        }
        dest.counts.add_in_flight(1);
        ResponseFuture {
            inner: self.inner.call(msg),
            guard: InFlight {
                dest,
                start: Instant::now(),
            },
        }
    }
}
