//! Which broker a URL names, and the DLQ consumer and publisher for it.

use std::time::Duration;

use redrive_rabbitmq::{RabbitConsumer, RabbitPublisher, Topology};
use redrive_sqs::aws_config::{self, BehaviorVersion, Region};
use redrive_sqs::{BatchingPublisher, Sqs, SqsConsumer};

/// How to reach the DLQ: the options that depend on the broker.
#[derive(Clone, Debug)]
pub(crate) struct Connect {
    /// RabbitMQ: the most unacked letters the broker sends; a run holds every letter it
    /// keeps, so it reads at most this many.
    pub(crate) prefetch: u16,
    /// SQS: the endpoint to use instead of the one the URL names.
    pub(crate) endpoint_url: Option<String>,
    /// SQS: the visibility timeout to receive with; longer than the run.
    pub(crate) visibility: Duration,
}

/// A broker URL, read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum BrokerUrl {
    /// `amqp://` or `amqps://`.
    Rabbit(String),
    /// An SQS endpoint, or a queue URL on it: the endpoint (`scheme://host[:port]`),
    /// and the queue when the URL named one.
    Sqs {
        endpoint: String,
        queue_url: Option<String>,
    },
    /// `kafka://host:port[,host:port…][/topic]`: the bootstrap servers, and the topic
    /// when the URL names one.
    Kafka {
        brokers: String,
        topic: Option<String>,
    },
}

impl BrokerUrl {
    /// Reads `url`.
    pub(crate) fn parse(url: &str) -> Result<Self, String> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(format!(
                "`{url}` is not a broker URL: use amqp://user:pass@host:5672/vhost, amqps://…, \
                 an SQS queue URL http(s)://host/account/queue, or kafka://host:port/topic"
            ));
        };
        match scheme.to_ascii_lowercase().as_str() {
            "amqp" | "amqps" => Ok(BrokerUrl::Rabbit(url.to_owned())),
            "http" | "https" => {
                let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
                let path = path.trim_end_matches('/');
                Ok(BrokerUrl::Sqs {
                    endpoint: format!("{scheme}://{host}"),
                    queue_url: (path.split('/').filter(|s| !s.is_empty()).count() >= 2)
                        .then(|| format!("{scheme}://{host}/{path}")),
                })
            }
            "kafka" => {
                let (brokers, topic) = rest.split_once('/').unwrap_or((rest, ""));
                let topic = topic.trim_matches('/');
                if brokers.is_empty() || brokers.contains('@') {
                    return Err(format!(
                        "`{url}`: name the brokers as kafka://host:port[,host:port…]/topic \
                         (no credentials in the URL)"
                    ));
                }
                Ok(BrokerUrl::Kafka {
                    brokers: brokers.to_owned(),
                    topic: (!topic.is_empty()).then(|| topic.to_owned()),
                })
            }
            other => Err(format!(
                "unknown broker scheme `{other}://`: use amqp://, amqps://, an SQS queue URL \
                 http(s)://host/account/queue, or kafka://host:port/topic"
            )),
        }
    }

    /// Where it is, without credentials, for messages.
    pub(crate) fn display(&self) -> String {
        match self {
            BrokerUrl::Rabbit(url) => match url.split_once('@') {
                Some((scheme_user, host)) => {
                    let scheme = scheme_user.split("://").next().unwrap_or("amqp");
                    format!("{scheme}://{host}")
                }
                None => url.clone(),
            },
            BrokerUrl::Sqs {
                endpoint,
                queue_url,
            } => queue_url.clone().unwrap_or_else(|| endpoint.clone()),
            BrokerUrl::Kafka { brokers, .. } => format!("kafka://{brokers}"),
        }
    }
}

/// The consumer of a RabbitMQ DLQ: it never declares the queue (so it cannot redeclare
/// it with other arguments; a missing queue is an error), and it takes it as a classic
/// queue, so letters are handed back by a confirmed republish, not a
/// `basic.nack(requeue)` that a quorum queue counts toward its delivery limit.
pub(crate) async fn rabbit_consumer(
    url: &str,
    dlq: &str,
    connect: &Connect,
) -> Result<RabbitConsumer, String> {
    RabbitConsumer::builder(url, Topology::new(dlq))
        .declare(false)
        .prefetch(connect.prefetch)
        .connection_name(format!("redrive-cli:{dlq}"))
        .connect()
        .await
        .map_err(|e| format!("cannot consume the DLQ `{dlq}`: {e}"))
}

/// The ready letters in a RabbitMQ DLQ (a passive declare), for the progress bar; `None`
/// when it cannot be read.
pub(crate) async fn rabbit_depth(url: &str, dlq: &str) -> Option<u64> {
    use redrive_rabbitmq::lapin::options::QueueDeclareOptions;
    use redrive_rabbitmq::lapin::types::FieldTable;
    let conn = redrive_rabbitmq::connect(url, "redrive-cli:depth")
        .await
        .ok()?;
    let depth = async {
        let ch = conn.create_channel().await.ok()?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let q = ch
            .queue_declare(dlq, passive, FieldTable::default())
            .await
            .ok()?;
        Some(u64::from(q.message_count()))
    }
    .await;
    let _ = conn.close(200, "done").await;
    depth
}

/// The publisher a RabbitMQ replay puts letters back with.
pub(crate) async fn rabbit_publisher(url: &str) -> Result<RabbitPublisher, String> {
    RabbitPublisher::connect_named(url, "redrive-cli:replay")
        .await
        .map_err(|e| format!("cannot connect to publish: {e}"))
}

/// The SQS handle: the endpoint from `--endpoint-url`, `AWS_ENDPOINT_URL`, or the URL;
/// the region from `AWS_REGION`, else `us-east-1`; credentials from the AWS chain.
pub(crate) async fn sqs(endpoint: &str, connect: &Connect) -> Sqs {
    let endpoint = connect
        .endpoint_url
        .clone()
        .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
        .unwrap_or_else(|| endpoint.to_owned());
    let region = std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".to_owned());
    let config = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(region))
        .endpoint_url(endpoint)
        .load()
        .await;
    Sqs::from_sdk_config(&config)
}

/// The consumer of an SQS DLQ: a visibility timeout longer than the run, receives that
/// wait at most a second, so the queue's end is found quickly, and no prefetch: a run
/// that ends at its `--limit` (or `show`, at the letter) has no receive in flight, whose
/// messages SQS would hide for the whole visibility timeout once the close cuts it short;
/// and deletes sent at once: a replay waits for each letter's removal before the next
/// (a 10 ms wait for company held it to 70 letters a second on the emulator).
pub(crate) async fn sqs_consumer(
    sqs: &Sqs,
    dlq: &str,
    connect: &Connect,
) -> Result<SqsConsumer, String> {
    sqs.consumer(dlq)
        .visibility_timeout(connect.visibility)
        .wait_time(Duration::from_secs(1))
        .prefetch(false)
        .ack_flush_interval(Duration::ZERO)
        .build()
        .await
        .map_err(|e| format!("cannot consume the DLQ `{dlq}`: {e}"))
}

/// The visible letters in an SQS DLQ (approximate), for the progress bar; `None` when
/// they cannot be read.
pub(crate) async fn sqs_depth(sqs: &Sqs, dlq: &str) -> Option<u64> {
    use redrive_sqs::aws_sdk_sqs::types::QueueAttributeName;
    let url = sqs.queue_url(dlq).await.ok()?;
    let out = sqs
        .client()
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .send()
        .await
        .ok()?;
    out.attributes()?
        .get(&QueueAttributeName::ApproximateNumberOfMessages)?
        .parse()
        .ok()
}

/// How long a replayed letter waits for others to share its `SendMessageBatch` call.
const SQS_LINGER: Duration = Duration::ZERO;

/// The publisher an SQS replay puts letters back with: the publishes in flight at once
/// share `SendMessageBatch` calls, each letter still answered (and removed from the DLQ)
/// on its own entry's confirmation.
pub(crate) fn sqs_publisher(sqs: &Sqs) -> BatchingPublisher {
    sqs.publisher().batched(SQS_LINGER)
}

#[cfg(test)]
mod tests {
    use super::BrokerUrl;

    #[test]
    fn urls_name_their_broker() {
        assert_eq!(
            BrokerUrl::parse("amqp://guest:guest@localhost:5672/%2f"),
            Ok(BrokerUrl::Rabbit(
                "amqp://guest:guest@localhost:5672/%2f".into()
            ))
        );
        assert_eq!(
            BrokerUrl::parse("http://127.0.0.1:9324/000000000000/orders-dlq"),
            Ok(BrokerUrl::Sqs {
                endpoint: "http://127.0.0.1:9324".into(),
                queue_url: Some("http://127.0.0.1:9324/000000000000/orders-dlq".into()),
            })
        );
        assert_eq!(
            BrokerUrl::parse("https://sqs.eu-west-1.amazonaws.com"),
            Ok(BrokerUrl::Sqs {
                endpoint: "https://sqs.eu-west-1.amazonaws.com".into(),
                queue_url: None,
            })
        );
        assert_eq!(
            BrokerUrl::parse("kafka://localhost:9092/orders-dlq"),
            Ok(BrokerUrl::Kafka {
                brokers: "localhost:9092".into(),
                topic: Some("orders-dlq".into()),
            })
        );
        assert_eq!(
            BrokerUrl::parse("kafka://k1:9092,k2:9092"),
            Ok(BrokerUrl::Kafka {
                brokers: "k1:9092,k2:9092".into(),
                topic: None,
            })
        );
        assert!(BrokerUrl::parse("kafka:///orders-dlq").is_err());
        assert!(BrokerUrl::parse("orders").is_err());
        assert_eq!(
            BrokerUrl::parse("amqp://guest:secret@rabbit:5672/")
                .unwrap()
                .display(),
            "amqp://rabbit:5672/"
        );
    }
}
