//! The fault run's SQS side: a standard queue on the SQS emulator at `SQS_ENDPOINT`
//! (default `http://127.0.0.1:9324`; `scripts/sqs-emulator` starts it). The consumers
//! reach it through a [`Proxy`] the run owns, and a cut closes every connection the
//! proxy carries, mid-request. The emulator keeps nothing across a restart, and real
//! SQS never restarts from a client's view, so this broker is not restarted: it gets
//! one more cut instead.

use std::time::Duration;

use redrive_fault_run::Broker;
use redrive_fault_run::proxy::Proxy;
use redrive_sqs::SqsPublisher;
use redrive_sqs::aws_sdk_sqs::types::QueueAttributeName;

use super::{DeadLetter, Depths, Target, drain};

fn endpoint() -> String {
    std::env::var("SQS_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:9324".to_owned())
}

/// An SQS queue of one run, and the proxy in front of the emulator.
pub(crate) struct Sqs {
    sqs: redrive_sqs::Sqs,
    queue: String,
    proxy: Proxy,
}

impl Sqs {
    /// Creates a fresh queue and its dead-letter queue (the dead-letter layer, not a
    /// redrive policy, moves poison messages there).
    pub(crate) async fn new() -> Self {
        let sqs = redrive_fault_run::sqs_client(&endpoint()).await;
        let queue = format!("redrive-fault-sqs-{}", super::tag());
        for name in [queue.clone(), format!("{queue}-dlq")] {
            tokio::time::timeout(
                Duration::from_secs(10),
                sqs.client()
                    .create_queue()
                    .queue_name(&name)
                    // Short, so a killed consumer's messages come back soon; the
                    // consumers extend it while a message runs.
                    .attributes(QueueAttributeName::VisibilityTimeout, "10")
                    .send(),
            )
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_else(|| {
                panic!(
                    "no SQS endpoint answers at {}: start the emulator with \
                     `source scripts/sqs-emulator` (or run `scripts/test`), or set SQS_ENDPOINT",
                    endpoint()
                )
            });
        }
        let upstream = endpoint()
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        let proxy = Proxy::start(upstream).await.expect("the proxy");
        Sqs { sqs, queue, proxy }
    }

    /// Visible, in-flight and delayed messages of `queue`.
    async fn depth(&self, queue: &str) -> u64 {
        let Ok(url) = self.sqs.queue_url(queue).await else {
            return u64::MAX;
        };
        let Ok(out) = self
            .sqs
            .client()
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
            .send()
            .await
        else {
            return u64::MAX;
        };
        out.attributes()
            .map(|a| a.values().filter_map(|v| v.parse::<u64>().ok()).sum())
            .unwrap_or(u64::MAX)
    }
}

impl Target for Sqs {
    type Producer = SqsPublisher;

    fn broker(&self) -> Broker {
        Broker::Sqs
    }

    fn url(&self) -> String {
        format!("http://{}", self.proxy.addr())
    }

    fn queue(&self) -> &str {
        &self.queue
    }

    async fn producer(&self) -> SqsPublisher {
        self.sqs.publisher()
    }

    async fn depths(&self) -> Depths {
        Depths {
            pending: self.depth(&self.queue).await,
            dead: self.depth(&format!("{}-dlq", self.queue)).await,
        }
    }

    async fn dead_letters(&self, expected: usize) -> Vec<DeadLetter> {
        let dlq = format!("{}-dlq", self.queue);
        let mut consumer = self
            .sqs
            .consumer(&dlq)
            .wait_time(Duration::from_secs(1))
            .build()
            .await
            .expect("a consumer of the dead-letter queue");
        drain(&mut consumer, expected).await
    }

    async fn cut(&self, _prefix: &str) -> usize {
        self.proxy.cut().await
    }

    async fn cleanup(&self) {
        for name in [self.queue.clone(), format!("{}-dlq", self.queue)] {
            if let Ok(url) = self.sqs.queue_url(&name).await {
                let _ = self.sqs.client().delete_queue().queue_url(url).send().await;
            }
        }
    }
}
