//! What the commands print: a letter as text or JSON, the stats' groups and their bars.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use redrive_middleware::dead_letter::Letter;
use serde_json::{Value, json};

/// How much of a payload `show` prints without `--raw`.
pub(crate) const PAYLOAD_PREVIEW: usize = 1024;

/// The age buckets of the stats, youngest first.
pub(crate) const AGE_BUCKETS: [(&str, Option<Duration>); 4] = [
    ("<1h", Some(Duration::from_secs(3600))),
    ("<1d", Some(Duration::from_secs(24 * 3600))),
    ("<7d", Some(Duration::from_secs(7 * 24 * 3600))),
    ("older", None),
];

/// A count per key, in order of first sight until sorted.
#[derive(Debug, Default)]
pub(crate) struct Groups {
    counts: HashMap<String, u64>,
}

impl Groups {
    pub(crate) fn add(&mut self, key: &str) {
        *self.counts.entry(key.to_owned()).or_default() += 1;
    }

    /// The groups, largest first (then by key), at most `top` of them; and how many
    /// letters the groups left out hold.
    pub(crate) fn sorted(&self, top: usize) -> (Vec<(String, u64)>, u64) {
        let mut v: Vec<(String, u64)> = self.counts.iter().map(|(k, n)| (k.clone(), *n)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let rest = v.iter().skip(top).map(|(_, n)| n).sum();
        v.truncate(top);
        (v, rest)
    }
}

/// The stats of a DLQ.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) total: u64,
    pub(crate) by_kind: Groups,
    pub(crate) by_error: Groups,
    pub(crate) by_origin: Groups,
    /// Counts per [`AGE_BUCKETS`] entry, then those without a failure time.
    pub(crate) by_age: [u64; 5],
}

impl Stats {
    pub(crate) fn add(&mut self, letter: &Letter, now: SystemTime) {
        self.total += 1;
        self.by_kind.add(letter.kind.as_deref().unwrap_or("(none)"));
        self.by_error
            .add(&one_line(letter.error.as_deref().unwrap_or("(none)"), 100));
        self.by_origin
            .add(letter.origin.as_deref().unwrap_or("(unknown)"));
        let slot = match letter.age(now) {
            None => 4,
            Some(age) => AGE_BUCKETS
                .iter()
                .position(|(_, below)| below.is_none_or(|b| age < b))
                .unwrap_or(3),
        };
        self.by_age[slot] += 1;
    }

    fn age_groups(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = AGE_BUCKETS
            .iter()
            .zip(self.by_age)
            .map(|((name, _), n)| ((*name).to_owned(), n))
            .collect();
        if self.by_age[4] > 0 {
            v.push(("(unknown)".to_owned(), self.by_age[4]));
        }
        v
    }

    pub(crate) fn json(&self, top: usize) -> Value {
        let groups = |g: &Groups, top: usize| {
            let (v, rest) = g.sorted(top);
            let mut out: Vec<Value> = v
                .into_iter()
                .map(|(key, count)| json!({ "key": key, "count": count }))
                .collect();
            if rest > 0 {
                out.push(json!({ "key": "(other)", "count": rest }));
            }
            Value::Array(out)
        };
        json!({
            "total": self.total,
            "by_kind": groups(&self.by_kind, usize::MAX),
            "by_error": groups(&self.by_error, top),
            "by_origin": groups(&self.by_origin, usize::MAX),
            "by_age": self.age_groups().into_iter()
                .map(|(key, count)| json!({ "key": key, "count": count }))
                .collect::<Vec<_>>(),
        })
    }

    pub(crate) fn text(&self, top: usize) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{} dead letters", self.total);
        let mut section = |title: &str, rows: Vec<(String, u64)>| {
            let _ = writeln!(out, "\n{title}");
            out.push_str(&bars(&rows, self.total));
        };
        let with_rest = |g: &Groups, top: usize| {
            let (mut v, rest) = g.sorted(top);
            if rest > 0 {
                v.push(("(other)".to_owned(), rest));
            }
            v
        };
        section("by error kind", with_rest(&self.by_kind, usize::MAX));
        section(
            &format!("by error message (top {top})"),
            with_rest(&self.by_error, top),
        );
        section("by origin", with_rest(&self.by_origin, usize::MAX));
        section("by age (since the last failure)", self.age_groups());
        out
    }
}

/// Rows of `label  count  ####`, the bars scaled to the largest count (30 wide).
pub(crate) fn bars(rows: &[(String, u64)], total: u64) -> String {
    const WIDTH: u64 = 30;
    let max = rows.iter().map(|r| r.1).max().unwrap_or(0).max(1);
    let label_width = rows
        .iter()
        .map(|r| r.0.chars().count())
        .max()
        .unwrap_or(0)
        .min(60);
    let mut out = String::new();
    for (label, n) in rows {
        let len = if *n == 0 {
            0
        } else {
            (n * WIDTH).div_ceil(max)
        };
        let pct = if total == 0 {
            0.0
        } else {
            *n as f64 * 100.0 / total as f64
        };
        let line = format!(
            "  {:<label_width$}  {n:>7}  {pct:>5.1}%  {}",
            one_line(label, 60),
            "#".repeat(usize::try_from(len).unwrap_or(0))
        );
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

/// `text` on one line, at most `max` characters (an ellipsis where cut).
pub(crate) fn one_line(text: &str, max: usize) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() <= max {
        flat
    } else {
        let mut cut: String = flat.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    }
}

fn time(t: Option<SystemTime>) -> Value {
    t.map_or(Value::Null, |t| {
        Value::String(humantime::format_rfc3339_millis(t).to_string())
    })
}

/// A duration as `3d 4h`, `12m`, `40s`: the two largest units.
pub(crate) fn age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// A letter as JSON: the envelope, the headers, the payload (its first
/// [`PAYLOAD_PREVIEW`] bytes unless `raw`).
pub(crate) fn letter_json(letter: &Letter, now: SystemTime, with_body: bool, raw: bool) -> Value {
    let mut v = json!({
        "id": letter.id(),
        "broker_id": letter.message.metadata.message_id.as_deref(),
        "kind": letter.kind,
        "error": letter.error,
        "origin": letter.origin,
        "origin_system": letter.origin_system,
        "origin_partition": letter.origin_partition,
        "origin_offset": letter.origin_offset,
        "original_message_id": letter.original_message_id,
        "attempts": letter.attempts,
        "replays": letter.replays,
        "first_failure_at": time(letter.first_failure_at),
        "last_failure_at": time(letter.last_failure_at),
        "enqueued_at": time(letter.enqueued_at),
        "age_seconds": letter.age(now).map(|d| d.as_secs()),
        "consumer": letter.consumer,
        "trace_id": letter.trace_id,
        "payload_bytes": letter.message.payload.len(),
    });
    if with_body {
        let headers: serde_json::Map<String, Value> = letter
            .message
            .headers
            .iter()
            .map(|(name, value)| {
                let text = String::from_utf8_lossy(value.as_bytes()).into_owned();
                (name.to_owned(), Value::String(text))
            })
            .collect();
        let (payload, truncated) = payload(letter, raw);
        v["headers"] = Value::Object(headers);
        v["payload"] = Value::String(payload);
        v["payload_truncated"] = Value::Bool(truncated);
    }
    v
}

/// The payload as text (lossy UTF-8), cut at [`PAYLOAD_PREVIEW`] bytes unless `raw`;
/// and whether it was cut.
pub(crate) fn payload(letter: &Letter, raw: bool) -> (String, bool) {
    let bytes = &letter.message.payload[..];
    if raw || bytes.len() <= PAYLOAD_PREVIEW {
        (String::from_utf8_lossy(bytes).into_owned(), false)
    } else {
        (
            String::from_utf8_lossy(&bytes[..PAYLOAD_PREVIEW]).into_owned(),
            true,
        )
    }
}

/// One line of `list`.
pub(crate) fn letter_line(letter: &Letter, now: SystemTime) -> String {
    format!(
        "{:<38} {:<10} {:<20} {:>3} {:>8}  {}",
        one_line(letter.id().unwrap_or("-"), 38),
        letter.kind.as_deref().unwrap_or("-"),
        one_line(letter.origin.as_deref().unwrap_or("-"), 20),
        letter.attempts.map_or("-".to_owned(), |a| a.to_string()),
        letter.age(now).map_or("-".to_owned(), age),
        one_line(letter.error.as_deref().unwrap_or("-"), 70),
    )
}

/// The header of `list`'s lines.
pub(crate) fn list_header() -> String {
    format!(
        "{:<38} {:<10} {:<20} {:>3} {:>8}  ERROR",
        "ID", "KIND", "ORIGIN", "ATT", "AGE"
    )
}

/// `show`'s text: the envelope's fields, the headers, the payload.
pub(crate) fn letter_text(letter: &Letter, now: SystemTime, raw: bool) -> String {
    let mut out = String::new();
    let v = letter_json(letter, now, false, raw);
    // In the order one reads a letter: which, why, from where, when, then the rest.
    for name in [
        "id",
        "kind",
        "error",
        "origin",
        "attempts",
        "replays",
        "first_failure_at",
        "last_failure_at",
        "age_seconds",
        "consumer",
        "trace_id",
        "origin_system",
        "origin_partition",
        "origin_offset",
        "original_message_id",
        "broker_id",
        "enqueued_at",
        "payload_bytes",
    ] {
        let text = match &v[name] {
            Value::Null => continue,
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let _ = writeln!(out, "{name:<20} {text}");
    }
    let _ = writeln!(out, "\nheaders");
    for (name, value) in letter.message.headers.iter() {
        let _ = writeln!(
            out,
            "  {name}: {}",
            String::from_utf8_lossy(value.as_bytes())
        );
    }
    let (body, truncated) = payload(letter, raw);
    let _ = writeln!(
        out,
        "\npayload ({} bytes{})",
        letter.message.payload.len(),
        if truncated {
            format!(", first {PAYLOAD_PREVIEW} shown; --raw for all")
        } else {
            String::new()
        }
    );
    out.push_str(&body);
    if !body.ends_with('\n') {
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{age, bars, one_line};
    use std::time::Duration;

    #[test]
    fn bars_scale_to_the_largest_group() {
        let rows = vec![("exhausted".to_owned(), 30), ("permanent".to_owned(), 10)];
        let text = bars(&rows, 40);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0].matches('#').count(), 30, "{text}");
        assert_eq!(lines[1].matches('#').count(), 10, "{text}");
        assert!(lines[0].contains("75.0%"), "{text}");
    }

    #[test]
    fn texts_fit_one_line() {
        assert_eq!(one_line("a\nb", 10), "a b");
        assert_eq!(one_line("abcdef", 4), "abc…");
        assert_eq!(age(Duration::from_secs(90_000)), "1d 1h");
        assert_eq!(age(Duration::from_secs(42)), "42s");
    }
}
