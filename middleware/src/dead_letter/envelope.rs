//! The dead-letter envelope: header names, and building the message that goes to the DLQ.

use std::error::Error as StdError;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redrive_core::{HeaderError, Metadata, OutgoingMessage};

/// The messaging system the message was consumed from (`rabbitmq`, `aws_sqs`, `kafka`, `memory`).
pub const ORIGINAL_SYSTEM: &str = "x-redrive-original-system";
/// The queue or topic the message was consumed from.
pub const ORIGINAL_DESTINATION: &str = "x-redrive-original-destination";
/// The partition it was consumed from (only for brokers with partitions).
pub const ORIGINAL_PARTITION: &str = "x-redrive-original-partition";
/// The offset within that partition (only for brokers with offsets).
pub const ORIGINAL_OFFSET: &str = "x-redrive-original-offset";
/// The broker's or producer's message id (only when the message had one).
pub const ORIGINAL_MESSAGE_ID: &str = "x-redrive-original-message-id";
/// When the broker accepted the original message, RFC 3339 UTC (only when the broker says).
pub const ORIGINAL_ENQUEUED_AT: &str = "x-redrive-original-enqueued-at";
/// The delivery attempt that failed last (`Metadata::attempt`), in decimal.
pub const ATTEMPTS: &str = "x-redrive-attempts";
/// The earliest known failure, RFC 3339 UTC. See [`DeadLetter`](super::DeadLetter) for
/// how it is derived.
pub const FIRST_FAILURE_AT: &str = "x-redrive-first-failure-at";
/// The failure that sent the message to the DLQ, RFC 3339 UTC.
pub const LAST_FAILURE_AT: &str = "x-redrive-last-failure-at";
/// Why the message was dead-lettered: [`Reason::Permanent`] (`permanent`),
/// [`Reason::Exhausted`] (`exhausted`) or [`Reason::Abandoned`] (`abandoned`).
pub const ERROR_KIND: &str = redrive_core::names::ERROR_KIND;
/// The handler's error and its sources, truncated on a character boundary to
/// [`DeadLetterConfig::with_max_error_len`](super::DeadLetterConfig::with_max_error_len).
pub const ERROR_MESSAGE: &str = "x-redrive-error-message";
/// The consumer that dead-lettered the message (only when one is configured).
pub const CONSUMER: &str = "x-redrive-consumer";
/// How many of the message's own headers were left out so the dead letter could be
/// published (only on a trimmed dead letter: the full one did not fit the broker's
/// header limits or the broker refused it). The trace context, the correlation id, the
/// message id and the idempotency key are always kept.
pub const DROPPED_HEADERS: &str = "x-redrive-dropped-headers";

/// Every envelope header. Headers of these names from an earlier dead-lettering are
/// removed before the new envelope is written, so envelopes never pile up.
pub const ENVELOPE_HEADERS: [&str; 13] = [
    ORIGINAL_SYSTEM,
    ORIGINAL_DESTINATION,
    ORIGINAL_PARTITION,
    ORIGINAL_OFFSET,
    ORIGINAL_MESSAGE_ID,
    ORIGINAL_ENQUEUED_AT,
    ATTEMPTS,
    FIRST_FAILURE_AT,
    LAST_FAILURE_AT,
    ERROR_KIND,
    ERROR_MESSAGE,
    CONSUMER,
    DROPPED_HEADERS,
];

/// The message's own headers a trimmed dead letter keeps: what follows the message
/// through a trace and through deduplication.
const KEPT_WHEN_TRIMMED: [&str; 5] = [
    redrive_core::names::TRACEPARENT,
    redrive_core::names::TRACESTATE,
    redrive_core::names::CORRELATION_ID,
    redrive_core::names::MESSAGE_ID,
    redrive_core::names::IDEMPOTENCY_KEY,
];

/// The most bytes of the error text a trimmed dead letter carries.
const TRIMMED_ERROR_LEN: usize = 256;

/// The trace context and correlation id headers: the dead-letter message carries them
/// exactly as they came in; the envelope never writes them.
pub use redrive_core::names::{CORRELATION_ID, TRACEPARENT, TRACESTATE};

/// Why a message was dead-lettered; the value of the [`ERROR_KIND`] header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// The error was permanent: retrying cannot help.
    Permanent,
    /// The message reached the configured maximum number of delivery attempts.
    Exhausted,
    /// The message came back past the maximum number of delivery attempts plus the
    /// abandon margin: earlier deliveries ended without a result the layer saw (most
    /// often the process or its connection died while handling it), so it is
    /// dead-lettered without running again.
    Abandoned,
}

impl Reason {
    /// `"permanent"`, `"exhausted"` or `"abandoned"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Permanent => "permanent",
            Reason::Exhausted => "exhausted",
            Reason::Abandoned => "abandoned",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What goes into one envelope besides the message itself.
#[derive(Clone, Copy)]
pub(crate) struct Envelope<'a> {
    pub(crate) metadata: &'a Metadata,
    pub(crate) reason: Reason,
    pub(crate) error: &'a str,
    pub(crate) max_error_len: usize,
    pub(crate) consumer: Option<&'a str>,
    pub(crate) now: SystemTime,
}

impl Envelope<'_> {
    /// The trimmed form of [`write`](Self::write): of the message's own headers only
    /// the trace context, the correlation id, the message id and the idempotency key
    /// stay, the error text is cut shorter, and [`DROPPED_HEADERS`] says how many
    /// headers went.
    ///
    /// On error `message` may hold part of the envelope; callers drop it.
    pub(crate) fn write_trimmed(&self, message: &mut OutgoingMessage) -> Result<(), HeaderError> {
        let before = message.headers.len();
        message.headers.retain(|name, _| {
            is_envelope_header(name)
                || KEPT_WHEN_TRIMMED
                    .iter()
                    .any(|k| k.eq_ignore_ascii_case(name))
        });
        let dropped = before - message.headers.len();
        let trimmed = Envelope {
            max_error_len: self.max_error_len.min(TRIMMED_ERROR_LEN),
            ..*self
        };
        trimmed.write(message)?;
        message
            .headers
            .insert_static(DROPPED_HEADERS, dropped.to_string())?;
        Ok(())
    }

    /// Replaces any earlier envelope on `message` with this one.
    ///
    /// On error `message` may hold part of the envelope; callers drop it.
    pub(crate) fn write(&self, message: &mut OutgoingMessage) -> Result<(), HeaderError> {
        let headers = &mut message.headers;
        let earlier_first = headers
            .get_str(FIRST_FAILURE_AT)
            .and_then(parse_rfc3339)
            .filter(|t| *t <= self.now);
        let first = earlier_first.unwrap_or(self.now);
        headers.retain(|name, _| !is_envelope_header(name));

        let meta = self.metadata;
        if !meta.source.system.is_empty() {
            headers.insert_static(ORIGINAL_SYSTEM, meta.source.system)?;
        }
        headers.insert_static(ORIGINAL_DESTINATION, &*meta.source.destination)?;
        if let Some(p) = meta.source.partition {
            headers.insert_static(ORIGINAL_PARTITION, p.to_string())?;
        }
        if let Some(o) = meta.source.offset {
            headers.insert_static(ORIGINAL_OFFSET, o.to_string())?;
        }
        if let Some(id) = &meta.message_id {
            headers.insert_static(ORIGINAL_MESSAGE_ID, &**id)?;
        }
        if let Some(t) = meta.enqueued_at {
            headers.insert_static(ORIGINAL_ENQUEUED_AT, format_rfc3339(t))?;
        }
        headers.insert_static(ATTEMPTS, meta.attempt.to_string())?;
        headers.insert_static(FIRST_FAILURE_AT, format_rfc3339(first))?;
        headers.insert_static(LAST_FAILURE_AT, format_rfc3339(self.now))?;
        headers.insert_static(ERROR_KIND, self.reason.as_str())?;
        headers.insert_static(
            ERROR_MESSAGE,
            truncate(self.error, self.max_error_len).into_owned(),
        )?;
        if let Some(c) = self.consumer {
            headers.insert_static(CONSUMER, c)?;
        }
        Ok(())
    }
}

pub(super) fn is_envelope_header(name: &str) -> bool {
    ENVELOPE_HEADERS
        .iter()
        .any(|h| h.eq_ignore_ascii_case(name))
}

/// The error and its sources as one line, `outer: inner: root`, skipping a source
/// whose text the line already holds (wrappers that print their source, markers that
/// print the error they wrap).
pub(crate) fn error_text(err: &(dyn StdError + 'static)) -> String {
    let mut text = err.to_string();
    let mut next = err.source();
    while let Some(e) = next {
        let s = e.to_string();
        if !s.is_empty() && !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        next = e.source();
    }
    text
}

/// `s` cut to at most `max` bytes on a character boundary, ending in `…` when cut.
pub(crate) use redrive_core::text::truncate;

/// `t` as RFC 3339 UTC with milliseconds: `2024-02-29T12:34:56.789Z`.
pub(crate) fn format_rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (y, m, day) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Parses what [`format_rfc3339`] writes (the fraction is optional, `Z` required).
pub(crate) fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
        return None;
    }
    if b[16] != b':' || *b.last()? != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u64> {
        let part = s.get(r)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let nanos = match &s[19..s.len() - 1] {
        "" => 0,
        frac => {
            let digits = frac.strip_prefix('.')?;
            if digits.is_empty() || digits.len() > 9 || !digits.bytes().all(|c| c.is_ascii_digit())
            {
                return None;
            }
            digits.parse::<u32>().ok()? * 10u32.pow(9 - digits.len() as u32)
        }
    };
    let days = days_from_civil(y as i64, mo as u32, d as u32);
    let secs = u64::try_from(days).ok()? * 86_400 + h * 3600 + mi * 60 + sec;
    UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

// Civil-date conversions (days since 1970-01-01, proleptic Gregorian calendar), after
// Howard Hinnant's public-domain `days_from_civil` / `civil_from_days` algorithms.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from(if m > 2 { m - 3 } else { m + 9 });
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_and_matches_known_dates() {
        assert_eq!(format_rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_709_210_096_789);
        assert_eq!(format_rfc3339(t), "2024-02-29T12:34:56.789Z");
        assert_eq!(parse_rfc3339("2024-02-29T12:34:56.789Z"), Some(t));
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(format_rfc3339(leap), "2000-02-29T00:00:00.000Z");
        assert_eq!(parse_rfc3339("2000-02-29T00:00:00Z"), Some(leap));
        for ms in [0u64, 86_399_999, 4_102_444_800_000, 1_234_567_890_123] {
            let t = UNIX_EPOCH + Duration::from_millis(ms);
            assert_eq!(parse_rfc3339(&format_rfc3339(t)), Some(t), "{ms}");
        }
    }

    #[test]
    fn rfc3339_rejects_what_it_does_not_write() {
        for bad in [
            "",
            "yesterday",
            "2024-02-29 12:34:56Z",
            "2024-13-01T00:00:00Z",
            "2024-02-29T12:34:56+01:00",
            "2024-02-29T12:34:56.Z",
            "+024-02-29T12:34:56Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn truncate_cuts_on_a_char_boundary_and_marks_the_cut() {
        assert_eq!(truncate("short", 10), "short");
        assert_eq!(truncate("abcdefgh", 6), "abc…");
        // "é" is two bytes: a cut inside it backs off to the boundary before it.
        let s = "aé".repeat(10);
        for max in 0..s.len() {
            let t = truncate(&s, max);
            assert!(t.len() <= max, "{max}: {t:?}");
        }
        assert_eq!(truncate("éé", 3), "…");
        assert_eq!(truncate("ééé", 5), "é…");
        assert_eq!(truncate("ééé", 2), "é");
    }

    #[test]
    fn error_text_walks_the_chain_without_repeating_itself() {
        #[derive(Debug)]
        struct Wrap(&'static str, Option<Box<dyn StdError + Send + Sync>>);
        impl fmt::Display for Wrap {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.0)
            }
        }
        impl StdError for Wrap {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                self.1.as_deref().map(|e| e as _)
            }
        }
        let err = Wrap(
            "decode order",
            Some(redrive_core::classify::permanent("missing field `id`")),
        );
        assert_eq!(error_text(&err), "decode order: missing field `id`");
    }
}
