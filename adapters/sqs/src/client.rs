//! The connection to SQS: the SDK client, queue URLs and queue attributes.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_config::{BehaviorVersion, SdkConfig};
use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::QueueAttributeName;

use crate::{Error, Result, SqsConsumerBuilder, SqsPublisher};

/// A handle on SQS: the `aws-sdk-sqs` client and a cache of queue URLs. Cheap to clone;
/// consumers and publishers made from it share the client's connections.
///
/// Queues are named by name (`orders`, `orders.fifo`) or by URL.
#[derive(Clone)]
pub struct Sqs {
    client: Client,
    urls: Arc<Mutex<HashMap<String, String>>>,
    /// Queue URLs already warned about for having no redrive policy.
    unguarded: Arc<Mutex<HashSet<String>>>,
}

impl fmt::Debug for Sqs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sqs").finish_non_exhaustive()
    }
}

impl Sqs {
    /// Endpoint, region and credentials from the normal AWS configuration chain
    /// (environment, profile files, container and instance metadata). The chain also
    /// honours `AWS_ENDPOINT_URL_SQS` and `AWS_ENDPOINT_URL`.
    pub async fn from_env() -> Self {
        Self::from_sdk_config(&aws_config::load_defaults(BehaviorVersion::latest()).await)
    }

    /// As [`from_env`](Self::from_env), with an explicit endpoint (an emulator, a VPC
    /// endpoint).
    pub async fn from_env_with_endpoint(endpoint_url: impl Into<String>) -> Self {
        let config = aws_config::defaults(BehaviorVersion::latest())
            .endpoint_url(endpoint_url)
            .load()
            .await;
        Self::from_sdk_config(&config)
    }

    /// From a loaded AWS configuration.
    pub fn from_sdk_config(config: &SdkConfig) -> Self {
        Self::from_client(Client::new(config))
    }

    /// From an SDK client built elsewhere.
    pub fn from_client(client: Client) -> Self {
        Sqs {
            client,
            urls: Arc::default(),
            unguarded: Arc::default(),
        }
    }

    /// The SDK client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// A consumer of `queue` (a name or a URL), to configure and build.
    pub fn consumer(&self, queue: impl Into<String>) -> SqsConsumerBuilder {
        SqsConsumerBuilder::new(self.clone(), queue.into())
    }

    /// A publisher with the default settings.
    pub fn publisher(&self) -> SqsPublisher {
        SqsPublisher::new(self.clone())
    }

    /// The URL of `queue`: a URL is taken as it is, a name is checked against SQS's
    /// naming rules ([`validate_queue_name`](crate::validate_queue_name)), then looked
    /// up once and cached.
    ///
    /// # Errors
    /// [`Error::InvalidQueueName`] (before any request), [`Error::QueueDoesNotExist`],
    /// or the request's error.
    pub async fn queue_url(&self, queue: &str) -> Result<String> {
        if is_url(queue) {
            return Ok(queue.to_owned());
        }
        crate::validate_queue_name(queue)?;
        if let Some(url) = self.lock().get(queue) {
            return Ok(url.clone());
        }
        let out = self
            .client
            .get_queue_url()
            .queue_name(queue)
            .send()
            .await
            .map_err(|e| Error::for_queue(queue, "GetQueueUrl", e))?;
        let url = out
            .queue_url()
            .ok_or_else(|| Error::QueueDoesNotExist(queue.to_owned()))?
            .to_owned();
        self.lock().insert(queue.to_owned(), url.clone());
        Ok(url)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.urls.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this is the first time `url` is found without a redrive policy.
    pub(crate) fn first_unguarded(&self, url: &str) -> bool {
        self.unguarded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(url.to_owned())
    }

    /// What redrive needs to know about `queue`: its visibility timeout, whether it is
    /// FIFO, its redrive policy. Read with `GetQueueAttributes`.
    ///
    /// # Errors
    /// [`Error::QueueDoesNotExist`], or the request's error.
    pub async fn queue_info(&self, queue: &str) -> Result<QueueInfo> {
        let url = self.queue_url(queue).await?;
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(QueueAttributeName::All)
            .send()
            .await
            .map_err(|e| Error::for_queue(queue, "GetQueueAttributes", e))?;
        let attrs = out.attributes();
        let get = |name: QueueAttributeName| attrs.and_then(|a| a.get(&name)).map(String::as_str);
        let visibility = get(QueueAttributeName::VisibilityTimeout)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(30);
        let redrive_policy = get(QueueAttributeName::RedrivePolicy)
            .filter(|p| !p.is_empty())
            .map(RedrivePolicy::parse)
            .transpose()?;
        Ok(QueueInfo {
            name: queue.into(),
            arn: get(QueueAttributeName::QueueArn).map(str::to_owned),
            fifo: get(QueueAttributeName::FifoQueue) == Some("true") || is_fifo_name(&url),
            url,
            visibility_timeout: Duration::from_secs(visibility),
            redrive_policy,
        })
    }
}

impl QueueInfo {
    /// The `RedrivePolicy` value to set on this queue: its dead-letter queue named
    /// `<queue>-dlq` (`<stem>-dlq.fifo` for a FIFO queue, whose dead-letter queue must be
    /// FIFO too), moved to after `max_receive_count` receives.
    pub fn suggested_redrive_policy(&self, max_receive_count: u32) -> String {
        let (prefix, name) = match &self.arn {
            Some(arn) => match arn.rsplit_once(':') {
                Some((prefix, name)) => (prefix.to_owned(), name.to_owned()),
                None => ("arn:aws:sqs:<region>:<account>".to_owned(), arn.clone()),
            },
            None => (
                "arn:aws:sqs:<region>:<account>".to_owned(),
                self.url.rsplit('/').next().unwrap_or_default().to_owned(),
            ),
        };
        let dlq = match name.strip_suffix(crate::FIFO_SUFFIX) {
            Some(stem) => format!("{stem}-dlq{}", crate::FIFO_SUFFIX),
            None => format!("{name}-dlq"),
        };
        format!(
            r#"{{"deadLetterTargetArn":"{prefix}:{dlq}","maxReceiveCount":"{max_receive_count}"}}"#
        )
    }
}

/// Whether `queue` is a queue URL rather than a name.
pub(crate) fn is_url(queue: &str) -> bool {
    queue.starts_with("https://") || queue.starts_with("http://")
}

/// Whether a queue name or URL names a FIFO queue (SQS requires the `.fifo` suffix).
pub(crate) fn is_fifo_name(queue: &str) -> bool {
    queue.ends_with(".fifo")
}

/// A queue's attributes that matter to redrive.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueInfo {
    /// The queue as it was named (a name or a URL).
    pub name: Arc<str>,
    /// The queue's URL.
    pub url: String,
    /// The queue's ARN, if SQS gave it.
    pub arn: Option<String>,
    /// Whether it is a FIFO queue.
    pub fifo: bool,
    /// Its default visibility timeout.
    pub visibility_timeout: Duration,
    /// Its native dead-letter policy, if it has one.
    pub redrive_policy: Option<RedrivePolicy>,
}

/// A queue's native dead-letter policy (the `RedrivePolicy` attribute): after
/// `max_receive_count` receives without a delete, SQS moves the message to the
/// dead-letter queue as it is, with no envelope.
///
/// # With redrive's dead-letter layer
/// Both count the same thing: SQS's `ApproximateReceiveCount` is redrive's `attempt`.
/// Whichever limit is lower wins:
/// - redrive's limit `M` below `maxReceiveCount` `R`: on attempt `M` the dead-letter
///   layer publishes the message with its envelope (error, attempts, origin, trace
///   context) and the original is deleted. SQS's policy stays as a backstop for what
///   redrive cannot dead-letter (the DLQ publish keeps failing, the process dies
///   mid-message).
/// - `R` at or below `M`: SQS moves the message after `R` receives, before redrive's
///   layer sees attempt `M`: no envelope, and `OnDeadLetter` hooks never run.
///
/// So set `maxReceiveCount` above redrive's limit, with headroom: receives that never
/// reach the handler count too (a message handed back at shutdown, a prefetched message
/// released unprocessed). [`backstops`](Self::backstops) checks this.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedrivePolicy {
    /// Receives after which SQS moves the message.
    pub max_receive_count: u32,
    /// The ARN of the dead-letter queue.
    pub dead_letter_target_arn: String,
}

impl RedrivePolicy {
    fn parse(text: &str) -> Result<Self> {
        let bad = || Error::Config(format!("the queue's RedrivePolicy does not parse: {text}"));
        let v: serde_json::Value = serde_json::from_str(text).map_err(|_| bad())?;
        // SQS returns the count as a number or as a string, depending on how it was set.
        let count = match &v["maxReceiveCount"] {
            serde_json::Value::Number(n) => n.as_u64(),
            serde_json::Value::String(s) => s.parse().ok(),
            _ => None,
        }
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(bad)?;
        Ok(RedrivePolicy {
            max_receive_count: count,
            dead_letter_target_arn: v["deadLetterTargetArn"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        })
    }

    /// Whether this policy leaves redrive's dead-letter limit of `max_attempts` in charge
    /// (`maxReceiveCount` above it), so SQS only moves what redrive could not.
    pub fn backstops(&self, max_attempts: u32) -> bool {
        self.max_receive_count > max_attempts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redrive_policy_parses_numbers_and_strings() {
        let p =
            RedrivePolicy::parse(r#"{"deadLetterTargetArn":"arn:x","maxReceiveCount":5}"#).unwrap();
        assert_eq!(p.max_receive_count, 5);
        assert_eq!(p.dead_letter_target_arn, "arn:x");
        let p = RedrivePolicy::parse(r#"{"deadLetterTargetArn":"arn:x","maxReceiveCount":"7"}"#)
            .unwrap();
        assert!(p.backstops(6) && !p.backstops(7));
        assert!(RedrivePolicy::parse("{}").is_err());
    }

    fn info(name: &str, arn: Option<&str>) -> QueueInfo {
        QueueInfo {
            name: name.into(),
            url: format!("https://sqs.eu-west-1.amazonaws.com/123456789012/{name}"),
            arn: arn.map(str::to_owned),
            fifo: is_fifo_name(name),
            visibility_timeout: Duration::from_secs(30),
            redrive_policy: None,
        }
    }

    #[test]
    fn the_suggested_policy_names_the_dash_dlq_queue() {
        let i = info("orders", Some("arn:aws:sqs:eu-west-1:123456789012:orders"));
        assert_eq!(
            i.suggested_redrive_policy(10),
            r#"{"deadLetterTargetArn":"arn:aws:sqs:eu-west-1:123456789012:orders-dlq","maxReceiveCount":"10"}"#
        );
        let i = info(
            "orders.fifo",
            Some("arn:aws:sqs:eu-west-1:123456789012:orders.fifo"),
        );
        assert!(
            i.suggested_redrive_policy(10)
                .contains(r#""arn:aws:sqs:eu-west-1:123456789012:orders-dlq.fifo""#)
        );
        let i = info("orders", None);
        assert!(
            i.suggested_redrive_policy(4)
                .contains(r#""arn:aws:sqs:<region>:<account>:orders-dlq","maxReceiveCount":"4""#)
        );
    }
}
