//! redrive's metrics on a Prometheus scrape endpoint, with health probes beside it.
//!
//! `cargo run --example metrics` runs a consumer on the in-memory broker while a producer
//! feeds it 100 orders a second: most take 60 ms, some fail once and are retried in
//! process, some fail their first delivery and come back from the broker, one in 50 is
//! rejected and dead-lettered. Until SIGTERM or Ctrl-C it serves, on `METRICS_ADDR`
//! (default 127.0.0.1:9464):
//! - `/metrics`: the Prometheus text format;
//! - `/health/live` and `/health/ready`: 200 or 503, with the Worker's health, the
//!   breaker's state and the backlog as JSON.
//!
//! `cargo run --example metrics -- --once` handles 300 orders, then scrapes itself once,
//! prints the series and exits.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use prometheus::{Encoder, Registry, TextEncoder};
use redrive::memory::MemoryBroker;
use redrive::middleware::Stack;
use redrive::middleware::circuit_breaker::{CircuitHandle, CircuitState};
use redrive::middleware::dead_letter::DeadLetterConfig;
use redrive::middleware::metrics::{MetricsLayer, QueueReading};
use redrive::middleware::retry::{Backoff, RetryConfig, Try};
use redrive::{
    BoxError, Health, Message, OutgoingMessage, Publisher, Redelivery, Report, Worker, classify,
    handler_fn,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// How long the handler takes for an order that goes through.
const HANDLER_LATENCY: Duration = Duration::from_millis(60);

/// What the consumer serves from: its broker, its metrics, its health and its breaker.
#[derive(Clone)]
struct App {
    broker: MemoryBroker,
    registry: Registry,
    health: Health,
    breaker: CircuitHandle,
}

/// The consumer, running: the Worker stops once `stop` is notified.
struct Running {
    app: App,
    stop: Arc<Notify>,
    worker: JoinHandle<Report>,
    // Kept for as long as the app is scraped.
    _provider: SdkMeterProvider,
}

/// Starts the consumer on `orders`.
fn start() -> Result<Running, BoxError> {
    let registry = Registry::new();
    let reader = opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        .build()?;
    let provider = SdkMeterProvider::builder().with_reader(reader).build();
    let broker = MemoryBroker::new();

    let metrics = MetricsLayer::new(&provider.meter("redrive-example"));
    // The broker's own figures for the queue and its dead-letter queue: messages ready,
    // received and not settled, and delayed. A RabbitMQ consumer reads them with
    // `redrive::rabbitmq::QueueStats`, an SQS one with `redrive::sqs::QueueStats`.
    for queue in ["orders", "orders-dlq"] {
        let b = broker.clone();
        metrics.observe_queue("memory", queue, move || {
            let delayed = b.delayed(queue);
            Some(
                QueueReading::new(b.depth(queue).saturating_sub(delayed) as u64)
                    .with_in_flight(b.in_flight(queue) as u64)
                    .with_delayed(delayed as u64),
            )
        });
    }
    // The Stack counts the retries and reports its breaker through the metrics layer.
    let stack = Stack::new()
        .metrics(metrics)
        .dead_letter(
            broker.clone(),
            DeadLetterConfig::default().with_max_attempts(3),
        )
        .retry(
            RetryConfig::default()
                .with_max_tries(2)
                .with_backoff(Backoff::constant(Duration::from_millis(5))),
        );
    let breaker = stack.circuit_handle();
    let worker = Worker::builder(broker.consumer("orders"))
        .stack(stack)
        .handler(handler_fn(handle))
        .concurrency(32)
        .redelivery(Redelivery::constant(Duration::from_millis(20)))
        .build()?;
    let app = App {
        broker,
        registry,
        health: worker.health(),
        breaker,
    };
    let stop = Arc::new(Notify::new());
    let s = stop.clone();
    let worker = tokio::spawn(worker.run_until(async move {
        tokio::select! {
            () = s.notified() => {}
            () = redrive::shutdown_signal() => {}
        }
    }));
    Ok(Running {
        app,
        stop,
        worker,
        _provider: provider,
    })
}

/// Order `n`: every 50th is rejected (dead-lettered), every 40th fails its first try
/// (retried in process), every 30th fails its whole first delivery (back to the broker).
async fn handle(m: Message) -> Result<(), BoxError> {
    let n: u32 = std::str::from_utf8(&m.payload)?.parse()?;
    let first_try = m.extensions.get::<Try>().is_none_or(|t| t.number == 1);
    if n % 50 == 0 {
        return Err(classify::permanent("order rejected by validation"));
    }
    if (n % 40 == 7 && first_try) || (n % 30 == 11 && m.attempt() == 1) {
        return Err("warehouse timed out".into());
    }
    tokio::time::sleep(HANDLER_LATENCY).await;
    Ok(())
}

/// Publishes orders `0..count` at `per_second`.
async fn feed(broker: MemoryBroker, count: u32, per_second: u32) -> Result<(), BoxError> {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / per_second);
    for n in 0..count {
        tick.tick().await;
        broker
            .publish("orders", OutgoingMessage::new(n.to_string()))
            .await?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let once = std::env::args().any(|a| a == "--once");
    let running = start()?;
    let addr = std::env::var("METRICS_ADDR").unwrap_or_else(|_| "127.0.0.1:9464".into());
    let listener = TcpListener::bind(&addr).await?;
    let local = listener.local_addr()?;
    eprintln!("serving http://{local}/metrics, /health/live and /health/ready");
    let app = running.app.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let app = app.clone();
            tokio::spawn(async move { serve(stream, &app).await });
        }
    });

    if !once {
        let producer = tokio::spawn(feed(running.app.broker.clone(), u32::MAX, 100));
        let report = running.worker.await?;
        producer.abort();
        eprintln!("handled: {report:?}");
        return Ok(());
    }

    for n in 0..300u32 {
        running
            .app
            .broker
            .publish("orders", OutgoingMessage::new(n.to_string()))
            .await?;
    }
    let b = running.app.broker.clone();
    while b.depth("orders") + b.in_flight("orders") > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (_, health) = get(local, "/health/ready").await?;
    eprintln!("health: {health}");
    let (_, body) = get(local, "/metrics").await?;
    let ours: Vec<&str> = body
        .lines()
        .filter(|l| l.starts_with("redrive_") || l.starts_with("messaging_"))
        .filter(|l| !l.contains("_bucket{"))
        .collect();
    println!("{}", ours.join("\n"));
    running.stop.notify_one();
    let report = running.worker.await?;
    eprintln!("handled: {report:?}");
    Ok(())
}

/// Answers one HTTP request: the metrics, or a health probe.
async fn serve(mut stream: TcpStream, app: &App) -> std::io::Result<()> {
    let mut buf = [0u8; 1024];
    let n = stream.read(&mut buf).await?;
    let request = String::from_utf8_lossy(&buf[..n]);
    let path = request.split(' ').nth(1).unwrap_or("");
    let (status, kind, body) = match path {
        "/metrics" => {
            let mut body = Vec::new();
            TextEncoder::new()
                .encode(&app.registry.gather(), &mut body)
                .map_err(std::io::Error::other)?;
            ("200 OK", "text/plain; version=0.0.4", body)
        }
        "/health/live" | "/health/ready" => {
            let report = app.health.report();
            let breaker = app.breaker.state();
            // Live while the Worker runs; ready while it takes deliveries and its
            // breaker lets them through.
            let ok = if path == "/health/live" {
                app.health.is_live()
            } else {
                app.health.is_ready() && breaker != CircuitState::Open
            };
            let body = serde_json::json!({
                "phase": report.phase.as_str(),
                "received": report.received,
                "seconds_since_last_received": report.since_last_received.map(|d| d.as_secs_f64()),
                "receive_failures": report.receive_failures,
                "in_flight": report.in_flight,
                "parked": report.parked,
                "breaker": breaker.as_str(),
                "backlog": app.broker.depth("orders"),
            });
            let status = if ok {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            (status, "application/json", body.to_string().into_bytes())
        }
        _ => (
            "404 Not Found",
            "text/plain",
            b"try /metrics, /health/live or /health/ready\n".to_vec(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&body).await?;
    stream.shutdown().await
}

/// GETs `path` from `addr`: the status line and the body.
async fn get(addr: SocketAddr, path: &str) -> std::io::Result<(String, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.lines().next().unwrap_or_default().to_owned();
    Ok((status, body.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of series `name` whose labels include `label`.
    fn value(body: &str, name: &str, label: &str) -> Option<f64> {
        body.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
            .find_map(|l| l.rsplit(' ').next()?.parse().ok())
    }

    /// The bounds of the bucket of `messaging.process.duration` for `orders` that holds
    /// its 95th percentile, in seconds, as Prometheus's `histogram_quantile` finds it.
    fn p95_bucket(body: &str) -> (f64, f64) {
        let mut buckets: Vec<(f64, f64)> = body
            .lines()
            .filter(|l| l.starts_with("messaging_process_duration_seconds_bucket{"))
            .filter(|l| l.contains(r#"messaging_destination_name="orders""#))
            .map(|l| {
                let le = l.split(r#"le=""#).nth(1).and_then(|r| r.split('"').next());
                let le = match le {
                    Some("+Inf") => f64::INFINITY,
                    Some(v) => v.parse().expect("a bucket bound"),
                    None => panic!("a bucket without le: {l}"),
                };
                (le, l.rsplit(' ').next().unwrap().parse().unwrap())
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let total = buckets.last().expect("the histogram is exported").1;
        let rank = 0.95 * total;
        let at = buckets.iter().position(|b| b.1 >= rank).unwrap();
        let lower = if at == 0 { 0.0 } else { buckets[at - 1].0 };
        (lower, buckets[at].0)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_scrape_during_a_run_with_failures_shows_latency_retries_and_depths() {
        let running = start().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = running.app.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let app = app.clone();
                tokio::spawn(async move { serve(stream, &app).await });
            }
        });
        let broker = running.app.broker.clone();
        let producer = tokio::spawn(feed(broker.clone(), 400, 200));

        // During the run: the feed goes on, handlers are running.
        let health = &running.app.health;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while health.report().received < 200 {
            assert!(tokio::time::Instant::now() < deadline, "{health:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let dlq_before = broker.depth("orders-dlq") as f64;
        let (status, body) = get(addr, "/metrics").await.unwrap();
        let dlq_after = broker.depth("orders-dlq") as f64;
        assert!(status.contains("200"), "{status}");
        assert!(!producer.is_finished(), "scraped after the feed ended");

        let (lower, upper) = p95_bucket(&body);
        let latency = HANDLER_LATENCY.as_secs_f64();
        assert!(
            lower >= latency / 2.0 && upper <= latency * 2.0 && lower < latency,
            "the P95 bucket ({lower}, {upper}] s is not within 2x of the handler's {latency} s"
        );
        let dest = r#"messaging_destination_name="orders""#;
        let retried = value(&body, "redrive_messages_retried_total", dest).unwrap_or(0.0);
        assert!(retried > 0.0, "no retry counted:\n{body}");
        let nacked = value(&body, "redrive_messages_nacked_total", dest).unwrap_or(0.0);
        assert!(nacked > 0.0, "no failed delivery counted:\n{body}");
        let dlq = value(&body, "redrive_queue_depth", r#"name="orders-dlq""#)
            .expect("the DLQ's depth is exported");
        assert!(
            (dlq_before..=dlq_after).contains(&dlq),
            "DLQ depth {dlq}, the broker's {dlq_before}..={dlq_after}"
        );
        assert_eq!(
            value(&body, "redrive_circuit_state_ratio", dest),
            Some(0.0),
            "the breaker is closed"
        );
        let (status, ready) = get(addr, "/health/ready").await.unwrap();
        assert!(status.contains("200"), "{status}: {ready}");
        assert!(ready.contains(r#""phase":"consuming""#), "{ready}");

        // Once the feed is done and every order settled, the gauges read what the
        // broker holds: nothing left, and the 8 rejected orders (0, 50, … 350).
        producer.await.unwrap().unwrap();
        while broker.depth("orders") + broker.in_flight("orders") > 0 {
            assert!(tokio::time::Instant::now() < deadline, "{health:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (_, body) = get(addr, "/metrics").await.unwrap();
        assert_eq!(
            value(&body, "redrive_queue_depth", r#"name="orders""#),
            Some(0.0)
        );
        assert_eq!(
            value(&body, "redrive_queue_depth", r#"name="orders-dlq""#),
            Some(broker.depth("orders-dlq") as f64)
        );
        running.stop.notify_one();
        let report = running.worker.await.unwrap();
        assert_eq!((report.dead_lettered, report.acked), (8, 400), "{report:?}");
        let (status, live) = get(addr, "/health/live").await.unwrap();
        assert!(status.contains("503"), "{status}: {live}");
    }
}
