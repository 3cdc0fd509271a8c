//! Where an idempotency key comes from: [`MakeKey`] and [`DefaultKey`].

use std::fmt::Write as _;
use std::sync::Arc;

use redrive_core::{HeaderValue, Message};

/// The header a producer sets to name the operation a message performs, first choice of
/// [`DefaultKey`]; and a producer's message id header, its second choice.
pub use redrive_core::names::{IDEMPOTENCY_KEY, MESSAGE_ID};

/// Works out a message's idempotency key. Implemented for [`DefaultKey`] and for
/// closures `Fn(&Message) -> Option<K>` where `K` is a `String`, a `&'static str` or an
/// `Arc<str>`.
///
/// `None` means the message has no key: the handler runs without deduplication. The key
/// is shared (`Arc<str>`) from here on: by the layer, the store and the handler's
/// [`IdempotencyToken`](super::IdempotencyToken), so a key already held in an `Arc`,
/// such as the broker's message id, is never copied.
pub trait MakeKey: Send + Sync + 'static {
    /// The key of `msg`, if it has one.
    fn make_key(&self, msg: &Message) -> Option<Arc<str>>;
}

impl<F, K> MakeKey for F
where
    F: Fn(&Message) -> Option<K> + Send + Sync + 'static,
    K: Into<Arc<str>>,
{
    fn make_key(&self, msg: &Message) -> Option<Arc<str>> {
        self(msg).map(Into::into)
    }
}

/// The default key: the [`IDEMPOTENCY_KEY`] header, else the [`MESSAGE_ID`] header,
/// else the broker's [`message_id`](redrive_core::Metadata::message_id). Empty values
/// are skipped; a header value that is not UTF-8 is used as `0x` and its hex digits.
///
/// A broker's message id is the same for every redelivery of one message but differs
/// between two sends of the same content, so it catches redeliveries, not a producer
/// that sends twice; producers that may retry a send should set [`IDEMPOTENCY_KEY`].
#[derive(Clone, Copy, Debug, Default)]
pub struct DefaultKey;

impl MakeKey for DefaultKey {
    fn make_key(&self, msg: &Message) -> Option<Arc<str>> {
        [IDEMPOTENCY_KEY, MESSAGE_ID]
            .into_iter()
            .filter_map(|name| msg.headers.get(name))
            .find(|v| !v.is_empty())
            .map(header_key)
            .or_else(|| {
                msg.metadata
                    .message_id
                    .as_ref()
                    .filter(|id| !id.is_empty())
                    .cloned()
            })
    }
}

fn header_key(value: &HeaderValue) -> Arc<str> {
    match value.as_str() {
        Some(s) => s.into(),
        None => {
            let bytes = value.as_bytes();
            let mut s = String::with_capacity(2 + 2 * bytes.len());
            s.push_str("0x");
            for b in bytes {
                let _ = write!(s, "{b:02x}");
            }
            s.into()
        }
    }
}
