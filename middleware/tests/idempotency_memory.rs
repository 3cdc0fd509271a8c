//! The idempotency layer with the in-memory store, a mock inner service and paused time.
#![cfg(feature = "idempotency")]

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redrive_core::classify::{Classifier, ErrorKind};
use redrive_core::{BoxError, Headers, Message, Outcome};
use redrive_middleware::idempotency::{
    self, CommitMode, CommitStatus, DefaultKey, IdempotencyConfig, IdempotencyLayer,
    IdempotencyStore, IdempotencyToken, KeyReserved, MakeKey, MemoryStore, Namespace, Reservation,
    StoreError, StoreFuture, Token, testkit,
};
use tower::{Layer, Service, ServiceExt, service_fn};

/// `key` as the layer stores it for a message from [`keyed`] (in the consumer's
/// namespace; such a message names no consumer).
fn stored(key: &str) -> String {
    Namespace::Consumer.scope(&keyed(key), key).to_string()
}

fn keyed(key: &str) -> Message {
    let mut headers = Headers::new();
    headers.insert(idempotency::IDEMPOTENCY_KEY, key).unwrap();
    Message::new("charge").with_headers(headers)
}

/// Counts calls, records the token it was given, and fails while `fail` is set.
#[derive(Clone, Default)]
struct Handler {
    calls: Arc<AtomicU32>,
    fail: Arc<AtomicBool>,
    tokens: Arc<Mutex<Vec<IdempotencyToken>>>,
    work: Duration,
}

impl Handler {
    fn calls(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }

    fn service(
        &self,
    ) -> impl Service<Message, Response = Outcome, Error = BoxError, Future: Send> + Clone + Send + 'static
    {
        let h = self.clone();
        service_fn(move |msg: Message| {
            let h = h.clone();
            async move {
                h.calls.fetch_add(1, Ordering::SeqCst);
                if let Some(t) = msg.extensions.get::<IdempotencyToken>() {
                    h.tokens.lock().unwrap().push(t.clone());
                }
                tokio::time::sleep(h.work).await;
                if h.fail.load(Ordering::SeqCst) {
                    return Err::<Outcome, BoxError>("card declined".into());
                }
                Ok(Outcome::Processed)
            }
        })
    }
}

fn layer(store: Arc<MemoryStore>) -> IdempotencyLayer<MemoryStore> {
    IdempotencyLayer::new(store, IdempotencyConfig::default()).unwrap()
}

#[tokio::test(start_paused = true)]
async fn the_store_keeps_the_store_contract() {
    testkit::run_all(&MemoryStore::new(), Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn a_store_of_many_shards_keeps_the_store_contract() {
    testkit::run_all(&MemoryStore::with_shards(64), Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn fresh_key_runs_and_commits_then_duplicates_are_skipped() {
    let store = Arc::new(MemoryStore::new());
    let layer = layer(store.clone());
    let handler = Handler::default();
    let mut svc = layer.layer(handler.service());

    assert_eq!(
        svc.ready().await.unwrap().call(keyed("k1")).await.unwrap(),
        Outcome::Processed
    );
    assert_eq!(handler.calls(), 1);
    assert_eq!(
        store
            .reserve(&stored("k1"), Duration::from_secs(1))
            .await
            .unwrap(),
        Reservation::Committed
    );

    for _ in 0..3 {
        let outcome = svc.ready().await.unwrap().call(keyed("k1")).await.unwrap();
        assert_eq!(outcome, Outcome::Deduplicated);
    }
    assert_eq!(handler.calls(), 1, "a committed key must skip the handler");
    assert_eq!(layer.deduplicated(), 3);
    assert_eq!(svc.stats().deduplicated, 3);

    // Another key is processed.
    assert_eq!(
        svc.ready().await.unwrap().call(keyed("k2")).await.unwrap(),
        Outcome::Processed
    );
    assert_eq!(handler.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn the_handler_gets_the_reservation_in_the_extensions() {
    let store = Arc::new(MemoryStore::new());
    let handler = Handler::default();
    layer(store.clone())
        .layer(handler.service())
        .oneshot(keyed("k"))
        .await
        .unwrap();
    let tokens = handler.tokens.lock().unwrap().clone();
    assert_eq!(tokens.len(), 1);
    assert_eq!(tokens[0].key(), stored("k"));
    // It is the token the key was committed with.
    let status = store
        .commit(&stored("k"), tokens[0].token(), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(status, CommitStatus::AlreadyCommitted);
}

#[tokio::test(start_paused = true)]
async fn a_failure_releases_the_key_and_the_error_goes_up_unchanged() {
    let store = Arc::new(MemoryStore::new());
    let handler = Handler::default();
    handler.fail.store(true, Ordering::SeqCst);
    let mut svc = layer(store.clone()).layer(handler.service());

    let err = svc
        .ready()
        .await
        .unwrap()
        .call(keyed("k"))
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "card declined");
    assert!(store.is_empty(), "the key was not released");

    handler.fail.store(false, Ordering::SeqCst);
    let outcome = svc.ready().await.unwrap().call(keyed("k")).await.unwrap();
    assert_eq!(outcome, Outcome::Processed);
    assert_eq!(handler.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_key_reserved_elsewhere_is_a_transient_error_with_the_lease_left() {
    let store = Arc::new(MemoryStore::new());
    let Reservation::Fresh(_) = store
        .reserve(&stored("k"), Duration::from_secs(10))
        .await
        .unwrap()
    else {
        panic!("fresh");
    };
    tokio::time::advance(Duration::from_secs(4)).await;

    let handler = Handler::default();
    let layer = layer(store.clone());
    let err = layer
        .layer(handler.service())
        .oneshot(keyed("k"))
        .await
        .unwrap_err();
    let class = Classifier::default().classify(&*err);
    assert_eq!(class.kind, ErrorKind::Transient);
    assert_eq!(class.retry_after, Some(Duration::from_secs(6)));
    let reserved = KeyReserved::find(&*err).expect("a KeyReserved in the chain");
    assert_eq!(
        (reserved.key(), reserved.remaining()),
        (&*stored("k"), Duration::from_secs(6))
    );
    assert_eq!(handler.calls(), 0);
    assert_eq!(layer.stats().reserved_elsewhere, 1);

    // Once the other lease has expired, the message is processed here.
    tokio::time::advance(Duration::from_secs(6)).await;
    let outcome = layer
        .layer(handler.service())
        .oneshot(keyed("k"))
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Processed);
    assert_eq!(handler.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn two_consumers_racing_for_one_key_run_the_handler_once() {
    let store = Arc::new(MemoryStore::new());
    let handler = Handler {
        work: Duration::from_secs(2),
        ..Handler::default()
    };
    // Two replicas: separate layers, one store.
    let a = layer(store.clone()).layer(handler.service());
    let b = layer(store.clone()).layer(handler.service());
    let (ra, rb) = tokio::join!(a.oneshot(keyed("k")), b.oneshot(keyed("k")));
    assert_eq!(handler.calls(), 1);
    let (ok, err) = match (ra, rb) {
        (Ok(o), Err(e)) | (Err(e), Ok(o)) => (o, e),
        other => panic!("expected one success and one refusal, got {other:?}"),
    };
    assert_eq!(ok, Outcome::Processed);
    assert!(KeyReserved::find(&*err).is_some(), "{err}");
    // The redelivery of the refused one is skipped.
    let again = layer(store)
        .layer(handler.service())
        .oneshot(keyed("k"))
        .await
        .unwrap();
    assert_eq!(again, Outcome::Deduplicated);
}

#[tokio::test(start_paused = true)]
async fn a_committed_key_is_forgotten_after_its_ttl() {
    let store = Arc::new(MemoryStore::new());
    let config = IdempotencyConfig::default().with_ttl(Duration::from_secs(60));
    let layer = IdempotencyLayer::new(store, config).unwrap();
    let handler = Handler::default();
    layer
        .layer(handler.service())
        .oneshot(keyed("k"))
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(59)).await;
    let o = layer
        .layer(handler.service())
        .oneshot(keyed("k"))
        .await
        .unwrap();
    assert_eq!(o, Outcome::Deduplicated);
    tokio::time::advance(Duration::from_secs(1)).await;
    let o = layer
        .layer(handler.service())
        .oneshot(keyed("k"))
        .await
        .unwrap();
    assert_eq!(o, Outcome::Processed);
    assert_eq!(handler.calls(), 2);
}

/// A memory store whose commits or reservations can be made to fail.
#[derive(Default)]
struct Flaky {
    inner: MemoryStore,
    fail_commit: AtomicBool,
    fail_reserve: AtomicBool,
    commits: AtomicU32,
}

impl IdempotencyStore for Flaky {
    fn reserve<'a>(&'a self, key: &'a str, lease: Duration) -> StoreFuture<'a, Reservation> {
        if self.fail_reserve.load(Ordering::SeqCst) {
            return Box::pin(async { Err(StoreError::backend("store unreachable")) });
        }
        self.inner.reserve(key, lease)
    }

    fn commit<'a>(
        &'a self,
        key: &'a str,
        token: &'a Token,
        ttl: Duration,
    ) -> StoreFuture<'a, CommitStatus> {
        self.commits.fetch_add(1, Ordering::SeqCst);
        if self.fail_commit.load(Ordering::SeqCst) {
            return Box::pin(async { Err(StoreError::backend("store unreachable")) });
        }
        self.inner.commit(key, token, ttl)
    }

    fn release<'a>(&'a self, key: &'a str, token: &'a Token) -> StoreFuture<'a, ()> {
        self.inner.release(key, token)
    }

    fn extend<'a>(
        &'a self,
        key: &'a str,
        token: &'a Token,
        lease: Duration,
    ) -> StoreFuture<'a, ()> {
        self.inner.extend(key, token, lease)
    }
}

#[tokio::test(start_paused = true)]
async fn a_success_whose_commit_fails_is_still_a_success() {
    let store = Arc::new(Flaky::default());
    store.fail_commit.store(true, Ordering::SeqCst);
    let layer = IdempotencyLayer::new(store.clone(), IdempotencyConfig::default()).unwrap();
    let handler = Handler::default();
    let started = tokio::time::Instant::now();
    let outcome = layer
        .layer(handler.service())
        .oneshot(keyed("k"))
        .await
        .unwrap();
    // Acked, not sent back to run its effect again; the commit was tried three times.
    assert_eq!(outcome, Outcome::Processed);
    assert_eq!(handler.calls(), 1);
    assert_eq!(store.commits.load(Ordering::SeqCst), 3);
    assert_eq!(started.elapsed(), Duration::from_secs(1));
    assert_eq!(layer.stats().commit_failures, 1);
}

#[tokio::test(start_paused = true)]
async fn a_failed_reservation_is_an_error_and_the_handler_does_not_run() {
    let store = Arc::new(Flaky::default());
    store.fail_reserve.store(true, Ordering::SeqCst);
    let layer = IdempotencyLayer::new(store, IdempotencyConfig::default()).unwrap();
    let handler = Handler::default();
    let err = layer
        .layer(handler.service())
        .oneshot(keyed("k"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("store unreachable"), "{err}");
    assert_eq!(handler.calls(), 0);
}

#[tokio::test(start_paused = true)]
async fn messages_without_a_key_are_processed_and_counted() {
    let store = Arc::new(MemoryStore::new());
    let layer = layer(store.clone());
    let handler = Handler::default();
    for _ in 0..2 {
        let o = layer
            .layer(handler.service())
            .oneshot(Message::new("x"))
            .await
            .unwrap();
        assert_eq!(o, Outcome::Processed);
    }
    assert_eq!(handler.calls(), 2);
    assert_eq!(layer.stats().unkeyed, 2);
    assert!(store.is_empty());
    assert!(handler.tokens.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn in_handler_commit_mode_the_layer_commit_is_a_no_op() {
    let store = Arc::new(MemoryStore::new());
    let config = IdempotencyConfig::default().with_commit_mode(CommitMode::Handler);
    let layer = IdempotencyLayer::new(store.clone(), config).unwrap();
    let committed_by_handler = Arc::new(Mutex::new(None));
    let seen = committed_by_handler.clone();
    let store_in_handler = store.clone();
    let svc = service_fn(move |msg: Message| {
        let (store, seen) = (store_in_handler.clone(), seen.clone());
        async move {
            let t = msg.extensions.get::<IdempotencyToken>().unwrap().clone();
            // Stands in for `PostgresStore::commit_in` inside the handler's transaction.
            let status = store
                .commit(t.key(), t.token(), Duration::from_secs(60))
                .await?;
            *seen.lock().unwrap() = Some(status);
            Ok::<_, BoxError>(Outcome::Processed)
        }
    });
    let outcome = layer.layer(svc.clone()).oneshot(keyed("k")).await.unwrap();
    assert_eq!(outcome, Outcome::Processed);
    assert_eq!(
        *committed_by_handler.lock().unwrap(),
        Some(CommitStatus::Committed)
    );
    // The handler's TTL (60 s) stands: the layer did not commit over it with its own (24 h).
    tokio::time::advance(Duration::from_secs(61)).await;
    assert!(matches!(
        store
            .reserve(&stored("k"), Duration::from_secs(1))
            .await
            .unwrap(),
        Reservation::Fresh(_)
    ));
}

#[tokio::test(start_paused = true)]
async fn a_custom_key_function_and_a_dyn_store() {
    let store: Arc<dyn IdempotencyStore> = Arc::new(MemoryStore::new());
    let config = IdempotencyConfig::default().with_key(|msg: &Message| {
        msg.headers
            .get_str("order-id")
            .map(|id| format!("order:{id}"))
    });
    let layer = IdempotencyLayer::new(store.clone(), config).unwrap();
    let handler = Handler::default();
    let mut headers = Headers::new();
    headers.insert("order-id", "42").unwrap();
    let msg = Message::new("x").with_headers(headers);
    layer
        .layer(handler.service())
        .oneshot(msg.clone())
        .await
        .unwrap();
    assert_eq!(
        store
            .reserve(&stored("order:42"), Duration::from_secs(1))
            .await
            .unwrap(),
        Reservation::Committed
    );
    let o = layer.layer(handler.service()).oneshot(msg).await.unwrap();
    assert_eq!(o, Outcome::Deduplicated);
    // Without the header there is no key, whatever the other headers say.
    layer
        .layer(handler.service())
        .oneshot(keyed("k"))
        .await
        .unwrap();
    assert_eq!(layer.stats().unkeyed, 1);
}

#[test]
fn the_default_key_prefers_the_idempotency_key_then_message_id_then_the_broker_id() {
    let mut msg = Message::new("x");
    assert_eq!(DefaultKey.make_key(&msg), None);
    msg.metadata.message_id = Some("broker-1".into());
    assert_eq!(DefaultKey.make_key(&msg).as_deref(), Some("broker-1"));
    msg.headers
        .insert(idempotency::MESSAGE_ID, "producer-1")
        .unwrap();
    assert_eq!(DefaultKey.make_key(&msg).as_deref(), Some("producer-1"));
    msg.headers
        .insert(idempotency::IDEMPOTENCY_KEY, "")
        .unwrap();
    assert_eq!(
        DefaultKey.make_key(&msg).as_deref(),
        Some("producer-1"),
        "empty is skipped"
    );
    msg.headers
        .insert(idempotency::IDEMPOTENCY_KEY, vec![0xff_u8, 0x01])
        .unwrap();
    assert_eq!(DefaultKey.make_key(&msg).as_deref(), Some("0xff01"));
    msg.headers.insert("Idempotency-Key", "op-9").unwrap();
    assert_eq!(DefaultKey.make_key(&msg).as_deref(), Some("op-9"));
}

#[test]
fn configuration_is_checked() {
    let store = Arc::new(MemoryStore::new());
    for config in [
        IdempotencyConfig::default().with_lease(Duration::ZERO),
        IdempotencyConfig::default().with_ttl(Duration::from_micros(10)),
        IdempotencyConfig::default().with_ttl(Duration::from_secs(400 * 365 * 86_400)),
    ] {
        let err = IdempotencyLayer::new(store.clone(), config).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("invalid idempotency configuration"),
            "{err}"
        );
    }
    assert!(IdempotencyLayer::new(store, IdempotencyConfig::default()).is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_call_dropped_before_it_completes_frees_its_key() {
    let store = Arc::new(MemoryStore::new());
    let handler = Handler {
        work: Duration::from_secs(5),
        ..Handler::default()
    };
    let mut svc = layer(store.clone()).layer(handler.service());

    // Dropped before its first poll: the key was reserved in `call`.
    let never_polled = svc.ready().await.unwrap().call(keyed("k1"));
    assert!(matches!(
        store
            .reserve(&stored("k1"), Duration::from_secs(1))
            .await
            .unwrap(),
        Reservation::Reserved { .. }
    ));
    drop(never_polled);
    let Reservation::Fresh(token) = store
        .reserve(&stored("k1"), Duration::from_secs(1))
        .await
        .unwrap()
    else {
        panic!("the dropped call's reservation was not released");
    };
    store.release(&stored("k1"), &token).await.unwrap();

    // Dropped while the handler runs (a shutdown deadline).
    let call = svc.ready().await.unwrap().call(keyed("k1"));
    let timed_out = tokio::time::timeout(Duration::from_secs(1), call).await;
    assert!(timed_out.is_err(), "the handler takes 5 s");
    assert_eq!(handler.calls(), 1);
    assert!(matches!(
        store
            .reserve(&stored("k1"), Duration::from_secs(1))
            .await
            .unwrap(),
        Reservation::Fresh(_)
    ));
}
