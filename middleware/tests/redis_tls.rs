//! The Redis idempotency store and rate limit over TLS (`rediss://`), on a private
//! Redis with a TLS port and a certificate authority of the test's own; and the errors
//! that say what to change when the URL and the port disagree or the CA is wrong.
#![cfg(feature = "redis-tls")]

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redrive_middleware::idempotency::{IdempotencyStore, RedisStore, Reservation, testkit};

#[path = "support/services.rs"]
mod services;

use services::{PrivateRedis, TestCerts};

/// Certificates and a Redis with a TLS port that trusts them.
fn tls_redis() -> (TestCerts, PrivateRedis) {
    tokio::task::block_in_place(|| {
        let certs = TestCerts::new();
        let redis = PrivateRedis::with_tls(&certs);
        (certs, redis)
    })
}

/// The clients of `redis` by the port they connected to (`laddr` in `CLIENT LIST`),
/// asked on its plaintext port; the asking connection is left out.
async fn clients_by_port(redis: &PrivateRedis) -> Vec<u16> {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut conn)
        .await
        .unwrap();
    list.lines()
        .filter(|line| !line.contains("cmd=client|list"))
        .filter_map(|line| {
            let laddr = line.split(' ').find_map(|f| f.strip_prefix("laddr="))?;
            laddr.rsplit(':').next()?.parse().ok()
        })
        .collect()
}

/// The error of connecting a store, which must fail.
async fn connect_error(connect: impl Future<Output = Result<RedisStore, impl ToString>>) -> String {
    match tokio::time::timeout(Duration::from_secs(20), connect).await {
        Ok(Ok(_)) => panic!("the store connected"),
        Ok(Err(e)) => {
            let err = e.to_string();
            eprintln!("the error: {err}");
            err
        }
        Err(_) => panic!("connecting hung for 20 s"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_keeps_the_store_contract_over_tls() {
    let (certs, redis) = tls_redis();
    let store = RedisStore::connect_with_ca(&redis.tls_url(), certs.ca())
        .await
        .unwrap()
        .with_prefix("redrive-test:tls:");
    testkit::run_all(&store, Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_talks_to_the_tls_port_only() {
    let (certs, redis) = tls_redis();
    let store = RedisStore::connect_with_ca(&redis.tls_url(), certs.ca())
        .await
        .unwrap();
    let lease = Duration::from_secs(5);
    let Reservation::Fresh(token) = store.reserve("k", lease).await.unwrap() else {
        panic!("a fresh key was not free");
    };
    store
        .commit("k", &token, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        store.reserve("k", lease).await.unwrap(),
        Reservation::Committed,
        "a duplicate was not seen"
    );
    assert_eq!(
        clients_by_port(&redis).await,
        [redis.tls_port()],
        "the store's one connection is on the TLS port"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_url_to_a_tls_port_says_to_use_rediss() {
    let (_certs, redis) = tls_redis();
    let url = format!("redis://localhost:{}", redis.tls_port());
    let err = connect_error(RedisStore::connect(&url)).await;
    assert!(err.contains("TLS") && err.contains("rediss://"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_url_to_a_plaintext_port_says_to_use_redis() {
    let (certs, redis) = tls_redis();
    let url = format!("rediss://localhost:{}", redis.port());
    let err = connect_error(RedisStore::connect_with_ca(&url, certs.ca())).await;
    assert!(err.contains("redis://"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_signed_by_another_ca_names_the_ca() {
    let (_certs, redis) = tls_redis();
    let other = tokio::task::block_in_place(TestCerts::new);
    let err = connect_error(RedisStore::connect_with_ca(&redis.tls_url(), other.ca())).await;
    let ca = other.ca().display().to_string();
    assert!(err.contains(&ca) && err.contains("not signed"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_the_platform_does_not_trust_says_how_to_give_one() {
    let (_certs, redis) = tls_redis();
    let err = connect_error(RedisStore::connect(&redis.tls_url())).await;
    assert!(err.contains("connect_with_ca"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_ca_file_is_named() {
    let (_certs, redis) = tls_redis();
    let missing = Path::new("/nonexistent/redrive-ca.pem");
    let err = connect_error(RedisStore::connect_with_ca(&redis.tls_url(), missing)).await;
    assert!(err.contains("/nonexistent/redrive-ca.pem"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_do_not_show_the_password() {
    let (_certs, redis) = tls_redis();
    let url = format!("redis://:hunter2@localhost:{}", redis.tls_port());
    let err = connect_error(RedisStore::connect(&url)).await;
    assert!(!err.contains("hunter2"), "{err}");
    assert!(err.contains("localhost"), "{err}");
}

#[cfg(feature = "rate-limit")]
mod rate_limit {
    use super::*;

    use redrive_core::{BoxError, Message};
    use redrive_middleware::rate_limit::{
        RateLimitConfig, RedisRateLimitConfig, RedisRateLimitLayer,
    };
    use tower::{Layer, Service, ServiceExt, service_fn};

    fn config() -> RedisRateLimitConfig {
        RedisRateLimitConfig::new("redrive-test:tls:rate", RateLimitConfig::per_second(1000))
            .with_timeout(Duration::from_secs(2))
    }

    /// Sends `n` messages through `layer`; panics when they do not pass within 10 s.
    async fn drive(layer: &RedisRateLimitLayer, n: usize) {
        let mut svc = layer.layer(service_fn(|_msg: Message| async { Ok::<_, BoxError>(()) }));
        let run = async {
            for _ in 0..n {
                svc.ready()
                    .await
                    .unwrap()
                    .call(Message::new("x"))
                    .await
                    .unwrap();
            }
        };
        tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .expect("the messages did not pass within 10 s");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_limit_grants_over_tls() {
        let (certs, redis) = tls_redis();
        let layer =
            RedisRateLimitLayer::from_url_with_ca(&redis.tls_url(), certs.ca(), config()).unwrap();
        drive(&layer, 5).await;
        assert!(!layer.is_degraded());
        assert_eq!(layer.outages(), 0);
        assert!(layer.redis_calls() >= 1);
        assert_eq!(
            clients_by_port(&redis).await,
            [redis.tls_port()],
            "the limit's one connection is on the TLS port"
        );
    }

    #[test]
    fn a_ca_file_with_a_plaintext_url_is_refused() {
        let certs = TestCerts::new();
        let err =
            RedisRateLimitLayer::from_url_with_ca("redis://localhost:6379", certs.ca(), config())
                .unwrap_err()
                .to_string();
        assert!(err.contains("rediss://"), "{err}");
    }

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    // The one test of this file with a subscriber; the rate limit's warning is logged on
    // the test's own thread, where the layer's future is polled.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_plaintext_url_to_a_tls_port_logs_to_use_rediss() {
        let (_certs, redis) = tls_redis();
        let capture = Capture::default();
        let writer = capture.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let url = format!("redis://localhost:{}", redis.tls_port());
        let layer = RedisRateLimitLayer::from_url(&url, config()).unwrap();
        let mut svc = layer.layer(service_fn(|_msg: Message| async { Ok::<_, BoxError>(()) }));
        // Failing closed: intake stops, and the outage is logged.
        let ready = tokio::time::timeout(Duration::from_secs(3), svc.ready()).await;
        assert!(ready.is_err(), "a message passed without Redis");
        assert!(layer.is_degraded());
        let log = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
        eprintln!("the log: {log}");
        assert!(log.contains("TLS") && log.contains("rediss://"), "{log}");
    }
}
