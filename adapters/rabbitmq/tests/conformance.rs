//! The shared conformance suite against the local RabbitMQ, on a classic and a quorum queue.

mod common;

use std::sync::Mutex;

use redrive_core::testkit::{self, Backend};
use redrive_rabbitmq::{QueueKind, RabbitConsumer, RabbitPublisher, Topology};

struct Rabbit {
    kind: QueueKind,
    publisher: RabbitPublisher,
    created: Mutex<Vec<Topology>>,
}

impl Rabbit {
    async fn new(kind: QueueKind) -> Self {
        Rabbit {
            kind,
            publisher: common::publisher().await,
            created: Mutex::default(),
        }
    }

    fn topology(&self, destination: &str) -> Topology {
        common::topology(destination, self.kind)
    }
}

impl Backend for Rabbit {
    type Consumer = RabbitConsumer;
    type Publisher = RabbitPublisher;

    async fn destination(&self) -> String {
        let name = common::unique(&format!("conf-{}", self.kind.as_str()));
        let topology = self.topology(&name);
        common::declare(&topology).await;
        self.created.lock().unwrap().push(topology);
        name
    }

    async fn consumer(&self, destination: &str) -> RabbitConsumer {
        common::consumer(&self.topology(destination), "redrive-conformance", 32).await
    }

    fn publisher(&self) -> RabbitPublisher {
        self.publisher.clone()
    }
}

async fn run(kind: QueueKind) {
    let backend = Rabbit::new(kind).await;
    let outcome = tokio::spawn(async move {
        testkit::run_all(&backend).await;
        backend
    })
    .await;
    match outcome {
        Ok(backend) => {
            let created = backend.created.lock().unwrap().clone();
            common::cleanup(&created).await;
        }
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_classic_queue() {
    run(QueueKind::Classic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_quorum_queue() {
    run(QueueKind::Quorum).await;
}
