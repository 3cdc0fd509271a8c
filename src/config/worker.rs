//! `[worker]`: its checks, and how it sets a `WorkerBuilder`.

use redrive_core::WorkerBuilder;

use super::sections::WorkerSection;
use super::values::LeaseKeepingSetting;
use super::{Settings, SettingsError};

impl Settings {
    pub(super) fn check_worker(&self, w: &WorkerSection) -> Result<(), SettingsError> {
        if w.concurrency == Some(0) {
            return Err(self.invalid(
                &["worker", "concurrency"],
                "0 would run nothing; set it to 1 or more",
            ));
        }
        if w.max_parked == Some(0) {
            return Err(self.invalid(
                &["worker", "max_parked"],
                "0 would hold no failed message; set it to 1 or more (1024 by default)",
            ));
        }
        if let Some(d) = w.settle_timeout {
            if d < std::time::Duration::from_millis(1) {
                return Err(self.invalid(
                    &["worker", "settle_timeout"],
                    format!(
                        "{d:?} would give up every ack at once; set at least 1ms (10s by default)"
                    ),
                ));
            }
        }
        if let Some(LeaseKeepingSetting(redrive_core::LeaseKeeping::Every(d))) = w.lease_keeping {
            if d.is_zero() {
                return Err(self.invalid(
                    &["worker", "lease_keeping"],
                    "an interval of 0 cannot keep a lease; give one shorter than the lease, or \"auto\"",
                ));
            }
        }
        if let Some(r) = &w.redelivery {
            if let Some(m) = r.multiplier {
                if !(m.is_finite() && m >= 1.0) {
                    return Err(self.invalid(
                        &["worker", "redelivery", "multiplier"],
                        format!(
                            "{m} is not a finite number of at least 1.0 (2.0 doubles the delay)"
                        ),
                    ));
                }
            }
            let (initial, max) = r.bounds();
            if max < initial {
                return Err(self.invalid(
                    &["worker", "redelivery"],
                    format!(
                        "`max` ({max:?}) is below `initial` ({initial:?}); raise the max or lower \
                         the initial delay"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Applies `[worker]` to `builder`: `Worker::builder(consumer).stack(stack)
    /// .handler(handler)`, before `build`. Keys left out keep the builder's settings.
    ///
    /// # Errors
    /// [`SettingsError`] naming the key when a value cannot work (a concurrency of 0, a
    /// redelivery max below its initial delay). The checks against the broker come at
    /// `build`.
    pub fn worker<C, S>(
        &self,
        mut builder: WorkerBuilder<C, S>,
    ) -> Result<WorkerBuilder<C, S>, SettingsError> {
        let Some(w) = &self.worker else {
            return Ok(builder);
        };
        self.check_worker(w)?;
        if let Some(name) = &w.name {
            builder = builder.name(name.clone());
        }
        if let Some(n) = w.concurrency {
            builder = builder.concurrency(n);
        }
        if let Some(e) = w.execution {
            builder = builder.execution(e.into());
        }
        if let Some(o) = w.ordering {
            builder = builder.ordering(o.into());
        }
        if let Some(n) = w.max_waiting {
            builder = builder.max_waiting(n);
        }
        if let Some(n) = w.max_parked {
            builder = builder.max_parked(n);
        }
        if let Some(r) = &w.redelivery {
            builder = builder.redelivery(r.redelivery());
        }
        if let Some(k) = w.lease_keeping {
            builder = builder.lease_keeping(k.0);
        }
        if let Some(d) = w.shutdown_timeout {
            builder = builder.shutdown_timeout(d);
        }
        if let Some(d) = w.settle_timeout {
            builder = builder.settle_timeout(d);
        }
        Ok(builder)
    }
}
