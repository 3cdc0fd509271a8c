//! [`shutdown_signal`](redrive_core::shutdown_signal) in a real process: this test binary
//! runs itself as a child whose Worker runs until the signal, sends the child SIGTERM or
//! SIGINT as a container runtime or a terminal would, and reads what the child prints.
#![cfg(all(unix, feature = "memory"))]

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use redrive_core::memory::MemoryBroker;
use redrive_core::{BoxError, Message, OutgoingMessage, Publisher, Shutdown, Worker, handler_fn};

const CHILD: &str = "child_runs_a_worker_until_the_shutdown_signal";
const MODE: &str = "REDRIVE_TEST_SIGNAL_CHILD";
/// 20 messages of 300 ms each, two at a time: the Worker is busy for 3 s unless stopped.
const MESSAGES: u32 = 20;

/// The child: a Worker on the in-memory broker that runs until the shutdown signal,
/// then prints its Report. Each call prints when it starts and finishes; in the mode
/// `stuck`, a call started before shutdown never finishes. Log events are printed as
/// `log LEVEL target fields`.
#[test]
#[ignore = "run as a child process by the tests below"]
fn child_runs_a_worker_until_the_shutdown_signal() {
    let mode = std::env::var(MODE).unwrap_or_else(|_| panic!("{MODE} is set by the parent test"));
    let stuck = match mode.as_str() {
        "drain" => false,
        "stuck" => true,
        other => panic!("{MODE}={other}: expected `drain` or `stuck`"),
    };
    tracing::subscriber::set_global_default(Lines).expect("the only subscriber");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let report = runtime.block_on(async {
        let broker = MemoryBroker::new();
        for i in 0..MESSAGES {
            broker
                .publish("orders", OutgoingMessage::new(i.to_string()))
                .await
                .expect("publish");
        }
        let handler = handler_fn(move |msg: Message| async move {
            let id = String::from_utf8_lossy(&msg.payload).into_owned();
            eprintln!("started {id}");
            if stuck {
                if let Some(shutdown) = msg.extensions.get::<Shutdown>() {
                    shutdown.started().await;
                }
                eprintln!("draining {id}");
                tokio::time::sleep(Duration::from_secs(60)).await;
            } else {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            eprintln!("finished {id}");
            Ok::<_, BoxError>(())
        });
        Worker::builder(broker.consumer("orders"))
            .service(handler)
            .concurrency(2)
            .shutdown_timeout(Duration::from_secs(60))
            .build()
            .expect("worker")
            .run_until(redrive_core::shutdown_signal())
            .await
    });
    eprintln!("report {report:?}");
}

#[test]
fn sigterm_drains_the_worker_and_the_process_exits_0() {
    drains_on("TERM", "SIGTERM");
}

#[test]
fn ctrl_c_drains_the_worker_and_the_process_exits_0() {
    drains_on("INT", "SIGINT (Ctrl-C)");
}

/// Sends `signal` while calls run: they finish, the Report is printed, the process exits 0.
fn drains_on(signal: &str, logged_as: &str) {
    let mut child = ChildRun::start("drain");
    child.wait_for("started ", Duration::from_secs(15));
    child.signal(signal);
    let (status, lines) = child.exit(Duration::from_secs(15));
    let all = lines.join("\n");
    assert_eq!(
        status.code(),
        Some(0),
        "the child should drain and exit 0 on {signal}, it ended with {status}:\n{all}"
    );
    let ids = |prefix: &str| -> BTreeSet<&str> {
        lines
            .iter()
            .filter_map(|l| l.strip_prefix(prefix))
            .collect()
    };
    let (started, finished) = (ids("started "), ids("finished "));
    assert!(!started.is_empty(), "no call started:\n{all}");
    assert_eq!(
        started, finished,
        "every call in flight at the signal should finish:\n{all}"
    );
    assert!(
        started.len() < MESSAGES as usize,
        "the signal should stop intake before the queue is empty:\n{all}"
    );
    let report = lines
        .iter()
        .find_map(|l| l.strip_prefix("report "))
        .unwrap_or_else(|| panic!("the child printed no Report:\n{all}"));
    assert!(
        report.contains(&format!("processed: {},", finished.len()))
            && report.contains("in_flight_at_deadline: 0,"),
        "the Report should count the drained calls as processed: {report}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("log INFO redrive_core")
            && l.contains(&format!("signal={logged_as:?}"))),
        "the signal should be logged at info, named {logged_as:?}:\n{all}"
    );
}

#[test]
fn a_second_signal_exits_at_once() {
    let mut child = ChildRun::start("stuck");
    child.wait_for("started ", Duration::from_secs(15));
    child.signal("TERM");
    child.wait_for("draining ", Duration::from_secs(5));
    let sent = Instant::now();
    child.signal("INT");
    let (status, lines) = child.exit(Duration::from_secs(5));
    let all = lines.join("\n");
    assert_eq!(
        status.code(),
        Some(130),
        "a second signal (SIGINT) should exit with 130 at once, the child ended with {status}:\n{all}"
    );
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "exited {:?} after the second signal",
        sent.elapsed()
    );
    assert!(
        !lines.iter().any(|l| l.starts_with("report ")),
        "the Worker should not have finished draining:\n{all}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("log WARN redrive_core")
            && l.contains("second shutdown signal")),
        "the exit should be logged at warn:\n{all}"
    );
}

/// The child process and the lines it printed, read as they come.
struct ChildRun {
    process: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl ChildRun {
    fn start(mode: &str) -> Self {
        let mut process = Command::new(std::env::current_exe().expect("this test binary"))
            .args([
                "--ignored",
                "--exact",
                CHILD,
                "--nocapture",
                "--test-threads=1",
            ])
            .env(MODE, mode)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the child");
        let (tx, lines) = mpsc::channel();
        forward(
            process.stdout.take().expect("piped"),
            "stdout: ",
            tx.clone(),
        );
        forward(process.stderr.take().expect("piped"), "", tx);
        ChildRun {
            process,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a line that starts with `prefix`.
    fn wait_for(&mut self, prefix: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.starts_with(prefix);
                    self.seen.push(line);
                    if found {
                        return;
                    }
                }
                Err(e) => panic!(
                    "no line starting with {prefix:?} within {within:?} ({e}); the child printed:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Sends `signal` (a name `kill` knows: TERM, INT) to the child.
    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.process.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed: {status}");
    }

    /// Waits for the child to exit; returns how it ended and every line it printed.
    fn exit(mut self, within: Duration) -> (ExitStatus, Vec<String>) {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                // Both pipes closed: the child is gone.
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                    "the child did not exit within {within:?}; it printed:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
        let status = self.process.wait().expect("wait for the child");
        (status, std::mem::take(&mut self.seen))
    }
}

impl Drop for ChildRun {
    fn drop(&mut self) {
        if matches!(self.process.try_wait(), Ok(None)) {
            let _ = self.process.kill();
            let _ = self.process.wait();
        }
    }
}

/// Sends each line of `pipe` to `tx`, prefixed, until the pipe closes.
fn forward(pipe: impl Read + Send + 'static, prefix: &'static str, tx: mpsc::Sender<String>) {
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(format!("{prefix}{line}")).is_err() {
                break;
            }
        }
    });
}

/// Prints log events at info and above as `log LEVEL target field=value...`.
struct Lines;

impl tracing::Subscriber for Lines {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        *metadata.level() <= tracing::Level::INFO
    }

    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }

    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = Fields(String::new());
        event.record(&mut fields);
        let metadata = event.metadata();
        eprintln!("log {} {}{}", metadata.level(), metadata.target(), fields.0);
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}

struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, " {}={value:?}", field.name());
    }
}
