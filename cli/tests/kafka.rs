//! `redrive dlq …` against a Kafka broker (`KAFKA_BROKERS`, else 127.0.0.1:9092;
//! `source scripts/kafka-broker` starts tansu), on a DLQ topic the dead-letter layer
//! filled over the Kafka adapter.
//!
//! tansu (0.6) answers a fetch from inside a batch of several records with nothing, and
//! the tool's second run starts at its group's committed offset, inside the topic: every
//! record here is published in a batch of its own (`batch.num.messages=1`).

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{assert_known_stats, ids, json, known_bodies, messages, run_worker, wait_until};
use redrive_core::Publisher;
use redrive_kafka::rdkafka::ClientConfig;
use redrive_kafka::rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use redrive_kafka::rdkafka::client::DefaultClientContext;
use redrive_kafka::rdkafka::consumer::{BaseConsumer, Consumer as _};
use redrive_kafka::{KafkaConsumer, KafkaPublisher};
use redrive_middleware::dead_letter::default_destination;
use serde_json::Value;

fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

/// A publisher that puts each record in a batch of its own.
fn publisher(brokers: &str) -> KafkaPublisher {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("batch.num.messages", "1")
        .set("linger.ms", "0");
    KafkaPublisher::from_config(config)
        .expect("publisher")
        .with_timeout(Duration::from_secs(10))
}

/// The records in `topic` (its high watermark, one partition).
async fn depth(brokers: &str, topic: &str) -> i64 {
    let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let client: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .expect("client");
        client
            .fetch_watermarks(&topic, 0, Duration::from_secs(10))
            .map(|(_, high)| high)
            .unwrap_or(0)
    })
    .await
    .expect("watermarks")
}

/// A fresh origin topic and its DLQ topic, one partition each.
struct Topics {
    brokers: String,
    origin: String,
    dlq: String,
}

impl Topics {
    async fn new(prefix: &str) -> Self {
        let brokers = brokers();
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .expect("admin client");
        let origin = redrive_core::testkit::unique_name(&format!("redrive-cli-{prefix}"));
        let dlq = default_destination(&origin);
        let created = tokio::time::timeout(
            Duration::from_secs(15),
            admin.create_topics(
                &[
                    NewTopic::new(&origin, 1, TopicReplication::Fixed(1)),
                    NewTopic::new(&dlq, 1, TopicReplication::Fixed(1)),
                ],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            ),
        )
        .await;
        match created {
            Ok(Ok(results)) => {
                for r in results {
                    r.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
                }
            }
            other => panic!(
                "the Kafka broker at {brokers} did not create the topics ({other:?}); start it \
                 with `source scripts/kafka-broker` (or run `scripts/test`), or set KAFKA_BROKERS"
            ),
        }
        Topics {
            brokers,
            origin,
            dlq,
        }
    }

    /// Publishes `bodies` to the origin, one at a time, and runs the Worker over it
    /// until the DLQ holds `dlq` records and the rest were handled.
    async fn fill(&self, bodies: &[String], dlq: i64) {
        let p = publisher(&self.brokers);
        for m in messages(bodies) {
            p.publish(&self.origin, m).await.expect("publish");
        }
        self.work(
            false,
            dlq,
            bodies.len() - usize::try_from(dlq).expect("dlq"),
        )
        .await;
    }

    /// Runs the Worker over the origin, in its group (which resumes where the last run
    /// committed), until the DLQ topic holds `dlq` records and it handled `handled`
    /// messages; returns their bodies, sorted.
    async fn work(&self, fixed: bool, dlq: i64, handled: usize) -> Vec<String> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let consumer = KafkaConsumer::builder(
            &self.brokers,
            &format!("{}-worker", self.origin),
            [&self.origin],
        )
        .commit_interval(Duration::from_millis(100))
        .close_timeout(Duration::from_secs(5))
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .build()
        .expect("consumer");
        let (brokers, dlq_name, counted) = (self.brokers.clone(), self.dlq.clone(), seen.clone());
        run_worker(
            consumer,
            Arc::new(publisher(&self.brokers)),
            fixed,
            seen.clone(),
            async move {
                wait_until(Duration::from_secs(40), "the Worker's run", || async {
                    depth(&brokers, &dlq_name).await == dlq
                        && counted.lock().expect("lock").len() == handled
                })
                .await;
            },
        )
        .await;
        let mut v = seen.lock().expect("lock").clone();
        v.sort();
        v
    }

    /// `redrive dlq <cmd> kafka://brokers/<topic> <topic> <more…> --json`.
    fn run(&self, cmd: &str, topic: &str, more: &[&str]) -> Value {
        let url = format!("kafka://{}/{topic}", self.brokers);
        let mut args = vec!["dlq", cmd, &url, topic];
        args.extend_from_slice(more);
        json(&args, &[])
    }

    /// The letters in the origin that came back by a replay (read by a group of their
    /// own, so the tool's group on the DLQ is not touched).
    fn replayed_to_origin(&self) -> Vec<String> {
        let group = format!("{}-check", self.origin);
        let list = self.run("list", &self.origin, &["--group", &group]);
        let mut v: Vec<String> = list["letters"]
            .as_array()
            .unwrap_or_else(|| panic!("no letters in {list}"))
            .iter()
            .filter(|l| l["replays"] == 1)
            .map(|l| l["id"].as_str().unwrap_or("?").to_owned())
            .collect();
        v.sort();
        v
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn stats_match_and_a_replay_of_every_letter_empties_the_dlq() {
    let t = Topics::new("all").await;
    t.fill(&known_bodies(), 5).await;

    let stats = t.run("stats", &t.dlq, &[]);
    assert_known_stats(&stats, &t.origin);
    let again = t.run("stats", &t.dlq, &[]);
    assert_eq!(again["read"], 5, "stats commits nothing: {again}");

    let done = t.run("replay", &t.dlq, &[]);
    assert_eq!(
        (
            &done["selected"],
            &done["replayed"],
            &done["failed"],
            &done["reread_next_run"]
        ),
        (&5.into(), &5.into(), &0.into(), &0.into()),
        "{done}"
    );
    assert_eq!(depth(&t.brokers, &t.origin).await, 7 + 5);
    let after = t.run("stats", &t.dlq, &[]);
    assert_eq!(
        (&after["read"], &after["total"]),
        (&0.into(), &0.into()),
        "every letter is past the tool group's committed offset: {after}"
    );
    assert_eq!(
        t.replayed_to_origin(),
        ["id-bad-1", "id-bad-2", "id-bad-3", "id-slow-1", "id-slow-2"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_filtered_replay_replays_exactly_the_selection() {
    let t = Topics::new("some").await;
    t.fill(&known_bodies(), 5).await;
    // The DLQ's order: which selected letters come after the first kept one.
    let list = t.run("list", &t.dlq, &[]);
    let order: Vec<String> = list["letters"]
        .as_array()
        .unwrap_or_else(|| panic!("no letters in {list}"))
        .iter()
        .map(|l| l["id"].as_str().unwrap_or("?").to_owned())
        .collect();
    assert_eq!(order.len(), 5, "{list}");
    let selected = |id: &String| id.starts_with("id-slow");
    let before_kept = order.iter().take_while(|id| selected(id)).count() as u64;
    let after_kept = 2 - before_kept;

    let dry = t.run("replay", &t.dlq, &["--kind", "exhausted", "--dry-run"]);
    assert_eq!(
        (&dry["read"], &dry["selected"], &dry["replayed"]),
        (&5.into(), &2.into(), &2.into()),
        "{dry}"
    );
    assert_eq!(
        depth(&t.brokers, &t.origin).await,
        7,
        "a dry run moves nothing"
    );

    let done = t.run("replay", &t.dlq, &["--kind", "exhausted"]);
    assert_eq!(
        (
            &done["read"],
            &done["selected"],
            &done["replayed"],
            &done["reread_next_run"]
        ),
        (&5.into(), &2.into(), &2.into(), &after_kept.into()),
        "{done} (DLQ order {order:?})"
    );
    assert_eq!(depth(&t.brokers, &t.origin).await, 7 + 2);
    assert_eq!(t.replayed_to_origin(), ["id-slow-1", "id-slow-2"]);
    // The bug is fixed: the Worker, resuming its group, handles them.
    assert_eq!(t.work(true, 5, 2).await, ["slow-1", "slow-2"]);

    // Only the letters before the first kept one are past the committed offset.
    let left = t.run("list", &t.dlq, &[]);
    assert_eq!(
        left["read"],
        5 - before_kept,
        "{left} (DLQ order {order:?})"
    );
    let mut want: Vec<String> = order.iter().skip(before_kept as usize).cloned().collect();
    want.sort();
    assert_eq!(ids(&left), want);

    // Purging every letter moves the offset to the end: nothing is read again.
    let purged = t.run("purge", &t.dlq, &["--yes"]);
    assert_eq!(
        (&purged["purged"], &purged["reread_next_run"]),
        (&(5 - before_kept).into(), &0.into()),
        "{purged}"
    );
    let after = t.run("stats", &t.dlq, &[]);
    assert_eq!(after["read"], 0, "{after}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_loop_guard_refuses_a_letter_that_failed_again() {
    let t = Topics::new("guard").await;
    let bodies: Vec<String> = ["bad-1", "bad-2", "bad-3"].map(str::to_owned).to_vec();
    t.fill(&bodies, 3).await;
    let replay = |more: &[&str]| {
        let mut args = vec!["--max-replays", "1"];
        args.extend_from_slice(more);
        t.run("replay", &t.dlq, &args)
    };
    let first = replay(&[]);
    assert_eq!(
        (&first["replayed"], &first["reread_next_run"]),
        (&3.into(), &0.into()),
        "{first}"
    );
    // Still broken: they come back to the DLQ, replayed once.
    assert!(t.work(false, 6, 0).await.is_empty());

    let guarded = replay(&[]);
    assert_eq!(
        (&guarded["read"], &guarded["replayed"], &guarded["refused"]),
        (&3.into(), &0.into(), &3.into()),
        "{guarded}"
    );
    assert_eq!(depth(&t.brokers, &t.origin).await, 3 + 3);
    // Refused letters stay before the group's committed offset: forced, they go back.
    let forced = replay(&["--force"]);
    assert_eq!(
        (&forced["read"], &forced["replayed"], &forced["refused"]),
        (&3.into(), &3.into(), &0.into()),
        "{forced}"
    );
    assert_eq!(depth(&t.brokers, &t.origin).await, 3 + 3 + 3);
    assert_eq!(t.run("stats", &t.dlq, &[])["read"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replay_killed_halfway_and_run_again_loses_nothing() {
    let t = Topics::new("kill").await;
    let bodies: Vec<String> = (0..100).map(|i| format!("bad-{i:03}")).collect();
    t.fill(&bodies, 100).await;

    let url = format!("kafka://{}/{}", t.brokers, t.dlq);
    let mut child = common::redrive(&["dlq", "replay", &url, &t.dlq, "--rate", "20"], &[])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    // Past the group join, a second and a half of replays (some committed, the last
    // ones not).
    wait_until(Duration::from_secs(40), "the first replays", || async {
        depth(&t.brokers, &t.origin).await >= 100 + 30
    })
    .await;
    child.kill().expect("SIGKILL");
    child.wait().expect("wait");
    let moved = depth(&t.brokers, &t.origin).await - 100;
    assert!(
        (30..90).contains(&moved),
        "killed halfway: {moved} replayed"
    );

    // The next run waits for the killed run's member to expire from the group, reads
    // from the committed offset and replays the rest.
    let again = t.run("replay", &t.dlq, &[]);
    assert_eq!(again["failed"], 0, "{again}");
    let resumed = again["replayed"].as_i64().expect("replayed");
    assert_eq!(t.run("stats", &t.dlq, &[])["read"], 0, "the DLQ is done");

    let mut got = t.replayed_to_origin();
    let total = got.len();
    let twice = got.windows(3).all(|w| !(w[0] == w[1] && w[1] == w[2]));
    got.dedup();
    let want: Vec<String> = bodies.iter().map(|b| format!("id-{b}")).collect();
    assert_eq!(got, want, "every letter is back at its origin");
    assert_eq!(total as i64, moved + resumed);
    // What the killed run replayed after its last commit (the adapter commits each
    // second; at 20/s about 20) is replayed again, once.
    assert!(twice, "no letter is at its origin three times");
    assert!(
        total <= 100 + 30,
        "{} duplicates, more than a commit interval's worth",
        total - 100
    );
}
