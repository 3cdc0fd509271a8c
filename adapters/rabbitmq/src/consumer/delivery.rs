//! A lapin delivery recorded with its channel's settler and turned into the Worker's
//! [`Delivery`].

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use bytes::Bytes;
use redrive_core::Delivery;

use crate::mapping::{self, AmqpDelivery};
use crate::settle::TagGap;

use super::acker::RabbitAcker;
use super::session::Session;

/// The Worker's delivery of `d`, or the tag gap that breaks its channel.
pub(super) fn delivery(
    session: &Arc<Session>,
    queue: &Arc<str>,
    d: lapin::message::Delivery,
) -> std::result::Result<Delivery, TagGap> {
    let (acker, received) = accept(session, d)?;
    let message = mapping::message(queue, acker.payload.clone(), received, acker.amqp.clone());
    Ok(Delivery::new(message, acker))
}

/// Records `d` with its channel's settler and gives its acker, with what the message is
/// built from; or the tag gap that breaks its channel.
pub(super) fn accept(
    session: &Arc<Session>,
    d: lapin::message::Delivery,
) -> std::result::Result<(RabbitAcker, mapping::Received), TagGap> {
    let lapin::message::Delivery {
        exchange,
        routing_key,
        redelivered,
        properties,
        data,
        delivery_tag,
        ..
    } = d;
    session.settler.deliver(delivery_tag)?;
    let received = mapping::receive(&properties, redelivered);
    let attempt = received.attempt;
    let amqp = AmqpDelivery::new(
        properties,
        exchange.to_string(),
        routing_key.to_string(),
        redelivered,
    );
    let acker = RabbitAcker {
        session: Arc::downgrade(session),
        tag: delivery_tag,
        settling: AtomicBool::new(false),
        amqp,
        payload: Bytes::from(data),
        attempt,
    };
    Ok((acker, received))
}
