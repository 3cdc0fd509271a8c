//! What an adapter gives the suite: the [`Backend`] trait, and unique names for its
//! destinations.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::{Consumer, Publisher};

/// What an adapter provides to the suite.
pub trait Backend: Send + Sync + 'static {
    /// The adapter's consumer.
    type Consumer: Consumer;
    /// The adapter's publisher.
    type Publisher: Publisher + Clone;

    /// A fresh, empty, uniquely named destination, declared if the broker needs that.
    fn destination(&self) -> impl Future<Output = String> + Send;

    /// A new consumer of `destination`, on its own connection or channel where the
    /// broker has them.
    fn consumer(&self, destination: &str) -> impl Future<Output = Self::Consumer> + Send;

    /// A publisher whose messages reach `destination`'s consumers.
    fn publisher(&self) -> Self::Publisher;

    /// How long new consumers of one destination take to share it (a consumer group's
    /// rebalance, for Kafka). Scenarios that check sharing start their consumers, wait
    /// this long, then publish. Zero by default.
    fn settle_time(&self) -> Duration {
        Duration::ZERO
    }
}

/// A name unique within this process and across runs: `prefix-<pid>-<time>-<n>`.
pub fn unique_name(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() % 1_000_000_000_000);
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}
