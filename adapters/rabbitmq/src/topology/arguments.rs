//! The declare arguments of the queue, its dead-letter queue and its delay queues (see
//! the [module docs](super)).

use lapin::types::{AMQPValue, FieldTable, LongString};

use super::{QueueKind, Topology};

pub(super) const X_QUEUE_TYPE: &str = "x-queue-type";
pub(super) const X_DELIVERY_LIMIT: &str = "x-delivery-limit";
pub(super) const X_DEAD_LETTER_EXCHANGE: &str = "x-dead-letter-exchange";
pub(super) const X_DEAD_LETTER_ROUTING_KEY: &str = "x-dead-letter-routing-key";
pub(super) const X_DEAD_LETTER_STRATEGY: &str = "x-dead-letter-strategy";
pub(super) const X_OVERFLOW: &str = "x-overflow";
pub(super) const X_MESSAGE_TTL: &str = "x-message-ttl";

/// The arguments a queue declared before the topology had a delivery limit lacks.
pub(crate) const GUARD_ARGUMENTS: [&str; 5] = [
    X_DELIVERY_LIMIT,
    X_DEAD_LETTER_EXCHANGE,
    X_DEAD_LETTER_ROUTING_KEY,
    X_DEAD_LETTER_STRATEGY,
    X_OVERFLOW,
];

impl Topology {
    /// What a message that kills the process or the connection on every delivery
    /// meets with this topology, when nothing guards against it: `None` when the broker
    /// dead-letters it after the delivery limit.
    pub(crate) fn unguarded(&self) -> Option<&'static str> {
        match (self.kind, &self.dead_letter_queue, self.delivery_limit) {
            (QueueKind::Classic, ..) => Some(
                "a classic queue cannot count deliveries on the broker: a message that kills \
                 the process or breaks the connection on every delivery (an abort, running out \
                 of memory, a header name or property lapin cannot parse as UTF-8) is redelivered \
                 forever, never reaches the dead-letter queue, and holds up the messages behind \
                 it; use a quorum queue \
                 (Topology::with_kind(QueueKind::Quorum)) with a dead-letter queue",
            ),
            (QueueKind::Quorum, None, _) => Some(
                "this quorum queue has no dead-letter queue, so no delivery limit is declared \
                 (one without a dead-letter exchange drops messages): a message that kills the \
                 process or breaks the connection on every delivery is redelivered forever, and \
                 RabbitMQ 4.x drops it after its default limit of 20 deliveries; add \
                 Topology::with_dead_letter_queue",
            ),
            (QueueKind::Quorum, Some(_), None) => Some(
                "this topology declares no delivery limit (without_delivery_limit): unless a \
                 policy sets `delivery-limit` and a dead-letter exchange on the queue, a message \
                 that kills the process or breaks the connection on every delivery is \
                 redelivered forever",
            ),
            (QueueKind::Quorum, Some(_), Some(_)) => None,
        }
    }

    /// The declare arguments of the delay queue of the bucket of 2^`exp` ms (see the
    /// [module docs](super#delay-queues)).
    pub(super) fn delay_queue_arguments(&self, exp: u32) -> FieldTable {
        let text = |s: &str| AMQPValue::LongString(LongString::from(s));
        let mut args = self.kind_arguments();
        args.insert(X_DEAD_LETTER_EXCHANGE.into(), text(""));
        args.insert(X_DEAD_LETTER_ROUTING_KEY.into(), text(&self.queue));
        if self.kind == QueueKind::Quorum {
            let ttl = (1u64 << exp).min(u64::from(u32::MAX));
            args.insert(
                X_MESSAGE_TTL.into(),
                AMQPValue::LongLongInt(i64::try_from(ttl).unwrap_or(i64::MAX)),
            );
            args.insert(X_DEAD_LETTER_STRATEGY.into(), text("at-least-once"));
            args.insert(X_OVERFLOW.into(), text("reject-publish"));
        }
        args
    }

    /// The dead-letter queue's declare arguments: its kind only.
    pub(super) fn kind_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        if self.kind == QueueKind::Quorum {
            args.insert(
                X_QUEUE_TYPE.into(),
                AMQPValue::LongString(LongString::from(self.kind.as_str())),
            );
        }
        args
    }

    /// The queue's declare arguments: its kind, and on a quorum queue with a dead-letter
    /// queue the guard (the [module docs](super#messages-no-consumer-can-settle)).
    pub(crate) fn queue_arguments(&self) -> FieldTable {
        let mut args = self.kind_arguments();
        if let (Some(limit), Some(dlq)) = (self.delivery_limit(), &self.dead_letter_queue) {
            let text = |s: &str| AMQPValue::LongString(LongString::from(s));
            args.insert(
                X_DELIVERY_LIMIT.into(),
                AMQPValue::LongLongInt(i64::from(limit)),
            );
            args.insert(X_DEAD_LETTER_EXCHANGE.into(), text(""));
            args.insert(X_DEAD_LETTER_ROUTING_KEY.into(), text(dlq));
            args.insert(X_DEAD_LETTER_STRATEGY.into(), text("at-least-once"));
            args.insert(X_OVERFLOW.into(), text("reject-publish"));
        }
        args
    }
}
