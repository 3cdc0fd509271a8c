//! The fault run, short version, on RabbitMQ (quorum and classic queues): two
//! `fault-consumer` processes consume `FAULT_RUN_MESSAGES` messages (default 2,000)
//! while the driver kills one of them (SIGKILL) and starts it again, restarts the
//! PostgreSQL that holds the idempotency keys and the effects, closes the consumers'
//! broker connections from the broker side, and restarts RabbitMQ. Then it checks that
//! every message that is not poison has exactly one row in `effects`, that the
//! dead-letter queue holds exactly the poison messages, each with its envelope, and that
//! nothing is left anywhere else, and prints a table of what it saw. A poison message
//! whose original's ack was lost after its dead letter was confirmed is dead-lettered
//! again when it comes back: such copies are counted in the table, not failed.
//!
//! Every fault must hit while messages still flow: the producer publishes at
//! `FAULT_RUN_RATE` messages a second (default 100), and a fault that comes after the
//! last effect fails the run.
//!
//! Needs RabbitMQ on `AMQP_URL` (default `amqp://127.0.0.1:5672`) with `rabbitmqctl`,
//! and PostgreSQL's server programs (`initdb`, `pg_ctl`): the driver runs a PostgreSQL
//! of its own on a free port, so it can restart it. The consumers' logs are kept under
//! the system's temporary directory (removed after a clean run); their paths are printed. The runs stop and start
//! the broker's application, so they run one at a time (a file-level lock), and a guard
//! starts the application again even when a run fails.

#[path = "../../middleware/tests/support/services.rs"]
mod services;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redrive_core::{OutgoingMessage, Publisher};
use redrive_fault_run::{ENV_AMQP_URL, ENV_CONSUMER, ENV_POSTGRES, ENV_QUEUE, ENV_QUEUE_KIND};
use redrive_fault_run::{Fate, SCHEMA, fate, message_id};
use redrive_middleware::dead_letter;
use redrive_middleware::idempotency::{MESSAGE_ID, PostgresStore};
use redrive_rabbitmq::lapin::options::{BasicGetOptions, QueueDeleteOptions};
use redrive_rabbitmq::lapin::types::AMQPValue;
use redrive_rabbitmq::{QueueKind, RabbitPublisher, Topology};
use tokio::process::{Child, Command};

/// One run at a time: each restarts the broker.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long the consumers may take to finish once the last fault is over.
const DRAIN: Duration = Duration::from_secs(150);
/// How long the run may go without progress before a fault is due.
const STALL: Duration = Duration::from_secs(90);

const HOW_TO_START: &str = "RabbitMQ is not reachable: start it with `rabbitmq-server -detached` \
     (then wait for `rabbitmqctl await_startup`), or point AMQP_URL at a running broker";

fn amqp_url() -> String {
    std::env::var(ENV_AMQP_URL).unwrap_or_else(|_| redrive_rabbitmq::DEFAULT_URL.to_owned())
}

/// Messages published a second: `FAULT_RUN_RATE`, default 100.
fn rate() -> u32 {
    std::env::var("FAULT_RUN_RATE").map_or(100, |n| {
        n.parse()
            .ok()
            .filter(|n| *n > 0)
            .unwrap_or_else(|| panic!("FAULT_RUN_RATE is `{n}`, not a positive number"))
    })
}

/// Messages in a run: `FAULT_RUN_MESSAGES`, default 2,000.
fn messages() -> usize {
    std::env::var("FAULT_RUN_MESSAGES").map_or(2_000, |n| {
        n.parse()
            .unwrap_or_else(|_| panic!("FAULT_RUN_MESSAGES is `{n}`, not a number"))
    })
}

/// Starts the broker's application again when dropped, so a failing run leaves the
/// broker running.
struct RestartOnDrop;

impl Drop for RestartOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .arg("start_app")
            .output();
    }
}

/// Runs `rabbitmqctl args…`, returning its stdout; panics with its stderr on failure.
async fn rabbitmqctl(args: &[&str]) -> String {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new("rabbitmqctl").args(args).output(),
    )
    .await
    .unwrap_or_else(|_| panic!("rabbitmqctl {args:?} did not finish within 60 s"))
    .unwrap_or_else(|e| panic!("cannot run rabbitmqctl {args:?}: {e}"));
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until the broker accepts connections again (up to 60 s).
async fn wait_for_broker() {
    let start = Instant::now();
    loop {
        match redrive_rabbitmq::connect(&amqp_url(), "redrive-fault-probe").await {
            Ok(c) => {
                let _ = c.close(200, "probe").await;
                return;
            }
            Err(e) if start.elapsed() > Duration::from_secs(60) => {
                panic!("{HOW_TO_START}: not back within 60 s: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// Messages in each queue whose name starts with `prefix` (ready and unacked), as the
/// broker counts them.
async fn queue_depths(prefix: &str) -> BTreeMap<String, u64> {
    let list = rabbitmqctl(&[
        "list_queues",
        "name",
        "messages",
        "--quiet",
        "--no-table-headers",
    ])
    .await;
    list.lines()
        .filter_map(|line| {
            let (name, n) = line.split_once('\t')?;
            let n = n.trim().parse().ok()?;
            name.starts_with(prefix).then(|| (name.to_owned(), n))
        })
        .collect()
}

/// One consumer process and its log.
struct ConsumerProcess {
    name: String,
    child: Child,
}

/// What one run shares between its steps.
struct Run {
    kind: QueueKind,
    queue: String,
    /// Connection names of this run's consumers start with it.
    prefix: String,
    postgres: String,
    logs: PathBuf,
}

impl Run {
    fn log(&self, name: &str) -> PathBuf {
        self.logs.join(format!("{name}.log"))
    }

    /// Starts a consumer named `name`, its output appended to its log.
    fn spawn(&self, name: &str) -> ConsumerProcess {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log(name))
            .expect("opening a consumer's log");
        let child = Command::new(env!("CARGO_BIN_EXE_fault-consumer"))
            .env(ENV_AMQP_URL, amqp_url())
            .env(ENV_QUEUE, &self.queue)
            .env(ENV_QUEUE_KIND, self.kind.as_str())
            .env(ENV_POSTGRES, &self.postgres)
            .env(ENV_CONSUMER, format!("{}{name}", self.prefix))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("the log's handle"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("starting fault-consumer");
        ConsumerProcess {
            name: name.to_owned(),
            child,
        }
    }
}

/// Sends SIGTERM to `process` and waits (up to 30 s) for it to exit; kills it after that.
async fn stop(process: &mut ConsumerProcess) -> bool {
    let Some(pid) = process.child.id() else {
        return true;
    };
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await;
    match tokio::time::timeout(Duration::from_secs(30), process.child.wait()).await {
        Ok(Ok(status)) => status.success(),
        _ => {
            let _ = process.child.kill().await;
            false
        }
    }
}

/// The driver's view of the effects table.
async fn distinct_effects(store: &PostgresStore) -> Option<u64> {
    let db = tokio::time::timeout(Duration::from_secs(5), store.pool().get())
        .await
        .ok()?
        .ok()?;
    let row = db
        .query_one("SELECT count(DISTINCT id) FROM effects", &[])
        .await
        .ok()?;
    u64::try_from(row.get::<_, i64>(0)).ok()
}

/// Waits until `distinct effects >= target`, or panics after [`STALL`] without progress.
async fn wait_for_progress(store: &PostgresStore, target: u64, what: &str) -> u64 {
    let mut last = (0, Instant::now());
    loop {
        let now = distinct_effects(store).await.unwrap_or(last.0);
        if now >= target {
            return now;
        }
        if now > last.0 {
            last = (now, Instant::now());
        }
        assert!(
            last.1.elapsed() < STALL,
            "no progress for {STALL:?} at {now} effects, waiting for {target} before {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Closes every connection of this run's consumers from the broker side; returns how
/// many it closed.
async fn cut_connections(prefix: &str) -> usize {
    let list = rabbitmqctl(&[
        "list_connections",
        "pid",
        "client_properties",
        "--quiet",
        "--no-table-headers",
    ])
    .await;
    let pids: Vec<String> = list
        .lines()
        .filter(|line| line.contains(&format!("\"{prefix}")))
        .filter_map(|line| line.split('\t').next().map(str::to_owned))
        .collect();
    // All at once: one rabbitmqctl takes about a second to start.
    let mut closing = tokio::task::JoinSet::new();
    for pid in pids.clone() {
        closing.spawn(async move {
            rabbitmqctl(&[
                "close_connection",
                &pid,
                "redrive fault run: connection cut",
            ])
            .await
        });
    }
    while let Some(done) = closing.join_next().await {
        done.expect("close_connection");
    }
    pids.len()
}

/// The value of an AMQP header as text.
fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// A dead letter: its message id and envelope headers.
#[derive(Debug)]
struct DeadLetter {
    id: String,
    headers: BTreeMap<String, String>,
}

/// Takes every message out of `queue`: each one's message id and text headers.
async fn drain(queue: &str) -> Vec<DeadLetter> {
    let conn = redrive_rabbitmq::connect(&amqp_url(), "redrive-fault-drain")
        .await
        .unwrap_or_else(|e| panic!("{HOW_TO_START}: {e}"));
    let ch = conn.create_channel().await.expect("channel");
    let mut out = Vec::new();
    while let Some(msg) = ch
        .basic_get(queue, BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
    {
        let props = &msg.delivery.properties;
        let headers = props
            .headers()
            .as_ref()
            .map(|h| {
                h.inner()
                    .iter()
                    .filter_map(|(k, v)| Some((k.as_str().to_owned(), text(v)?)))
                    .collect()
            })
            .unwrap_or_default();
        let id = props
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default();
        out.push(DeadLetter { id, headers });
    }
    let _ = conn.close(200, "drained").await;
    out
}

/// What a run saw, one row of the table.
#[derive(Debug, Default)]
struct Figures {
    messages: usize,
    poison: usize,
    kills: u32,
    restarts: u32,
    cuts: u32,
    lost: usize,
    duplicates: usize,
    duplicates_plain: usize,
    dead_lettered: usize,
    /// Dead letters beyond the first of their id.
    dead_lettered_again: usize,
    wall: Duration,
}

/// The faults of a run, with how far the run was when each hit.
struct Faults {
    /// Effects the run ends with.
    good: u64,
    started: Instant,
    /// What hit, when.
    hits: Vec<String>,
    /// What hit once every effect was there, and so tested nothing.
    late: Vec<String>,
}

impl Faults {
    /// Records that `what` has just hit, with `done` effects in.
    fn hit(&mut self, what: &str, done: u64) {
        self.hits.push(format!(
            "{what} at {:.0} % of the effects, {:.1} s in",
            done as f64 * 100.0 / self.good as f64,
            self.started.elapsed().as_secs_f64()
        ));
        if done >= self.good {
            self.late.push(what.to_owned());
        }
    }
}

/// The producer: publishes a run's messages at a steady rate, so the faults hit a
/// stream in flow, and stops publishing while the broker restarts.
struct Producer {
    /// Held for writing while the broker restarts: no publish is in flight then, so
    /// none can be lost or sent twice by the restart.
    gate: Arc<tokio::sync::RwLock<()>>,
    task: tokio::task::JoinHandle<Duration>,
}

impl Producer {
    /// Publishes `n` messages with ids to `queue`, `rate` a second, up to 64 awaiting
    /// their confirms.
    async fn start(queue: &str, n: usize, rate: u32) -> Self {
        let publisher = RabbitPublisher::connect_named(amqp_url(), "redrive-fault-producer")
            .await
            .unwrap_or_else(|e| panic!("{HOW_TO_START}: {e}"));
        let queue: Arc<str> = queue.into();
        let gate = Arc::new(tokio::sync::RwLock::new(()));
        let open = gate.clone();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..n {
                tick.tick().await;
                if tasks.len() >= 64 {
                    tasks.join_next().await.expect("a task").expect("publish");
                }
                let pass = open.clone().read_owned().await;
                let (publisher, queue) = (publisher.clone(), queue.clone());
                tasks.spawn(async move {
                    let id = message_id(i);
                    let msg = OutgoingMessage::new(format!("{{\"order\":\"{id}\"}}"))
                        .with_header(MESSAGE_ID, id.as_str())
                        .expect("a header");
                    tokio::time::timeout(Duration::from_secs(30), publisher.publish(&queue, msg))
                        .await
                        .unwrap_or_else(|_| panic!("publishing {id}: no confirm within 30 s"))
                        .unwrap_or_else(|e| panic!("publishing {id}: {e}"));
                    drop(pass);
                });
            }
            while let Some(done) = tasks.join_next().await {
                done.expect("publish");
            }
            publisher.close().await;
            started.elapsed()
        });
        Producer { gate, task }
    }
}

async fn fault_run(kind: QueueKind) -> Figures {
    let _serial = SERIAL.lock().await;
    let n = messages();
    let mut pg = tokio::task::block_in_place(services::PrivatePostgres::new);
    let store = PostgresStore::connect(&pg.params())
        .await
        .expect("the private PostgreSQL");
    store.migrate().await.expect("the idempotency table");
    store
        .pool()
        .get()
        .await
        .expect("a connection")
        .batch_execute(SCHEMA)
        .await
        .expect("the effects tables");

    let tag = format!("{:08x}", fastrand::u32(..));
    let queue = format!("redrive-fault-{}-{tag}", kind.as_str());
    let topology = Topology::new(&queue)
        .with_kind(kind)
        .with_dead_letter_queue(format!("{queue}-dlq"))
        .with_max_delay(Duration::from_secs(600));
    let conn = redrive_rabbitmq::connect(&amqp_url(), "redrive-fault-declare")
        .await
        .unwrap_or_else(|e| panic!("{HOW_TO_START}: {e}"));
    topology.declare(&conn).await.expect("declare the topology");
    let _ = conn.close(200, "declared").await;
    let logs = std::env::temp_dir().join(format!("redrive-fault-run-{}-{tag}", kind.as_str()));
    std::fs::create_dir_all(&logs).expect("the log directory");
    let run = Run {
        kind,
        prefix: format!("redrive-fault-{}-{tag}-", kind.as_str()),
        queue: queue.clone(),
        postgres: pg.params(),
        logs,
    };

    let ids: Vec<String> = (0..n).map(message_id).collect();
    let poison: BTreeSet<&str> = ids
        .iter()
        .filter(|id| fate(id) == Fate::Poison)
        .map(String::as_str)
        .collect();
    let good = (n - poison.len()) as u64;
    let started = Instant::now();
    let producer = Producer::start(&queue, n, rate()).await;

    let mut figures = Figures {
        messages: n,
        poison: poison.len(),
        ..Figures::default()
    };
    let mut a = run.spawn("a1");
    let mut b = run.spawn("b1");
    let mut faults = Faults {
        good,
        started,
        hits: Vec::new(),
        late: Vec::new(),
    };

    // The kill, at a random moment between 10 % and 25 % of the effects.
    let kill_at = good * fastrand::u64(10..=25) / 100;
    let waited = wait_for_progress(&store, kill_at, "the kill").await;
    a.child.start_kill().expect("SIGKILL");
    let _ = tokio::time::timeout(Duration::from_secs(10), a.child.wait()).await;
    figures.kills += 1;
    faults.hit(&format!("SIGKILL {}", a.name), waited);
    tokio::time::sleep(Duration::from_millis(500)).await;
    a = run.spawn("a2");

    // The PostgreSQL restart comes last: the consumers' circuit breakers open while it is
    // away and keep intake paused for 30 s, and the rest of the run goes fast after that.
    let waited = wait_for_progress(&store, good * 30 / 100, "the connection cut").await;
    let cut = cut_connections(&run.prefix).await;
    figures.cuts += 1;
    let done = distinct_effects(&store).await.unwrap_or(waited);
    faults.hit(&format!("{cut} connections cut"), done);

    let waited = wait_for_progress(&store, good * 50 / 100, "the RabbitMQ restart").await;
    {
        let _paused = producer.gate.write().await;
        let guard = RestartOnDrop;
        rabbitmqctl(&["stop_app"]).await;
        let done = distinct_effects(&store).await.unwrap_or(waited);
        faults.hit("RabbitMQ stopped", done);
        tokio::time::sleep(Duration::from_secs(1)).await;
        rabbitmqctl(&["start_app"]).await;
        std::mem::forget(guard);
        wait_for_broker().await;
    }
    figures.restarts += 1;

    let waited = wait_for_progress(&store, good * 75 / 100, "the PostgreSQL restart").await;
    tokio::task::block_in_place(|| pg.stop());
    faults.hit("PostgreSQL stopped", waited);
    tokio::task::block_in_place(|| pg.start());
    figures.restarts += 1;

    let published = tokio::time::timeout(DRAIN, producer.task)
        .await
        .expect("the producer did not finish")
        .expect("the producer");

    // Every good message's effect, every poison message dead-lettered, every queue of
    // the run but the dead-letter queue empty.
    let dlq = format!("{queue}-dlq");
    let deadline = Instant::now() + DRAIN;
    let mut settled = false;
    while Instant::now() < deadline {
        let effects = distinct_effects(&store).await.unwrap_or(0);
        let depths = queue_depths(&queue).await;
        let dead = depths.get(&dlq).copied().unwrap_or(0);
        let left: u64 = depths
            .iter()
            .filter(|(name, _)| **name != dlq)
            .map(|(_, n)| n)
            .sum();
        if effects >= good && dead >= poison.len() as u64 && left == 0 {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Late duplicates, if any, have a moment to show.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let wall = started.elapsed();
    let stopped_a = stop(&mut a).await;
    let stopped_b = stop(&mut b).await;

    // The verdict, from the tables and the queues.
    let db = store.pool().get().await.expect("a connection");
    let count = |table: &str| {
        let db = &db;
        let sql = format!("SELECT id, count(*) FROM {table} GROUP BY id");
        async move {
            db.query(&sql, &[])
                .await
                .expect("reading the effects")
                .into_iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
                .collect::<BTreeMap<String, i64>>()
        }
    };
    let effects = count("effects").await;
    let plain = count("effects_plain").await;
    let duplicate_rows = db
        .query(
            "SELECT id, consumer, at::text FROM effects WHERE id IN \
             (SELECT id FROM effects GROUP BY id HAVING count(*) > 1) ORDER BY id, at",
            &[],
        )
        .await
        .expect("reading the duplicates");
    let leftovers = queue_depths(&queue).await;
    let dead_letters = drain(&dlq).await;
    let dead_ids: BTreeMap<&str, usize> = dead_letters.iter().fold(BTreeMap::new(), |mut m, d| {
        *m.entry(d.id.as_str()).or_default() += 1;
        m
    });

    let lost: Vec<&str> = ids
        .iter()
        .map(String::as_str)
        .filter(|id| !poison.contains(id) && !effects.contains_key(*id))
        .collect();
    let duplicated: Vec<(&String, &i64)> = effects.iter().filter(|(_, n)| **n > 1).collect();
    let poison_with_effect: Vec<&String> = effects
        .keys()
        .filter(|id| poison.contains(id.as_str()))
        .collect();
    let poison_missing: Vec<&&str> = poison
        .iter()
        .filter(|id| !dead_ids.contains_key(**id))
        .collect();
    let dead_not_poison: Vec<&&str> = dead_ids
        .keys()
        .filter(|id| !poison.contains(**id))
        .collect();
    let dead_twice: Vec<(&&str, &usize)> = dead_ids.iter().filter(|(_, n)| **n > 1).collect();
    let incomplete: Vec<String> = dead_letters
        .iter()
        .filter_map(|d| {
            let missing = envelope_problems(d, &queue);
            (!missing.is_empty()).then(|| format!("{}: {}", d.id, missing.join(", ")))
        })
        .collect();
    let left_behind: Vec<(&String, &u64)> = leftovers
        .iter()
        .filter(|(name, n)| **name != dlq && **n > 0)
        .collect();

    figures.lost = lost.len();
    figures.duplicates = duplicated.iter().map(|(_, n)| (**n - 1) as usize).sum();
    figures.duplicates_plain = plain.values().map(|n| (*n - 1) as usize).sum();
    figures.dead_lettered = dead_letters.len();
    figures.dead_lettered_again = dead_twice.iter().map(|(_, n)| **n - 1).sum();
    figures.wall = wall;

    let mut report = String::new();
    let _ = writeln!(
        report,
        "fault run on a {} queue: {n} messages published in {published:.1?}; faults: {}; \
         consumer logs in {}",
        kind.as_str(),
        faults.hits.join(", "),
        run.logs.display()
    );
    if !settled {
        let _ = writeln!(report, "not settled within {DRAIN:?} of the last fault");
    }
    if !(stopped_a && stopped_b) {
        let _ = writeln!(report, "a consumer did not stop cleanly on SIGTERM");
    }
    for row in &duplicate_rows {
        let _ = writeln!(
            report,
            "duplicate effect: {} by {} at {}",
            row.get::<_, String>(0),
            row.get::<_, String>(1),
            row.get::<_, String>(2)
        );
    }
    if !dead_twice.is_empty() {
        // The dead letter was confirmed, then the original's ack was lost with its
        // connection: the redelivery is dead-lettered again. At-least-once, like any
        // publish followed by an ack; the copies carry the same message id.
        let _ = writeln!(report, "dead-lettered more than once: {dead_twice:?}");
    }
    println!("{report}");
    print_table(&[(kind, &figures)]);
    // Leave the queues when something is wrong, for a look; else remove them.
    let clean = lost.is_empty()
        && duplicated.is_empty()
        && poison_with_effect.is_empty()
        && poison_missing.is_empty()
        && dead_not_poison.is_empty()
        && incomplete.is_empty()
        && left_behind.is_empty();
    if clean {
        delete_queues(&topology).await;
        let _ = std::fs::remove_dir_all(&run.logs);
    }
    assert!(lost.is_empty(), "lost (no effect): {lost:?}\n{report}");
    assert!(
        duplicated.is_empty(),
        "duplicate effects in the transactional table: {duplicated:?}\n{report}"
    );
    assert!(
        poison_with_effect.is_empty(),
        "poison with an effect: {poison_with_effect:?}"
    );
    assert!(
        poison_missing.is_empty(),
        "poison not in the DLQ: {poison_missing:?}\n{report}"
    );
    assert!(
        dead_not_poison.is_empty(),
        "good messages in the DLQ: {dead_not_poison:?}\n{report}"
    );
    assert!(
        incomplete.is_empty(),
        "dead letters without a complete envelope: {incomplete:?}"
    );
    assert!(
        left_behind.is_empty(),
        "messages left in the run's queues: {left_behind:?}\n{report}"
    );
    assert!(stopped_a && stopped_b, "{report}");
    assert!(
        faults.late.is_empty(),
        "{:?} came after the last effect, so tested nothing; raise FAULT_RUN_MESSAGES\n{report}",
        faults.late
    );
    figures
}

/// What is missing or wrong in a dead letter's envelope.
fn envelope_problems(d: &DeadLetter, queue: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let expect = |name: &str, ok: &dyn Fn(&str) -> bool, problems: &mut Vec<String>| match d
        .headers
        .get(name)
    {
        Some(v) if ok(v) => {}
        Some(v) => problems.push(format!("{name} = {v:?}")),
        None => problems.push(format!("no {name}")),
    };
    let any = |_: &str| true;
    expect(
        dead_letter::ORIGINAL_SYSTEM,
        &|v| v == "rabbitmq",
        &mut problems,
    );
    expect(
        dead_letter::ORIGINAL_DESTINATION,
        &|v| v == queue,
        &mut problems,
    );
    expect(
        dead_letter::ERROR_KIND,
        &|v| v == "permanent",
        &mut problems,
    );
    expect(
        dead_letter::ERROR_MESSAGE,
        &|v| v.contains("is poison"),
        &mut problems,
    );
    expect(
        dead_letter::ATTEMPTS,
        &|v| v.parse::<u32>().is_ok_and(|n| n >= 1),
        &mut problems,
    );
    expect(dead_letter::FIRST_FAILURE_AT, &any, &mut problems);
    expect(dead_letter::LAST_FAILURE_AT, &any, &mut problems);
    expect(dead_letter::CONSUMER, &any, &mut problems);
    problems
}

/// Deletes the run's queue, its dead-letter queue and its delay queues.
async fn delete_queues(topology: &Topology) {
    let Ok(conn) = redrive_rabbitmq::connect(&amqp_url(), "redrive-fault-cleanup").await else {
        return;
    };
    if let Ok(ch) = conn.create_channel().await {
        let mut names = vec![topology.queue().to_owned()];
        names.extend(topology.dead_letter_queue().map(str::to_owned));
        names.extend(topology.delay_queues());
        for q in names {
            let _ = ch.queue_delete(&q, QueueDeleteOptions::default()).await;
        }
    }
    let _ = conn.close(200, "done").await;
}

fn print_table(rows: &[(QueueKind, &Figures)]) {
    println!(
        "| broker | messages | kills | restarts | cuts | lost | duplicate effects (transactional) \
         | duplicate effects (plain) | dead-lettered (poison ids, copies) | wall time |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (kind, f) in rows {
        println!(
            "| RabbitMQ {} | {} | {} | {} | {} | {} | {} | {} | {} ({}, {}) | {:.1} s |",
            kind.as_str(),
            f.messages,
            f.kills,
            f.restarts,
            f.cuts,
            f.lost,
            f.duplicates,
            f.duplicates_plain,
            f.dead_lettered,
            f.poison,
            f.dead_lettered_again,
            f.wall.as_secs_f64()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_quorum_queue_loses_nothing_and_duplicates_no_effect() {
    fault_run(QueueKind::Quorum).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_classic_queue_loses_nothing_and_duplicates_no_effect() {
    fault_run(QueueKind::Classic).await;
}
