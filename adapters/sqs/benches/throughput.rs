//! Consumer throughput against the SQS emulator: a bare aws-sdk-sqs loop
//! (`ReceiveMessage` of 10, then `DeleteMessageBatch`) against redrive's Worker with a
//! no-op handler, bare and inside the full middleware Stack (trace, metrics into an SDK
//! meter provider, dead letter, idempotency with the in-memory store, circuit breaker,
//! rate limit far above the rate reached, retry, timeout), on the same number of
//! messages. Prints a table.
//!
//! ```sh
//! source scripts/sqs-emulator
//! cargo bench -p redrive-sqs --bench throughput            # 5,000 messages
//! BENCH_MESSAGES=20000 cargo bench -p redrive-sqs --bench throughput
//! ```
//!
//! Reads `SQS_ENDPOINT` (default `http://127.0.0.1:9324`); the emulator's own speed
//! bounds both numbers, so read them as a ratio.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use redrive_core::{BoxError, Message, OutgoingMessage, Worker, handler_fn};
use redrive_sqs::Sqs;
use redrive_sqs::aws_sdk_sqs::types::DeleteMessageBatchRequestEntry;
use tokio::sync::Notify;
use tower::util::BoxService;

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../../../benches/support/full_stack.rs"]
mod support;
use support::full_stack;

/// A fresh queue holding `n` messages; returns its name and URL.
async fn filled_queue(sqs: &Sqs, prefix: &str, n: usize) -> (String, String) {
    let name = redrive_core::testkit::unique_name(prefix);
    let url = common::create_queue(sqs, &name, Duration::from_secs(30), &[]).await;
    let messages: Vec<_> = (0..n)
        .map(|i| {
            OutgoingMessage::new(format!("{{\"order\":{i}}}"))
                .with_header("x-correlation-id", format!("c-{i}"))
                .expect("header")
        })
        .collect();
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in messages.chunks(n.div_ceil(8).max(1)) {
        let (p, name, chunk) = (sqs.publisher(), name.clone(), chunk.to_vec());
        tasks.spawn(async move { p.send_batch(&name, &chunk).await.expect("send") });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("send task");
    }
    (name, url)
}

async fn bare_loop(sqs: &Sqs, url: &str, n: usize) -> Duration {
    let client = sqs.client();
    let start = Instant::now();
    let mut done = 0;
    while done < n {
        let out = client
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .message_attribute_names("All")
            .send()
            .await
            .expect("ReceiveMessage");
        let entries: Vec<_> = out
            .messages()
            .iter()
            .enumerate()
            .map(|(i, m)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(m.receipt_handle().unwrap_or_default())
                    .build()
                    .expect("entry")
            })
            .collect();
        if entries.is_empty() {
            continue;
        }
        done += entries.len();
        client
            .delete_message_batch()
            .queue_url(url)
            .set_entries(Some(entries))
            .send()
            .await
            .expect("DeleteMessageBatch");
    }
    start.elapsed()
}

async fn worker(
    sqs: &Sqs,
    queue: &str,
    n: usize,
    concurrency: usize,
    full: bool,
) -> (Duration, u64) {
    let handled = Arc::new(AtomicUsize::new(0));
    let all = Arc::new(Notify::new());
    let (h, a) = (handled.clone(), all.clone());
    let handler = handler_fn(move |_m: Message| {
        let (h, a) = (h.clone(), a.clone());
        async move {
            if h.fetch_add(1, Ordering::Relaxed) + 1 == n {
                a.notify_one();
            }
            Ok::<_, BoxError>(())
        }
    });
    let consumer = sqs
        .consumer(queue)
        .wait_time(Duration::from_secs(1))
        .build()
        .await
        .expect("consumer");
    let service = if full {
        BoxService::new(full_stack(sqs.publisher(), handler))
    } else {
        BoxService::new(handler)
    };
    let start = Instant::now();
    let report = Worker::builder(consumer)
        .service(service)
        .concurrency(concurrency)
        .build()
        .expect("worker")
        // Shutdown waits for the last acks: the time includes every delete confirmed.
        .run_until(async move { all.notified().await })
        .await;
    (start.elapsed(), report.acked)
}

fn main() {
    let n: usize = std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let sqs = common::sqs().await;
        println!(
            "SQS consumer throughput, {n} messages, batches of 10, against {}",
            common::endpoint()
        );
        let (_, url) = filled_queue(&sqs, "bench-bare", n).await;
        let bare = bare_loop(&sqs, &url, n).await;
        let mut rows = vec![(
            "bare aws-sdk-sqs: ReceiveMessage(10) + DeleteMessageBatch loop".to_owned(),
            bare,
            n as u64,
        )];
        for (concurrency, full) in [(16, false), (64, false), (64, true)] {
            let (name, _) = filled_queue(&sqs, "bench-worker", n).await;
            let (t, acked) = worker(&sqs, &name, n, concurrency, full).await;
            let what = if full {
                "full Stack + no-op handler"
            } else {
                "no-op handler"
            };
            rows.push((
                format!("redrive Worker, {what}, concurrency {concurrency}"),
                t,
                acked,
            ));
        }
        println!();
        println!("| consumer | acked | seconds | msg/s | vs bare |");
        println!("|---|---:|---:|---:|---:|");
        let rate = |t: Duration, k: u64| k as f64 / t.as_secs_f64();
        let base = rate(bare, n as u64);
        for (what, t, acked) in rows {
            let r = rate(t, acked);
            println!(
                "| {what} | {acked} | {:.2} | {:.0} | {:.2}× |",
                t.as_secs_f64(),
                r,
                r / base
            );
        }
    });
}
