//! [`RetryLayer`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower::Layer;

use super::budget::SharedBudget;
use super::{ConfigError, OnRetry, Retry, RetryConfig};

/// What every clone of a layer and its services share.
pub(crate) struct Shared<H> {
    pub(crate) config: RetryConfig,
    /// [`RetryConfig::window`], worked out once: the most one delivery attempt sleeps.
    pub(crate) window: Duration,
    pub(crate) budget: Option<Arc<SharedBudget>>,
    pub(crate) hook: H,
    /// The first try's number, made once: every message carries it.
    pub(crate) first_try: Arc<super::Try>,
    /// `redrive.messages.retried`, when a Stack with a metrics layer built this layer.
    #[cfg(feature = "metrics")]
    pub(crate) counter: Option<crate::metrics::RetryCounter>,
}

/// Wraps a service in [`Retry`]. Clones share the settings, the hook and the
/// [`Budget`](super::Budget).
pub struct RetryLayer<H = ()> {
    shared: Arc<Shared<H>>,
}

impl RetryLayer {
    /// A layer that retries with `config`.
    ///
    /// # Errors
    /// [`ConfigError`] when `config` cannot work (`max_tries` of 0, a NaN or negative
    /// multiplier or jitter, a max below the min); the message says what to change.
    /// Check it against the consumer's broker with [`RetryConfig::check`].
    pub fn new(config: RetryConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let budget = config
            .budget
            .as_ref()
            .map(|b| Arc::new(SharedBudget::new(b)));
        Ok(RetryLayer {
            shared: Arc::new(Shared {
                window: config.window(),
                config,
                budget,
                hook: (),
                first_try: Arc::new(super::Try::new(1)),
                #[cfg(feature = "metrics")]
                counter: None,
            }),
        })
    }
}

impl<H> RetryLayer<H> {
    /// Calls `hook` before each retry. The layer keeps its budget.
    #[must_use]
    pub fn on_retry<H2: OnRetry>(self, hook: H2) -> RetryLayer<H2> {
        RetryLayer {
            shared: Arc::new(Shared {
                config: self.shared.config.clone(),
                window: self.shared.window,
                budget: self.shared.budget.clone(),
                hook,
                first_try: self.shared.first_try.clone(),
                #[cfg(feature = "metrics")]
                counter: self.shared.counter.clone(),
            }),
        }
    }

    /// The layer's settings.
    pub fn config(&self) -> &RetryConfig {
        &self.shared.config
    }

    /// Counts each retry into `counter` too. Only for a layer no clone has been taken
    /// of (one a Stack built from settings); returns whether it was set.
    #[cfg(feature = "metrics")]
    pub(crate) fn count_into(&mut self, counter: crate::metrics::RetryCounter) -> bool {
        Arc::get_mut(&mut self.shared)
            .map(|shared| shared.counter = Some(counter))
            .is_some()
    }
}

impl<H> Clone for RetryLayer<H> {
    fn clone(&self) -> Self {
        RetryLayer {
            shared: self.shared.clone(),
        }
    }
}

impl<H> fmt::Debug for RetryLayer<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryLayer")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl<S, H> Layer<S> for RetryLayer<H> {
    type Service = Retry<S, H>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry {
            inner,
            shared: self.shared.clone(),
        }
    }
}
