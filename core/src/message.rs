//! The message a handler sees: payload, headers, ordering key, metadata and extensions.

use std::any::{Any, TypeId};
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;

use crate::cow_vec::CowVec;

use crate::Headers;

/// Where a message came from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Source {
    /// The messaging system, as the OpenTelemetry `messaging.system` attribute names it
    /// (`rabbitmq`, `aws_sqs`, `kafka`, `memory`).
    pub system: &'static str,
    /// The queue or topic the message was consumed from.
    ///
    /// Shared, so copying the metadata (for a retry, a dead-letter envelope) never
    /// copies the name; adapters hand every message of a queue the same allocation.
    pub destination: Arc<str>,
    /// The partition, for brokers that have them.
    pub partition: Option<i32>,
    /// The offset within the partition, for brokers that have them.
    pub offset: Option<i64>,
    /// The consumer group this delivery was made to, for brokers where several groups
    /// read one destination independently (Kafka's `group.id`); `None` elsewhere.
    ///
    /// With `system` and `destination` it names the consumer a message was delivered
    /// to: state kept per consumer (idempotency keys) is scoped by it.
    pub group: Option<Arc<str>>,
}

/// What the broker and the framework know about a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metadata {
    /// The broker's or producer's message id, if there is one. Shared, like
    /// [`Source::destination`], so copies of the metadata do not copy it.
    pub message_id: Option<Arc<str>>,
    /// Where the message came from.
    pub source: Source,
    /// The delivery attempt, 1-based: the broker's own count where it keeps one, else a
    /// header the framework maintains, or the Worker's count for a parked message.
    pub attempt: u32,
    /// When the broker accepted the message, if it says.
    pub enqueued_at: Option<SystemTime>,
    /// When this delivery was received.
    pub received_at: SystemTime,
}

impl Default for Metadata {
    fn default() -> Self {
        Metadata {
            message_id: None,
            source: Source::default(),
            attempt: 1,
            enqueued_at: None,
            received_at: SystemTime::now(),
        }
    }
}

/// Typed values that layers hand each other, one per type.
///
/// Values are shared, and so is the set of them until a copy changes it: cloning a
/// message's extensions is a reference count, never an allocation. A message carries a
/// handful at most, so they live in a small vector, not a hash map.
#[derive(Clone, Default)]
pub struct Extensions {
    entries: CowVec<Entry>,
}

type Entry = (TypeId, Arc<dyn Any + Send + Sync>);

impl Extensions {
    /// No extensions.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores `value`, returning whether one of its type was replaced.
    pub fn insert<T: Send + Sync + 'static>(&mut self, value: T) -> bool {
        self.insert_shared(Arc::new(value))
    }

    /// Stores a value already shared, without allocating for it: a value every
    /// message carries (the Worker's [`Shutdown`](crate::Shutdown) signal, say) is made
    /// once and handed to each. Returns whether one of its type was replaced.
    pub fn insert_shared<T: Send + Sync + 'static>(&mut self, value: Arc<T>) -> bool {
        let id = TypeId::of::<T>();
        let value: Arc<dyn Any + Send + Sync> = value;
        let entries = self.entries.make_mut();
        match entries.iter_mut().find(|(t, _)| *t == id) {
            Some(slot) => {
                slot.1 = value;
                true
            }
            None => {
                entries.push((id, value));
                false
            }
        }
    }

    /// The value of type `T`, if one is stored.
    pub fn get<T: Send + Sync + 'static>(&self) -> Option<&T> {
        let id = TypeId::of::<T>();
        self.entries
            .as_slice()
            .iter()
            .find(|(t, _)| *t == id)
            .and_then(|(_, v)| v.downcast_ref::<T>())
    }

    /// Removes the value of type `T`; returns whether there was one.
    pub fn remove<T: Send + Sync + 'static>(&mut self) -> bool {
        let id = TypeId::of::<T>();
        if !self.entries.as_slice().iter().any(|(t, _)| *t == id) {
            return false;
        }
        self.entries.make_mut().retain(|(t, _)| *t != id);
        true
    }

    /// Number of stored values.
    pub fn len(&self) -> usize {
        self.entries.as_slice().len()
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Debug for Extensions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Extensions")
            .field("len", &self.len())
            .finish()
    }
}

/// A message as a handler sees it. Cloning is cheap: the payload is shared, not copied.
///
/// Its `Debug` shows the payload's length, never its bytes: a message logged with `?`
/// does not put its contents in the log.
#[derive(Clone, Default)]
pub struct Message {
    /// The body.
    pub payload: Bytes,
    /// Headers (AMQP headers, SQS message attributes, Kafka record headers).
    pub headers: Headers,
    /// The ordering key (Kafka record key, SQS FIFO group id, a routing header).
    pub key: Option<Bytes>,
    /// What the broker and the framework know about this delivery.
    pub metadata: Metadata,
    /// Typed values layers hand each other.
    pub extensions: Extensions,
}

/// A payload as `Debug` shows it: its length only.
struct PayloadLen(usize);

impl fmt::Debug for PayloadLen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} bytes>", self.0)
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("payload", &PayloadLen(self.payload.len()))
            .field("headers", &self.headers)
            .field("key", &self.key)
            .field("metadata", &self.metadata)
            .field("extensions", &self.extensions)
            .finish()
    }
}

impl fmt::Debug for OutgoingMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutgoingMessage")
            .field("payload", &PayloadLen(self.payload.len()))
            .field("headers", &self.headers)
            .field("key", &self.key)
            .finish()
    }
}

impl Message {
    /// A message with this payload and nothing else, as a test or a producer builds it.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Message {
            payload: payload.into(),
            ..Message::default()
        }
    }

    /// Sets the ordering key.
    #[must_use]
    pub fn with_key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sets the headers.
    #[must_use]
    pub fn with_headers(mut self, headers: Headers) -> Self {
        self.headers = headers;
        self
    }

    /// The delivery attempt (1-based).
    pub fn attempt(&self) -> u32 {
        self.metadata.attempt
    }

    /// This message as one to publish again (to a DLQ, or forwarded): payload, headers, key.
    pub fn to_outgoing(&self) -> OutgoingMessage {
        OutgoingMessage {
            payload: self.payload.clone(),
            headers: self.headers.clone(),
            key: self.key.clone(),
        }
    }
}

/// A message to publish. Its `Debug` shows the payload's length, never its bytes.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct OutgoingMessage {
    /// The body.
    pub payload: Bytes,
    /// Headers to send with it.
    pub headers: Headers,
    /// The ordering key.
    pub key: Option<Bytes>,
}

impl OutgoingMessage {
    /// A message with this payload, no headers and no key.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        OutgoingMessage {
            payload: payload.into(),
            ..Self::default()
        }
    }

    /// Sets the ordering key.
    #[must_use]
    pub fn with_key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sets one header.
    ///
    /// # Errors
    /// When the header breaks the headers' limits.
    pub fn with_header(
        mut self,
        name: impl Into<String>,
        value: impl Into<crate::HeaderValue>,
    ) -> Result<Self, crate::HeaderError> {
        self.headers.insert(name, value)?;
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_the_payload_length_not_its_bytes() {
        let m = Message::new("card 4111-1111");
        let text = format!("{m:?} {:?}", m.to_outgoing());
        // The whole number: its digits alone may turn up in `received_at`.
        assert!(!text.contains("4111-1111"), "{text}");
        assert!(text.contains("<14 bytes>"), "{text}");
    }

    #[test]
    fn clone_shares_the_payload() {
        let m = Message::new(vec![1u8; 1024]);
        let c = m.clone();
        assert_eq!(m.payload.as_ptr(), c.payload.as_ptr());
    }

    #[test]
    fn extensions_are_typed_and_shared() {
        let mut e = Extensions::new();
        assert!(!e.insert(5u32));
        assert!(e.insert(6u32));
        e.insert("x");
        let c = e.clone();
        assert_eq!(c.get::<u32>(), Some(&6));
        assert_eq!(c.get::<&str>(), Some(&"x"));
        assert_eq!(c.get::<u64>(), None);
        e.remove::<u32>();
        assert_eq!(e.len(), 1);
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn a_changed_copy_of_the_extensions_leaves_the_original_alone() {
        let mut original = Extensions::new();
        assert!(!original.remove::<u32>(), "nothing to remove");
        original.insert(1u32);
        let mut copy = original.clone();
        assert!(copy.insert(2u32));
        copy.insert(3u8);
        assert_eq!(original.get::<u32>(), Some(&1));
        assert_eq!(original.get::<u8>(), None);
        assert!(copy.remove::<u32>());
        assert_eq!((copy.len(), original.len()), (1, 1));
        assert_eq!(original.get::<u32>(), Some(&1));
    }

    #[test]
    fn a_shared_value_is_stored_as_it_is_not_copied() {
        let shared = Arc::new(String::from("signal"));
        let (mut a, mut b) = (Extensions::new(), Extensions::new());
        assert!(!a.insert_shared(shared.clone()));
        b.insert_shared(shared.clone());
        assert!(std::ptr::eq(a.get::<String>().unwrap(), &*shared));
        assert!(std::ptr::eq(b.get::<String>().unwrap(), &*shared));
        assert_eq!(Arc::strong_count(&shared), 3);
        assert!(a.insert(String::from("own")), "replaces the shared one");
        assert_eq!(a.get::<String>().map(String::as_str), Some("own"));
        assert_eq!(Arc::strong_count(&shared), 2);
    }
}
