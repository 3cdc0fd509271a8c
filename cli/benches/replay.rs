//! Replay throughput of the `redrive` binary per broker, unlimited and with `--rate`:
//! fills a DLQ with dead letters (envelope headers as the dead-letter layer writes them),
//! runs `redrive dlq replay … --limit N --json`, and prints a table.
//!
//! `source scripts/sqs-emulator && source scripts/kafka-broker && cargo bench -p
//! redrive-cli --bench replay` (RabbitMQ at `AMQP_URL` or the local default; SQS at
//! `SQS_ENDPOINT`; Kafka at `KAFKA_BROKERS`).

use std::process::Command;
use std::time::Duration;

use futures_util::StreamExt as _;
use redrive_kafka::KafkaPublisher;
use redrive_kafka::rdkafka::ClientConfig;
use redrive_kafka::rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use redrive_kafka::rdkafka::client::DefaultClientContext;
use redrive_kafka::rdkafka::consumer::{BaseConsumer, Consumer as _};

use redrive_core::{OutgoingMessage, Publisher};
use redrive_rabbitmq::RabbitPublisher;
use redrive_sqs::Sqs;
use redrive_sqs::aws_config::{self, BehaviorVersion, Region};
use redrive_sqs::aws_sdk_sqs::config::Credentials;

fn letter(origin: &str, i: usize) -> OutgoingMessage {
    OutgoingMessage::new(format!("{{\"order\":{i}}}"))
        .with_header("message-id", format!("bench-{i}"))
        .and_then(|m| m.with_header("x-redrive-original-destination", origin.to_owned()))
        .and_then(|m| m.with_header("x-redrive-error-kind", "exhausted"))
        .and_then(|m| m.with_header("x-redrive-error-message", "warehouse timed out"))
        .expect("headers")
}

/// Runs the replay; (replayed, letters a second from its start to its last letter).
fn replay(url: &str, dlq: &str, n: usize, rate: Option<u32>, more: &[&str]) -> (u64, f64) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_redrive"));
    cmd.args([
        "dlq",
        "replay",
        url,
        dlq,
        "--json",
        "--limit",
        &n.to_string(),
    ])
    .env("AWS_ACCESS_KEY_ID", "test")
    .env("AWS_SECRET_ACCESS_KEY", "test")
    .env("AWS_REGION", "us-east-1");
    if let Some(r) = rate {
        cmd.args(["--rate", &r.to_string()]);
    }
    cmd.args(more);
    let out = cmd.output().expect("run redrive");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    (
        v["replayed"].as_u64().unwrap_or(0),
        v["per_second"].as_f64().unwrap_or(0.0),
    )
}

fn row(broker: &str, rate: Option<u32>, (done, measured): (u64, f64)) {
    let secs = done as f64 / measured.max(0.001);
    let target = rate.map_or("unlimited".to_owned(), |r| format!("{r}/s"));
    let error = rate.map_or("".to_owned(), |r| {
        format!("{:+.1} %", (measured - f64::from(r)) * 100.0 / f64::from(r))
    });
    println!("| {broker} | {target} | {done} | {secs:.2} | {measured:.0} | {error} |");
}

/// Whether the command line (`cargo bench … -- kafka sqs`) asks for `broker`: each
/// when it names none.
fn wanted(broker: &str) -> bool {
    let named: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    named.is_empty() || named.iter().any(|n| n == broker)
}

#[tokio::main]
async fn main() {
    println!("| broker | --rate | letters | seconds | letters/s | rate error |");
    println!("|---|---|---|---|---|---|");

    if wanted("rabbitmq") {
        rabbitmq(5000).await;
    }
    if wanted("sqs") {
        sqs(2000).await;
    }
    if wanted("kafka") {
        kafka(5000).await;
    }
}

async fn rabbitmq(n_rabbit: usize) {
    let amqp = std::env::var("AMQP_URL").unwrap_or_else(|_| redrive_rabbitmq::DEFAULT_URL.into());
    let origin = redrive_core::testkit::unique_name("redrive-bench-replay");
    let dlq = format!("{origin}-dlq");
    let conn = redrive_rabbitmq::connect(&amqp, "bench")
        .await
        .expect("RabbitMQ: start it with `rabbitmq-server -detached`");
    let ch = conn.create_channel().await.expect("channel");
    for q in [&origin, &dlq] {
        ch.queue_declare(q, Default::default(), Default::default())
            .await
            .expect("declare");
    }
    let p = RabbitPublisher::connect(&amqp).await.expect("publisher");
    for rate in [None, Some(500)] {
        let n = if rate.is_some() { 1000 } else { n_rabbit };
        for i in 0..n {
            p.publish(&dlq, letter(&origin, i)).await.expect("publish");
        }
        row("RabbitMQ", rate, replay(&amqp, &dlq, n, rate, &[]));
        ch.queue_purge(&origin, Default::default())
            .await
            .expect("purge");
    }
    for q in [&origin, &dlq] {
        let _ = ch.queue_delete(q, Default::default()).await;
    }
}

async fn sqs(n_sqs: usize) {
    let origin = redrive_core::testkit::unique_name("redrive-bench-replay");
    let dlq = format!("{origin}-dlq");
    let endpoint = std::env::var("SQS_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:9324".into());
    let config = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "bench"))
        .endpoint_url(&endpoint)
        .load()
        .await;
    let sqs = Sqs::from_sdk_config(&config);
    for q in [&origin, &dlq] {
        sqs.client()
            .create_queue()
            .queue_name(q)
            .send()
            .await
            .expect("SQS emulator: `source scripts/sqs-emulator`");
    }
    let p = sqs.publisher();
    for rate in [None, Some(500)] {
        let n = if rate.is_some() { 1000 } else { n_sqs };
        let letters: Vec<_> = (0..n).map(|i| letter(&origin, i)).collect();
        for chunk in letters.chunks(10) {
            p.send_batch(&dlq, chunk).await.expect("send");
        }
        row("SQS emulator", rate, replay(&endpoint, &dlq, n, rate, &[]));
        let url = sqs.queue_url(&origin).await.expect("url");
        sqs.client()
            .purge_queue()
            .queue_url(url)
            .send()
            .await
            .expect("purge");
    }
    for q in [&origin, &dlq] {
        if let Ok(url) = sqs.queue_url(q).await {
            let _ = sqs.client().delete_queue().queue_url(url).send().await;
        }
    }
}

async fn kafka(n_kafka: usize) {
    let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .expect("admin client");
    // One record per batch: tansu (0.6) miscounts a topic's high watermark after
    // batches of several records, and the tool reads a DLQ up to its high watermark.
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &brokers)
        .set("batch.num.messages", "1");
    let p = KafkaPublisher::from_config(config).expect("producer");
    let probe: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .expect("client");
    // The default (one publish in flight on Kafka), then 16 in flight.
    for (rate, in_flight) in [(None, None), (Some(500), None), (None, Some("16"))] {
        let n = if rate.is_some() { 1000 } else { n_kafka };
        let origin = redrive_core::testkit::unique_name("redrive-bench-replay");
        let dlq = format!("{origin}-dlq");
        admin
            .create_topics(
                &[
                    NewTopic::new(&origin, 1, TopicReplication::Fixed(1)),
                    NewTopic::new(&dlq, 1, TopicReplication::Fixed(1)),
                ],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .expect("Kafka: `source scripts/kafka-broker`");
        futures_util::stream::iter((0..n).map(|i| p.publish(&dlq, letter(&origin, i))))
            .buffered(64)
            .for_each(|r| async move { r.expect("publish") })
            .await;
        let url = format!("kafka://{brokers}/{dlq}");
        let (name, more) = match in_flight {
            None => ("Kafka (tansu)".to_owned(), vec![]),
            Some(k) => (
                format!("Kafka (tansu), --in-flight {k}"),
                vec!["--in-flight", k],
            ),
        };
        row(&name, rate, replay(&url, &dlq, n, rate, &more));
        // The origin's high watermark: what the broker counts of the replayed records.
        let (_, high) = probe
            .fetch_watermarks(&origin, 0, Duration::from_secs(10))
            .expect("watermarks");
        eprintln!("{name}: the origin's high watermark is {high} for {n} records replayed");
    }
}
