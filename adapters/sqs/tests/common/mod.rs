//! What the SQS tests share: the emulator's address, a client, fresh queues.
#![allow(
    dead_code,
    unreachable_pub,
    reason = "each test binary uses part of this"
)]

use std::time::Duration;

use redrive_sqs::Sqs;
use redrive_sqs::aws_config::{self, BehaviorVersion, Region};
use redrive_sqs::aws_sdk_sqs::config::Credentials;
use redrive_sqs::aws_sdk_sqs::types::QueueAttributeName;

/// The emulator's address: `SQS_ENDPOINT`, else fauxqs's default port here.
pub fn endpoint() -> String {
    std::env::var("SQS_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:9324".to_owned())
}

/// A handle on the emulator with dummy credentials and region `us-east-1`. Fails loudly,
/// saying how to start the emulator, when it does not answer.
pub async fn sqs() -> Sqs {
    let endpoint = endpoint();
    let config = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new(
            "test",
            "test",
            None,
            None,
            "redrive-tests",
        ))
        .endpoint_url(&endpoint)
        .load()
        .await;
    let sqs = Sqs::from_sdk_config(&config);
    let probe = tokio::time::timeout(
        Duration::from_secs(10),
        sqs.client().list_queues().max_results(1).send(),
    )
    .await;
    match probe {
        Ok(Ok(_)) => sqs,
        Ok(Err(e)) => panic!(
            "the SQS emulator at {endpoint} did not answer ({}); start it with \
             `source scripts/sqs-emulator` (or run `scripts/test`), or set SQS_ENDPOINT",
            redrive_sqs::aws_sdk_sqs::error::DisplayErrorContext(&e)
        ),
        Err(_) => panic!(
            "the SQS emulator at {endpoint} did not answer within 10 s; start it with \
             `source scripts/sqs-emulator` (or run `scripts/test`), or set SQS_ENDPOINT"
        ),
    }
}

/// Creates a fresh queue (FIFO when `name` ends in `.fifo`) with this visibility
/// timeout and extra attributes; returns its URL. The name must be one SQS accepts
/// (the emulator accepts more): [`create_queue_unchecked`] takes any.
pub async fn create_queue(
    sqs: &Sqs,
    name: &str,
    visibility: Duration,
    extra: &[(QueueAttributeName, String)],
) -> String {
    if let Err(e) = redrive_sqs::validate_queue_name(name) {
        panic!("tests create only queues real SQS accepts: {e}");
    }
    create_queue_unchecked(sqs, name, visibility, extra).await
}

/// As [`create_queue`], for a name real SQS would refuse (the emulator takes it).
pub async fn create_queue_unchecked(
    sqs: &Sqs,
    name: &str,
    visibility: Duration,
    extra: &[(QueueAttributeName, String)],
) -> String {
    let mut req = sqs.client().create_queue().queue_name(name).attributes(
        QueueAttributeName::VisibilityTimeout,
        visibility.as_secs().to_string(),
    );
    if name.ends_with(".fifo") {
        req = req.attributes(QueueAttributeName::FifoQueue, "true");
    }
    for (k, v) in extra {
        req = req.attributes(k.clone(), v.clone());
    }
    let out = req.send().await.expect("CreateQueue");
    out.queue_url().expect("queue url").to_owned()
}

/// A unique queue name; `fifo` adds the `.fifo` suffix SQS requires.
pub fn queue_name(prefix: &str, fifo: bool) -> String {
    let name = redrive_core::testkit::unique_name(prefix);
    if fifo { format!("{name}.fifo") } else { name }
}

/// Messages in the queue: (visible, in flight, delayed).
pub async fn counts(sqs: &Sqs, url: &str) -> (u64, u64, u64) {
    let out = sqs
        .client()
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::All)
        .send()
        .await
        .expect("GetQueueAttributes");
    let attrs = out.attributes().expect("attributes");
    let get =
        |n: QueueAttributeName| -> u64 { attrs.get(&n).and_then(|v| v.parse().ok()).unwrap_or(0) };
    (
        get(QueueAttributeName::ApproximateNumberOfMessages),
        get(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
        get(QueueAttributeName::ApproximateNumberOfMessagesDelayed),
    )
}
