//! `redrive dlq …` against the SQS emulator (`SQS_ENDPOINT`, else
//! http://127.0.0.1:9324; `source scripts/sqs-emulator` starts it), on a DLQ the
//! dead-letter layer filled.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{assert_known_stats, ids, json, known_bodies, messages, run_worker, wait_until};
use redrive_core::Publisher;
use redrive_middleware::dead_letter::default_destination;
use redrive_sqs::Sqs;
use redrive_sqs::aws_config::{self, BehaviorVersion, Region};
use redrive_sqs::aws_sdk_sqs::config::Credentials;
use redrive_sqs::aws_sdk_sqs::types::QueueAttributeName;

fn endpoint() -> String {
    std::env::var("SQS_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:9324".to_owned())
}

/// The environment the binary gets: dummy credentials and region.
fn env() -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID", "test".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "test".to_owned()),
        ("AWS_REGION", "us-east-1".to_owned()),
    ]
}

/// A handle on the emulator; fails saying how to start it when it does not answer.
async fn sqs() -> Sqs {
    let endpoint = endpoint();
    let config = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new(
            "test",
            "test",
            None,
            None,
            "redrive-cli-tests",
        ))
        .endpoint_url(&endpoint)
        .load()
        .await;
    let sqs = Sqs::from_sdk_config(&config);
    let probe = tokio::time::timeout(
        Duration::from_secs(10),
        sqs.client().list_queues().max_results(1).send(),
    )
    .await;
    if !matches!(probe, Ok(Ok(_))) {
        panic!(
            "the SQS emulator at {endpoint} did not answer; start it with \
             `source scripts/sqs-emulator` (or run `scripts/test`), or set SQS_ENDPOINT"
        );
    }
    sqs
}

/// Messages in `queue`, visible or in flight.
async fn depth(sqs: &Sqs, queue: &str) -> u32 {
    let url = sqs.queue_url(queue).await.expect("queue url");
    let out = sqs
        .client()
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::All)
        .send()
        .await
        .expect("GetQueueAttributes");
    let attrs = out.attributes().expect("attributes");
    let get =
        |n: QueueAttributeName| -> u32 { attrs.get(&n).and_then(|v| v.parse().ok()).unwrap_or(0) };
    get(QueueAttributeName::ApproximateNumberOfMessages)
        + get(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
}

/// A fresh origin queue and its DLQ.
struct Queues {
    sqs: Sqs,
    origin: String,
    dlq: String,
}

impl Queues {
    async fn new(prefix: &str) -> Self {
        let sqs = sqs().await;
        let origin = redrive_core::testkit::unique_name(&format!("redrive-cli-{prefix}"));
        let dlq = default_destination(&origin);
        for q in [&origin, &dlq] {
            sqs.client()
                .create_queue()
                .queue_name(q)
                .attributes(QueueAttributeName::VisibilityTimeout, "30")
                .send()
                .await
                .expect("CreateQueue");
        }
        Queues { sqs, origin, dlq }
    }

    /// Runs the Worker on the origin until the DLQ holds `dlq` letters and the origin
    /// is empty; returns the bodies it handled.
    async fn work(&self, fixed: bool, dlq: u32) -> Vec<String> {
        let handled = Arc::new(Mutex::new(Vec::new()));
        let consumer = self
            .sqs
            .consumer(&self.origin)
            .wait_time(Duration::from_secs(1))
            .build()
            .await
            .expect("consumer");
        let publisher = Arc::new(self.sqs.publisher());
        let (sqs, origin, dlq_name) = (self.sqs.clone(), self.origin.clone(), self.dlq.clone());
        run_worker(consumer, publisher, fixed, handled.clone(), async move {
            wait_until(Duration::from_secs(20), "the Worker's run", || async {
                depth(&sqs, &dlq_name).await == dlq && depth(&sqs, &origin).await == 0
            })
            .await;
        })
        .await;
        // A long poll the Worker's close cut short still takes a message that arrives
        // within its wait (1 s) on the emulator, and hides it for the visibility timeout.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let mut v = handled.lock().expect("lock").clone();
        v.sort();
        v
    }

    /// Publishes `bodies` to the origin and runs the Worker until the DLQ holds `dlq`.
    async fn fill(&self, bodies: &[String], dlq: u32) {
        let p = self.sqs.publisher();
        for m in messages(bodies) {
            p.publish(&self.origin, m).await.expect("publish");
        }
        self.work(false, dlq).await;
        assert_eq!(depth(&self.sqs, &self.dlq).await, dlq);
    }

    fn args<'a>(&'a self, cmd: &'a str, queue: &'a str, url: &'a str) -> Vec<&'a str> {
        vec!["dlq", cmd, url, queue]
    }

    async fn cleanup(&self) {
        for q in [&self.origin, &self.dlq] {
            if let Ok(url) = self.sqs.queue_url(q).await {
                let _ = self.sqs.client().delete_queue().queue_url(url).send().await;
            }
        }
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
    let q = Queues::new("replay").await;
    q.fill(&known_bodies(), 5).await;
    let u = endpoint();

    let stats = json(&strs(&with(q.args("stats", &q.dlq, &u), &[])), &env());
    assert_known_stats(&stats, &q.origin);
    assert_eq!(depth(&q.sqs, &q.dlq).await, 5, "stats removes nothing");

    let show = json(
        &strs(&with(q.args("show", &q.dlq, &u), &["id-bad-2"])),
        &env(),
    );
    assert_eq!(show["kind"], "permanent", "{show}");
    assert_eq!(show["payload"], "bad-2", "{show}");
    assert_eq!(show["origin"], q.origin.as_str(), "{show}");
    assert_eq!(show["consumer"], "orders-worker", "{show}");

    let dry = json(
        &strs(&with(
            q.args("replay", &q.dlq, &u),
            &["--kind", "exhausted", "--dry-run"],
        )),
        &env(),
    );
    assert_eq!(
        (&dry["read"], &dry["selected"], &dry["replayed"]),
        (&5.into(), &2.into(), &2.into()),
        "{dry}"
    );
    assert_eq!(
        (depth(&q.sqs, &q.origin).await, depth(&q.sqs, &q.dlq).await),
        (0, 5),
        "a dry run moves nothing"
    );

    let done = json(
        &strs(&with(
            q.args("replay", &q.dlq, &u),
            &["--kind", "exhausted", "--rate", "100"],
        )),
        &env(),
    );
    assert_eq!(
        (&done["selected"], &done["replayed"], &done["failed"]),
        (&2.into(), &2.into(), &0.into()),
        "{done}"
    );
    assert_eq!(
        (depth(&q.sqs, &q.origin).await, depth(&q.sqs, &q.dlq).await),
        (2, 3)
    );
    let back = json(&strs(&with(q.args("list", &q.origin, &u), &[])), &env());
    assert_eq!(ids(&back), ["id-slow-1", "id-slow-2"], "{back}");
    assert_eq!(back["letters"][0]["replays"], 1, "{back}");

    // The bug is fixed: the Worker handles them.
    let handled = q.work(true, 3).await;
    assert_eq!(handled, ["slow-1", "slow-2"]);
    let left = json(&strs(&with(q.args("list", &q.dlq, &u), &[])), &env());
    assert_eq!(ids(&left), ["id-bad-1", "id-bad-2", "id-bad-3"], "{left}");
    q.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_loop_guard_refuses_a_letter_that_failed_again() {
    let q = Queues::new("guard").await;
    q.fill(&known_bodies(), 5).await;
    let u = endpoint();
    let replay = |more: &[&str]| json(&strs(&with(q.args("replay", &q.dlq, &u), more)), &env());
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
    assert_eq!(
        (depth(&q.sqs, &q.origin).await, depth(&q.sqs, &q.dlq).await),
        (0, 5)
    );
    let forced = replay(&["--kind", "permanent", "--max-replays", "1", "--force"]);
    assert_eq!(
        (&forced["replayed"], &forced["refused"]),
        (&3.into(), &0.into()),
        "{forced}"
    );
    assert_eq!(
        (depth(&q.sqs, &q.origin).await, depth(&q.sqs, &q.dlq).await),
        (3, 2)
    );
    q.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replay_killed_halfway_and_run_again_loses_nothing() {
    let q = Queues::new("kill").await;
    let bodies: Vec<String> = (0..100).map(|i| format!("bad-{i:03}")).collect();
    q.fill(&bodies, 100).await;
    let u = endpoint();

    let args = with(
        q.args("replay", &q.dlq, &u),
        &["--rate", "20", "--visibility", "3s"],
    );
    let mut child = common::redrive(&strs(&args), &env())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    child.kill().expect("SIGKILL");
    child.wait().expect("wait");
    // The killed run's letters come back to the DLQ when their visibility timeout ends.
    wait_until(
        Duration::from_secs(10),
        "the killed run's letters back",
        || async { depth(&q.sqs, &q.origin).await + depth(&q.sqs, &q.dlq).await >= 100 },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let moved = depth(&q.sqs, &q.origin).await;
    assert!(
        (10..90).contains(&moved),
        "killed halfway: {moved} replayed"
    );

    let again = json(&strs(&with(q.args("replay", &q.dlq, &u), &[])), &env());
    assert_eq!(again["failed"], 0, "{again}");
    assert_eq!(depth(&q.sqs, &q.dlq).await, 0);
    let origin = json(&strs(&with(q.args("list", &q.origin, &u), &[])), &env());
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
