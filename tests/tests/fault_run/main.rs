//! The fault run: two `fault-consumer` processes consume `FAULT_RUN_MESSAGES` messages
//! (default 2,000) from one broker while the driver kills them (SIGKILL) and starts
//! them again, cuts their broker connections, restarts the broker where it keeps its
//! data across a restart, and restarts the PostgreSQL that holds the idempotency keys
//! and the effects. Then it checks that every message that is not poison has exactly
//! one row in `effects`, that the dead-letter queue holds exactly the poison messages,
//! each with its envelope, and that nothing is left anywhere else, and prints a table
//! of what it saw.
//!
//! One test per broker: a RabbitMQ quorum queue and a classic queue ([`rabbitmq`]),
//! the SQS emulator ([`sqs`]) and tansu ([`kafka`]). The short version (the default:
//! one kill, one cut, one broker restart, one PostgreSQL restart) runs in the test
//! command; `scripts/fault-run` runs the full one (`FAULT_RUN_MESSAGES=100000`,
//! `FAULT_RUN_KILLS=3`, `FAULT_RUN_CUTS=2`). A broker that cannot be restarted here
//! with its data (the SQS emulator keeps nothing, and real SQS never restarts from a
//! client's view) gets one more cut instead.
//!
//! Every fault must hit while messages still flow: the producer publishes at
//! `FAULT_RUN_RATE` messages a second (default 100), and a fault that comes after the
//! last effect fails the run. A poison message whose original's ack was lost after its
//! dead letter was confirmed is dead-lettered again when it comes back: such copies
//! are counted in the table, not failed.
//!
//! Needs PostgreSQL's server programs (`initdb`, `pg_ctl`): the driver runs a
//! PostgreSQL of its own on a free port, so it can restart it. The consumers' logs are
//! kept under the system's temporary directory (removed after a clean run); their
//! paths are printed. The runs go one at a time (a file-level lock): the machine has
//! few cores, and the RabbitMQ runs restart the broker.

mod kafka;
mod rabbitmq;
#[path = "../../../middleware/tests/support/services.rs"]
mod services;
mod sqs;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::future::Future;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redrive_core::{Consumer, OutgoingMessage, Publisher};
use redrive_fault_run::{Broker, ENV_BROKER, ENV_BROKER_URL, ENV_CONSUMER, ENV_POSTGRES};
use redrive_fault_run::{ENV_QUEUE, Fate, SCHEMA, fate, message_id};
use redrive_middleware::dead_letter;
use redrive_middleware::idempotency::{MESSAGE_ID, PostgresStore};
use tokio::process::{Child, Command};

/// One run at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long the producer may take beyond its planned time.
const DRAIN: Duration = Duration::from_secs(150);
/// How long the run may go without progress before a fault is due.
const STALL: Duration = Duration::from_secs(90);

/// A positive number from the environment variable `name`, or `default`.
fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name).map_or(default, |n| {
        n.parse()
            .ok()
            .filter(|n| *n > 0)
            .unwrap_or_else(|| panic!("{name} is `{n}`, not a positive number"))
    })
}

/// The broker side of a run: what the driver does to one broker.
pub trait Target: Send + Sync + 'static {
    /// What the producer publishes with.
    type Producer: Publisher + Clone;

    /// The broker.
    fn broker(&self) -> Broker;
    /// The address the consumers connect to.
    fn url(&self) -> String;
    /// The queue or topic; its dead-letter queue is `<queue>-dlq`.
    fn queue(&self) -> &str;
    /// A publisher for the producer.
    fn producer(&self) -> impl Future<Output = Self::Producer> + Send;
    /// Messages not yet done in the run's queues (the dead-letter queue aside), and
    /// messages in the dead-letter queue.
    fn depths(&self) -> impl Future<Output = Depths> + Send;
    /// Takes every dead letter out of the dead-letter queue; `expected` is how many
    /// there should be at least.
    fn dead_letters(&self, expected: usize) -> impl Future<Output = Vec<DeadLetter>> + Send;
    /// Cuts every broker connection of the consumers whose names start with `prefix`;
    /// returns how many it cut.
    fn cut(&self, prefix: &str) -> impl Future<Output = usize> + Send;
    /// Whether [`restart`](Target::restart) can restart the broker with its data; a
    /// broker that cannot gets one more cut instead.
    fn can_restart(&self) -> bool {
        false
    }
    /// Stops the broker and starts it again; returns once it accepts connections.
    /// Called only when [`can_restart`](Target::can_restart) says so.
    fn restart(&self) -> impl Future<Output = ()> + Send {
        async { unreachable!("restart called on a broker that cannot restart") }
    }
    /// Removes the run's queues (after a clean run).
    fn cleanup(&self) -> impl Future<Output = ()> + Send;
}

/// Queue depths, as the broker counts them.
#[derive(Clone, Copy, Debug, Default)]
pub struct Depths {
    /// Messages not yet done: ready, in flight, delayed, or not yet committed.
    pub pending: u64,
    /// Messages in the dead-letter queue.
    pub dead: u64,
}

/// A dead letter: its message id and envelope headers.
#[derive(Debug)]
pub struct DeadLetter {
    /// Its message id.
    pub id: String,
    /// Its headers whose values are text.
    pub headers: BTreeMap<String, String>,
}

/// One consumer process.
struct ConsumerProcess {
    name: String,
    child: Child,
}

/// What one run shares between its steps.
struct Run {
    broker: Broker,
    url: String,
    queue: String,
    /// Consumer names (and their connections' names) start with it.
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
            .env(ENV_BROKER, self.broker.name())
            .env(ENV_BROKER_URL, &self.url)
            .env(ENV_QUEUE, &self.queue)
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

/// A fault the driver brings about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Kill,
    Cut,
    BrokerRestart,
    PostgresRestart,
}

/// The faults of a run, in order: kills and cuts alternating, then the broker's
/// restart (one more cut where the broker cannot restart with its data), then
/// PostgreSQL's. PostgreSQL comes last: the consumers' circuit breakers open while it
/// is away and keep intake paused for 30 s, and the rest of the run goes fast after.
fn schedule(kills: u64, cuts: u64, can_restart: bool) -> Vec<Fault> {
    let (mut k, mut c) = (kills, cuts);
    let mut plan = Vec::new();
    while k + c > 0 {
        if k > 0 {
            plan.push(Fault::Kill);
            k -= 1;
        }
        if c > 0 {
            plan.push(Fault::Cut);
            c -= 1;
        }
    }
    plan.push(if can_restart {
        Fault::BrokerRestart
    } else {
        Fault::Cut
    });
    plan.push(Fault::PostgresRestart);
    plan
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
    /// Publishes `n` messages with ids (and keys) to `queue`, `rate` a second, up to
    /// 64 awaiting their confirms.
    fn start<P: Publisher + Clone>(publisher: P, queue: &str, n: usize, rate: u64) -> Self {
        let queue: Arc<str> = queue.into();
        let gate = Arc::new(tokio::sync::RwLock::new(()));
        let open = gate.clone();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_secs(1) / rate as u32);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
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
                        .with_key(id.clone())
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
            started.elapsed()
        });
        Producer { gate, task }
    }
}

/// Runs the fault run against `target` and checks its outcome; returns its figures.
async fn fault_run<T: Target>(target: T) -> Figures {
    let _serial = SERIAL.lock().await;
    let broker = target.broker();
    let n = usize::try_from(setting("FAULT_RUN_MESSAGES", 2_000)).expect("a count");
    let plan = schedule(
        setting("FAULT_RUN_KILLS", 1),
        setting("FAULT_RUN_CUTS", 1),
        target.can_restart(),
    );
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

    let queue = target.queue().to_owned();
    let logs = std::env::temp_dir().join(&queue);
    std::fs::create_dir_all(&logs).expect("the log directory");
    let run = Run {
        broker,
        url: target.url(),
        prefix: format!("{queue}-"),
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
    let rate = setting("FAULT_RUN_RATE", 100);
    let producer = Producer::start(target.producer().await, &queue, n, rate);

    let mut figures = Figures {
        messages: n,
        poison: poison.len(),
        ..Figures::default()
    };
    let mut consumers = [run.spawn("a1"), run.spawn("b1")];
    let mut faults = Faults {
        good,
        started,
        hits: Vec::new(),
        late: Vec::new(),
    };

    // Fault i of m hits at about 10 % + i × 65 % / (m - 1) of the effects.
    let m = plan.len() as u64;
    for (i, fault) in plan.iter().enumerate() {
        let at = 10 + i as u64 * 65 / (m - 1).max(1);
        let at = good * fastrand::u64(at.saturating_sub(4).max(5)..=at + 4) / 100;
        let waited = wait_for_progress(&store, at, &format!("{fault:?}")).await;
        match fault {
            Fault::Kill => {
                let slot = figures.kills as usize % 2;
                let victim = &mut consumers[slot];
                victim.child.start_kill().expect("SIGKILL");
                let _ = tokio::time::timeout(Duration::from_secs(10), victim.child.wait()).await;
                faults.hit(&format!("SIGKILL {}", victim.name), waited);
                figures.kills += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
                let name = format!(
                    "{}{}",
                    if slot == 0 { "a" } else { "b" },
                    figures.kills / 2 + 2
                );
                consumers[slot] = run.spawn(&name);
            }
            Fault::Cut => {
                let cut = target.cut(&run.prefix).await;
                figures.cuts += 1;
                let done = distinct_effects(&store).await.unwrap_or(waited);
                faults.hit(&format!("{cut} connections cut"), done);
            }
            Fault::BrokerRestart => {
                let _paused = producer.gate.write().await;
                faults.hit("broker restart", waited);
                target.restart().await;
                figures.restarts += 1;
            }
            Fault::PostgresRestart => {
                tokio::task::block_in_place(|| pg.stop());
                faults.hit("PostgreSQL stopped", waited);
                tokio::task::block_in_place(|| pg.start());
                figures.restarts += 1;
            }
        }
    }

    let publishing = Duration::from_secs(n as u64 / rate) + DRAIN;
    let published = tokio::time::timeout(publishing, producer.task)
        .await
        .expect("the producer did not finish")
        .expect("the producer");

    // Every good message's effect, every poison message dead-lettered, every queue of
    // the run but the dead-letter queue empty; given up after STALL without progress.
    let mut settled = false;
    let mut last = (0, Instant::now());
    while last.1.elapsed() < STALL {
        let effects = distinct_effects(&store).await.unwrap_or(0);
        let depths = target.depths().await;
        if effects >= good && depths.dead >= poison.len() as u64 && depths.pending == 0 {
            settled = true;
            break;
        }
        let progress = effects + depths.dead;
        if progress > last.0 {
            last = (progress, Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Late duplicates, if any, have a moment to show.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let wall = started.elapsed();
    let mut stopped = true;
    for consumer in &mut consumers {
        stopped &= stop(consumer).await;
    }

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
    let left = target.depths().await.pending;
    let dead_letters = target.dead_letters(poison.len()).await;
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
            let missing = envelope_problems(d, broker, &queue);
            (!missing.is_empty()).then(|| format!("{}: {}", d.id, missing.join(", ")))
        })
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
        "fault run on {}: {n} messages published in {published:.1?}; faults: {}; \
         consumer logs in {}",
        broker.title(),
        faults.hits.join(", "),
        run.logs.display()
    );
    if !settled {
        let _ = writeln!(report, "not settled: no progress for {STALL:?}");
    }
    if !stopped {
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
    print_table(&[(broker, &figures)]);
    // Leave the queues and logs when something is wrong, for a look; else remove them.
    let clean = lost.is_empty()
        && duplicated.is_empty()
        && poison_with_effect.is_empty()
        && poison_missing.is_empty()
        && dead_not_poison.is_empty()
        && incomplete.is_empty()
        && left == 0;
    if clean {
        target.cleanup().await;
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
        left == 0,
        "{left} messages left in the run's queues\n{report}"
    );
    assert!(stopped, "{report}");
    assert!(
        faults.late.is_empty(),
        "{:?} came after the last effect, so tested nothing; raise FAULT_RUN_MESSAGES\n{report}",
        faults.late
    );
    figures
}

/// What is missing or wrong in a dead letter's envelope.
fn envelope_problems(d: &DeadLetter, broker: Broker, queue: &str) -> Vec<String> {
    let system = match broker {
        Broker::RabbitQuorum | Broker::RabbitClassic => "rabbitmq",
        Broker::Sqs => "aws_sqs",
        Broker::Kafka => "kafka",
    };
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
        &|v| v == system,
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

fn print_table(rows: &[(Broker, &Figures)]) {
    println!(
        "| broker | messages | kills | restarts | cuts | lost | duplicate effects (transactional) \
         | duplicate effects (plain) | dead-lettered (poison ids, copies) | wall time |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (broker, f) in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} ({}, {}) | {:.1} s |",
            broker.title(),
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

/// Takes every message from `consumer` until it has `expected` and then nothing more
/// comes for 3 s, or 60 s have passed: each one's message id and text headers.
async fn drain(consumer: &mut impl Consumer, expected: usize) -> Vec<DeadLetter> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut out = Vec::new();
    while Instant::now() < deadline {
        let idle = if out.len() >= expected {
            Duration::from_secs(3)
        } else {
            deadline.saturating_duration_since(Instant::now())
        };
        let Ok(next) = tokio::time::timeout(idle, consumer.receive()).await else {
            break;
        };
        let Some(delivery) = next.expect("receiving a dead letter") else {
            break;
        };
        let headers = delivery
            .message
            .headers
            .iter()
            .filter_map(|(k, v)| Some((k.to_owned(), v.as_str()?.to_owned())))
            .collect();
        let id = delivery
            .message
            .headers
            .get_str(redrive_middleware::idempotency::MESSAGE_ID)
            .unwrap_or_default()
            .to_owned();
        delivery.ack().await.expect("acking a dead letter");
        out.push(DeadLetter { id, headers });
    }
    let _ = consumer.close().await;
    out
}

/// A tag that tells this run's queues from others'.
fn tag() -> String {
    format!("{:08x}", fastrand::u32(..))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_quorum_loses_nothing_and_duplicates_no_effect() {
    fault_run(rabbitmq::Rabbit::new(redrive_rabbitmq::QueueKind::Quorum).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_classic_loses_nothing_and_duplicates_no_effect() {
    fault_run(rabbitmq::Rabbit::new(redrive_rabbitmq::QueueKind::Classic).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_loses_nothing_and_duplicates_no_effect() {
    fault_run(sqs::Sqs::new().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_loses_nothing_and_duplicates_no_effect() {
    fault_run(kafka::Kafka::new().await).await;
}
