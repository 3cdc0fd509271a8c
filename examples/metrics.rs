//! redrive's metrics on a Prometheus scrape endpoint.
//!
//! `cargo run --example metrics` handles a few hundred messages on the in-memory broker
//! (some fail and are redelivered, some are dead-lettered) and serves the metrics at
//! <http://127.0.0.1:9464/metrics> (set `METRICS_ADDR` to change it) until SIGTERM or
//! Ctrl-C.
//! `cargo run --example metrics -- --once` scrapes itself once, prints it and exits.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use prometheus::{Encoder, Registry, TextEncoder};
use redrive::memory::MemoryBroker;
use redrive::middleware::dead_letter::{DeadLetterConfig, DeadLetterLayer};
use redrive::middleware::metrics::{MetricsLayer, QueueReading};
use redrive::{
    BoxError, Message, OutgoingMessage, Publisher, Redelivery, Worker, classify, handler_fn,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceBuilder;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let once = std::env::args().any(|a| a == "--once");
    let registry = Registry::new();
    let reader = opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        .build()?;
    let provider = SdkMeterProvider::builder().with_reader(reader).build();
    let meter = provider.meter("redrive-example");

    let broker = MemoryBroker::new();
    for i in 0..300u32 {
        broker
            .publish("orders", OutgoingMessage::new(i.to_string()))
            .await?;
    }
    let metrics = MetricsLayer::new(&meter);
    // The broker's own figures: ready messages in the queue and its dead-letter queue.
    // A RabbitMQ consumer reads them with `redrive::rabbitmq::QueueStats`.
    for queue in ["orders", "orders-dlq"] {
        let b = broker.clone();
        metrics.observe_queue("memory", queue, move || {
            Some(QueueReading::new(b.depth(queue) as u64))
        });
    }
    let stack = ServiceBuilder::new()
        .layer(metrics)
        .layer(DeadLetterLayer::new(
            Arc::new(broker.clone()),
            DeadLetterConfig::default().with_max_attempts(3),
        )?)
        .service(handler_fn(|m: Message| async move {
            let n: u32 = std::str::from_utf8(&m.payload)?.parse()?;
            match n % 50 {
                0 => Err(classify::permanent("order rejected by validation")),
                7 if m.attempt() == 1 => Err("warehouse timed out".into()),
                _ => {
                    tokio::time::sleep(Duration::from_millis(u64::from(n % 5))).await;
                    Ok::<_, BoxError>(())
                }
            }
        }));
    let b = broker.clone();
    let idle = async move {
        while b.depth("orders") + b.in_flight("orders") > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    // Stops once every message is settled, or on SIGTERM or Ctrl-C.
    let mut interrupted = false;
    let report = Worker::builder(broker.consumer("orders"))
        .service(stack)
        .redelivery(Redelivery::constant(Duration::from_millis(10)))
        .build()?
        .run_until(async {
            tokio::select! {
                () = idle => {}
                () = redrive::shutdown_signal() => interrupted = true,
            }
        })
        .await;
    eprintln!("handled: {report:?}");
    if interrupted {
        return Ok(());
    }

    let addr = std::env::var("METRICS_ADDR").unwrap_or_else(|_| "127.0.0.1:9464".into());
    let listener = TcpListener::bind(&addr).await?;
    let local = listener.local_addr()?;
    eprintln!("serving metrics on http://{local}/metrics");

    if once {
        let server = tokio::spawn(async move {
            if let Ok((stream, _)) = listener.accept().await {
                let _ = serve(stream, &registry).await;
            }
        });
        let mut stream = TcpStream::connect(local).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        server.await?;
        let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
        let ours: Vec<&str> = body
            .lines()
            .filter(|l| l.starts_with("redrive_") || l.starts_with("messaging_"))
            .filter(|l| !l.contains("_bucket{"))
            .collect();
        println!("{}", ours.join("\n"));
        return Ok(());
    }
    // Made once, so a signal that arrives while a connection is accepted is not missed.
    let mut stop = std::pin::pin!(redrive::shutdown_signal());
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = accepted?;
                let registry = registry.clone();
                tokio::spawn(async move { let _ = serve(stream, &registry).await; });
            }
            () = &mut stop => return Ok(()),
        }
    }
}

/// Answers one HTTP request with the Prometheus text format.
async fn serve(mut stream: TcpStream, registry: &Registry) -> std::io::Result<()> {
    let mut buf = [0u8; 1024];
    let n = stream.read(&mut buf).await?;
    let request = String::from_utf8_lossy(&buf[..n]);
    let (status, body) = if request.starts_with("GET /metrics ") {
        let mut body = Vec::new();
        TextEncoder::new()
            .encode(&registry.gather(), &mut body)
            .map_err(std::io::Error::other)?;
        ("200 OK", body)
    } else {
        ("404 Not Found", b"try /metrics\n".to_vec())
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&body).await?;
    stream.shutdown().await
}
