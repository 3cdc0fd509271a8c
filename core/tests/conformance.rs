//! The in-memory broker passes the conformance suite.
#![cfg(feature = "testkit")]

use std::time::Duration;

use redrive_core::memory::{MemoryBroker, MemoryConsumer, QueueConfig};
use redrive_core::testkit::{self, Backend};

struct Memory(MemoryBroker);

impl Backend for Memory {
    type Consumer = MemoryConsumer;
    type Publisher = MemoryBroker;

    async fn destination(&self) -> String {
        let name = testkit::unique_name("conformance");
        self.0.declare(
            &name,
            QueueConfig::default().with_lease(Duration::from_secs(2)),
        );
        name
    }

    async fn consumer(&self, destination: &str) -> MemoryConsumer {
        self.0.consumer(destination)
    }

    fn publisher(&self) -> MemoryBroker {
        self.0.clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_broker_passes_the_conformance_suite() {
    testkit::run_all(&Memory(MemoryBroker::new())).await;
}
