//! Reading a dead letter back: its envelope decoded ([`Letter`]), and which letters an
//! operation takes ([`Selection`]).

use std::time::{Duration, SystemTime};

use redrive_core::{HeaderError, Message, OutgoingMessage, names};

use super::envelope::{
    ATTEMPTS, CONSUMER, ERROR_KIND, ERROR_MESSAGE, FIRST_FAILURE_AT, LAST_FAILURE_AT,
    ORIGINAL_DESTINATION, ORIGINAL_ENQUEUED_AT, ORIGINAL_MESSAGE_ID, ORIGINAL_OFFSET,
    ORIGINAL_PARTITION, ORIGINAL_SYSTEM, is_envelope_header, parse_rfc3339,
};

/// How many times a dead letter was put back into a queue by a replay, in decimal: the
/// replay writes it on the copy it publishes, and the copy keeps it if it is
/// dead-lettered again, so a replay can refuse a message that keeps coming back.
pub const REPLAYS: &str = "x-redrive-replays";

/// A message read from a dead-letter queue, with its envelope decoded. Every field of
/// the envelope is optional: a message some other tool put in the queue reads with
/// `kind` `None`.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Letter {
    /// The message as the DLQ delivered it: payload, headers (the envelope included),
    /// key and the broker's metadata.
    pub message: Message,
    /// The messaging system it was first consumed from.
    pub origin_system: Option<String>,
    /// The queue or topic it was first consumed from: where a replay puts it back.
    pub origin: Option<String>,
    /// The partition it was consumed from (brokers with partitions).
    pub origin_partition: Option<i32>,
    /// Its offset in that partition (brokers with offsets).
    pub origin_offset: Option<i64>,
    /// The original message's id, where it had one.
    pub original_message_id: Option<String>,
    /// When the broker first accepted it, where the broker said.
    pub enqueued_at: Option<SystemTime>,
    /// The delivery attempt that failed last.
    pub attempts: Option<u32>,
    /// Why it was dead-lettered: `permanent`, `exhausted` or `abandoned`.
    pub kind: Option<String>,
    /// The handler's error, as the envelope keeps it (truncated).
    pub error: Option<String>,
    /// The earliest known failure.
    pub first_failure_at: Option<SystemTime>,
    /// The failure that dead-lettered it.
    pub last_failure_at: Option<SystemTime>,
    /// The consumer that dead-lettered it, where one was named.
    pub consumer: Option<String>,
    /// The trace it belongs to (from `traceparent`), as 32 hex digits.
    pub trace_id: Option<String>,
    /// Times it was replayed before ([`REPLAYS`]).
    pub replays: u32,
}

impl Letter {
    /// Decodes `message`'s envelope.
    pub fn read(message: Message) -> Letter {
        let h = &message.headers;
        let text = |name: &str| h.get_str(name).map(str::to_owned);
        fn number<T: std::str::FromStr>(m: &Message, name: &str) -> Option<T> {
            m.headers.get_str(name).and_then(|v| v.trim().parse().ok())
        }
        let time = |name: &str| h.get_str(name).and_then(parse_rfc3339);
        let trace_id = h
            .get_str(names::TRACEPARENT)
            .and_then(|tp| tp.split('-').nth(1))
            .filter(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(str::to_ascii_lowercase);
        Letter {
            origin_system: text(ORIGINAL_SYSTEM),
            origin: text(ORIGINAL_DESTINATION),
            origin_partition: number(&message, ORIGINAL_PARTITION),
            origin_offset: number(&message, ORIGINAL_OFFSET),
            original_message_id: text(ORIGINAL_MESSAGE_ID),
            enqueued_at: time(ORIGINAL_ENQUEUED_AT),
            attempts: number(&message, ATTEMPTS),
            kind: text(ERROR_KIND),
            error: text(ERROR_MESSAGE),
            first_failure_at: time(FIRST_FAILURE_AT),
            last_failure_at: time(LAST_FAILURE_AT),
            consumer: text(CONSUMER),
            trace_id,
            replays: number(&message, REPLAYS).unwrap_or(0),
            message,
        }
    }

    /// The id to name this letter by: the producer's `message-id` header, else the
    /// original message's broker id, else the broker's id for the dead letter itself.
    pub fn id(&self) -> Option<&str> {
        self.message
            .headers
            .get_str(names::MESSAGE_ID)
            .or(self.original_message_id.as_deref())
            .or(self.message.metadata.message_id.as_deref())
    }

    /// How long it has been dead: from its last failure to `now`.
    pub fn age(&self, now: SystemTime) -> Option<Duration> {
        self.last_failure_at
            .map(|t| now.duration_since(t).unwrap_or_default())
    }

    /// The message a replay publishes: the payload, the key and the message's own
    /// headers (trace context, correlation id, idempotency key included), without the
    /// envelope and the adapter's attempt count, so it starts again at attempt 1, and
    /// with [`REPLAYS`] one higher. The original message id comes back as `message-id`
    /// where the message had none of its own.
    ///
    /// # Errors
    /// If a header cannot be written (a header limit).
    pub fn replay_message(&self) -> Result<OutgoingMessage, HeaderError> {
        let mut out = self.message.to_outgoing();
        out.headers.retain(|name, _| {
            !is_envelope_header(name)
                && !name.eq_ignore_ascii_case(names::ATTEMPT)
                && !name.eq_ignore_ascii_case(REPLAYS)
        });
        out.headers
            .insert_static(REPLAYS, (self.replays + 1).to_string())?;
        if let Some(id) = &self.original_message_id {
            if out.headers.get_str(names::MESSAGE_ID).is_none() {
                out.headers.insert_static(names::MESSAGE_ID, id.clone())?;
            }
        }
        Ok(out)
    }
}

/// Which dead letters an operation takes: every condition set must hold (an empty
/// selection takes them all); a condition given several values (kinds, origins, ids)
/// takes any of them.
///
/// ```
/// use redrive_middleware::dead_letter::Selection;
///
/// let timeouts = Selection::all()
///     .with_kind("exhausted")
///     .with_error_containing("timed out")
///     .with_origin("orders");
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[must_use]
pub struct Selection {
    kinds: Vec<String>,
    error_contains: Option<String>,
    origins: Vec<String>,
    since: Option<SystemTime>,
    until: Option<SystemTime>,
    ids: Vec<String>,
}

impl Selection {
    /// Every dead letter.
    pub fn all() -> Self {
        Selection::default()
    }

    /// Letters of this kind (`permanent`, `exhausted`, `abandoned`).
    pub fn with_kind(mut self, kind: impl Into<String>) -> Self {
        self.kinds.push(kind.into());
        self
    }

    /// Letters whose error contains `text` (case-sensitive).
    pub fn with_error_containing(mut self, text: impl Into<String>) -> Self {
        self.error_contains = Some(text.into());
        self
    }

    /// Letters first consumed from this queue or topic.
    pub fn with_origin(mut self, origin: impl Into<String>) -> Self {
        self.origins.push(origin.into());
        self
    }

    /// Letters dead-lettered at or after `t` (their last failure).
    pub fn since(mut self, t: SystemTime) -> Self {
        self.since = Some(t);
        self
    }

    /// Letters dead-lettered before `t` (their last failure).
    pub fn until(mut self, t: SystemTime) -> Self {
        self.until = Some(t);
        self
    }

    /// The letter with this id: [`Letter::id`], the original message's broker id, or
    /// the broker's id of the dead letter.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.ids.push(id.into());
        self
    }

    /// Whether `letter` is selected.
    pub fn matches(&self, letter: &Letter) -> bool {
        let any = |wanted: &[String], have: Option<&str>| {
            wanted.is_empty() || have.is_some_and(|h| wanted.iter().any(|w| w == h))
        };
        let at = letter.last_failure_at;
        any(&self.kinds, letter.kind.as_deref())
            && any(&self.origins, letter.origin.as_deref())
            && self
                .error_contains
                .as_deref()
                .is_none_or(|text| letter.error.as_deref().is_some_and(|e| e.contains(text)))
            && self.since.is_none_or(|s| at.is_some_and(|t| t >= s))
            && self.until.is_none_or(|u| at.is_some_and(|t| t < u))
            && (self.ids.is_empty()
                || self.ids.iter().any(|w| {
                    let w = Some(w.as_str());
                    letter.id() == w
                        || letter.original_message_id.as_deref() == w
                        || letter.message.metadata.message_id.as_deref() == w
                }))
    }
}
