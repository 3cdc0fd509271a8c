//! The poller's background task: reads every queue with `GetQueueAttributes` each
//! interval.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use aws_sdk_sqs::types::QueueAttributeName;
use tokio::sync::watch;

use super::{Config, QueueCounts, QueueFigures, QueueStatus};
use crate::Error;

/// The attributes read, in the order of [`QueueCounts`]' fields.
const COUNTS: [QueueAttributeName; 3] = [
    QueueAttributeName::ApproximateNumberOfMessages,
    QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
    QueueAttributeName::ApproximateNumberOfMessagesDelayed,
];

/// Runs the poller until it is stopped or its last handle dropped.
pub(super) async fn run(
    config: Config,
    figures: Arc<Mutex<Vec<QueueFigures>>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        for (i, queue) in config.queues.iter().enumerate() {
            let read = tokio::time::timeout(config.timeout, read(&config, queue));
            let result = tokio::select! {
                biased;
                // A stop, or the last handle dropped (the sender with it).
                _ = stop.changed() => return,
                r = read => r,
            };
            let (status, counts, reason) = match result {
                Ok(Ok(counts)) => (QueueStatus::Read, Some(counts), String::new()),
                Ok(Err((status, reason))) => (status, None, reason),
                Err(_) => (
                    QueueStatus::Unavailable,
                    None,
                    format!("no answer within {:?}", config.timeout),
                ),
            };
            set(&figures, i, queue, status, counts, &reason);
        }
        tokio::select! {
            biased;
            _ = stop.changed() => return,
            () = tokio::time::sleep(config.interval) => {}
        }
    }
}

/// One read of `queue`'s counts; on failure, the status it leaves the queue in and why.
async fn read(config: &Config, queue: &str) -> Result<QueueCounts, (QueueStatus, String)> {
    let failed = |e: Error| (status_of(&e), e.to_string());
    let url = config.sqs.queue_url(queue).await.map_err(failed)?;
    let out = config
        .sqs
        .client()
        .get_queue_attributes()
        .queue_url(&url)
        .set_attribute_names(Some(COUNTS.to_vec()))
        .send()
        .await
        .map_err(|e| failed(Error::for_queue(queue, "GetQueueAttributes", e)))?;
    let attrs = out.attributes();
    let count = |name: &QueueAttributeName| {
        attrs
            .and_then(|a| a.get(name))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| {
                (
                    QueueStatus::Unavailable,
                    format!(
                        "SQS answered GetQueueAttributes without a number for {}",
                        name.as_str()
                    ),
                )
            })
    };
    Ok(QueueCounts {
        visible: count(&COUNTS[0])?,
        in_flight: count(&COUNTS[1])?,
        delayed: count(&COUNTS[2])?,
        read_at: SystemTime::now(),
    })
}

/// The status a failed read leaves its queue in.
fn status_of(e: &Error) -> QueueStatus {
    match e {
        Error::QueueDoesNotExist(_) => QueueStatus::NotFound,
        Error::Request {
            code: Some(code), ..
        } if is_refusal(code) => QueueStatus::Refused,
        _ => QueueStatus::Unavailable,
    }
}

/// Whether an SQS error code says the credentials may not read the queue.
fn is_refusal(code: &str) -> bool {
    let code = code.strip_prefix("AWS.SimpleQueueService.").unwrap_or(code);
    matches!(
        code,
        "AccessDenied" | "AccessDeniedException" | "KmsAccessDenied" | "KMS.AccessDeniedException"
    )
}

/// Records queue `i`'s status, logging a change of it once.
fn set(
    figures: &Mutex<Vec<QueueFigures>>,
    i: usize,
    queue: &str,
    status: QueueStatus,
    counts: Option<QueueCounts>,
    reason: &str,
) {
    let before = {
        let mut figures = figures.lock().unwrap_or_else(PoisonError::into_inner);
        let f = &mut figures[i];
        let before = f.status;
        f.status = status;
        f.counts = counts;
        before
    };
    if before == status {
        return;
    }
    match status {
        QueueStatus::NotFound => {
            tracing::warn!(queue = %queue, "queue stats: the SQS queue does not exist; its figures are absent until it does");
        }
        QueueStatus::Refused => {
            tracing::warn!(queue = %queue, reason = %reason, "queue stats: SQS refused to tell the queue's figures");
        }
        QueueStatus::Unavailable => {
            tracing::warn!(queue = %queue, reason = %reason, "queue stats: cannot read the queue's figures from SQS; asking again each interval");
        }
        QueueStatus::Read if before != QueueStatus::Pending => {
            tracing::info!(queue = %queue, "queue stats: the queue can be read again");
        }
        QueueStatus::Read | QueueStatus::Pending => {}
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn request(code: &str) -> Error {
        Error::Request {
            operation: "GetQueueAttributes",
            code: Some(code.to_owned()),
            message: code.to_owned(),
            source: Arc::new(std::io::Error::other(code.to_owned())),
        }
    }

    #[test]
    fn a_failed_read_is_missing_refused_or_unavailable() {
        assert_eq!(
            status_of(&Error::QueueDoesNotExist("q".into())),
            QueueStatus::NotFound
        );
        assert_eq!(status_of(&request("AccessDenied")), QueueStatus::Refused);
        assert_eq!(
            status_of(&request("KMS.AccessDeniedException")),
            QueueStatus::Refused
        );
        assert_eq!(
            status_of(&request("RequestThrottled")),
            QueueStatus::Unavailable
        );
    }
}
