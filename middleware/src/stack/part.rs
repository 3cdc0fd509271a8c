//! Each layer's place in a [`Stack`](super::Stack): its description, its start-up
//! check, and what the Stack's cross-layer checks need from it.

use std::time::Duration;

use redrive_core::Capabilities;
use tower::layer::util::Identity;

use crate::Error;

/// One layer's place in a [`Stack`](super::Stack): its description and its start-up
/// check.
///
/// Implemented for every redrive layer and for [`Identity`] (an empty place).
pub trait StackPart {
    /// The layer as `describe()` prints it; `None` for an empty place.
    fn describe(&self) -> Option<String>;

    /// Checks the layer's configuration against the consumer's capabilities.
    ///
    /// # Errors
    /// [`Error::Config`] naming the layer and what to change.
    fn check(&self, _caps: &Capabilities) -> Result<(), Error> {
        Ok(())
    }

    /// The longest this layer can keep one delivery attempt sleeping between tries
    /// (the retry layer's window); `None` for other layers.
    fn retry_window(&self) -> Option<Duration> {
        None
    }

    /// How long a reservation this layer takes lasts unrenewed (the idempotency
    /// layer's lease); `None` for other layers.
    fn reservation_lease(&self) -> Option<Duration> {
        None
    }

    /// Reports the layer's own state through the Stack's metrics layer, once a Worker
    /// is built with the Stack (the cluster-wide rate limit's); nothing for most
    /// layers.
    #[cfg(feature = "metrics")]
    fn report_into(&self, _metrics: &crate::metrics::MetricsLayer) {}
}

impl StackPart for Identity {
    fn describe(&self) -> Option<String> {
        None
    }
}

#[allow(dead_code, reason = "unused when no layer with a duration is enabled")]
pub(crate) fn secs(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{d:?}")
    }
}

/// The user's own layers in a [`Stack`](super::Stack)
/// ([`around_handler`](super::Stack::around_handler)), and how many.
#[derive(Clone, Debug, Default)]
pub(super) struct Custom<L> {
    pub(super) layer: L,
    pub(super) count: usize,
}

impl<L> StackPart for Custom<L> {
    fn describe(&self) -> Option<String> {
        (self.count > 0).then(|| format!("custom({})", self.count))
    }
}

#[cfg(feature = "trace")]
impl<M> StackPart for crate::trace::TraceLayer<M> {
    fn describe(&self) -> Option<String> {
        Some("trace".into())
    }
}

#[cfg(feature = "metrics")]
impl StackPart for crate::metrics::MetricsLayer {
    fn describe(&self) -> Option<String> {
        Some("metrics".into())
    }
}

#[cfg(feature = "dead-letter")]
impl<P, H> StackPart for crate::dead_letter::DeadLetterLayer<P, H> {
    fn describe(&self) -> Option<String> {
        let c = self.config();
        let to = c.destination.as_deref().unwrap_or("<source>-dlq");
        Some(format!(
            "dead_letter(max_attempts={}, to={to})",
            c.max_attempts
        ))
    }

    fn check(&self, caps: &Capabilities) -> Result<(), Error> {
        self.config()
            .check(caps)
            .map_err(|e| Error::config("dead_letter", e))
    }
}

#[cfg(feature = "idempotency")]
impl<St: ?Sized> StackPart for crate::idempotency::IdempotencyLayer<St> {
    fn describe(&self) -> Option<String> {
        let c = self.config();
        Some(format!(
            "idempotency(lease={}, ttl={})",
            secs(c.lease),
            secs(c.ttl)
        ))
    }

    fn reservation_lease(&self) -> Option<Duration> {
        Some(self.config().lease)
    }
}

#[cfg(feature = "retry")]
impl<H> StackPart for crate::retry::RetryLayer<H> {
    fn describe(&self) -> Option<String> {
        let c = self.config();
        Some(format!(
            "retry(max_tries={}, window={}{})",
            c.max_tries,
            secs(c.window()),
            if c.budget.is_some() { ", budget" } else { "" }
        ))
    }

    fn check(&self, caps: &Capabilities) -> Result<(), Error> {
        self.config()
            .check(caps)
            .map_err(|e| Error::config("retry", e))
    }

    fn retry_window(&self) -> Option<Duration> {
        Some(self.config().window())
    }
}

#[cfg(feature = "timeout")]
impl StackPart for crate::timeout::TimeoutLayer {
    fn describe(&self) -> Option<String> {
        Some(format!("timeout({})", secs(self.timeout())))
    }
}
