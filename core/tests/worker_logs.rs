//! The Worker's own log lines about a message name the message: its id and its
//! correlation id, so an SRE can follow one message through the logs.
#![cfg(feature = "memory")]

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redrive_core::memory::MemoryBroker;
use redrive_core::{BoxError, Message, OutgoingMessage, Publisher, Worker, handler_fn, names};

/// A writer that keeps what the log subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_failed_message_is_logged_with_its_message_and_correlation_ids() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let broker = MemoryBroker::new();
    let message = OutgoingMessage::new("order")
        .with_header(names::MESSAGE_ID, "order-17")
        .unwrap()
        .with_header(names::CORRELATION_ID, "corr-42")
        .unwrap();
    broker.publish("orders", message).await.unwrap();
    let handler = handler_fn(|_m: Message| async { Err::<(), BoxError>("downstream down".into()) });
    Worker::builder(broker.consumer("orders"))
        .service(handler)
        .build()
        .unwrap()
        .run_until(tokio::time::sleep(Duration::from_millis(300)))
        .await;

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let failed = logs
        .lines()
        .find(|l| l.contains("handler failed"))
        .unwrap_or_else(|| panic!("no `handler failed` line in:\n{logs}"));
    assert!(failed.contains("message_id=order-17"), "{failed}");
    assert!(failed.contains("correlation_id=corr-42"), "{failed}");
}
