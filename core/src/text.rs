//! Text that comes from outside (error messages that quote payloads, header values a
//! producer chose), bounded before it goes into logs, spans and dead-letter envelopes.
//!
//! ```
//! use redrive_core::text::truncate;
//!
//! assert_eq!(truncate("short", 16), "short");
//! assert_eq!(truncate("éééééééééé", 12), "éééé…"); // cut on a character boundary
//! ```

use std::borrow::Cow;
use std::fmt;
use std::panic::AssertUnwindSafe;

const ELLIPSIS: &str = "\u{2026}";

/// `s` cut to at most `max` bytes on a character boundary, ending in `…` when cut.
pub fn truncate(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        return Cow::Borrowed(s);
    }
    if max < ELLIPSIS.len() {
        return Cow::Borrowed(&s[..floor_char_boundary(s, max)]);
    }
    let cut = floor_char_boundary(s, max - ELLIPSIS.len());
    Cow::Owned(format!("{}{ELLIPSIS}", &s[..cut]))
}

/// `value`'s `Display` for a log line or a span: cut to `max` bytes like [`truncate`],
/// and a `Display` that panics (user code: an error type's) written as such instead of
/// unwinding the caller.
///
/// ```
/// use redrive_core::text::bounded;
///
/// let err = std::io::Error::other("x".repeat(5000));
/// assert_eq!(bounded(&err, 8).to_string(), "xxxxx…");
/// ```
pub fn bounded<T: fmt::Display + ?Sized>(value: &T, max: usize) -> Bounded<'_, T> {
    Bounded { value, max }
}

/// See [`bounded`].
pub struct Bounded<'a, T: ?Sized> {
    value: &'a T,
    max: usize,
}

impl<T: fmt::Display + ?Sized> fmt::Display for Bounded<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = std::panic::catch_unwind(AssertUnwindSafe(|| self.value.to_string()))
            .unwrap_or_else(|_| "<its Display panicked>".to_owned());
        f.write_str(&truncate(&text, self.max))
    }
}

impl<T: fmt::Display + ?Sized> fmt::Debug for Bounded<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::truncate;

    #[test]
    fn cuts_on_a_char_boundary_within_the_bound() {
        for max in 0..40 {
            let s = "aé€😀".repeat(5);
            let t = truncate(&s, max);
            assert!(t.len() <= max.max(s.len().min(max)), "{max}: {t}");
            assert!(t.len() <= max || t == s);
        }
        assert_eq!(truncate("abc", 2), "ab");
    }
}
