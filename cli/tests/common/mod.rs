//! What the CLI's tests share: a broker with an origin queue and its DLQ, filled with
//! real dead letters by a Worker under the dead-letter layer, and the built binary.
#![allow(
    dead_code,
    unreachable_pub,
    reason = "each test binary uses part of this"
)]

use std::future::Future;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redrive_core::{BoxError, Consumer, Message, OutgoingMessage, Publisher, Redelivery, Worker};
use redrive_core::{classify, handler_fn};
use redrive_middleware::dead_letter::{DeadLetterConfig, DeadLetterLayer};
use serde_json::Value;
use tower::ServiceBuilder;

/// Bodies starting with `bad` fail permanently, `slow` transiently on every attempt
/// (exhausted after 2), unless `fixed`; the rest succeed and are recorded in `handled`.
pub async fn run_worker<C: Consumer, P: Publisher>(
    consumer: C,
    publisher: Arc<P>,
    fixed: bool,
    handled: Arc<Mutex<Vec<String>>>,
    until: impl Future<Output = ()> + Send,
) {
    let stack = ServiceBuilder::new()
        .layer(
            DeadLetterLayer::new(
                publisher,
                DeadLetterConfig::default()
                    .with_max_attempts(2)
                    .with_consumer_name("orders-worker"),
            )
            .expect("dead-letter layer"),
        )
        .service(handler_fn(move |m: Message| {
            let handled = handled.clone();
            async move {
                let body = String::from_utf8_lossy(&m.payload).into_owned();
                if !fixed && body.starts_with("bad") {
                    return Err(classify::permanent("invalid order: no customer"));
                }
                if !fixed && body.starts_with("slow") {
                    return Err::<(), BoxError>("warehouse timed out".into());
                }
                handled.lock().expect("lock").push(body);
                Ok(())
            }
        }));
    Worker::builder(consumer)
        .service(stack)
        .concurrency(8)
        .redelivery(Redelivery::constant(Duration::ZERO))
        .build()
        .expect("worker")
        .run_until(until)
        .await;
}

/// Messages with these bodies, each with `message-id` `id-<body>`.
pub fn messages(bodies: &[String]) -> Vec<OutgoingMessage> {
    bodies
        .iter()
        .map(|b| {
            OutgoingMessage::new(b.clone())
                .with_header("message-id", format!("id-{b}"))
                .expect("header")
        })
        .collect()
}

/// The bodies of the known DLQ: 3 permanent, 2 exhausted, and 2 that succeed.
pub fn known_bodies() -> Vec<String> {
    [
        "bad-1", "ok-1", "slow-1", "bad-2", "slow-2", "bad-3", "ok-2",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Polls `f` every 50 ms until it is true, at most `within`.
pub async fn wait_until<F, Fut>(within: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `redrive` binary with these arguments and environment.
pub fn redrive(args: &[&str], env: &[(&str, String)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_redrive"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Runs it to its end; panics with its stderr when it fails.
pub fn run_ok(args: &[&str], env: &[(&str, String)]) -> Output {
    let out = redrive(args, env).output().expect("run redrive");
    assert!(
        out.status.success(),
        "redrive {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs it with `--json`; its stdout as JSON.
pub fn json(args: &[&str], env: &[(&str, String)]) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    let out = run_ok(&args, env);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A stats group as `key → count` pairs, sorted by key.
pub fn group(stats: &Value, name: &str) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = stats[name]
        .as_array()
        .unwrap_or_else(|| panic!("no `{name}` in {stats}"))
        .iter()
        .map(|g| {
            (
                g["key"].as_str().unwrap_or_default().to_owned(),
                g["count"].as_u64().unwrap_or_default(),
            )
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    v.sort();
    v
}

/// The ids of `list --json`'s letters, sorted.
pub fn ids(list: &Value) -> Vec<String> {
    let mut v: Vec<String> = list["letters"]
        .as_array()
        .unwrap_or_else(|| panic!("no letters in {list}"))
        .iter()
        .map(|l| l["id"].as_str().unwrap_or("?").to_owned())
        .collect();
    v.sort();
    v
}

/// Checks the stats of the known DLQ ([`known_bodies`]) from `origin`.
pub fn assert_known_stats(stats: &Value, origin: &str) {
    assert_eq!(stats["total"], 5, "{stats}");
    assert_eq!(
        group(stats, "by_kind"),
        vec![("exhausted".to_owned(), 2), ("permanent".to_owned(), 3)]
    );
    assert_eq!(
        group(stats, "by_error"),
        vec![
            ("invalid order: no customer".to_owned(), 3),
            ("warehouse timed out".to_owned(), 2)
        ]
    );
    assert_eq!(group(stats, "by_origin"), vec![(origin.to_owned(), 5)]);
    assert_eq!(group(stats, "by_age"), vec![("<1h".to_owned(), 5)]);
}
