//! Error classification: transient by default, `permanent` or `retry_after` by marker.
//!
//! A handler returns any error. Retrying it is the default. Wrap it in [`Permanent`]
//! (poison, bad schema, validation) and it is never retried; wrap it in [`RetryAfter`]
//! and the redelivery waits at least that long. Markers are found anywhere in the
//! error's [`source`](std::error::Error::source) chain, so a marker deep inside an
//! `anyhow`-style wrapper still counts. A [`Classifier`] hook maps error types a user
//! cannot wrap (a database driver's error, say).
//!
//! ```
//! use std::time::Duration;
//! use redrive_core::classify::{self, Classifier, ErrorKind};
//!
//! let err = classify::permanent(std::io::Error::other("bad schema"));
//! assert_eq!(Classifier::default().classify(&*err).kind, ErrorKind::Permanent);
//!
//! let err = classify::retry_after(std::io::Error::other("throttled"), Duration::from_secs(3));
//! let c = Classifier::default().classify(&*err);
//! assert_eq!((c.kind, c.retry_after), (ErrorKind::Transient, Some(Duration::from_secs(3))));
//! ```

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::BoxError;

/// Whether an error is worth retrying.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Worth retrying: a timeout, an unavailable downstream. The default.
    Transient,
    /// Never worth retrying: the message itself is bad.
    Permanent,
}

impl ErrorKind {
    /// `"transient"` or `"permanent"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Transient => "transient",
            ErrorKind::Permanent => "permanent",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What classification says about one error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Classification {
    /// Transient or permanent.
    pub kind: ErrorKind,
    /// A delay the error asks for before the next try, if any.
    pub retry_after: Option<Duration>,
}

impl Classification {
    /// Transient with no delay hint.
    pub const TRANSIENT: Classification = Classification {
        kind: ErrorKind::Transient,
        retry_after: None,
    };
    /// Permanent.
    pub const PERMANENT: Classification = Classification {
        kind: ErrorKind::Permanent,
        retry_after: None,
    };

    /// Whether the error is permanent.
    pub fn is_permanent(&self) -> bool {
        self.kind == ErrorKind::Permanent
    }
}

/// Marks an error as permanent: it is never retried.
#[derive(Debug)]
pub struct Permanent(BoxError);

impl Permanent {
    /// Wraps `err`.
    pub fn new(err: impl Into<BoxError>) -> Self {
        Permanent(err.into())
    }

    /// The wrapped error.
    pub fn into_inner(self) -> BoxError {
        self.0
    }
}

impl fmt::Display for Permanent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl StdError for Permanent {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.0)
    }
}

/// Marks an error as transient with a delay before the next try.
#[derive(Debug)]
pub struct RetryAfter {
    delay: Duration,
    source: BoxError,
}

impl RetryAfter {
    /// Wraps `err`, asking for `delay` before the next try.
    pub fn new(err: impl Into<BoxError>, delay: Duration) -> Self {
        RetryAfter {
            delay,
            source: err.into(),
        }
    }

    /// The delay asked for.
    pub fn delay(&self) -> Duration {
        self.delay
    }
}

impl fmt::Display for RetryAfter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.source, f)
    }
}

impl StdError for RetryAfter {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.source)
    }
}

/// Wraps `err` as a [`Permanent`] error, boxed, ready to return from a handler.
pub fn permanent(err: impl Into<BoxError>) -> BoxError {
    Box::new(Permanent::new(err))
}

/// Wraps `err` as a [`RetryAfter`] error, boxed, ready to return from a handler.
pub fn retry_after(err: impl Into<BoxError>, delay: Duration) -> BoxError {
    Box::new(RetryAfter::new(err, delay))
}

type Hook = dyn Fn(&(dyn StdError + 'static)) -> Option<Classification> + Send + Sync;

/// Classifies errors: a user hook first, then the markers along the source chain.
///
/// Cheap to clone; every layer that needs to classify (retry, dead letter, circuit
/// breaker, the Worker) takes one, so one hook serves the whole stack.
#[derive(Clone, Default)]
pub struct Classifier {
    hook: Option<Arc<Hook>>,
}

impl Classifier {
    /// Classifies by markers only.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a hook that sees each error of the source chain, outermost first, and may
    /// classify it. The first `Some` wins; markers are the fallback.
    ///
    /// ```
    /// use redrive_core::classify::{Classification, Classifier, ErrorKind};
    ///
    /// let classifier = Classifier::new().with_hook(|err| {
    ///     err.downcast_ref::<std::num::ParseIntError>()
    ///         .map(|_| Classification::PERMANENT)
    /// });
    /// let err = "x".parse::<u32>().unwrap_err();
    /// assert_eq!(classifier.classify(&err).kind, ErrorKind::Permanent);
    /// ```
    #[must_use]
    pub fn with_hook<F>(mut self, hook: F) -> Self
    where
        F: Fn(&(dyn StdError + 'static)) -> Option<Classification> + Send + Sync + 'static,
    {
        self.hook = Some(Arc::new(hook));
        self
    }

    /// Classifies `err`.
    pub fn classify(&self, err: &(dyn StdError + 'static)) -> Classification {
        let mut retry_after = None;
        let mut next = Some(err);
        while let Some(e) = next {
            if let Some(hook) = &self.hook {
                if let Some(c) = hook(e) {
                    return c;
                }
            }
            if e.is::<Permanent>() {
                return Classification::PERMANENT;
            }
            if let Some(r) = e.downcast_ref::<RetryAfter>() {
                retry_after.get_or_insert(r.delay);
            }
            next = e.source();
        }
        Classification {
            kind: ErrorKind::Transient,
            retry_after,
        }
    }
}

impl fmt::Debug for Classifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Classifier")
            .field("hook", &self.hook.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] BoxError);

    #[test]
    fn transient_by_default() {
        let err = std::io::Error::other("boom");
        assert_eq!(
            Classifier::default().classify(&err),
            Classification::TRANSIENT
        );
    }

    #[test]
    fn markers_are_found_through_the_source_chain() {
        let err = Outer(permanent("bad payload"));
        assert!(Classifier::default().classify(&err).is_permanent());
        let err = Outer(retry_after("slow down", Duration::from_millis(250)));
        let c = Classifier::default().classify(&err);
        assert_eq!(c.kind, ErrorKind::Transient);
        assert_eq!(c.retry_after, Some(Duration::from_millis(250)));
    }

    #[test]
    fn permanent_wins_over_retry_after() {
        let err = retry_after(permanent("poison"), Duration::from_secs(1));
        assert!(Classifier::default().classify(&*err).is_permanent());
    }

    #[test]
    fn hook_sees_inner_errors_and_wins() {
        let c = Classifier::new().with_hook(|e| {
            e.downcast_ref::<std::fmt::Error>()
                .map(|_| Classification::PERMANENT)
        });
        let err = Outer(Box::new(std::fmt::Error));
        assert!(c.classify(&err).is_permanent());
        assert_eq!(c.classify(&Outer("x".into())), Classification::TRANSIENT);
    }
}
