//! Running blocking librdkafka calls without stalling the runtime.

use tokio::runtime::RuntimeFlavor;

/// Runs a blocking librdkafka call on a thread of its own and waits for it. Unlike
/// `spawn_blocking`, a call that outlives its caller's timeout does not hold up the
/// runtime's shutdown (or the process's exit).
pub(super) async fn off_runtime<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("redrive-kafka-close".into())
        .spawn(move || {
            let _ = tx.send(f());
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "could not start a thread for a blocking kafka call");
        return None;
    }
    rx.await.ok()
}

/// Runs `f`, which blocks, handing the worker thread over first on a multi-thread
/// runtime so its other tasks run on.
pub(super) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}
