//! [`DeadLetterLayer`].

use std::fmt;
use std::sync::Arc;

use redrive_core::Publisher;
use tower::Layer;

use super::{ConfigError, DeadLetter, DeadLetterConfig, OnDeadLetter};

/// What every clone of a layer and its services share.
pub(crate) struct Shared<P, H> {
    pub(crate) publisher: Arc<P>,
    pub(crate) config: DeadLetterConfig,
    pub(crate) hook: H,
}

/// Wraps a service in [`DeadLetter`]. Clones share the publisher, settings and hook.
pub struct DeadLetterLayer<P, H = ()> {
    shared: Arc<Shared<P, H>>,
}

impl<P: Publisher> DeadLetterLayer<P> {
    /// A layer that publishes through `publisher` with `config`.
    ///
    /// # Errors
    /// [`ConfigError`] when `config` cannot work (`max_attempts` of 0, an empty
    /// destination, a destination the publisher's broker refuses by name, see
    /// [`Publisher::check_destination`]); the message says what to change.
    pub fn new(publisher: Arc<P>, config: DeadLetterConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        if let Some(d) = &config.destination {
            publisher.check_destination(d).map_err(|e| {
                ConfigError::new(
                    "dead-letter",
                    format!("the dead-letter destination `{d}` cannot be used: {e}"),
                )
            })?;
        }
        Ok(DeadLetterLayer {
            shared: Arc::new(Shared {
                publisher,
                config,
                hook: (),
            }),
        })
    }
}

impl<P, H> DeadLetterLayer<P, H> {
    /// Calls `hook` after each confirmed dead-letter publish.
    #[must_use]
    pub fn on_dead_letter<H2: OnDeadLetter>(self, hook: H2) -> DeadLetterLayer<P, H2> {
        DeadLetterLayer {
            shared: Arc::new(Shared {
                publisher: self.shared.publisher.clone(),
                config: self.shared.config.clone(),
                hook,
            }),
        }
    }

    /// The layer's settings.
    pub fn config(&self) -> &DeadLetterConfig {
        &self.shared.config
    }
}

impl<P, H> Clone for DeadLetterLayer<P, H> {
    fn clone(&self) -> Self {
        DeadLetterLayer {
            shared: self.shared.clone(),
        }
    }
}

impl<P, H> fmt::Debug for DeadLetterLayer<P, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetterLayer")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl<S, P, H> Layer<S> for DeadLetterLayer<P, H> {
    type Service = DeadLetter<S, P, H>;

    fn layer(&self, inner: S) -> Self::Service {
        DeadLetter {
            inner,
            shared: self.shared.clone(),
        }
    }
}
