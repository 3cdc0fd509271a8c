//! The Worker's own figures as gauges: [`MetricsLayer::observe_worker`].

use opentelemetry::KeyValue;
use redrive_core::{Health, HealthReport};

use super::MetricsLayer;

/// `redrive.worker.name`, on the Worker's gauges: the name given with
/// `WorkerBuilder::name`.
pub const ATTR_WORKER: &str = "redrive.worker.name";

/// One gauge of the Worker's: name, unit, description, and its figure in a report.
type Gauge = (
    &'static str,
    &'static str,
    &'static str,
    fn(&HealthReport) -> u64,
);

impl MetricsLayer {
    /// Reports the Worker behind `health` as gauges, with `redrive.worker.name`:
    /// `redrive.worker.parked` (failed messages it holds until their next attempt),
    /// `redrive.worker.waiting` (messages held behind a busy ordering key) and
    /// `redrive.worker.receive_failures` (receives failed in a row). A
    /// [`Stack`](crate::Stack) with a metrics layer does this for the Worker it is built
    /// into; give Workers that share a meter different names.
    pub fn observe_worker(&self, health: Health) {
        let gauges: [Gauge; 3] = [
            (
                "redrive.worker.parked",
                "{message}",
                "Failed messages the Worker holds until their next attempt",
                |r| r.parked as u64,
            ),
            (
                "redrive.worker.waiting",
                "{message}",
                "Messages the Worker holds behind a busy ordering key",
                |r| r.waiting as u64,
            ),
            (
                "redrive.worker.receive_failures",
                "{failure}",
                "Receives from the broker that failed in a row",
                |r| u64::from(r.receive_failures),
            ),
        ];
        for (name, unit, description, figure) in gauges {
            let health = health.clone();
            // The meter provider keeps the callback registered for its own lifetime.
            let _gauge = self
                .meter
                .u64_observable_gauge(name)
                .with_unit(unit)
                .with_description(description)
                .with_callback(move |observer| {
                    // Read at each collection: a Stack is handed the health before the
                    // Worker is built and named.
                    let attrs = [KeyValue::new(ATTR_WORKER, health.worker_name().to_owned())];
                    observer.observe(figure(&health.report()), &attrs);
                })
                .build();
        }
    }
}
