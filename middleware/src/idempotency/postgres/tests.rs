use std::time::Duration;

use super::PostgresStore;

// The store contract runs from `tests/idempotency_postgres.rs`, through the public
// `idempotency::testkit`.

/// A store on the local PostgreSQL (`DATABASE_URL`, default
/// `host=127.0.0.1 user=postgres dbname=test`) in a fresh, migrated table; panics,
/// saying how to start PostgreSQL, when it cannot be reached.
async fn postgres_store() -> PostgresStore {
    let params = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into());
    let store =
        match tokio::time::timeout(Duration::from_secs(5), PostgresStore::connect(&params)).await {
            Ok(Ok(store)) => store,
            Ok(Err(e)) => panic!(
                "cannot reach PostgreSQL with `{params}` ({e}); start it with \
             `pg_ctlcluster 15 main start` or set DATABASE_URL"
            ),
            Err(_) => panic!(
                "PostgreSQL with `{params}` did not answer within 5 s; start it with \
             `pg_ctlcluster 15 main start` or set DATABASE_URL"
            ),
        };
    let table = format!("redrive_test_{:016x}", fastrand::u64(..));
    let store = store.with_table(&table).unwrap();
    store.migrate().await.unwrap();
    store
}

#[tokio::test]
async fn migrate_is_idempotent_and_purge_deletes_expired_rows() {
    use crate::idempotency::{IdempotencyStore, Reservation};
    let store = postgres_store().await;
    store.migrate().await.unwrap();
    let Reservation::Fresh(_) = store.reserve("k", Duration::from_millis(1)).await.unwrap() else {
        panic!("fresh key");
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(store.purge_expired().await.unwrap(), 1);
    assert_eq!(store.purge_expired().await.unwrap(), 0);
}

#[test]
fn table_names_are_checked() {
    for ok in ["t", "_t1", "public.redrive_idempotency", "S.T"] {
        assert!(super::check_table(ok).is_ok(), "{ok}");
    }
    let long = "t".repeat(64);
    for bad in [
        "",
        "1t",
        "a.b.c",
        "t;drop table x",
        "a-b",
        "\"t\"",
        ".t",
        long.as_str(),
    ] {
        let err = super::check_table(bad).unwrap_err();
        assert!(
            err.to_string().contains("is not a table name"),
            "{bad}: {err}"
        );
    }
}
