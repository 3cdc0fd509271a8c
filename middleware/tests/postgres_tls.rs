//! The PostgreSQL idempotency store over TLS (`sslmode=…`, `sslrootcert=…`), on a private
//! PostgreSQL that takes TLS connections only, with a certificate authority of the
//! test's own; and the errors that say what to change when the parameters and the
//! server disagree or the CA is wrong.
#![cfg(feature = "postgres-tls")]

use std::time::Duration;

use redrive_middleware::idempotency::{PostgresStore, testkit};

#[path = "support/services.rs"]
mod services;

use services::{PrivatePostgres, TestCerts};

/// Certificates and a PostgreSQL that takes TLS only, with a certificate they hold.
fn tls_postgres() -> (TestCerts, PrivatePostgres) {
    tokio::task::block_in_place(|| {
        let certs = TestCerts::new();
        let pg = PrivatePostgres::with_tls(&certs);
        (certs, pg)
    })
}

/// A store connected with `params`, which must connect.
async fn connect(params: &str) -> PostgresStore {
    match tokio::time::timeout(Duration::from_secs(20), PostgresStore::connect(params)).await {
        Ok(Ok(store)) => store,
        Ok(Err(e)) => panic!("connecting with `{params}` failed: {e}"),
        Err(_) => panic!("connecting with `{params}` hung for 20 s"),
    }
}

/// The error of connecting a store with `params`, which must fail.
async fn connect_error(params: &str) -> String {
    match tokio::time::timeout(Duration::from_secs(20), PostgresStore::connect(params)).await {
        Ok(Ok(_)) => panic!("the store connected with `{params}`"),
        Ok(Err(e)) => {
            let err = e.to_string();
            eprintln!("the error: {err}");
            err
        }
        Err(_) => panic!("connecting with `{params}` hung for 20 s"),
    }
}

/// Whether the connection the store's pool hands out runs over TLS, as the server sees
/// it.
async fn pool_uses_tls(store: &PostgresStore) -> bool {
    let client = store.pool().get().await.unwrap();
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    row.get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_keeps_the_store_contract_over_verified_tls() {
    let (certs, pg) = tls_postgres();
    let params = format!(
        "{} sslmode=verify-full sslrootcert={}",
        pg.params(),
        certs.ca().display()
    );
    let store = connect(&params)
        .await
        .with_table("redrive_test_tls")
        .unwrap();
    store.migrate().await.unwrap();
    assert!(
        pool_uses_tls(&store).await,
        "the pool's connection is plaintext"
    );
    testkit::run_all(&store, Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_with_verify_full_connects_by_name() {
    let (certs, pg) = tls_postgres();
    let url = format!(
        "postgresql://postgres@localhost:{}/test?sslmode=verify-full&sslrootcert={}",
        pg.port(),
        certs.ca().display()
    );
    let store = connect(&url).await;
    assert!(
        pool_uses_tls(&store).await,
        "the pool's connection is plaintext"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_takes_any_certificate() {
    let (_certs, pg) = tls_postgres();
    let store = connect(&format!("{} sslmode=require", pg.params())).await;
    assert!(
        pool_uses_tls(&store).await,
        "the pool's connection is plaintext"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_takes_tls_when_the_server_offers_it() {
    let (_certs, pg) = tls_postgres();
    let store = connect(&format!("{}?sslmode=prefer", pg.url())).await;
    assert!(
        pool_uses_tls(&store).await,
        "the pool's connection is plaintext"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_ca_does_not_check_the_host_name() {
    let (certs, pg) = tls_postgres();
    // Reached at 127.0.0.1, checked as `db.invalid`, a name the certificate lacks.
    let params = format!(
        "host=db.invalid hostaddr=127.0.0.1 port={} user=postgres dbname=test \
         sslmode=verify-ca sslrootcert='{}'",
        pg.port(),
        certs.ca().display()
    );
    let store = connect(&params).await;
    assert!(
        pool_uses_tls(&store).await,
        "the pool's connection is plaintext"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_checks_the_host_name() {
    let (certs, pg) = tls_postgres();
    let params = format!(
        "host=db.invalid hostaddr=127.0.0.1 port={} user=postgres dbname=test \
         sslmode=verify-full sslrootcert={}",
        pg.port(),
        certs.ca().display()
    );
    let err = connect_error(&params).await;
    assert!(
        err.contains("db.invalid") && err.contains("verify-ca"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_signed_by_another_ca_names_the_ca() {
    let (_certs, pg) = tls_postgres();
    let other = tokio::task::block_in_place(TestCerts::new);
    let ca = other.ca().display().to_string();
    let err = connect_error(&format!(
        "{} sslmode=verify-full sslrootcert={ca}",
        pg.params()
    ))
    .await;
    assert!(err.contains(&ca) && err.contains("not signed"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_the_platform_does_not_trust_says_to_give_sslrootcert() {
    let (_certs, pg) = tls_postgres();
    let err = connect_error(&format!("{} sslmode=verify-full", pg.params())).await;
    assert!(err.contains("sslrootcert="), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_ca_file_is_named() {
    let (_certs, pg) = tls_postgres();
    let err = connect_error(&format!(
        "{} sslmode=verify-full sslrootcert=/nonexistent/redrive-ca.pem",
        pg.params()
    ))
    .await;
    assert!(err.contains("/nonexistent/redrive-ca.pem"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_sslmode_to_a_tls_only_server_says_to_add_one() {
    let (_certs, pg) = tls_postgres();
    let err = connect_error(&pg.params()).await;
    assert!(
        err.contains("sslmode=require") && err.contains("sslmode=verify-full"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_do_not_show_the_password() {
    let (_certs, pg) = tls_postgres();
    let url = format!("postgresql://postgres:hunter2@127.0.0.1:{}/test", pg.port());
    let err = connect_error(&url).await;
    assert!(err.contains("sslmode=require"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
    let err = connect_error(&format!(
        "{} password=hunter2 sslmode=sometimes",
        pg.params()
    ))
    .await;
    assert!(err.contains("sslmode"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}
