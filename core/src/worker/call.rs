//! One handler call, from the service's `call` to its settlement ([`run_one`]), and a
//! failed message's stay in the park ([`park`]).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::watch;
use tower::Service;

use super::Redelivery;
use super::builder::Plan;
use super::config::Config;
use super::shutdown::{Shutdown, Stop};
use super::state::{Done, KeyId, Parking, Settled};
use crate::classify::{Classification, Classifier, ErrorKind};
use crate::handler::Panicked;
use crate::{
    BoxError, Capabilities, Delivery, Error, Extensions, Message, Outcome, Result, Settle,
};

pub(super) struct TaskCtx {
    /// How long one settle may take.
    pub(super) settle_timeout: Duration,
    pub(super) renew_every: Option<Duration>,
    pub(super) lease: Option<Duration>,
    pub(super) max_nack_delay: Duration,
    pub(super) park: bool,
    pub(super) redelivery: Redelivery,
    pub(super) classifier: Classifier,
    /// The signal every message carries, made once and shared; its receiver is also
    /// the one calls and parked messages watch.
    pub(super) shutdown: Arc<Shutdown>,
    /// Extensions holding only `shutdown`, shared by every message that arrives without
    /// extensions of its own, so handing a message the signal allocates nothing.
    pub(super) signal: Extensions,
}

impl TaskCtx {
    pub(super) fn new(config: &Config, caps: Capabilities, plan: Plan, shutdown: Shutdown) -> Self {
        let mut ctx = TaskCtx {
            settle_timeout: config.settle_timeout,
            renew_every: plan.renew_every,
            lease: caps.lease,
            max_nack_delay: caps.max_nack_delay,
            park: plan.park,
            redelivery: config.redelivery,
            classifier: config.classifier.clone(),
            shutdown: Arc::new(shutdown),
            signal: Extensions::new(),
        };
        ctx.signal.insert_shared(ctx.shutdown.clone());
        ctx
    }
}

pub(super) fn run_one<S>(
    service: &mut S,
    delivery: Delivery,
    key: Option<KeyId>,
    ctx: &TaskCtx,
) -> impl Future<Output = Done> + Send + 'static
where
    S: Service<Message>,
    S::Response: Into<Outcome> + Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
    S::Future: Send + 'static,
{
    let (mut message, settle) = delivery.into_parts();
    // Copied before the signal goes in: a message from the broker has no extensions,
    // so the copy shares none, and what the service adds is not copied on write.
    // Run again after parking, the copy gets the signal then.
    let parked_copy = ctx.park.then(|| message.clone());
    if message.extensions.is_empty() {
        // A layer that adds an extension copies the shared list first.
        message.extensions = ctx.signal.clone();
    } else {
        message.extensions.insert_shared(ctx.shutdown.clone());
    }
    let attempt = message.metadata.attempt;
    // Shared, not copied: for the log lines about this message.
    let ids = Ids {
        message_id: message.metadata.message_id.clone(),
        headers: message.headers.clone(),
    };
    let call = std::panic::catch_unwind(AssertUnwindSafe(|| service.call(message)));
    let renew_every = ctx.renew_every;
    let lease = ctx.lease;
    let max_nack_delay = ctx.max_nack_delay;
    let redelivery = ctx.redelivery;
    let classifier = ctx.classifier.clone();
    let settle_timeout = ctx.settle_timeout;
    let mut stop = ctx.shutdown.rx.clone();

    async move {
        let result: Option<std::result::Result<Outcome, (BoxError, bool)>> = match call {
            Err(panic) => Some(Err((Panicked::from_payload(panic).into(), true))),
            Ok(fut) => {
                // The response's conversion runs inside the catch too: it is user code.
                let fut = AssertUnwindSafe(fut.map(|r| r.map(Into::into).map_err(Into::into)))
                    .catch_unwind();
                let keeper = keep_lease(&settle, renew_every, lease);
                // The call first: one that completes on its first poll never sets up
                // the lease timer or the abort watch (which takes the watch's lock to
                // register, and again to deregister).
                tokio::select! {
                    biased;
                    r = fut => Some(match r {
                        Ok(Ok(outcome)) => Ok(outcome),
                        // A panic the stack caught (and turned into an error every layer
                        // saw) is counted as one all the same.
                        Ok(Err(e)) => {
                            let panicked = is_panic(&*e);
                            Err((e, panicked))
                        }
                        Err(panic) => Err((Panicked::from_payload(panic).into(), true)),
                    }),
                    () = keeper => unreachable!("lease keeping never ends"),
                    _ = stop.wait_for(|s| *s == Stop::Abort) => None,
                }
            }
        };
        match result {
            None => {
                let settled = bounded(settle.nack(Duration::ZERO), settle_timeout).await;
                let settle_error = log_settle(settled, "nack after the shutdown deadline");
                Done::Settled {
                    key,
                    settled: Settled::Aborted,
                    panicked: false,
                    settle_error,
                }
            }
            Some(Ok(outcome)) => {
                let settle_error = log_settle(bounded(settle.ack(), settle_timeout).await, "ack");
                Done::Settled {
                    key,
                    settled: Settled::Acked(outcome),
                    panicked: false,
                    settle_error,
                }
            }
            Some(Err((err, panicked))) => {
                // The classifier and the error's `Display` are user code: a panic in
                // either must not take the message's fate with it.
                let class =
                    std::panic::catch_unwind(AssertUnwindSafe(|| classifier.classify(&*err)))
                        .unwrap_or_else(|panic| {
                            tracing::error!(
                                attempt,
                                message_id = %ids.message_id(),
                                correlation_id = %ids.correlation_id(),
                                panic = %logged(&Panicked::from_payload(panic)),
                                "the classifier panicked; the failure is taken as transient"
                            );
                            Classification::TRANSIENT
                        });
                let delay = class
                    .retry_after
                    .unwrap_or_else(|| redelivery.delay(attempt));
                let error = logged(&*err);
                if class.kind == ErrorKind::Permanent {
                    tracing::error!(
                        attempt,
                        message_id = %ids.message_id(),
                        correlation_id = %ids.correlation_id(),
                        error = %error,
                        "permanent error reached the Worker; add a dead-letter layer to take such messages out of the queue"
                    );
                } else {
                    tracing::warn!(
                        attempt,
                        message_id = %ids.message_id(),
                        correlation_id = %ids.correlation_id(),
                        error = %error,
                        ?delay,
                        "handler failed"
                    );
                }
                match parked_copy {
                    Some(message) => {
                        settle.running(false);
                        Done::Park(Box::new(Parking {
                            key,
                            message,
                            settle,
                            delay,
                            panicked,
                        }))
                    }
                    None => {
                        let delay = delay.min(max_nack_delay);
                        let settled = bounded(settle.nack(delay), settle_timeout).await;
                        let settle_error = log_settle(settled, "nack");
                        Done::Settled {
                            key,
                            settled: Settled::Nacked,
                            panicked,
                            settle_error,
                        }
                    }
                }
            }
        }
    }
}

/// Extends the lease every `every` for as long as it is polled.
async fn keep_lease(settle: &Settle, every: Option<Duration>, lease: Option<Duration>) {
    let (Some(every), Some(lease)) = (every, lease) else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(every).await;
        if let Err(e) = settle.extend(lease).await {
            tracing::warn!(error = %e, "lease extension failed; the broker may redeliver this message");
        }
    }
}

/// How often a parked message checks that it is still this consumer's
/// ([`Acker::is_current`](crate::Acker::is_current)): a message whose partition was
/// revoked leaves its park within this, and frees its key for the new assignment.
const PARKED_CURRENT_CHECK: Duration = Duration::from_millis(250);

/// Why a parked message left its park.
enum Unparked {
    /// Its delay passed: it runs again.
    Due,
    /// Shutdown began: it goes back to the broker.
    Shutdown,
    /// It is no longer this consumer's: it goes back untried.
    NotCurrent,
}

#[allow(clippy::too_many_arguments, reason = "one place, called once")]
pub(super) async fn park(
    message: Message,
    settle: Settle,
    key: Option<KeyId>,
    delay: Duration,
    settle_timeout: Duration,
    renew_every: Option<Duration>,
    lease: Option<Duration>,
    mut stop: watch::Receiver<Stop>,
) -> Done {
    let keeper = keep_lease(&settle, renew_every, lease);
    let unparked = tokio::select! {
        () = tokio::time::sleep(delay) => Unparked::Due,
        () = keeper => unreachable!("lease keeping never ends"),
        _ = stop.wait_for(|s| *s >= Stop::Draining) => Unparked::Shutdown,
        () = no_longer_current(&settle) => Unparked::NotCurrent,
    };
    let settled = match unparked {
        Unparked::Due => return Done::Unpark(Box::new((message, settle))),
        Unparked::Shutdown => bounded(settle.nack(Duration::ZERO), settle_timeout).await,
        Unparked::NotCurrent => {
            let ids = Ids {
                message_id: message.metadata.message_id.clone(),
                headers: message.headers.clone(),
            };
            tracing::info!(
                message_id = %ids.message_id(),
                correlation_id = %ids.correlation_id(),
                "parked delivery no longer this consumer's (partition revoked); handed back before its delay"
            );
            bounded(settle.hand_back(), settle_timeout).await
        }
    };
    Done::HandedBack {
        key,
        parked: true,
        count: 1,
        settle_errors: u64::from(log_settle(settled, "hand back")),
    }
}

/// Completes once `settle`'s message is no longer this consumer's, checking every
/// [`PARKED_CURRENT_CHECK`].
async fn no_longer_current(settle: &Settle) {
    let start = tokio::time::Instant::now() + PARKED_CURRENT_CHECK;
    let mut every = tokio::time::interval_at(start, PARKED_CURRENT_CHECK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if !settle.is_current() {
            return;
        }
    }
}

/// `settle`, given up after `limit`: a broker that does not answer (a connection it
/// blocks) cannot hold a call's slot, or shutdown, for longer.
pub(super) async fn bounded(
    settle: impl Future<Output = Result<()>>,
    limit: Duration,
) -> Result<()> {
    match tokio::time::timeout(limit, settle).await {
        Ok(settled) => settled,
        Err(_) => Err(Error::broker(format!(
            "the broker did not answer within the settle timeout ({limit:?})"
        ))),
    }
}

pub(super) fn log_settle(r: Result<()>, what: &str) -> bool {
    match r {
        Ok(()) => false,
        Err(e) => {
            tracing::warn!(settle = what, error = %e, "settling failed; the broker will redeliver the message");
            true
        }
    }
}

/// Whether `err` or one of its sources is a caught panic.
fn is_panic(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(e) = next {
        if e.is::<Panicked>() {
            return true;
        }
        next = e.source();
    }
    false
}

/// The most bytes of an error's text a Worker log line carries: error text can quote a
/// payload (a decoder's "invalid value" quotes the value).
const MAX_LOGGED_ERROR: usize = 1024;

/// An error for a log line: bounded, and safe from a `Display` that panics.
pub(super) fn logged<E: std::fmt::Display + ?Sized>(err: &E) -> crate::text::Bounded<'_, E> {
    crate::text::bounded(err, MAX_LOGGED_ERROR)
}

/// What the Worker's log lines about a message name it by: its id (the producer's
/// `message-id` header, else the broker's id) and its correlation id.
struct Ids {
    message_id: Option<std::sync::Arc<str>>,
    headers: crate::Headers,
}

impl Ids {
    fn message_id(&self) -> &str {
        self.headers
            .get_str(crate::names::MESSAGE_ID)
            .or(self.message_id.as_deref())
            .unwrap_or("")
    }

    fn correlation_id(&self) -> &str {
        self.headers
            .get_str(crate::names::CORRELATION_ID)
            .unwrap_or("")
    }
}
