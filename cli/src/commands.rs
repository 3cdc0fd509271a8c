//! The commands, on any adapter's DLQ consumer and publisher.

use std::io::{IsTerminal, Write as _};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use indicatif::{ProgressBar, ProgressStyle};
use redrive_core::{Consumer, Publisher};
use redrive_middleware::dead_letter::{DeadLetterQueue, Letter, Progress, Replay, Selection};
use serde_json::json;

use crate::report::{self, Stats};

/// A command, its target read.
#[derive(Debug)]
pub(crate) enum Command {
    Stats {
        selection: Selection,
        top: usize,
    },
    List {
        selection: Selection,
        limit: Option<u64>,
    },
    Show {
        id: String,
        raw: bool,
    },
    Replay {
        selection: Selection,
        replay: Replay,
    },
    Purge {
        selection: Selection,
        limit: Option<u64>,
        yes: bool,
    },
}

/// What every command needs besides the consumer.
#[derive(Debug)]
pub(crate) struct Context {
    /// The broker, for messages.
    pub(crate) where_: String,
    pub(crate) dlq: String,
    pub(crate) json: bool,
    pub(crate) idle: Duration,
    /// The most letters one run can hold (a RabbitMQ prefetch), to warn when reached.
    pub(crate) read_cap: Option<u64>,
    /// The letters in the DLQ before the run, where known: the progress bar's total.
    pub(crate) depth: Option<u64>,
    /// Kafka: the letters this run removed after one it kept, which the next run reads
    /// again (the committed offset stops at the first kept letter).
    pub(crate) reread: Option<crate::kafka::Reread>,
}

impl Context {
    fn warn_if_capped(&self, read: u64, kept: u64) {
        if self.read_cap.is_some_and(|cap| kept >= cap && read >= cap) {
            eprintln!(
                "redrive: warning: {read} letters read, as many as the prefetch allows a run to \
                 hold; the DLQ may have more: raise --prefetch (at most 65535)"
            );
        }
    }

    /// Kafka: how many letters this run `verb` after a letter it kept, which the next
    /// run may read again; warns on stderr when there are any.
    fn warn_reread(&self, verb: &str) -> Option<u64> {
        let n = self.reread.as_ref()?.count();
        if n > 0 {
            eprintln!(
                "redrive: warning: {n} letters {verb} after a letter this run kept: Kafka's \
                 committed offset cannot move past a kept letter. Its metadata keeps them as \
                 done for the next run as far as it holds them (about 280 runs of them at \
                 worst); on a broker that drops commit metadata the next run reads them \
                 again (and a replay would replay them again). Selecting every letter, or \
                 running again until none is kept, avoids it."
            );
        }
        Some(n)
    }
}

/// Runs `cmd` on the DLQ `consumer` reads; `publisher` is there for a replay that is
/// not a dry run.
pub(crate) async fn run<C: Consumer, P: Publisher>(
    cmd: Command,
    ctx: Context,
    consumer: C,
    publisher: Option<P>,
) -> Result<ExitCode, String> {
    let mut dlq = DeadLetterQueue::new(consumer).with_idle(ctx.idle);
    let result = match cmd {
        Command::Stats { selection, top } => stats(&mut dlq, &ctx, &selection, top).await,
        Command::List { selection, limit } => list(&mut dlq, &ctx, &selection, limit).await,
        Command::Show { id, raw } => show(&mut dlq, &ctx, &id, raw).await,
        Command::Replay { selection, replay } => {
            replay_cmd(&mut dlq, &ctx, &selection, &replay, publisher.as_ref()).await
        }
        Command::Purge {
            selection,
            limit,
            yes,
        } => purge(&mut dlq, &ctx, &selection, limit, yes).await,
    };
    if let Err(e) = dlq.close().await {
        if ctx.reread.is_some() && result.is_ok() {
            // Kafka: the close commits the offsets that remove the letters.
            return Err(format!(
                "committing the consumer group's offsets failed ({e}): the letters this run \
                 replayed or purged are read again by the next run"
            ));
        }
        eprintln!("redrive: closing the consumer: {e}");
    }
    result
}

fn print_json(v: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer_pretty(&mut out, v);
    let _ = writeln!(out);
}

async fn stats<C: Consumer>(
    dlq: &mut DeadLetterQueue<C>,
    ctx: &Context,
    selection: &Selection,
    top: usize,
) -> Result<ExitCode, String> {
    let now = SystemTime::now();
    let mut stats = Stats::default();
    let p = dlq
        .scan(selection, None, |l| stats.add(l, now))
        .await
        .map_err(|e| format!("reading the DLQ: {e}"))?;
    ctx.warn_if_capped(p.read, p.read);
    if ctx.json {
        let mut v = stats.json(top);
        v["dlq"] = json!(ctx.dlq);
        v["read"] = json!(p.read);
        print_json(&v);
    } else {
        println!("{} at {}: {} read", ctx.dlq, ctx.where_, p.read);
        print!("{}", stats.text(top));
    }
    Ok(ExitCode::SUCCESS)
}

async fn list<C: Consumer>(
    dlq: &mut DeadLetterQueue<C>,
    ctx: &Context,
    selection: &Selection,
    limit: Option<u64>,
) -> Result<ExitCode, String> {
    let now = SystemTime::now();
    let mut letters: Vec<Letter> = Vec::new();
    let p = dlq
        .scan(selection, limit, |l| letters.push(l.clone()))
        .await
        .map_err(|e| format!("reading the DLQ: {e}"))?;
    ctx.warn_if_capped(p.read, p.read);
    if ctx.json {
        let v: Vec<_> = letters
            .iter()
            .map(|l| report::letter_json(l, now, false, false))
            .collect();
        print_json(&json!({ "dlq": ctx.dlq, "read": p.read, "letters": v }));
    } else {
        println!("{}", report::list_header());
        for l in &letters {
            println!("{}", report::letter_line(l, now));
        }
        println!("{} of {} letters", letters.len(), p.read);
    }
    Ok(ExitCode::SUCCESS)
}

async fn show<C: Consumer>(
    dlq: &mut DeadLetterQueue<C>,
    ctx: &Context,
    id: &str,
    raw: bool,
) -> Result<ExitCode, String> {
    let now = SystemTime::now();
    let mut found: Option<Letter> = None;
    let p = dlq
        .scan(&Selection::all().with_id(id), Some(1), |l| {
            found = Some(l.clone());
        })
        .await
        .map_err(|e| format!("reading the DLQ: {e}"))?;
    let Some(letter) = found else {
        ctx.warn_if_capped(p.read, p.read);
        return Err(format!(
            "no letter `{id}` among the {} read from {}",
            p.read, ctx.dlq
        ));
    };
    if ctx.json {
        print_json(&report::letter_json(&letter, now, true, raw));
    } else {
        print!("{}", report::letter_text(&letter, now, raw));
    }
    Ok(ExitCode::SUCCESS)
}

/// A future that completes at the first Ctrl-C, and the flag it sets.
fn ctrl_c() -> (Arc<AtomicBool>, impl Future<Output = ()>) {
    let flag = Arc::new(AtomicBool::new(false));
    let set = flag.clone();
    let fut = async move {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
        set.store(true, Ordering::SeqCst);
    };
    (flag, fut)
}

/// Shows a run's progress on stderr: a bar on a terminal, a line a second otherwise.
struct Meter {
    bar: Option<ProgressBar>,
    /// Whether the bar counts letters read (out of the DLQ's depth) rather than selected.
    by_read: bool,
    verb: &'static str,
    started: Instant,
    last_line: Instant,
    /// When the first and the last selected letter were done: the rate is between
    /// them, without the connect, the first receive, and the idle wait that finds the
    /// queue's end.
    first_done: Option<Instant>,
    last_done: Instant,
}

impl Meter {
    /// A bar over the selected letters when there is a `limit`, else over the letters
    /// read when the DLQ's `depth` is known, else a spinner.
    fn new(verb: &'static str, limit: Option<u64>, depth: Option<u64>) -> Self {
        let by_read = limit.is_none() && depth.is_some();
        let bar = std::io::stderr().is_terminal().then(|| {
            let (bar, template) = match (limit, depth) {
                (Some(n), _) => (
                    ProgressBar::new(n),
                    "{spinner} [{elapsed_precise}] [{bar:30}] {pos}/{len} selected, {per_sec}, eta {eta}  {msg}",
                ),
                (None, Some(n)) => (
                    ProgressBar::new(n),
                    "{spinner} [{elapsed_precise}] [{bar:30}] {pos}/{len} read, {per_sec}, eta {eta}  {msg}",
                ),
                (None, None) => (
                    ProgressBar::new_spinner(),
                    "{spinner} [{elapsed_precise}] {pos} selected, {per_sec}  {msg}",
                ),
            };
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("#>-"));
            }
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Meter {
            bar,
            by_read,
            verb,
            started: Instant::now(),
            last_line: Instant::now(),
            first_done: None,
            last_done: Instant::now(),
        }
    }

    fn update(&mut self, p: &Progress) {
        self.last_done = Instant::now();
        self.first_done.get_or_insert(self.last_done);
        match &self.bar {
            Some(bar) => {
                bar.set_position(if self.by_read { p.read } else { p.selected });
                bar.set_message(format!(
                    "{} {}, refused {}, failed {}",
                    self.verb, p.done, p.refused, p.failed
                ));
            }
            None if self.last_line.elapsed() >= Duration::from_secs(1) => {
                self.last_line = Instant::now();
                let secs = self.started.elapsed().as_secs_f64();
                eprintln!(
                    "redrive: read {} selected {} {} {} refused {} failed {} ({:.0}/s)",
                    p.read,
                    p.selected,
                    self.verb,
                    p.done,
                    p.refused,
                    p.failed,
                    p.done as f64 / secs.max(0.001)
                );
            }
            None => {}
        }
    }

    /// Ends the display; the run's time, and the rate of `done` letters between the
    /// first and the last (over the whole run when there were fewer than two).
    fn finish(&self, done: u64) -> (Duration, f64) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        let took = self.started.elapsed();
        let rate = match self.first_done {
            Some(first) if done >= 2 && self.last_done > first => {
                (done - 1) as f64 / (self.last_done - first).as_secs_f64()
            }
            _ => done as f64 / took.as_secs_f64().max(0.001),
        };
        (took, rate)
    }
}

async fn replay_cmd<C: Consumer, P: Publisher>(
    dlq: &mut DeadLetterQueue<C>,
    ctx: &Context,
    selection: &Selection,
    replay: &Replay,
    publisher: Option<&P>,
) -> Result<ExitCode, String> {
    if let Some(rate) = replay.rate.filter(|r| !(r.is_finite() && *r > 0.0)) {
        return Err(format!(
            "--rate {rate}: give a number of letters a second above 0"
        ));
    }
    let (stopped, stop) = ctrl_c();
    let mut meter = Meter::new(
        if replay.dry_run {
            "would replay"
        } else {
            "replayed"
        },
        replay.limit,
        ctx.depth,
    );
    let p = match publisher {
        Some(publisher) => {
            dlq.replay(publisher, selection, replay, |p| meter.update(p), stop)
                .await
        }
        // A dry run publishes nothing: any publisher will do, and none is connected.
        None => {
            dlq.replay(&NoPublisher, selection, replay, |p| meter.update(p), stop)
                .await
        }
    };
    let p = p.map_err(|e| {
        meter.finish(0);
        format!("reading the DLQ: {e}")
    })?;
    let (took, rate) = meter.finish(p.done);
    let kept = p.read - if replay.dry_run { 0 } else { p.done };
    ctx.warn_if_capped(p.read, kept);
    let reread = ctx.warn_reread("replayed");
    let stopped = stopped.load(Ordering::SeqCst);
    if ctx.json {
        print_json(&json!({
            "dlq": ctx.dlq,
            "dry_run": replay.dry_run,
            "read": p.read,
            "selected": p.selected,
            "replayed": p.done,
            "refused": p.refused,
            "no_origin": p.no_origin,
            "failed": p.failed,
            "stopped": stopped,
            "seconds": took.as_secs_f64(),
            "per_second": rate,
            "reread_next_run": reread,
        }));
    } else {
        println!(
            "{}{}: read {}, selected {}, {} {}, refused {} (loop guard), no origin {}, failed {} \
             in {:.1}s ({rate:.0}/s)",
            ctx.dlq,
            if stopped { " (stopped by Ctrl-C)" } else { "" },
            p.read,
            p.selected,
            if replay.dry_run {
                "would replay"
            } else {
                "replayed"
            },
            p.done,
            p.refused,
            p.no_origin,
            p.failed,
            took.as_secs_f64(),
        );
        if p.refused > 0 {
            println!(
                "  {} letters were replayed {} times or more already: --force replays them anyway, \
                 --max-replays raises the guard",
                p.refused, replay.max_replays
            );
        }
    }
    Ok(if p.failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

async fn purge<C: Consumer>(
    dlq: &mut DeadLetterQueue<C>,
    ctx: &Context,
    selection: &Selection,
    limit: Option<u64>,
    yes: bool,
) -> Result<ExitCode, String> {
    if !yes {
        if !std::io::stdin().is_terminal() {
            return Err(
                "purge removes letters for good: pass --yes (stdin is not a terminal to ask on)"
                    .to_owned(),
            );
        }
        let which = if *selection == Selection::all() {
            "EVERY letter".to_owned()
        } else {
            "the selected letters".to_owned()
        };
        eprint!(
            "Remove {which}{} from `{}` at {} for good? (`replay --dry-run` counts them) [y/N] ",
            limit.map_or(String::new(), |n| format!(" (at most {n})")),
            ctx.dlq,
            ctx.where_
        );
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        let _ = std::io::stdin().read_line(&mut answer);
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            eprintln!("redrive: nothing purged");
            return Ok(ExitCode::FAILURE);
        }
    }
    let (stopped, stop) = ctrl_c();
    let mut meter = Meter::new("purged", limit, ctx.depth);
    let p = dlq.purge(selection, limit, |p| meter.update(p), stop).await;
    let p = p.map_err(|e| {
        meter.finish(0);
        format!("reading the DLQ: {e}")
    })?;
    let (took, _) = meter.finish(p.done);
    ctx.warn_if_capped(p.read, p.read - p.done);
    let reread = ctx.warn_reread("purged");
    let stopped = stopped.load(Ordering::SeqCst);
    if ctx.json {
        print_json(&json!({
            "dlq": ctx.dlq,
            "read": p.read,
            "selected": p.selected,
            "purged": p.done,
            "failed": p.failed,
            "stopped": stopped,
            "seconds": took.as_secs_f64(),
            "reread_next_run": reread,
        }));
    } else {
        println!(
            "{}{}: read {}, selected {}, purged {}, failed {} in {:.1}s",
            ctx.dlq,
            if stopped { " (stopped by Ctrl-C)" } else { "" },
            p.read,
            p.selected,
            p.done,
            p.failed,
            took.as_secs_f64()
        );
    }
    Ok(if p.failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The publisher of a dry run, which publishes nothing.
struct NoPublisher;

impl Publisher for NoPublisher {
    async fn publish(
        &self,
        destination: &str,
        _message: redrive_core::OutgoingMessage,
    ) -> redrive_core::Result<()> {
        Err(redrive_core::Error::broker(format!(
            "a dry run publishes nothing (to `{destination}`)"
        )))
    }
}
