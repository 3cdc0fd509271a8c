//! Stopping on the operating system's stop signals: [`shutdown_signal`] completes on
//! SIGTERM or Ctrl-C, for [`Worker::run_until`](crate::Worker::run_until).

use std::future::pending;

/// Completes when the process is asked to stop: on SIGTERM or SIGINT (Ctrl-C) on Unix,
/// on Ctrl-C elsewhere. Give it to [`Worker::run_until`](crate::Worker::run_until) so
/// that both start a graceful shutdown.
///
/// ```no_run
/// use redrive_core::memory::MemoryBroker;
/// use redrive_core::{handler, BoxError, Message, Worker};
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), BoxError> {
/// let broker = MemoryBroker::new();
/// let handler = handler::handler_fn(|msg: Message| async move {
///     println!("{:?}", msg.payload);
///     Ok::<_, BoxError>(())
/// });
/// let worker = Worker::builder(broker.consumer("orders")).service(handler).build()?;
/// let report = worker.run_until(redrive_core::shutdown_signal()).await;
/// println!("{report:?}");
/// # Ok(())
/// # }
/// ```
///
/// To stop also for a reason of your own, wait for whichever comes first:
///
/// ```no_run
/// # async fn f(done: tokio::sync::oneshot::Receiver<()>) {
/// let stop = async {
///     tokio::select! {
///         _ = done => {}
///         () = redrive_core::shutdown_signal() => {}
///     }
/// };
/// # let _ = stop;
/// # }
/// ```
///
/// # Why SIGTERM too
/// Kubernetes, Docker and systemd stop a process with SIGTERM and kill it after a
/// grace period (by default 30 s in Kubernetes, 10 s in Docker, 90 s in systemd): keep
/// [`shutdown_timeout`](crate::WorkerBuilder::shutdown_timeout) under it. A program
/// that waits for Ctrl-C only dies of the SIGTERM at once: nothing drains, and
/// in-flight messages come back only when their lease runs out or the broker notices
/// the lost connection.
///
/// # A second signal
/// The handlers stay installed once the first signal arrived (Tokio keeps a signal's
/// handler for the rest of the process), so a second SIGTERM or Ctrl-C would do nothing.
/// Instead, a second signal ends the process at once with [`std::process::exit`]:
/// exit code 143 when it is SIGTERM and 130 when it is SIGINT or Ctrl-C (128 plus the
/// signal's number, as a shell reports a process that signal killed). Messages still
/// in flight are then not settled, and destructors do not run: the broker delivers
/// those messages again once their lease runs out or their connection closes, as after
/// a crash. Nothing is lost, but their handlers may run twice.
///
/// Before this future is first polled no handler is installed, and a signal has its
/// default effect: the process ends. [`Worker::run_until`](crate::Worker::run_until)
/// polls it before it takes the first delivery.
///
/// # Logs
/// - `info` when the first signal arrives, naming it;
/// - `warn` when a second one arrives, just before the process exits;
/// - `warn` when the handler for one signal cannot be installed: it then waits for
///   the other alone, and, with neither, logs an `error` and never completes (the
///   Worker then runs until its consumer closes).
///
/// # Panics
/// Only where [`tokio::signal`] panics itself: when polled outside a Tokio runtime
/// whose I/O driver is on (`#[tokio::main]` and `Builder::enable_all` turn it on).
/// A handler that cannot be installed is logged, never a panic.
pub async fn shutdown_signal() {
    let mut listener = os::Listener::install();
    let first = listener.next().await;
    tracing::info!(
        signal = first.name(),
        "shutdown signal received; finishing in-flight messages (a second signal exits at once)"
    );
    tokio::spawn(async move {
        let second = listener.next().await;
        tracing::warn!(
            signal = second.name(),
            exit_code = second.exit_code(),
            "second shutdown signal received; exiting now, in-flight messages are left to the broker's redelivery"
        );
        std::process::exit(second.exit_code());
    });
}

/// A signal [`shutdown_signal`] listens for.
#[derive(Clone, Copy, Debug)]
enum Received {
    /// SIGTERM.
    #[cfg_attr(not(unix), allow(dead_code, reason = "Unix only"))]
    Terminate,
    /// SIGINT, or Ctrl-C outside Unix.
    Interrupt,
}

impl Received {
    fn name(self) -> &'static str {
        match self {
            Received::Terminate => "SIGTERM",
            Received::Interrupt => "SIGINT (Ctrl-C)",
        }
    }

    /// 128 plus the signal's number, as a shell reports a process killed by it.
    fn exit_code(self) -> i32 {
        match self {
            Received::Terminate => 128 + 15,
            Received::Interrupt => 128 + 2,
        }
    }
}

#[cfg(unix)]
mod os {
    use tokio::signal::unix::{Signal, SignalKind, signal};

    use super::{Received, pending};

    /// The SIGTERM and SIGINT handlers, installed once and kept: a signal that arrives
    /// between two waits is seen by the next one.
    pub(super) struct Listener {
        terminate: Option<Signal>,
        interrupt: Option<Signal>,
    }

    impl Listener {
        pub(super) fn install() -> Self {
            let listener = Listener {
                terminate: install(SignalKind::terminate(), Received::Terminate),
                interrupt: install(SignalKind::interrupt(), Received::Interrupt),
            };
            if listener.terminate.is_none() && listener.interrupt.is_none() {
                tracing::error!(
                    "no shutdown signal can be listened for; stop the process another way"
                );
            }
            listener
        }

        pub(super) async fn next(&mut self) -> Received {
            tokio::select! {
                () = wait(&mut self.terminate) => Received::Terminate,
                () = wait(&mut self.interrupt) => Received::Interrupt,
            }
        }
    }

    fn install(kind: SignalKind, received: Received) -> Option<Signal> {
        signal(kind)
            .inspect_err(|e| {
                tracing::warn!(
                    signal = received.name(),
                    error = %e,
                    "cannot listen for this shutdown signal; waiting for the other alone"
                );
            })
            .ok()
    }

    async fn wait(signal: &mut Option<Signal>) {
        if let Some(s) = signal {
            // Tokio documents that `recv` never returns `None`; if it did, the signal
            // could not arrive any more, and waiting for the other is the answer.
            if s.recv().await.is_some() {
                return;
            }
        }
        pending().await
    }
}

#[cfg(not(unix))]
mod os {
    use super::{Received, pending};

    /// Ctrl-C, the one stop signal outside Unix.
    pub(super) struct Listener;

    impl Listener {
        pub(super) fn install() -> Self {
            Listener
        }

        pub(super) async fn next(&mut self) -> Received {
            if let Err(e) = tokio::signal::ctrl_c().await {
                tracing::error!(
                    error = %e,
                    "cannot listen for Ctrl-C; no shutdown signal will arrive, stop the process another way"
                );
                pending::<()>().await;
            }
            Received::Interrupt
        }
    }
}
