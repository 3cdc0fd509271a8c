//! The defaults of a dead-letter replay, from `[replay]`.

use redrive_middleware::dead_letter::Replay;

use super::{Settings, SettingsError};

impl Settings {
    /// `[replay]` as a [`Replay`] for [`DeadLetterQueue::replay`]: the loop guard, the
    /// rate, the publishes in flight and the destination a replay takes unless its
    /// caller says otherwise (the `redrive` tool's flags win over the file). Without
    /// the section, `Replay::default()`.
    ///
    /// # Errors
    /// [`SettingsError`] naming `rate` when it is not a number above 0, or `in_flight`
    /// when it is 0.
    ///
    /// [`DeadLetterQueue::replay`]: redrive_middleware::dead_letter::DeadLetterQueue::replay
    pub fn replay(&self) -> Result<Replay, SettingsError> {
        let Some(section) = &self.replay else {
            return Ok(Replay::default());
        };
        if let Some(rate) = section.rate {
            if !(rate.is_finite() && rate > 0.0) {
                return Err(self.invalid(
                    &["replay", "rate"],
                    format!("a replay's rate is letters a second above 0, not {rate}"),
                ));
            }
        }
        if section.in_flight == Some(0) {
            return Err(self.invalid(
                &["replay", "in_flight"],
                "at least one publish must be allowed in flight (1 replays in the DLQ's order)",
            ));
        }
        Ok(section.replay())
    }
}
