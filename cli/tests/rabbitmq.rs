//! `redrive dlq …` against the local RabbitMQ (`AMQP_URL`, else
//! amqp://guest:guest@127.0.0.1:5672/%2f), on a DLQ the dead-letter layer filled.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{assert_known_stats, ids, json, known_bodies, messages, run_worker, wait_until};
use redrive_core::Publisher;
use redrive_middleware::dead_letter::default_destination;
use redrive_rabbitmq::lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use redrive_rabbitmq::lapin::types::FieldTable;
use redrive_rabbitmq::{RabbitConsumer, RabbitPublisher, Topology};

fn url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| redrive_rabbitmq::DEFAULT_URL.to_owned())
}

const HOW_TO_START: &str = "RabbitMQ is not reachable: start it with `rabbitmq-server -detached` \
     (then `rabbitmqctl await_startup`), or point AMQP_URL at a running broker";

/// Ready messages in `queue`.
async fn depth(queue: &str) -> u32 {
    let conn = redrive_rabbitmq::connect(&url(), "redrive-cli-test-depth")
        .await
        .unwrap_or_else(|e| panic!("{HOW_TO_START}: {e}"));
    let ch = conn.create_channel().await.expect("channel");
    let q = ch
        .queue_declare(
            queue,
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("the queue exists");
    let _ = conn.close(200, "done").await;
    q.message_count()
}

/// A fresh origin queue and its DLQ.
struct Queues {
    topology: Topology,
    origin: String,
    dlq: String,
}

impl Queues {
    fn new(prefix: &str) -> Self {
        let origin = redrive_core::testkit::unique_name(&format!("redrive-cli-{prefix}"));
        let dlq = default_destination(&origin);
        Queues {
            topology: Topology::new(&origin).with_dead_letter_queue(&dlq),
            origin,
            dlq,
        }
    }

    async fn consumer(&self) -> RabbitConsumer {
        RabbitConsumer::builder(url(), self.topology.clone())
            .prefetch(50)
            .connect()
            .await
            .unwrap_or_else(|e| panic!("{HOW_TO_START}: {e}"))
    }

    /// Runs the Worker on the origin until the DLQ holds `dlq` letters and the origin
    /// is empty; returns the bodies it handled.
    async fn work(&self, fixed: bool, dlq: u32) -> Vec<String> {
        let handled = Arc::new(Mutex::new(Vec::new()));
        let publisher = Arc::new(RabbitPublisher::connect(url()).await.expect("publisher"));
        let (origin, dlq_name) = (self.origin.clone(), self.dlq.clone());
        run_worker(
            self.consumer().await,
            publisher,
            fixed,
            handled.clone(),
            async move {
                wait_until(Duration::from_secs(20), "the Worker's run", || async {
                    depth(&dlq_name).await == dlq && depth(&origin).await == 0
                })
                .await;
                // The last acks.
                tokio::time::sleep(Duration::from_millis(200)).await;
            },
        )
        .await;
        let mut v = handled.lock().expect("lock").clone();
        v.sort();
        v
    }

    /// Publishes `bodies` to the origin and runs the Worker until the DLQ holds `dlq`.
    async fn fill(&self, bodies: &[String], dlq: u32) {
        let consumer = self.consumer().await; // declares the queues
        drop(consumer);
        let p = RabbitPublisher::connect(url())
            .await
            .unwrap_or_else(|e| panic!("{HOW_TO_START}: {e}"));
        for m in messages(bodies) {
            p.publish(&self.origin, m).await.expect("publish");
        }
        p.close().await;
        self.work(false, dlq).await;
        assert_eq!(depth(&self.dlq).await, dlq);
    }

    fn args<'a>(&'a self, cmd: &'a str, queue: &'a str, url: &'a str) -> Vec<&'a str> {
        vec!["dlq", cmd, url, queue]
    }

    async fn cleanup(&self) {
        let conn = redrive_rabbitmq::connect(&url(), "redrive-cli-test-cleanup")
            .await
            .expect("connect");
        let ch = conn.create_channel().await.expect("channel");
        let mut names = vec![self.origin.clone(), self.dlq.clone()];
        names.extend(self.topology.delay_queues());
        for q in names {
            let _ = ch.queue_delete(&q, QueueDeleteOptions::default()).await;
        }
        let _ = conn.close(200, "done").await;
    }
}

fn with<'a>(mut args: Vec<&'a str>, more: &[&'a str]) -> Vec<String> {
    args.extend_from_slice(more);
    args.into_iter().map(str::to_owned).collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn stats_show_and_a_filtered_replay_the_worker_then_handles() {
    let q = Queues::new("replay");
    q.fill(&known_bodies(), 5).await;
    let u = url();

    let stats = json(&strs(&with(q.args("stats", &q.dlq, &u), &[])), &[]);
    assert_known_stats(&stats, &q.origin);
    assert_eq!(depth(&q.dlq).await, 5, "stats removes nothing");

    let show = json(&strs(&with(q.args("show", &q.dlq, &u), &["id-bad-2"])), &[]);
    assert_eq!(show["kind"], "permanent", "{show}");
    assert_eq!(show["payload"], "bad-2", "{show}");
    assert_eq!(show["origin"], q.origin.as_str(), "{show}");
    assert_eq!(show["consumer"], "orders-worker", "{show}");

    let dry = json(
        &strs(&with(
            q.args("replay", &q.dlq, &u),
            &["--kind", "exhausted", "--dry-run"],
        )),
        &[],
    );
    assert_eq!(
        (&dry["read"], &dry["selected"], &dry["replayed"]),
        (&5.into(), &2.into(), &2.into()),
        "{dry}"
    );
    assert_eq!(
        (depth(&q.origin).await, depth(&q.dlq).await),
        (0, 5),
        "a dry run moves nothing"
    );

    let done = json(
        &strs(&with(
            q.args("replay", &q.dlq, &u),
            &["--kind", "exhausted", "--rate", "100"],
        )),
        &[],
    );
    assert_eq!(
        (&done["selected"], &done["replayed"], &done["failed"]),
        (&2.into(), &2.into(), &0.into()),
        "{done}"
    );
    assert_eq!((depth(&q.origin).await, depth(&q.dlq).await), (2, 3));
    let back = json(&strs(&with(q.args("list", &q.origin, &u), &[])), &[]);
    assert_eq!(ids(&back), ["id-slow-1", "id-slow-2"], "{back}");
    assert_eq!(back["letters"][0]["replays"], 1, "{back}");

    // The bug is fixed: the Worker handles them.
    let handled = q.work(true, 3).await;
    assert_eq!(handled, ["slow-1", "slow-2"]);
    let left = json(&strs(&with(q.args("list", &q.dlq, &u), &[])), &[]);
    assert_eq!(ids(&left), ["id-bad-1", "id-bad-2", "id-bad-3"], "{left}");
    q.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_loop_guard_refuses_a_letter_that_failed_again() {
    let q = Queues::new("guard");
    q.fill(&known_bodies(), 5).await;
    let u = url();
    let replay = |more: &[&str]| json(&strs(&with(q.args("replay", &q.dlq, &u), more)), &[]);
    let first = replay(&["--kind", "permanent", "--max-replays", "1"]);
    assert_eq!(first["replayed"], 3, "{first}");
    // Still broken: they come back to the DLQ, replayed once.
    q.work(false, 5).await;

    let guarded = replay(&["--kind", "permanent", "--max-replays", "1"]);
    assert_eq!(
        (
            &guarded["selected"],
            &guarded["replayed"],
            &guarded["refused"]
        ),
        (&3.into(), &0.into(), &3.into()),
        "{guarded}"
    );
    assert_eq!((depth(&q.origin).await, depth(&q.dlq).await), (0, 5));
    let forced = replay(&["--kind", "permanent", "--max-replays", "1", "--force"]);
    assert_eq!(
        (&forced["replayed"], &forced["refused"]),
        (&3.into(), &0.into()),
        "{forced}"
    );
    assert_eq!((depth(&q.origin).await, depth(&q.dlq).await), (3, 2));
    q.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replay_killed_halfway_and_run_again_loses_nothing() {
    let q = Queues::new("kill");
    let bodies: Vec<String> = (0..100).map(|i| format!("bad-{i:03}")).collect();
    q.fill(&bodies, 100).await;
    let u = url();

    let args = with(q.args("replay", &q.dlq, &u), &["--rate", "20"]);
    let mut child = common::redrive(&strs(&args), &[])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    child.kill().expect("SIGKILL");
    child.wait().expect("wait");
    // The broker returns the killed run's unacked letters to the DLQ.
    wait_until(
        Duration::from_secs(10),
        "the killed run's letters back",
        || async { depth(&q.origin).await + depth(&q.dlq).await >= 100 },
    )
    .await;
    let moved = depth(&q.origin).await;
    assert!(
        (10..90).contains(&moved),
        "killed halfway: {moved} replayed"
    );

    let again = json(&strs(&with(q.args("replay", &q.dlq, &u), &[])), &[]);
    assert_eq!(again["failed"], 0, "{again}");
    assert_eq!(depth(&q.dlq).await, 0);
    let origin = json(&strs(&with(q.args("list", &q.origin, &u), &[])), &[]);
    let mut got = ids(&origin);
    let total = got.len();
    let twice = got.windows(3).all(|w| !(w[0] == w[1] && w[1] == w[2]));
    got.dedup();
    let want: Vec<String> = bodies.iter().map(|b| format!("id-{b}")).collect();
    assert_eq!(got, want, "every message is back at its origin");
    // Killed between a publish and its removal, a letter is duplicated once; at most
    // the publishes in flight (16) can be caught that way.
    assert!(twice, "no letter is at its origin three times");
    assert!(
        total <= 100 + 16,
        "{} duplicates, more than the 16 in flight",
        total - 100
    );
    q.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_stops_after_the_current_letter_and_says_so() {
    let q = Queues::new("sigint");
    let bodies: Vec<String> = (0..60).map(|i| format!("bad-{i:03}")).collect();
    q.fill(&bodies, 60).await;
    let u = url();
    let args = with(q.args("replay", &q.dlq, &u), &["--rate", "20", "--json"]);
    let child = common::redrive(&strs(&args), &[])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let sent = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill -INT");
    assert!(sent.success());
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(report["stopped"], true, "{report}");
    let replayed = u32::try_from(report["replayed"].as_u64().expect("replayed")).expect("u32");
    assert!((5..55).contains(&replayed), "stopped halfway: {report}");
    // A clean stop: what was replayed left the DLQ, the rest is back in it, no duplicate.
    assert_eq!(
        (depth(&q.origin).await, depth(&q.dlq).await),
        (replayed, 60 - replayed)
    );
    q.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn purge_asks_for_yes_and_removes_only_the_selection() {
    let q = Queues::new("purge");
    q.fill(&known_bodies(), 5).await;
    let u = url();
    let args = with(q.args("purge", &q.dlq, &u), &["--kind", "permanent"]);
    let refused = common::redrive(&strs(&args), &[])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--yes"), "{stderr}");
    assert_eq!(depth(&q.dlq).await, 5, "nothing purged without --yes");

    let purged = json(
        &strs(&with(args.iter().map(String::as_str).collect(), &["--yes"])),
        &[],
    );
    assert_eq!(
        (&purged["selected"], &purged["purged"]),
        (&3.into(), &3.into()),
        "{purged}"
    );
    let left = json(&strs(&with(q.args("list", &q.dlq, &u), &[])), &[]);
    assert_eq!(ids(&left), ["id-slow-1", "id-slow-2"], "{left}");
    q.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_settings_file_sets_the_replay_defaults_and_flags_win() {
    let q = Queues::new("settings");
    q.fill(&known_bodies(), 5).await;
    let u = url();
    let dir = std::env::temp_dir().join(redrive_core::testkit::unique_name("redrive-cli-settings"));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("redrive.toml");
    // The library's file: the sections the Worker reads, and `[replay]`.
    std::fs::write(
        &file,
        "[dead_letter]\nmax_attempts = 2\n\n[replay]\nmax_replays = 0\nrate = 200\n",
    )
    .expect("write");
    let config = file.to_str().expect("utf-8").to_owned();
    let replay = |more: &[&str], env: &[(&str, String)]| {
        let mut args = with(q.args("replay", &q.dlq, &u), &["--config", &config]);
        args.extend(more.iter().map(|s| (*s).to_owned()));
        json(&strs(&args), env)
    };

    // max_replays = 0: the loop guard refuses every letter.
    let guarded = replay(&["--kind", "permanent"], &[]);
    assert_eq!(
        (
            &guarded["selected"],
            &guarded["replayed"],
            &guarded["refused"]
        ),
        (&3.into(), &0.into(), &3.into()),
        "{guarded}"
    );
    // The environment overrides the file, and a flag overrides both.
    let by_env = replay(
        &["--kind", "permanent"],
        &[("REDRIVE_REPLAY__MAX_REPLAYS", "1".to_owned())],
    );
    assert_eq!(by_env["replayed"], 3, "{by_env}");
    let by_flag = replay(&["--kind", "exhausted", "--max-replays", "1"], &[]);
    assert_eq!(by_flag["replayed"], 2, "{by_flag}");
    assert_eq!((depth(&q.origin).await, depth(&q.dlq).await), (5, 0));

    // A value that cannot work stops the run before it connects, naming the key.
    std::fs::write(&file, "[replay]\nrate = 0\n").expect("write");
    let out = common::redrive(
        &strs(&with(q.args("replay", &q.dlq, &u), &["--config", &config])),
        &[],
    )
    .output()
    .expect("run redrive");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("replay.rate") && err.contains("redrive.toml") && err.contains("above 0"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    q.cleanup().await;
}

/// Leaves a DLQ named `orders-dlq` (from `orders`) filled for a demonstration:
/// `cargo test -p redrive-cli --test rabbitmq -- --ignored demo`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "fills orders-dlq for the README's session"]
async fn demo() {
    let origin = "orders".to_owned();
    let dlq = default_destination(&origin);
    let q = Queues {
        topology: Topology::new(&origin).with_dead_letter_queue(&dlq),
        origin,
        dlq,
    };
    let mut bodies = Vec::new();
    for i in 0..40 {
        bodies.push(format!("bad-{i}"));
    }
    for i in 0..12 {
        bodies.push(format!("slow-{i}"));
    }
    q.fill(&bodies, 52).await;
}
