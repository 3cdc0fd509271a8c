//! The SQS adapter passes redrive's conformance suite against the emulator, on a
//! standard queue and on a FIFO queue.
//!
//! Queues get a 5 s visibility timeout, so `unacked_comes_back` is quick; the Worker
//! keeps leases by extending them every 2.5 s.

mod common;

use std::time::Duration;

use redrive_core::testkit::{self, Backend};
use redrive_sqs::{Sqs, SqsConsumer, SqsPublisher};

const VISIBILITY: Duration = Duration::from_secs(5);

struct SqsBackend {
    sqs: Sqs,
    fifo: bool,
}

impl Backend for SqsBackend {
    type Consumer = SqsConsumer;
    type Publisher = SqsPublisher;

    async fn destination(&self) -> String {
        let name = common::queue_name("conformance", self.fifo);
        common::create_queue(&self.sqs, &name, VISIBILITY, &[]).await;
        name
    }

    async fn consumer(&self, destination: &str) -> SqsConsumer {
        self.sqs
            .consumer(destination)
            .build()
            .await
            .expect("consumer")
    }

    fn publisher(&self) -> SqsPublisher {
        self.sqs.publisher()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_queue_passes_the_conformance_suite() {
    let sqs = common::sqs().await;
    testkit::run_all(&SqsBackend { sqs, fifo: false }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_queue_passes_the_conformance_suite() {
    let sqs = common::sqs().await;
    testkit::run_all(&SqsBackend { sqs, fifo: true }).await;
}
