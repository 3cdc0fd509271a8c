//! A steady load of reserve-and-commit on an idempotency store, for the tests that
//! restart the store's server under it, and the checks those tests share: operations
//! fail while the server is down, none hangs, and they succeed again after it is back
//! with nothing done by hand.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redrive_middleware::idempotency::{CommitStatus, IdempotencyStore, Reservation};
use tokio::task::JoinHandle;

/// The longest a store operation may take, outage or not, before the test calls it
/// hung.
pub(crate) const HUNG: Duration = Duration::from_secs(15);

/// The longest a store operation may take in these tests: the stores' own timeouts
/// are a few seconds.
pub(crate) const SLOWEST: Duration = Duration::from_secs(8);

/// How soon after the server is back an operation must succeed.
pub(crate) const RECOVERY: Duration = Duration::from_secs(10);

/// One reserve-and-commit of a new key.
#[derive(Debug)]
pub(crate) struct Op {
    /// When it ended, since the load started.
    pub(crate) ended: Duration,
    /// How long it took.
    pub(crate) took: Duration,
    /// Its error, if it failed.
    pub(crate) error: Option<String>,
}

/// Workers that each reserve and commit one new key after another until stopped.
pub(crate) struct Load {
    started: Instant,
    stop: Arc<AtomicBool>,
    ops: Arc<Mutex<Vec<Op>>>,
    workers: Vec<JoinHandle<()>>,
}

impl Load {
    /// Starts `workers` workers on `store`.
    pub(crate) fn start(store: Arc<dyn IdempotencyStore>, workers: usize) -> Self {
        let started = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(Mutex::new(Vec::new()));
        let run = fastrand::u64(..);
        let workers = (0..workers)
            .map(|w| {
                let (store, stop, ops) = (store.clone(), stop.clone(), ops.clone());
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        n += 1;
                        let key = format!("load-{run:016x}-{w}-{n}");
                        let began = Instant::now();
                        let error = match tokio::time::timeout(HUNG, once(&*store, &key)).await {
                            Ok(Ok(())) => None,
                            Ok(Err(e)) => Some(e),
                            Err(_) => Some(format!("hung for {HUNG:?}")),
                        };
                        let failed = error.is_some();
                        ops.lock().unwrap().push(Op {
                            ended: started.elapsed(),
                            took: began.elapsed(),
                            error,
                        });
                        // A failing store answers at once; don't spin on it.
                        let pause = if failed { 50 } else { 5 };
                        tokio::time::sleep(Duration::from_millis(pause)).await;
                    }
                })
            })
            .collect();
        Load {
            started,
            stop,
            ops,
            workers,
        }
    }

    /// The time since the load started.
    pub(crate) fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits until an operation that ended after `after` succeeded, for at most
    /// `within`; the time it ended, if one did.
    pub(crate) async fn first_success_after(
        &self,
        after: Duration,
        within: Duration,
    ) -> Option<Duration> {
        let deadline = Instant::now() + within;
        loop {
            let found = self
                .ops
                .lock()
                .unwrap()
                .iter()
                .find(|op| op.ended > after && op.error.is_none())
                .map(|op| op.ended);
            if found.is_some() || Instant::now() > deadline {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the workers; every operation they did.
    pub(crate) async fn finish(self) -> Vec<Op> {
        self.stop.store(true, Ordering::SeqCst);
        for worker in self.workers {
            worker.await.unwrap();
        }
        std::mem::take(&mut *self.ops.lock().unwrap())
    }
}

async fn once(store: &dyn IdempotencyStore, key: &str) -> Result<(), String> {
    let token = match store.reserve(key, Duration::from_secs(30)).await {
        Ok(Reservation::Fresh(token)) => token,
        Ok(other) => return Err(format!("a new key was found {other:?}")),
        Err(e) => return Err(e.to_string()),
    };
    match store.commit(key, &token, Duration::from_secs(60)).await {
        Ok(CommitStatus::Committed) => Ok(()),
        Ok(other) => Err(format!("commit answered {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// When the server went away and came back, since the load started.
pub(crate) struct Outage {
    /// Just before the server was stopped.
    pub(crate) stopping: Duration,
    /// Once the server had stopped.
    pub(crate) down: Duration,
    /// Just before the server was started again.
    pub(crate) restarting: Duration,
    /// Once it accepted connections again.
    pub(crate) up: Duration,
    /// When the first operation after `up` succeeded, if one did within [`RECOVERY`].
    pub(crate) recovered: Option<Duration>,
}

/// Checks the load's operations around `outage`: all succeeded before it, all that
/// ended while the server was down failed, none took longer than [`SLOWEST`], one
/// succeeded within [`RECOVERY`] of the server's return, and all did for the last
/// second of the run. Prints the figures.
pub(crate) fn check(ops: &[Op], outage: &Outage, what: &str) {
    let first_error = |ops: &[&Op]| ops.iter().find_map(|op| op.error.clone());
    let before: Vec<&Op> = ops.iter().filter(|op| op.ended < outage.stopping).collect();
    let during: Vec<&Op> = ops
        .iter()
        .filter(|op| op.ended > outage.down && op.ended < outage.restarting)
        .collect();
    let after_up: Vec<&Op> = ops.iter().filter(|op| op.ended > outage.up).collect();
    let end = ops.iter().map(|op| op.ended).max().unwrap_or_default();
    let last_second: Vec<&Op> = ops
        .iter()
        .filter(|op| op.ended + Duration::from_secs(1) > end)
        .collect();
    let slowest = ops
        .iter()
        .max_by_key(|op| op.took)
        .expect("some operations");
    println!(
        "{what}: {} operations; {} before the outage, {} failed during it ({} in all), \
         slowest {:?}; down at {:?}, up at {:?}, first success {:?} after",
        ops.len(),
        before.len(),
        during.iter().filter(|op| op.error.is_some()).count(),
        during.len(),
        slowest.took,
        outage.down,
        outage.up,
        outage.recovered.map(|t| t.saturating_sub(outage.up)),
    );
    if let Some(e) = first_error(&during) {
        println!("{what}: the first error during the outage: {e}");
    }

    assert!(
        before.len() >= 10,
        "{what}: too little load before the outage"
    );
    if let Some(e) = first_error(&before) {
        panic!("{what}: an operation failed before the outage: {e}");
    }
    assert!(
        !during.is_empty(),
        "{what}: no operation ended during the outage"
    );
    assert!(
        during.iter().all(|op| op.error.is_some()),
        "{what}: an operation succeeded while the server was down"
    );
    assert!(
        slowest.took < SLOWEST,
        "{what}: an operation took {:?} (more than {SLOWEST:?}): {:?}",
        slowest.took,
        slowest.error
    );
    let Some(recovered) = outage.recovered else {
        panic!(
            "{what}: no operation succeeded within {RECOVERY:?} of the server's return; \
             the last error: {}",
            after_up
                .iter()
                .rev()
                .find_map(|op| op.error.clone())
                .unwrap_or_else(|| "none (no operation ended)".into())
        );
    };
    assert!(recovered > outage.up);
    assert!(
        last_second.len() >= 10,
        "{what}: too little load at the end"
    );
    if let Some(e) = first_error(&last_second) {
        panic!("{what}: an operation failed in the last second, after recovery: {e}");
    }
}
