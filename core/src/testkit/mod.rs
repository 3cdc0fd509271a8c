//! The conformance suite every adapter runs against its real broker.
//!
//! An adapter implements [`Backend`] (fresh destinations, consumers, a publisher) and
//! calls [`run_all`], or runs the scenarios one by one as separate tests. Scenarios use
//! real time, bounded by [`SCENARIO_TIMEOUT`], and unique payloads per scenario.
//!
//! ```no_run
//! use redrive_core::memory::{MemoryBroker, MemoryConsumer};
//! use redrive_core::testkit::{self, Backend};
//!
//! struct Memory(MemoryBroker);
//!
//! impl Backend for Memory {
//!     type Consumer = MemoryConsumer;
//!     type Publisher = MemoryBroker;
//!     async fn destination(&self) -> String {
//!         testkit::unique_name("conformance")
//!     }
//!     async fn consumer(&self, destination: &str) -> MemoryConsumer {
//!         self.0.consumer(destination)
//!     }
//!     fn publisher(&self) -> MemoryBroker {
//!         self.0.clone()
//!     }
//! }
//!
//! # async fn f() {
//! testkit::run_all(&Memory(MemoryBroker::new())).await;
//! # }
//! ```
//!
//! # Scenarios
//! | scenario | checks |
//! |---|---|
//! | [`round_trip`] | every message published is received with payload, headers and key intact; ack removes |
//! | [`nack_redelivers`] | a nacked message comes back with `attempt` + 1 (brokers that can nack) |
//! | [`nack_delay_honoured`] | a delayed nack is not redelivered early (brokers that can nack) |
//! | [`unacked_comes_back`] | an unsettled message returns after its lease, or when its consumer goes away |
//! | [`worker_retries_failures`] | a failed message is run again by the Worker (nacked or parked) as the next attempt |
//! | [`per_key_order`] | `PerKey` order holds under concurrency 16 |
//! | [`two_workers_share`] | two Workers on one destination share the work and lose nothing |
//! | [`restart_loses_nothing`] | a Worker stopped mid-stream and a new one lose nothing |
//! | [`shutdown_drains`] | shutdown lets in-flight work finish and acks it |

/// The [`Backend`] trait and [`unique_name`].
mod backend;
/// The scenarios on a bare consumer: delivery, nack, redelivery after a lost consumer.
mod broker;
/// What the scenarios share: publishing, receiving with a deadline, a recording Worker.
mod support;
/// The scenarios that run Workers: retries, order, sharing, restart, shutdown.
mod worker;

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::FutureExt;

pub use backend::{Backend, unique_name};
pub use broker::{nack_delay_honoured, nack_redelivers, round_trip, unacked_comes_back};
pub use worker::{
    per_key_order, restart_loses_nothing, shutdown_drains, two_workers_share,
    worker_retries_failures,
};

/// The longest one scenario may take before it fails.
pub const SCENARIO_TIMEOUT: Duration = Duration::from_secs(90);

/// How long a scenario waits to be sure nothing more arrives.
pub const QUIET_PERIOD: Duration = Duration::from_millis(1500);

/// Runs every scenario, one after another; panics naming each that failed.
pub async fn run_all<B: Backend>(backend: &B) {
    let mut failed = Vec::new();
    macro_rules! scenario {
        ($name:ident) => {
            let r = tokio::time::timeout(
                SCENARIO_TIMEOUT,
                AssertUnwindSafe($name(backend)).catch_unwind(),
            )
            .await;
            match r {
                Ok(Ok(())) => eprintln!("conformance: {} ... ok", stringify!($name)),
                Ok(Err(panic)) => {
                    let why = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                        .unwrap_or_default();
                    eprintln!("conformance: {} ... FAILED: {why}", stringify!($name));
                    failed.push(stringify!($name));
                }
                Err(_) => {
                    eprintln!("conformance: {} ... TIMED OUT", stringify!($name));
                    failed.push(stringify!($name));
                }
            }
        };
    }
    scenario!(round_trip);
    scenario!(nack_redelivers);
    scenario!(nack_delay_honoured);
    scenario!(unacked_comes_back);
    scenario!(worker_retries_failures);
    scenario!(per_key_order);
    scenario!(two_workers_share);
    scenario!(restart_loses_nothing);
    scenario!(shutdown_drains);
    assert!(
        failed.is_empty(),
        "conformance scenarios failed: {failed:?}"
    );
}
