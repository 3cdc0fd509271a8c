//! The Worker's stop signal: [`Shutdown`], as layers see it, and the [`Stop`] stages
//! behind it.

use tokio::sync::watch;

/// Tells layers that the Worker's shutdown has begun, so they stop starting new work
/// (a retry layer stops retrying). The Worker puts one in every message's
/// [`extensions`](crate::Message::extensions).
///
/// ```
/// # use redrive_core::{Message, worker::Shutdown};
/// # fn f(msg: &Message) {
/// if msg.extensions.get::<Shutdown>().is_some_and(Shutdown::is_started) {
///     // do not retry
/// }
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct Shutdown {
    pub(super) rx: watch::Receiver<Stop>,
}

impl Shutdown {
    /// A signal that never fires, for tests and for services run outside a Worker.
    pub fn never() -> Self {
        let (_, rx) = watch::channel(Stop::Running);
        Shutdown { rx }
    }

    /// A signal and the function that fires it, for tests and for custom runtimes.
    pub fn channel() -> (impl Fn() + Send + Sync + 'static, Self) {
        let (tx, rx) = watch::channel(Stop::Running);
        (
            move || {
                let _ = tx.send(Stop::Draining);
            },
            Shutdown { rx },
        )
    }

    /// Whether shutdown has begun.
    pub fn is_started(&self) -> bool {
        *self.rx.borrow() != Stop::Running
    }

    /// Completes when shutdown begins; never, if the signal's source is gone without
    /// having fired.
    pub async fn started(&self) {
        let mut rx = self.rx.clone();
        if rx.wait_for(|s| *s != Stop::Running).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Stop {
    Running,
    Draining,
    Abort,
}
