//! The consumer reads the queue's `RedrivePolicy` at start-up and warns, once and with
//! the attribute to set, when there is none: without it nothing on SQS's side ends the
//! deliveries of a message that never gets a fate.
//!
//! One test function, with a global subscriber: the warning is checked in the log, and
//! tracing's callsite cache does not mix well with thread-local subscribers in tests
//! that run in parallel.

mod common;

use std::fmt::{Debug, Write as _};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redrive_sqs::Sqs;
use redrive_sqs::aws_sdk_sqs::types::QueueAttributeName;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

/// Every event of redrive-sqs: its level and its fields, message first.
#[derive(Clone, Default)]
struct Events(Arc<Mutex<Vec<(Level, String)>>>);

struct Fields<'a>(&'a mut String);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        let _ = write!(self.0, "{}={value:?} ", field.name());
    }
}

impl<S: Subscriber> Layer<S> for Events {
    fn enabled(&self, metadata: &Metadata<'_>, _: Context<'_, S>) -> bool {
        metadata.target().starts_with("redrive_sqs")
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut text = String::new();
        event.record(&mut Fields(&mut text));
        self.0
            .lock()
            .unwrap()
            .push((*event.metadata().level(), text));
    }
}

impl Events {
    /// The events at `level` that name `queue`.
    fn about(&self, level: Level, queue: &str) -> Vec<String> {
        let quoted = format!("queue={queue} ");
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(l, text)| *l == level && text.contains(&quoted))
            .map(|(_, text)| text.clone())
            .collect()
    }
}

async fn build(sqs: &Sqs, queue: &str) -> redrive_sqs::SqsConsumer {
    sqs.consumer(queue)
        .wait_time(Duration::from_secs(1))
        .build()
        .await
        .expect("consumer")
}

async fn arn(sqs: &Sqs, url: &str) -> String {
    sqs.client()
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .expect("queue arn")
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
        .expect("arn")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_checks_the_queues_redrive_policy() {
    let events = Events::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(events.clone()))
        .expect("the only subscriber of this test binary");
    let sqs = common::sqs().await;

    a_queue_without_a_redrive_policy_is_warned_about_once(&sqs, &events).await;
    a_fifo_queue_without_one_is_told_of_a_fifo_dead_letter_queue(&sqs, &events).await;
    a_queue_with_a_redrive_policy_is_not_warned_about(&sqs, &events).await;
}

async fn a_queue_without_a_redrive_policy_is_warned_about_once(sqs: &Sqs, events: &Events) {
    let name = common::queue_name("unguarded", false);
    let url = common::create_queue(sqs, &name, Duration::from_secs(10), &[]).await;
    let own_arn = arn(sqs, &url).await;
    let dlq_arn = format!("{}-dlq", own_arn);

    let c = build(sqs, &name).await;
    assert_eq!(c.queue().redrive_policy, None);
    let warnings = events.about(Level::WARN, &name);
    assert_eq!(warnings.len(), 1, "one warning: {warnings:?}");
    let w = &warnings[0];
    assert!(w.contains("RedrivePolicy"), "names the attribute: {w}");
    assert!(
        w.contains(&format!(
            r#"{{"deadLetterTargetArn":"{dlq_arn}","maxReceiveCount":"10"}}"#
        )),
        "gives the value to set, with the ARN of <queue>-dlq: {w}"
    );
    assert!(w.contains("forever"), "says what is unprotected: {w}");

    // Once: a second consumer of the same queue does not warn again.
    let _again = build(sqs, &name).await;
    assert_eq!(events.about(Level::WARN, &name).len(), 1);
}

async fn a_fifo_queue_without_one_is_told_of_a_fifo_dead_letter_queue(sqs: &Sqs, events: &Events) {
    let name = common::queue_name("unguarded", true);
    let url = common::create_queue(sqs, &name, Duration::from_secs(10), &[]).await;
    let own_arn = arn(sqs, &url).await;
    let dlq_arn = format!(
        "{}-dlq.fifo",
        own_arn.strip_suffix(".fifo").expect("a FIFO queue's ARN")
    );
    let _c = build(sqs, &name).await;
    let warnings = events.about(Level::WARN, &name);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains(&format!(r#""deadLetterTargetArn":"{dlq_arn}""#)),
        "a FIFO queue's dead-letter queue is FIFO too: {}",
        warnings[0]
    );
}

async fn a_queue_with_a_redrive_policy_is_not_warned_about(sqs: &Sqs, events: &Events) {
    let name = common::queue_name("guarded", false);
    let dlq = format!("{name}-dlq");
    let dlq_url = common::create_queue(sqs, &dlq, Duration::from_secs(10), &[]).await;
    let dlq_arn = arn(sqs, &dlq_url).await;
    let policy = format!(r#"{{"deadLetterTargetArn":"{dlq_arn}","maxReceiveCount":"7"}}"#);
    common::create_queue(
        sqs,
        &name,
        Duration::from_secs(10),
        &[(QueueAttributeName::RedrivePolicy, policy)],
    )
    .await;

    let c = build(sqs, &name).await;
    let policy = c.redrive_policy().expect("the policy, read at start-up");
    assert_eq!(policy.max_receive_count, 7);
    assert_eq!(policy.dead_letter_target_arn, dlq_arn);
    assert_eq!(events.about(Level::WARN, &name), Vec::<String>::new());
    let debug = events.about(Level::DEBUG, &name);
    assert!(
        debug.iter().any(|d| d.contains("max_receive_count=7")),
        "logged at debug: {debug:?}"
    );
}
