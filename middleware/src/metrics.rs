//! OpenTelemetry metrics per destination: consumed, acked, nacked, retried,
//! dead-lettered, deduplicated, in flight, processing time, message age, circuit state.
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
//! Every instrument carries `messaging.system` and `messaging.destination.name`.
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
//! | `messaging.process.duration` | histogram | `s` | time in the stack per delivery |
//! | `redrive.messages.acked` | observable counter | `{message}` | deliveries the stack finished (`Ok`), so the Worker acks |
//! | `redrive.messages.nacked` | observable counter | `{message}` | deliveries that failed, so the Worker nacks or parks |
//! | `redrive.messages.retried` | observable counter | `{message}` | in-process retries (through [`RetryCounter`]) |
//! | `redrive.messages.dead_lettered` | observable counter | `{message}` | of the acked: dead-lettered |
//! | `redrive.messages.deduplicated` | observable counter | `{message}` | of the acked: skipped duplicates |
//! | `redrive.messages.in_flight` | observable up-down counter | `{message}` | deliveries in the stack now |
//! | `redrive.message.age` | histogram | `s` | the broker's enqueue time to when the delivery enters the stack (each attempt, waits in this process included) |
//! | `redrive.circuit.state` | gauge | `1` | 0 closed, 1 half-open, 2 open ([`MetricsLayer::observe_circuit`]) |
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

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Histogram, Meter, ObservableCounter, ObservableUpDownCounter};
use redrive_core::{BoxError, Message, Outcome};
use tower::{Layer, Service};

/// `messaging.system`.
pub const ATTR_SYSTEM: &str = "messaging.system";
/// `messaging.destination.name`.
pub const ATTR_DESTINATION: &str = "messaging.destination.name";

/// The counters, in the order of [`COUNTERS`].
#[derive(Clone, Copy)]
enum Count {
    Consumed,
    Acked,
    Nacked,
    Retried,
    DeadLettered,
    Deduplicated,
}

const COUNTERS: [(&str, &str); 6] = [
    (
        "messaging.client.consumed.messages",
        "Deliveries handed to the stack",
    ),
    ("redrive.messages.acked", "Deliveries finished, to be acked"),
    (
        "redrive.messages.nacked",
        "Deliveries failed, to be nacked or parked",
    ),
    ("redrive.messages.retried", "In-process retries"),
    ("redrive.messages.dead_lettered", "Deliveries dead-lettered"),
    (
        "redrive.messages.deduplicated",
        "Duplicate deliveries skipped",
    ),
];

/// Counts are kept in atomics per destination and reported by observable instruments
/// when the meter provider collects: a relaxed atomic add per event instead of an
/// attribute-set lookup in the SDK. Only the two histograms record per message.
struct Instruments {
    duration: Histogram<f64>,
    age: Histogram<f64>,
    /// Whether destinations bind their histograms ([`MetricsLayer::with_bound_histograms`]).
    #[cfg(feature = "metrics-bound")]
    bind: std::sync::atomic::AtomicBool,
    destinations: Arc<RwLock<Vec<Arc<Destination>>>>,
    _observed: (Vec<ObservableCounter<u64>>, ObservableUpDownCounter<i64>),
}

/// Aligned to 128 bytes, so the `Arc`'s counts (changed by every call and its future,
/// often on two cores) share no cache line with the fields every call reads.
#[repr(align(128))]
struct Destination {
    system: &'static str,
    name: Arc<str>,
    attrs: Box<[KeyValue]>,
    duration: DestinationHistogram,
    age: DestinationHistogram,
    counts: Counts,
}

/// One destination's counts, in one slot per thread shard: a thread adds into its own
/// slot, so calls running on several cores at once do not pass one cache line back and
/// forth; the instruments report the sums.
struct Counts {
    shards: Box<[Shard]>,
}

/// One shard's counts, on cache lines of its own (128 bytes: x86 fetches lines in
/// pairs).
#[repr(align(128))]
#[derive(Default)]
struct Shard {
    counts: [AtomicU64; COUNTERS.len()],
    /// Added to by calls and taken from by their futures, perhaps in other shards: only
    /// the sum is meaningful.
    in_flight: AtomicI64,
}

impl Counts {
    fn new() -> Self {
        Counts {
            shards: (0..crate::shard::count())
                .map(|_| Shard::default())
                .collect(),
        }
    }

    fn shard(&self) -> &Shard {
        &self.shards[crate::shard::index(self.shards.len())]
    }

    fn add(&self, c: Count) {
        self.shard().counts[c as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn add_in_flight(&self, delta: i64) {
        self.shard().in_flight.fetch_add(delta, Ordering::Relaxed);
    }

    fn total(&self, counter: usize) -> u64 {
        self.shards.iter().fold(0, |sum, s| {
            sum.wrapping_add(s.counts[counter].load(Ordering::Relaxed))
        })
    }

    /// The shards are read one after another while calls go on, so the sum is the
    /// count at no single moment: a call that began and ended during the read may show
    /// only its end. It is never reported below zero.
    fn in_flight(&self) -> i64 {
        self.shards
            .iter()
            .fold(0i64, |sum, s| {
                sum.wrapping_add(s.in_flight.load(Ordering::Relaxed))
            })
            .max(0)
    }
}

/// One histogram of one destination: recorded with its attributes, or bound to them
/// ([`MetricsLayer::with_bound_histograms`]).
enum DestinationHistogram {
    Unbound(Histogram<f64>),
    #[cfg(feature = "metrics-bound")]
    Bound(opentelemetry::metrics::BoundHistogram<f64>),
}

impl DestinationHistogram {
    fn new(histogram: &Histogram<f64>, attrs: &[KeyValue], bind: bool) -> Self {
        #[cfg(feature = "metrics-bound")]
        if bind {
            return DestinationHistogram::Bound(histogram.bind(attrs));
        }
        let _ = (attrs, bind);
        DestinationHistogram::Unbound(histogram.clone())
    }

    /// Records `value` with `attrs`, the attributes it was made with.
    fn record(&self, value: f64, attrs: &[KeyValue]) {
        match self {
            DestinationHistogram::Unbound(h) => h.record(value, attrs),
            #[cfg(feature = "metrics-bound")]
            DestinationHistogram::Bound(h) => h.record(value),
        }
    }
}

impl Destination {
    /// Whether `msg` came from this destination.
    fn holds(&self, msg: &Message) -> bool {
        let source = &msg.metadata.source;
        // Adapters share one name per queue, so the pointers match first.
        self.system == source.system
            && (Arc::ptr_eq(&self.name, &source.destination) || *self.name == *source.destination)
    }

    fn add(&self, c: Count) {
        self.counts.add(c);
    }
}

type Destinations = Arc<RwLock<Vec<Arc<Destination>>>>;

fn each(destinations: &Destinations, mut f: impl FnMut(&Destination)) {
    for d in destinations
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        f(d);
    }
}

impl Instruments {
    fn new(meter: &Meter) -> Self {
        let destinations: Destinations = Arc::default();
        let counters = COUNTERS
            .iter()
            .enumerate()
            .map(|(i, (name, description))| {
                let observed = destinations.clone();
                meter
                    .u64_observable_counter(*name)
                    .with_unit("{message}")
                    .with_description(*description)
                    .with_callback(move |observer| {
                        each(&observed, |d| {
                            observer.observe(d.counts.total(i), &d.attrs);
                        });
                    })
                    .build()
            })
            .collect();
        let observed = destinations.clone();
        let in_flight = meter
            .i64_observable_up_down_counter("redrive.messages.in_flight")
            .with_unit("{message}")
            .with_description("Deliveries in the stack now")
            .with_callback(move |observer| {
                each(&observed, |d| {
                    observer.observe(d.counts.in_flight(), &d.attrs);
                });
            })
            .build();
        Instruments {
            duration: meter
                .f64_histogram("messaging.process.duration")
                .with_unit("s")
                .with_description("Time in the stack per delivery")
                .build(),
            age: meter
                .f64_histogram("redrive.message.age")
                .with_unit("s")
                .with_description("Time from the broker's enqueue to the stack")
                .build(),
            destinations,
            #[cfg(feature = "metrics-bound")]
            bind: std::sync::atomic::AtomicBool::new(false),
            _observed: (counters, in_flight),
        }
    }

    /// The destination `msg` came from, created on first sight.
    fn binds(&self) -> bool {
        #[cfg(feature = "metrics-bound")]
        return self.bind.load(Ordering::Relaxed);
        #[cfg(not(feature = "metrics-bound"))]
        false
    }

    fn destination(&self, msg: &Message) -> Arc<Destination> {
        let source = &msg.metadata.source;
        let find = |list: &[Arc<Destination>]| list.iter().find(|d| d.holds(msg)).cloned();
        if let Some(d) = find(&self.destinations.read().unwrap_or_else(|p| p.into_inner())) {
            return d;
        }
        let mut list = self.destinations.write().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = find(&list) {
            return d;
        }
        let attrs: Box<[KeyValue]> = Box::new([
            KeyValue::new(ATTR_SYSTEM, source.system),
            KeyValue::new(ATTR_DESTINATION, source.destination.clone()),
        ]);
        let d = Arc::new(Destination {
            system: source.system,
            name: source.destination.clone(),
            duration: DestinationHistogram::new(&self.duration, &attrs, self.binds()),
            age: DestinationHistogram::new(&self.age, &attrs, self.binds()),
            attrs,
            counts: Counts::new(),
        });
        list.push(d.clone());
        d
    }
}

/// Builds [`Metrics`] services; clones share the instruments.
#[derive(Clone)]
pub struct MetricsLayer {
    meter: Meter,
    instruments: Arc<Instruments>,
}

impl fmt::Debug for MetricsLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetricsLayer").finish_non_exhaustive()
    }
}

impl MetricsLayer {
    /// Instruments created on `meter`.
    pub fn new(meter: &Meter) -> Self {
        MetricsLayer {
            meter: meter.clone(),
            instruments: Arc::new(Instruments::new(meter)),
        }
    }

    /// Binds each destination's histograms to its attributes once, so recording a
    /// duration or an age skips the SDK's attribute lookup (see [the module
    /// docs](self#bound-histograms-feature-metrics-bound)). Only for a meter provider
    /// that implements binding, as `opentelemetry_sdk`'s does: with one that does not,
    /// the histograms record nothing. Call it before the layer handles messages;
    /// destinations seen before keep recording unbound.
    #[cfg(feature = "metrics-bound")]
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics-bound")))]
    #[must_use]
    pub fn with_bound_histograms(self) -> Self {
        self.instruments.bind.store(true, Ordering::Relaxed);
        self
    }

    /// Instruments on the global meter provider's `redrive` meter.
    pub fn global() -> Self {
        Self::new(&opentelemetry::global::meter("redrive"))
    }

    /// A handle that counts in-process retries into `redrive.messages.retried`; give
    /// it to the retry layer's hook.
    pub fn retry_counter(&self) -> RetryCounter {
        RetryCounter {
            instruments: self.instruments.clone(),
        }
    }

    /// Reports a circuit breaker's state as the `redrive.circuit.state` gauge for
    /// `destination`; `state` returns 0 (closed), 1 (half-open) or 2 (open).
    pub fn observe_circuit(
        &self,
        system: &'static str,
        destination: impl Into<String>,
        state: impl Fn() -> i64 + Send + Sync + 'static,
    ) {
        let attrs = [
            KeyValue::new(ATTR_SYSTEM, system),
            KeyValue::new(ATTR_DESTINATION, destination.into()),
        ];
        // The meter provider keeps the callback registered for its own lifetime.
        let _gauge = self
            .meter
            .i64_observable_gauge("redrive.circuit.state")
            .with_unit("1")
            .with_description("Circuit breaker state: 0 closed, 1 half-open, 2 open")
            .with_callback(move |observer| observer.observe(state(), &attrs))
            .build();
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = Metrics<S>;

    fn layer(&self, inner: S) -> Metrics<S> {
        Metrics {
            inner,
            instruments: self.instruments.clone(),
            last: None,
        }
    }
}

/// Counts in-process retries; see [`MetricsLayer::retry_counter`].
#[derive(Clone)]
pub struct RetryCounter {
    instruments: Arc<Instruments>,
}

impl RetryCounter {
    /// Counts one retry of `msg`.
    pub fn record(&self, msg: &Message) {
        self.instruments.destination(msg).add(Count::Retried);
    }
}

impl fmt::Debug for RetryCounter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryCounter").finish_non_exhaustive()
    }
}

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

/// Takes a delivery out of `in_flight` and records its duration, even if its future
/// is dropped (at a shutdown deadline, say).
struct InFlight {
    dest: Arc<Destination>,
    start: Instant,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.dest.counts.add_in_flight(-1);
        self.dest
            .duration
            .record(self.start.elapsed().as_secs_f64(), &self.dest.attrs);
    }
}

pin_project_lite::pin_project! {
    /// The future of [`Metrics`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        guard: InFlight,
    }
}

impl<F, R, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<R, E>>,
    R: Into<Outcome>,
    E: Into<BoxError>,
{
    type Output = Result<Outcome, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = match this.inner.poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(r) => r,
        };
        let dest = &this.guard.dest;
        Poll::Ready(match result {
            Ok(r) => {
                let outcome = r.into();
                dest.add(Count::Acked);
                match outcome {
                    Outcome::DeadLettered => dest.add(Count::DeadLettered),
                    Outcome::Deduplicated => dest.add(Count::Deduplicated),
                    _ => {}
                }
                Ok(outcome)
            }
            Err(e) => {
                dest.add(Count::Nacked);
                Err(e.into())
            }
        })
    }
}

/// Give it to the retry layer: `RetryLayer::new(..)?.on_retry(metrics.retry_counter())`.
#[cfg(feature = "retry")]
impl crate::retry::OnRetry for RetryCounter {
    fn on_retry(&self, event: &crate::retry::RetryEvent<'_>) {
        self.record(event.message);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_from_many_threads_add_up_whatever_their_shards() {
        let counts = Counts::new();
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..1_000 {
                        counts.add(Count::Acked);
                        counts.add_in_flight(1);
                    }
                });
            }
        });
        // Taken out on other threads than they went in on, as futures are dropped.
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| (0..2_000).for_each(|_| counts.add_in_flight(-1)));
            }
        });
        assert_eq!(counts.total(Count::Acked as usize), 8_000);
        assert_eq!(counts.total(Count::Nacked as usize), 0);
        assert_eq!(counts.in_flight(), 0);
    }
}
