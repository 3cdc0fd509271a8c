//! The instruments, and the counts kept per destination for them to report.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{
    Histogram, Meter, ObservableCounter, ObservableGauge, ObservableUpDownCounter,
};
use redrive_core::Message;

use super::{ATTR_DESTINATION, ATTR_SYSTEM};

/// The counters, in the order of [`COUNTERS`].
#[derive(Clone, Copy)]
pub(super) enum Count {
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
pub(super) struct Instruments {
    duration: Histogram<f64>,
    age: Histogram<f64>,
    /// Whether destinations bind their histograms
    /// ([`MetricsLayer::with_bound_histograms`](super::MetricsLayer::with_bound_histograms)).
    #[cfg(feature = "metrics-bound")]
    pub(super) bind: std::sync::atomic::AtomicBool,
    destinations: Arc<RwLock<Vec<Arc<Destination>>>>,
    /// The state of the circuit breaker in the same stack, reported for every
    /// destination (see `MetricsLayer::circuit_state`).
    pub(super) circuit: CircuitSlot,
    _observed: (
        Vec<ObservableCounter<u64>>,
        ObservableUpDownCounter<i64>,
        ObservableGauge<i64>,
    ),
}

/// Reads a circuit breaker's state as `redrive.circuit.state` reports it.
pub(super) type CircuitState = Arc<dyn Fn() -> i64 + Send + Sync>;
pub(super) type CircuitSlot = Arc<RwLock<Option<CircuitState>>>;

/// `redrive.circuit.state`'s unit and description, the same wherever it is made, so
/// the SDK takes every registration for one instrument.
pub(super) const CIRCUIT_UNIT: &str = "1";
pub(super) const CIRCUIT_DESCRIPTION: &str = "Circuit breaker state: 0 closed, 1 half-open, 2 open";

/// Aligned to 128 bytes, so the `Arc`'s counts (changed by every call and its future,
/// often on two cores) share no cache line with the fields every call reads.
#[repr(align(128))]
pub(super) struct Destination {
    system: &'static str,
    name: Arc<str>,
    pub(super) attrs: Box<[KeyValue]>,
    pub(super) duration: DestinationHistogram,
    pub(super) age: DestinationHistogram,
    pub(super) counts: Counts,
}

/// One destination's counts, in one slot per thread shard: a thread adds into its own
/// slot, so calls running on several cores at once do not pass one cache line back and
/// forth; the instruments report the sums.
pub(super) struct Counts {
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

    pub(super) fn add_in_flight(&self, delta: i64) {
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
/// ([`MetricsLayer::with_bound_histograms`](super::MetricsLayer::with_bound_histograms)).
pub(super) enum DestinationHistogram {
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
    pub(super) fn record(&self, value: f64, attrs: &[KeyValue]) {
        match self {
            DestinationHistogram::Unbound(h) => h.record(value, attrs),
            #[cfg(feature = "metrics-bound")]
            DestinationHistogram::Bound(h) => h.record(value),
        }
    }
}

impl Destination {
    /// Whether `msg` came from this destination.
    pub(super) fn holds(&self, msg: &Message) -> bool {
        let source = &msg.metadata.source;
        // Adapters share one name per queue, so the pointers match first.
        self.system == source.system
            && (Arc::ptr_eq(&self.name, &source.destination) || *self.name == *source.destination)
    }

    pub(super) fn add(&self, c: Count) {
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
    pub(super) fn new(meter: &Meter, duration_buckets: &[f64], age_buckets: &[f64]) -> Self {
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
        let circuit = CircuitSlot::default();
        let (observed, state) = (destinations.clone(), circuit.clone());
        let circuit_gauge = meter
            .i64_observable_gauge("redrive.circuit.state")
            .with_unit(CIRCUIT_UNIT)
            .with_description(CIRCUIT_DESCRIPTION)
            .with_callback(move |observer| {
                let read = state.read().unwrap_or_else(|p| p.into_inner()).clone();
                if let Some(read) = read {
                    let value = read();
                    each(&observed, |d| observer.observe(value, &d.attrs));
                }
            })
            .build();
        Instruments {
            duration: meter
                .f64_histogram("messaging.process.duration")
                .with_unit("s")
                .with_description("Time in the stack per delivery")
                .with_boundaries(duration_buckets.to_vec())
                .build(),
            age: meter
                .f64_histogram("redrive.message.age")
                .with_unit("s")
                .with_description("Time from the broker's enqueue to the stack")
                .with_boundaries(age_buckets.to_vec())
                .build(),
            destinations,
            #[cfg(feature = "metrics-bound")]
            bind: std::sync::atomic::AtomicBool::new(false),
            circuit,
            _observed: (counters, in_flight, circuit_gauge),
        }
    }

    /// The destination `msg` came from, created on first sight.
    fn binds(&self) -> bool {
        #[cfg(feature = "metrics-bound")]
        return self.bind.load(Ordering::Relaxed);
        #[cfg(not(feature = "metrics-bound"))]
        false
    }

    pub(super) fn destination(&self, msg: &Message) -> Arc<Destination> {
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
