//! Building a [`Stack`]: its description, its checks, and the layers around a handler
//! in the canonical order.

use std::fmt::Write as _;

use redrive_core::{BoxError, Capabilities, CatchPanic};
use tower::Layer;

use crate::Error;

use super::{BreakerPlace, MetricsPlace, Stack, StackPart};

impl<Tr, Me, Dl, Id, Cb, Rl, Re, To, Us> Stack<Tr, Me, Dl, Id, Cb, Rl, Re, To, Us>
where
    Tr: StackPart,
    Me: StackPart,
    Dl: StackPart,
    Id: StackPart,
    Cb: StackPart,
    Rl: StackPart,
    Re: StackPart,
    To: StackPart,
{
    fn parts(&self) -> [&dyn StackPart; 9] {
        [
            &self.trace,
            &self.metrics,
            &self.dead_letter,
            &self.circuit_breaker,
            &self.idempotency,
            &self.rate_limit,
            &self.retry,
            &self.timeout,
            &self.custom,
        ]
    }

    /// The built pipeline as text, outermost first, ending in `handler`.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for d in self.parts().iter().filter_map(|p| p.describe()) {
            let _ = write!(out, "{d} -> ");
        }
        out.push_str("handler");
        out
    }

    /// Checks every layer against the consumer's capabilities (a retry window longer
    /// than the broker's lease, say), and the layers against each other (a retry
    /// window longer than the idempotency lease). `Worker::builder(..).stack(stack)`
    /// runs it when the Worker is built; call it yourself only when you wrap a handler
    /// with [`service`](Stack::service).
    ///
    /// # Errors
    /// The first layer's [`Error::Config`], naming the layer and what to change.
    pub fn check(&self, caps: &Capabilities) -> Result<(), Error> {
        if let Some(e) = self.settings.errors.first() {
            return Err(Error::config(e.layer(), e.message()));
        }
        let parts = self.parts();
        parts.iter().try_for_each(|p| p.check(caps))?;
        let window = parts.iter().filter_map(|p| p.retry_window()).max();
        let lease = parts.iter().filter_map(|p| p.reservation_lease()).min();
        if let (Some(window), Some(lease)) = (window, lease) {
            if window >= lease {
                return Err(Error::config(
                    "idempotency",
                    format!(
                        "retries can keep a message for {window:?} between tries, but the \
                         idempotency lease is {lease:?}; the reservation is renewed while the \
                         call runs, but if the store cannot be reached to renew it, it lapses \
                         and another consumer may run the message while retries go on here; \
                         raise the lease above {window:?} (`IdempotencyConfig::with_lease`) \
                         or shorten the retries"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Wraps `handler` in the stack.
    ///
    /// # Panics
    /// If a place was given settings that cannot work; [`check`](Stack::check) first.
    pub fn service<S>(&self, handler: S) -> <Self as Layer<S>>::Service
    where
        Self: Layer<S>,
    {
        self.layer(handler)
    }
}

/// What lets `Worker::builder(consumer).stack(stack).handler(handler)` wrap the handler
/// and run [`Stack::check`] against the consumer's capabilities at `build`.
impl<H, Tr, Me, Dl, Id, Cb, Rl, Re, To, Us> redrive_core::Pipeline<H>
    for Stack<Tr, Me, Dl, Id, Cb, Rl, Re, To, Us>
where
    Us: Layer<H>,
    To: Layer<CatchPanic<Us::Service>>,
    Re: Layer<To::Service>,
    Rl: Layer<Re::Service>,
    Id: Layer<Rl::Service>,
    Cb: Layer<Id::Service>,
    Dl: Layer<Cb::Service>,
    Me: Layer<Dl::Service>,
    Tr: Layer<Me::Service>,
    Me: MetricsPlace,
    Cb: BreakerPlace,
    Tr: StackPart,
    Me: StackPart,
    Dl: StackPart,
    Id: StackPart,
    Cb: StackPart,
    Rl: StackPart,
    Re: StackPart,
    To: StackPart,
{
    type Service = Tr::Service;

    fn check(&self, caps: &Capabilities) -> Result<(), BoxError> {
        Stack::check(self, caps).map_err(Into::into)
    }

    fn attach(&self, health: &redrive_core::Health) {
        self.metrics.observe_worker(health);
        self.metrics.report_part(&self.rate_limit);
    }

    fn wrap(&self, handler: H) -> Self::Service {
        // The Worker's builder reports `check`'s errors at `build`, and never runs
        // this service then: the stand-ins of bad settings are never used.
        self.wrap_unchecked(handler)
    }
}

impl<S, Tr, Me, Dl, Id, Cb, Rl, Re, To, Us> Layer<S> for Stack<Tr, Me, Dl, Id, Cb, Rl, Re, To, Us>
where
    Us: Layer<S>,
    To: Layer<CatchPanic<Us::Service>>,
    Re: Layer<To::Service>,
    Rl: Layer<Re::Service>,
    Id: Layer<Rl::Service>,
    Cb: Layer<Id::Service>,
    Dl: Layer<Cb::Service>,
    Me: Layer<Dl::Service>,
    Tr: Layer<Me::Service>,
    Me: MetricsPlace,
    Cb: BreakerPlace,
{
    type Service = Tr::Service;

    /// # Panics
    /// If a place was given settings that cannot work: [`check`](Stack::check)
    /// reports them, and `Worker::builder(..).build()` runs it before it wraps the
    /// handler. A Stack used as a plain tower layer must be checked first.
    fn layer(&self, handler: S) -> Self::Service {
        if let Some(e) = self.settings.errors.first() {
            panic!(
                "the Stack was used with settings that cannot work ({e}); `Stack::check` \
                 reports them"
            );
        }
        self.wrap_unchecked(handler)
    }
}

impl<Tr, Me, Dl, Id, Cb, Rl, Re, To, Us> Stack<Tr, Me, Dl, Id, Cb, Rl, Re, To, Us> {
    /// The handler in every layer, outermost first, without looking at the errors of
    /// the settings.
    fn wrap_unchecked<S>(&self, handler: S) -> Tr::Service
    where
        Us: Layer<S>,
        To: Layer<CatchPanic<Us::Service>>,
        Re: Layer<To::Service>,
        Rl: Layer<Re::Service>,
        Id: Layer<Rl::Service>,
        Cb: Layer<Id::Service>,
        Dl: Layer<Cb::Service>,
        Me: Layer<Dl::Service>,
        Tr: Layer<Me::Service>,
        Me: MetricsPlace,
        Cb: BreakerPlace,
    {
        // The metrics layer reports the breaker in place now that the Stack is
        // complete: the default breaker is rebuilt when a classifier is set.
        self.metrics.follow(&self.circuit_breaker);
        // Innermost: a panic in the handler (or in the user's layers around it) is an
        // error every layer sees.
        let s = self.custom.layer.layer(handler);
        let s = self.timeout.layer(CatchPanic::new(s));
        let s = self.retry.layer(s);
        let s = self.rate_limit.layer(s);
        let s = self.idempotency.layer(s);
        let s = self.circuit_breaker.layer(s);
        let s = self.dead_letter.layer(s);
        let s = self.metrics.layer(s);
        self.trace.layer(s)
    }
}
