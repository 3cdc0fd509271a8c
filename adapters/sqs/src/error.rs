//! The adapter's error type.

use std::sync::Arc;

use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

/// What can go wrong talking to SQS, or mapping a message onto it.
///
/// Converts into [`redrive_core::Error`]: a missing queue becomes
/// [`UnknownDestination`](redrive_core::Error::UnknownDestination), a message no longer in
/// flight becomes [`LeaseExpired`](redrive_core::Error::LeaseExpired), a configuration
/// error stays one, a send that must fail again the same way
/// ([`is_rejection`](Error::is_rejection)) is
/// [`Rejected`](redrive_core::Error::Rejected), everything else is a
/// [`Broker`](redrive_core::Error::Broker) error; the last two keep this one as their
/// source.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An SQS API call failed (after the SDK's own retries).
    #[error("SQS {operation} failed: {message}")]
    Request {
        /// The SQS operation, as `ReceiveMessage`.
        operation: &'static str,
        /// The error code SQS returned, if it returned one.
        code: Option<String>,
        /// What went wrong, with the SDK's context.
        message: String,
        /// The SDK's error.
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
    /// The queue does not exist.
    #[error("SQS queue `{0}` does not exist")]
    QueueDoesNotExist(String),
    /// The message is no longer in flight: its visibility timeout ran out (SQS delivers
    /// it again), or it was deleted.
    #[error(
        "the message is no longer in flight (its visibility timeout ran out, or it was deleted); SQS will deliver it again"
    )]
    NotInFlight,
    /// One entry of a batch call failed, after retries where SQS said it was its fault.
    #[error("SQS {operation} failed for one message: {code}: {message}")]
    BatchEntry {
        /// The SQS operation, as `DeleteMessageBatch`.
        operation: &'static str,
        /// The error code SQS returned.
        code: String,
        /// SQS's explanation.
        message: String,
        /// Whether SQS blamed the request (not retried) rather than itself.
        sender_fault: bool,
    },
    /// The headers need more message attributes than SQS allows, and packing is off.
    #[error(
        "the message needs {needed} SQS message attributes, above SQS's limit of {limit}; `{first_excess}` does not fit \
         (turn on `HeaderOverflow::Pack`, or send fewer headers)"
    )]
    TooManyAttributes {
        /// Attributes the message would need.
        needed: usize,
        /// How many it may have.
        limit: usize,
        /// The first header that did not fit.
        first_excess: String,
    },
    /// A header cannot be an SQS message attribute, and packing is off.
    #[error(
        "header `{name}` cannot be an SQS message attribute: {reason} (turn on `HeaderOverflow::Pack` to carry it packed)"
    )]
    InvalidAttribute {
        /// The header.
        name: String,
        /// Why not.
        reason: &'static str,
    },
    /// The body and attributes are larger than the limit.
    #[error(
        "the message takes {size} bytes with its attributes, above the limit of {limit} bytes; send less, or raise \
         `max_message_bytes` if the queue's MaximumMessageSize allows it"
    )]
    MessageTooLarge {
        /// The size SQS would count.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The message's key cannot be sent: as a FIFO message group id it must be 1 to 128
    /// characters of ASCII letters, digits and punctuation.
    #[error("the message key cannot be sent to SQS: {0}")]
    InvalidKey(String),
    /// The queue name breaks SQS's naming rules (see
    /// [`validate_queue_name`](crate::validate_queue_name)); nothing was sent.
    #[error(
        "`{name}` is not a valid SQS queue name: {reason}{}",
        suggestion.as_ref().map(|s| format!("; use `{s}`")).unwrap_or_default()
    )]
    InvalidQueueName {
        /// The name as given.
        name: String,
        /// The rule it breaks.
        reason: String,
        /// A valid name to use instead, where there is one.
        suggestion: Option<String>,
    },
    /// Configuration that cannot work; the message says what to change.
    #[error("invalid SQS adapter configuration: {0}")]
    Config(String),
}

impl Error {
    pub(crate) fn request<E, R>(operation: &'static str, err: SdkError<E, R>) -> Self
    where
        E: std::error::Error + ProvideErrorMetadata + Send + Sync + 'static,
        R: std::fmt::Debug + Send + Sync + 'static,
    {
        let code = err.code().map(str::to_owned);
        let message = match (err.code(), err.message()) {
            (Some(code), Some(msg)) => format!("{code}: {msg}"),
            (Some(code), None) => code.to_owned(),
            _ => DisplayErrorContext(&err).to_string(),
        };
        Error::Request {
            operation,
            code,
            message,
            source: Arc::new(err),
        }
    }

    /// [`Error::QueueDoesNotExist`] when SQS says `queue` does not exist, else the
    /// request's error.
    pub(crate) fn for_queue<E, R>(queue: &str, operation: &'static str, err: SdkError<E, R>) -> Self
    where
        E: std::error::Error + ProvideErrorMetadata + Send + Sync + 'static,
        R: std::fmt::Debug + Send + Sync + 'static,
    {
        if is_missing_queue(err.code()) {
            Error::QueueDoesNotExist(queue.to_owned())
        } else {
            Error::request(operation, err)
        }
    }

    /// The SQS error code, for a failed request or batch entry.
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Request { code, .. } => code.as_deref(),
            Error::BatchEntry { code, .. } => Some(code),
            _ => None,
        }
    }

    /// Whether sending the same message the same way must fail the same way: a queue
    /// name SQS does not accept, a message that does not fit SQS's limits or has a
    /// header or key SQS cannot take (all found before any request), or a send SQS
    /// refused for what was sent (an invalid parameter, attribute or body, a batch entry
    /// it blamed on the request). Such an error converts into
    /// [`redrive_core::Error::Rejected`].
    ///
    /// Throttling, KMS, credential and network errors are not: they may pass.
    pub fn is_rejection(&self) -> bool {
        match self {
            Error::InvalidQueueName { .. }
            | Error::TooManyAttributes { .. }
            | Error::InvalidAttribute { .. }
            | Error::MessageTooLarge { .. }
            | Error::InvalidKey(_) => true,
            Error::Request {
                operation, code, ..
            } => is_send(operation) && code.as_deref().is_some_and(is_rejected_send),
            // SQS's blame alone is not enough: a KMS or throttling failure of one entry
            // may come marked as the sender's, and passes on a later try.
            Error::BatchEntry {
                operation,
                code,
                sender_fault,
                ..
            } => is_send(operation) && *sender_fault && is_rejected_send(code),
            Error::QueueDoesNotExist(_) | Error::NotInFlight | Error::Config(_) => false,
        }
    }
}

fn is_send(operation: &str) -> bool {
    matches!(operation, "SendMessage" | "SendMessageBatch")
}

/// Whether an SQS error code of a send says the request itself is wrong: sent again the
/// same way, it is refused again.
fn is_rejected_send(code: &str) -> bool {
    let code = code.strip_prefix("AWS.SimpleQueueService.").unwrap_or(code);
    matches!(
        code,
        "InvalidParameterValue"
            | "InvalidMessageContents"
            | "InvalidAttributeName"
            | "InvalidAttributeValue"
            | "MissingParameter"
            | "UnsupportedOperation"
            | "BatchRequestTooLong"
            | "BatchEntryIdsNotDistinct"
            | "InvalidBatchEntryId"
            | "TooManyEntriesInBatchRequest"
            | "EmptyBatchRequest"
    )
}

/// Whether an SQS error code says the queue does not exist.
pub(crate) fn is_missing_queue(code: Option<&str>) -> bool {
    matches!(
        code,
        Some("AWS.SimpleQueueService.NonExistentQueue" | "QueueDoesNotExist")
    )
}

/// Whether an SQS error says the receipt handle no longer names an in-flight message.
///
/// SQS answers a visibility change for a message whose timeout ran out with
/// `InvalidParameterValue` naming the receipt handle, hence the look at the text.
pub(crate) fn is_not_in_flight(code: Option<&str>, message: Option<&str>) -> bool {
    match code {
        Some(
            "ReceiptHandleIsInvalid"
            | "MessageNotInflight"
            | "AWS.SimpleQueueService.MessageNotInflight",
        ) => true,
        Some("InvalidParameterValue") => message.is_some_and(|m| m.contains("ReceiptHandle")),
        _ => false,
    }
}

impl From<Error> for redrive_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::QueueDoesNotExist(q) => redrive_core::Error::UnknownDestination(q),
            Error::NotInFlight => redrive_core::Error::LeaseExpired,
            Error::Config(m) => redrive_core::Error::Config(m),
            e if e.is_rejection() => redrive_core::Error::Rejected(Box::new(e)),
            other => redrive_core::Error::Broker(Box::new(other)),
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    fn request(operation: &'static str, code: &str) -> Error {
        Error::Request {
            operation,
            code: Some(code.to_owned()),
            message: code.to_owned(),
            source: Arc::new(std::io::Error::other(code.to_owned())),
        }
    }

    #[test]
    fn sends_sqs_refuses_for_what_was_sent_are_rejected() {
        for code in [
            "InvalidParameterValue",
            "AWS.SimpleQueueService.InvalidParameterValue",
            "InvalidMessageContents",
            "InvalidAttributeName",
            "AWS.SimpleQueueService.BatchRequestTooLong",
        ] {
            let e = request("SendMessage", code);
            assert!(e.is_rejection(), "{code}");
            assert!(
                matches!(
                    redrive_core::Error::from(e),
                    redrive_core::Error::Rejected(_)
                ),
                "{code}"
            );
        }
    }

    #[test]
    fn outages_and_other_operations_are_not_rejections() {
        for code in [
            "RequestThrottled",
            "KmsThrottled",
            "KmsDisabled",
            "InternalError",
        ] {
            let e = request("SendMessage", code);
            assert!(!e.is_rejection(), "{code}");
            assert!(
                matches!(redrive_core::Error::from(e), redrive_core::Error::Broker(_)),
                "{code}"
            );
        }
        // The same code on a receive says nothing about a message sent.
        assert!(!request("ReceiveMessage", "InvalidParameterValue").is_rejection());
        let entry = |code: &str, sender_fault| Error::BatchEntry {
            operation: "SendMessageBatch",
            code: code.into(),
            message: String::new(),
            sender_fault,
        };
        assert!(entry("InvalidMessageContents", true).is_rejection());
        assert!(!entry("InvalidMessageContents", false).is_rejection());
        for code in [
            "InternalError",
            "KMS.ThrottlingException",
            "RequestThrottled",
        ] {
            assert!(!entry(code, true).is_rejection(), "{code}");
        }
        assert!(!Error::QueueDoesNotExist("q".into()).is_rejection());
        assert!(matches!(
            redrive_core::Error::from(Error::QueueDoesNotExist("q".into())),
            redrive_core::Error::UnknownDestination(q) if q == "q"
        ));
    }

    #[test]
    fn limits_found_before_any_request_are_rejections() {
        let e = Error::MessageTooLarge { size: 2, limit: 1 };
        assert!(e.is_rejection());
        assert!(redrive_core::Error::from(e).is_deterministic());
        assert!(Error::InvalidKey("k".into()).is_rejection());
        assert!(
            crate::validate_queue_name("a.b")
                .unwrap_err()
                .is_rejection()
        );
    }
}
