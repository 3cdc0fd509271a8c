//! `amqps://` against the local RabbitMQ behind stunnel, with a certificate authority
//! each test makes: publish and consume with a CA file, reconnects that keep it, and
//! the errors of a wrong scheme or an unknown CA. Needs `openssl` and `stunnel4`
//! (`apt-get install stunnel4`; scripts/test installs it).

mod common;
mod support;

use std::time::Duration;

use redrive_core::{Consumer, OutgoingMessage, Publisher};
use redrive_rabbitmq::lapin::uri::AMQPUri;
use redrive_rabbitmq::{Error, QueueKind, RabbitConsumer, RabbitPublisher};

use support::{Stunnel, TempDir, TestCerts};

/// The broker's plaintext address (`AMQP_URL`, else the local default), which stunnel
/// forwards to.
fn broker() -> AMQPUri {
    common::url().parse().expect("AMQP_URL is an AMQP address")
}

/// `host:port` of the broker's plaintext listener.
fn plain_target() -> String {
    let b = broker();
    format!("{}:{}", b.authority.host, b.authority.port)
}

/// An address at `host:port` with `scheme`, and the broker's user and vhost.
fn address(scheme: &str, host: &str, port: u16) -> String {
    let b = broker();
    let user = &b.authority.userinfo;
    let vhost = b.vhost.replace('%', "%25").replace('/', "%2f");
    format!(
        "{scheme}://{}:{}@{host}:{port}/{vhost}",
        user.username, user.password
    )
}

/// An `amqps://` address of stunnel's port.
fn amqps(port: u16) -> String {
    address("amqps", "localhost", port)
}

/// The error's text, checked not to show the password.
fn text(e: &Error) -> String {
    let text = format!("{e}");
    let password = broker().authority.userinfo.password;
    assert!(
        !text.contains(&format!(":{password}@")),
        "the password shows: {text}"
    );
    text
}

/// Closes the connection named `name` from the broker's side.
async fn kill_connection(name: &str) {
    for _ in 0..50 {
        let list = common::rabbitmqctl(&[
            "list_connections",
            "pid",
            "client_properties",
            "--quiet",
            "--no-table-headers",
        ])
        .await;
        let pid = list
            .lines()
            .find(|line| line.contains(&format!("\"{name}\"")))
            .and_then(|line| line.split('\t').next())
            .map(str::to_owned);
        if let Some(pid) = pid {
            common::rabbitmqctl(&["close_connection", &pid, "redrive tls test"]).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("connection {name} not found in rabbitmqctl list_connections");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_consume_over_amqps_with_a_ca_file() {
    let certs = TestCerts::new();
    let stunnel = Stunnel::start(&certs, &plain_target());
    let url = amqps(stunnel.port());
    let queue = common::unique("tls");
    let topology = common::topology(&queue, QueueKind::Quorum);

    let mut consumer = RabbitConsumer::builder(&url, topology.clone())
        .connection_name(format!("{queue}-consumer"))
        .tls_ca_file(certs.ca_file())
        .connect()
        .await
        .expect("consumer over amqps");
    let publisher =
        RabbitPublisher::connect_with_ca_file(&url, "redrive-test:tls", certs.ca_file())
            .await
            .expect("publisher over amqps");
    publisher
        .publish(&queue, OutgoingMessage::new("over tls"))
        .await
        .expect("publish over amqps");

    let delivery = common::next(&mut consumer, Duration::from_secs(10))
        .await
        .expect("the message, consumed over amqps");
    assert_eq!(&delivery.message.payload[..], b"over tls");
    delivery.ack().await.expect("ack over amqps");

    // Only the TLS port was given: every connection went through stunnel, decrypted.
    assert!(
        stunnel.tls_sessions() >= 2,
        "stunnel accepted fewer TLS sessions than the consumer and publisher opened: {}",
        stunnel.log()
    );
    publisher.close().await;
    consumer.close().await.expect("close");
    common::cleanup(&[topology]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_and_the_publisher_reconnect_with_their_ca_file() {
    let certs = TestCerts::new();
    let stunnel = Stunnel::start(&certs, &plain_target());
    let url = amqps(stunnel.port());
    let queue = common::unique("tls-reconnect");
    let topology = common::topology(&queue, QueueKind::Classic);
    let name = format!("{queue}-consumer");

    let mut consumer = RabbitConsumer::builder(&url, topology.clone())
        .connection_name(&name)
        .tls_ca_file(certs.ca_file())
        .reconnect(redrive_rabbitmq::Reconnect::new(
            Duration::from_millis(100),
            Duration::from_secs(1),
        ))
        .connect()
        .await
        .expect("consumer over amqps");
    let monitor = consumer.monitor();
    let publisher =
        RabbitPublisher::connect_with_ca_file(&url, "redrive-test:tls", certs.ca_file())
            .await
            .expect("publisher over amqps");
    let before = stunnel.tls_sessions();

    kill_connection(&name).await;
    let start = std::time::Instant::now();
    while monitor.reconnects() < 1 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the consumer did not reconnect over amqps: {}",
            stunnel.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The next publish opens a new connection, with the same CA file.
    publisher.close().await;
    publisher
        .publish(&queue, OutgoingMessage::new("after reconnect"))
        .await
        .expect("publish after the publisher reconnected");

    let delivery = common::next(&mut consumer, Duration::from_secs(10))
        .await
        .expect("the message, consumed after the reconnect");
    assert_eq!(&delivery.message.payload[..], b"after reconnect");
    delivery.ack().await.expect("ack");
    assert!(
        stunnel.tls_sessions() >= before + 2,
        "the reconnects did not go through stunnel: {}",
        stunnel.log()
    );
    publisher.close().await;
    consumer.close().await.expect("close");
    common::cleanup(&[topology]).await;
}

#[tokio::test]
async fn connect_with_a_ca_file_opens_a_tls_connection() {
    let certs = TestCerts::new();
    let stunnel = Stunnel::start(&certs, &plain_target());
    // The certificate names both: a host name, and an IP address checked as one.
    for host in ["localhost", "127.0.0.1"] {
        let url = address("amqps", host, stunnel.port());
        let connection =
            redrive_rabbitmq::connect_with_ca_file(&url, "redrive-test:tls", certs.ca_file())
                .await
                .unwrap_or_else(|e| panic!("connect to {host} over amqps: {e}"));
        connection.create_channel().await.expect("a channel");
        let _ = connection.close(200, "done").await;
    }
    assert_eq!(stunnel.tls_sessions(), 2, "{}", stunnel.log());
}

#[tokio::test]
async fn amqp_to_a_tls_port_says_to_use_amqps() {
    let certs = TestCerts::new();
    let stunnel = Stunnel::start(&certs, &plain_target());
    let url = address("amqp", "localhost", stunnel.port());
    let err = redrive_rabbitmq::connect(&url, "redrive-test:tls")
        .await
        .expect_err("plaintext AMQP to a TLS port");
    let text = text(&err);
    assert!(matches!(err, Error::Connect { .. }), "{text}");
    assert!(text.contains("use amqps://"), "{text}");
}

#[tokio::test]
async fn amqps_to_the_plaintext_port_says_to_use_amqp() {
    let certs = TestCerts::new();
    let b = broker();
    let err = redrive_rabbitmq::connect_with_ca_file(
        &address("amqps", &b.authority.host, b.authority.port),
        "redrive-test:tls",
        certs.ca_file(),
    )
    .await
    .expect_err("TLS to RabbitMQ's plaintext port");
    let text = text(&err);
    assert!(matches!(err, Error::Connect { .. }), "{text}");
    assert!(text.contains("use amqp://"), "{text}");
}

#[tokio::test]
async fn a_server_certificate_of_another_ca_is_an_unknown_authority() {
    let certs = TestCerts::new();
    let other = TestCerts::new();
    let stunnel = Stunnel::start(&certs, &plain_target());
    let url = amqps(stunnel.port());

    let wrong = redrive_rabbitmq::connect_with_ca_file(&url, "redrive-test:tls", other.ca_file())
        .await
        .expect_err("a server certificate the CA file did not sign");
    // Without a CA file only the platform's roots are trusted.
    let none = redrive_rabbitmq::connect(&url, "redrive-test:tls")
        .await
        .expect_err("a server certificate of a private CA");
    for err in [wrong, none] {
        let text = text(&err);
        assert!(matches!(err, Error::Connect { .. }), "{text}");
        assert!(text.contains("unknown certificate authority"), "{text}");
        assert!(text.contains("CA file"), "{text}");
    }
}

#[tokio::test]
async fn a_ca_file_that_cannot_be_used_is_a_configuration_error() {
    let certs = TestCerts::new();
    let dir = TempDir::new("redrive-tls-bad");
    let missing = dir.path().join("missing.crt");
    let not_pem = dir.path().join("not-pem.crt");
    std::fs::write(&not_pem, "not a certificate").expect("write");

    for (url, file, says) in [
        (amqps(5671), missing.clone(), "missing.crt"),
        (amqps(5671), not_pem.clone(), "no PEM certificate"),
        (common::url(), certs.ca_file(), "amqps://"),
    ] {
        let err = redrive_rabbitmq::connect_with_ca_file(&url, "redrive-test:tls", &file)
            .await
            .expect_err("an unusable CA file");
        let text = text(&err);
        assert!(matches!(err, Error::Config(_)), "{text}");
        assert!(text.contains(says), "{text}");

        let err = RabbitPublisher::connect_with_ca_file(&url, "redrive-test:tls", &file)
            .await
            .expect_err("an unusable CA file");
        assert!(matches!(err, Error::Config(_)), "{err}");

        let topology = common::topology(&common::unique("tls-config"), QueueKind::Classic);
        let err = RabbitConsumer::builder(&url, topology)
            .tls_ca_file(&file)
            .connect()
            .await
            .expect_err("an unusable CA file");
        assert!(matches!(err, Error::Config(_)), "{err}");
    }
}
