//! Filling a queue for the RabbitMQ benches, shared by them through `#[path]`.

use redrive_rabbitmq::lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use redrive_rabbitmq::lapin::{BasicProperties, Connection};

/// Publishes `n` messages of 64 bytes to `queue`, the `i`th with the message id
/// `id(i)`, and waits for the broker's confirms.
pub(crate) async fn fill(conn: &Connection, queue: &str, n: usize, id: impl Fn(usize) -> String) {
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let body = [b'x'; 64];
    for i in 0..n {
        let _confirm = ch
            .basic_publish(
                "",
                queue,
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default()
                    .with_delivery_mode(1)
                    .with_message_id(id(i).into()),
            )
            .await
            .expect("publish");
        if i % 10_000 == 9_999 {
            ch.wait_for_confirms().await.expect("confirms");
        }
    }
    ch.wait_for_confirms().await.expect("confirms");
    let _ = ch.close(200, "filled").await;
}
