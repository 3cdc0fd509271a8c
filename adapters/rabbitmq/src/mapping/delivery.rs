//! [`AmqpDelivery`]: what RabbitMQ said about one delivery, typed.

use std::sync::Arc;

use lapin::BasicProperties;

/// What RabbitMQ said about one delivery, exactly: the typed properties and header table,
/// the exchange and routing key it was published with, and the redelivered flag.
///
/// Every message the adapter hands out carries one in its
/// [`extensions`](redrive_core::Message::extensions); cloning is cheap.
///
/// ```
/// # use redrive_core::Message;
/// use redrive_rabbitmq::AmqpDelivery;
/// # fn f(msg: &Message) {
/// if let Some(amqp) = msg.extensions.get::<AmqpDelivery>() {
///     println!("priority {:?}, routed by {}", amqp.properties().priority(), amqp.routing_key());
/// }
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct AmqpDelivery(Arc<DeliveryInfo>);

#[derive(Debug)]
struct DeliveryInfo {
    properties: BasicProperties,
    exchange: String,
    routing_key: String,
    redelivered: bool,
}

impl AmqpDelivery {
    pub(crate) fn new(
        properties: BasicProperties,
        exchange: String,
        routing_key: String,
        redelivered: bool,
    ) -> Self {
        AmqpDelivery(Arc::new(DeliveryInfo {
            properties,
            exchange,
            routing_key,
            redelivered,
        }))
    }

    /// The message's properties, with its header table, as the broker sent them.
    pub fn properties(&self) -> &BasicProperties {
        &self.0.properties
    }

    /// The exchange the message was published to (empty: the default exchange).
    pub fn exchange(&self) -> &str {
        &self.0.exchange
    }

    /// The routing key it was published with.
    pub fn routing_key(&self) -> &str {
        &self.0.routing_key
    }

    /// Whether the broker flagged this delivery as a redelivery.
    pub fn redelivered(&self) -> bool {
        self.0.redelivered
    }
}
