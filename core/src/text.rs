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
