//! SQS's rules for queue names.

use crate::{Error, Result};

/// The longest queue name SQS accepts, a FIFO queue's `.fifo` suffix included.
pub const MAX_QUEUE_NAME_LEN: usize = 80;

/// The suffix SQS requires of a FIFO queue's name.
pub const FIFO_SUFFIX: &str = ".fifo";

/// Checks `name` against SQS's rules for queue names, before any request: 1 to 80
/// characters of ASCII letters, digits, `-` and `_`; a FIFO queue's name ends in
/// `.fifo`, and the 80 include that suffix. Some emulators accept more (a dot, as in
/// `orders.dlq`); SQS does not.
///
/// A queue URL is not checked: pass the name.
///
/// # Errors
/// [`Error::InvalidQueueName`], saying which rule the name breaks and, where one
/// exists, a valid name to use instead (`orders.dlq` → `orders-dlq`).
///
/// ```
/// use redrive_sqs::validate_queue_name;
///
/// assert!(validate_queue_name("orders-dlq").is_ok());
/// assert!(validate_queue_name("orders-dlq.fifo").is_ok());
/// let err = validate_queue_name("orders.dlq").unwrap_err();
/// assert!(err.to_string().contains("use `orders-dlq`"), "{err}");
/// ```
pub fn validate_queue_name(name: &str) -> Result<()> {
    let (stem, fifo) = match name.strip_suffix(FIFO_SUFFIX) {
        Some(stem) => (stem, true),
        None => (name, false),
    };
    let suffix = if fifo { FIFO_SUFFIX } else { "" };
    let invalid = |reason: String, suggestion: Option<String>| {
        Err(Error::InvalidQueueName {
            name: name.to_owned(),
            reason,
            suggestion,
        })
    };
    if stem.is_empty() {
        return invalid(
            if fifo {
                "a FIFO queue's name needs at least one character before `.fifo`".into()
            } else {
                "a queue name is 1 to 80 characters; this one is empty".into()
            },
            None,
        );
    }
    if let Some(bad) = stem.chars().find(|&c| !allowed(c)) {
        let fixed: String = stem
            .chars()
            .map(|c| if allowed(c) { c } else { '-' })
            .collect::<String>()
            + suffix;
        let suggestion = (fixed.len() <= MAX_QUEUE_NAME_LEN).then_some(fixed);
        return invalid(
            format!(
                "queue names hold only ASCII letters, digits, `-` and `_` (a FIFO queue's name ends in `.fifo`); \
                 {bad:?} is none of these"
            ),
            suggestion,
        );
    }
    if name.len() > MAX_QUEUE_NAME_LEN {
        return invalid(
            format!(
                "a queue name is at most {MAX_QUEUE_NAME_LEN} characters{}; this one has {}",
                if fifo { ", `.fifo` included" } else { "" },
                name.len()
            ),
            Some(format!(
                "{}{suffix}",
                &stem[..MAX_QUEUE_NAME_LEN - suffix.len()]
            )),
        );
    }
    Ok(())
}

fn allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(name: &str) -> String {
        validate_queue_name(name).expect_err(name).to_string()
    }

    #[test]
    fn letters_digits_dashes_and_underscores_are_valid() {
        for name in ["orders", "orders-dlq", "Orders_2", "a", "0", "-", "_x-"] {
            validate_queue_name(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn a_fifo_name_ends_in_dot_fifo() {
        validate_queue_name("orders.fifo").unwrap();
        validate_queue_name("orders-dlq.fifo").unwrap();
        let err = reason(".fifo");
        assert!(err.contains("before `.fifo`"), "{err}");
        let err = reason("orders.fifo.fifo");
        assert!(err.contains("use `orders-fifo.fifo`"), "{err}");
    }

    #[test]
    fn a_dot_elsewhere_is_invalid_and_a_dash_suggested() {
        let err = reason("orders.dlq");
        assert!(
            err.contains("`orders.dlq` is not a valid SQS queue name"),
            "{err}"
        );
        assert!(
            err.contains("only ASCII letters, digits, `-` and `_`"),
            "{err}"
        );
        assert!(err.contains("'.'"), "names the character: {err}");
        assert!(err.contains("use `orders-dlq`"), "{err}");
        let err = reason("orders.dlq.fifo");
        assert!(err.contains("use `orders-dlq.fifo`"), "{err}");
        // `.FIFO` is not the suffix: SQS wants it in lower case.
        let err = reason("orders.FIFO");
        assert!(err.contains("use `orders-FIFO`"), "{err}");
    }

    #[test]
    fn other_characters_are_invalid() {
        for name in ["with space", "ümlaut", "a/b", "a:b", "tab\t", "a.b.c"] {
            let err = reason(name);
            assert!(err.contains("only ASCII letters"), "{name}: {err}");
        }
        assert!(reason("a b").contains("use `a-b`"));
    }

    #[test]
    fn names_are_1_to_80_characters_fifo_suffix_included() {
        validate_queue_name(&"a".repeat(80)).unwrap();
        validate_queue_name(&format!("{}.fifo", "a".repeat(75))).unwrap();
        let err = reason(&"a".repeat(81));
        assert!(
            err.contains("at most 80 characters; this one has 81"),
            "{err}"
        );
        assert!(err.contains(&format!("use `{}`", "a".repeat(80))), "{err}");
        let err = reason(&format!("{}.fifo", "a".repeat(76)));
        assert!(err.contains("`.fifo` included; this one has 81"), "{err}");
        assert!(
            err.contains(&format!("use `{}.fifo`", "a".repeat(75))),
            "{err}"
        );
        let err = reason("");
        assert!(
            err.contains("1 to 80 characters; this one is empty"),
            "{err}"
        );
    }
}
