//! [`CorrelationId`]: the message's own, or one made by a [`MakeCorrelationId`], and the
//! current one while a call is polled.

use std::cell::RefCell;
use std::fmt;
use std::sync::Arc;

use redrive_core::{Headers, Message};

use super::{CORRELATION_ID, CORRELATION_ID_ALIASES, TRACEPARENT};

thread_local! {
    /// The correlation id of the call being polled on this thread: set by
    /// [`ResponseFuture`](super::ResponseFuture) around each poll of its inner future
    /// (and its drop), and put back as it was afterwards, so it follows the call from
    /// thread to thread the way a task-local does.
    static CURRENT: RefCell<Option<CorrelationId>> = const { RefCell::new(None) };
}

/// Makes `id` the current correlation id until dropped, then restores the one before.
pub(super) struct Scope<'a> {
    slot: &'a mut Option<CorrelationId>,
}

impl<'a> Scope<'a> {
    /// `None` if the thread's locals are gone (the thread is exiting) or the current id
    /// is being read: then the call runs without one rather than panicking.
    pub(super) fn enter(slot: &'a mut Option<CorrelationId>) -> Option<Self> {
        CURRENT
            .try_with(|current| {
                current
                    .try_borrow_mut()
                    .map(|mut current| std::mem::swap(slot, &mut *current))
                    .is_ok()
            })
            .ok()
            .filter(|swapped| *swapped)
            .map(|_| Scope { slot })
    }
}

impl Drop for Scope<'_> {
    fn drop(&mut self) {
        let _ = CURRENT.try_with(|current| {
            if let Ok(mut current) = current.try_borrow_mut() {
                std::mem::swap(self.slot, &mut *current);
            }
        });
    }
}

/// A message's correlation id, in its [`extensions`](Message::extensions) and, while
/// the handler runs, in [`CorrelationId::current`].
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CorrelationId(Arc<str>);

impl CorrelationId {
    /// A correlation id with this value.
    pub fn new(id: impl Into<Arc<str>>) -> Self {
        CorrelationId(id.into())
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id of the message being handled by the current task, if any.
    pub fn current() -> Option<CorrelationId> {
        CURRENT
            .try_with(|current| current.try_borrow().ok().and_then(|c| c.clone()))
            .ok()
            .flatten()
    }
}

impl fmt::Display for CorrelationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for CorrelationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// Makes a correlation id for a message that has none.
pub trait MakeCorrelationId: Clone + Send + Sync + 'static {
    /// The id for `msg`.
    fn make_correlation_id(&self, msg: &Message) -> CorrelationId;
}

/// The default: stable across redeliveries where the message allows it.
///
/// 1. the trace id of the message's `traceparent`, if it has a valid one (the same on
///    every delivery attempt of a message, and already the key SREs search by);
/// 2. else the broker's message id;
/// 3. else 128 random bits as 32 lowercase hex digits ([`RandomCorrelationId`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct DefaultCorrelationId;

impl MakeCorrelationId for DefaultCorrelationId {
    fn make_correlation_id(&self, msg: &Message) -> CorrelationId {
        if let Some(trace_id) = msg
            .headers
            .get_str(TRACEPARENT)
            .and_then(traceparent_trace_id)
        {
            return CorrelationId::new(trace_id);
        }
        if let Some(id) = msg.metadata.message_id.as_ref().filter(|id| !id.is_empty()) {
            // Shares the message id's allocation.
            return CorrelationId(id.clone());
        }
        RandomCorrelationId.make_correlation_id(msg)
    }
}

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`), if valid and
/// not all zeros.
fn traceparent_trace_id(value: &str) -> Option<&str> {
    let mut parts = value.trim().split('-');
    let (_version, trace_id) = (parts.next()?, parts.next()?);
    let valid = trace_id.len() == 32
        && trace_id.bytes().all(|b| b.is_ascii_hexdigit())
        && trace_id.bytes().any(|b| b != b'0');
    valid.then_some(trace_id)
}

/// 128 random bits as 32 lowercase hex digits.
#[derive(Clone, Copy, Debug, Default)]
pub struct RandomCorrelationId;

impl MakeCorrelationId for RandomCorrelationId {
    fn make_correlation_id(&self, _msg: &Message) -> CorrelationId {
        CorrelationId::new(format!("{:032x}", fastrand::u128(..)))
    }
}

impl<F> MakeCorrelationId for F
where
    F: Fn(&Message) -> CorrelationId + Clone + Send + Sync + 'static,
{
    fn make_correlation_id(&self, msg: &Message) -> CorrelationId {
        self(msg)
    }
}

pub(super) fn find_correlation_id(headers: &Headers, extra: &[String]) -> Option<CorrelationId> {
    std::iter::once(CORRELATION_ID)
        .chain(CORRELATION_ID_ALIASES.iter().copied())
        .chain(extra.iter().map(String::as_str))
        .find_map(|name| headers.get_str(name).filter(|v| !v.is_empty()))
        .map(CorrelationId::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_correlation_id_prefers_the_trace_id_then_the_message_id() {
        let mut msg = Message::new("x");
        msg.headers
            .insert(
                TRACEPARENT,
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .unwrap();
        msg.metadata.message_id = Some("m-1".into());
        let id = DefaultCorrelationId.make_correlation_id(&msg);
        assert_eq!(id.as_str(), "4bf92f3577b34da6a3ce929d0e0e4736");
        msg.headers
            .insert(
                TRACEPARENT,
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            )
            .unwrap();
        assert_eq!(
            DefaultCorrelationId.make_correlation_id(&msg).as_str(),
            "m-1"
        );
        msg.metadata.message_id = None;
        let random = DefaultCorrelationId.make_correlation_id(&msg);
        assert_eq!(random.as_str().len(), 32);
        assert_ne!(random, DefaultCorrelationId.make_correlation_id(&msg));
    }
}
