//! `redrive`: look into a dead-letter queue, put a selection of its letters back where
//! they came from at a rate, or purge them; on RabbitMQ, SQS and Kafka.
//!
//! Every command reads the DLQ through a consumer and holds the letters it keeps until
//! it ends, then hands them back, so a run sees each letter once and a letter leaves
//! the DLQ only once it was republished (confirmed) or purged. A run killed at any
//! point leaves each letter in the DLQ or back at its origin, at worst both.
//!
//! On Kafka a DLQ is a topic, read by a consumer group of the tool's own, whose
//! committed offset marks what the tool has removed (see `kafka.rs`).

mod broker;
mod commands;
mod kafka;
mod report;
mod settled;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::{Args, Parser, Subcommand};
use redrive_middleware::dead_letter::{Replay, Selection};

use crate::broker::{BrokerUrl, Connect};

/// Inspect, replay and purge dead letters.
#[derive(Debug, Parser)]
#[command(name = "redrive", version, about)]
struct Cli {
    /// A settings file in the library's format (`redrive.toml`): its `[replay]` section
    /// sets replay's defaults (max_replays, rate, in_flight, destination), which flags
    /// override; `REDRIVE_REPLAY__<KEY>` variables override the file.
    #[arg(long, global = true, env = "REDRIVE_CONFIG", value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Top,
}

#[derive(Debug, Subcommand)]
enum Top {
    /// Dead-letter queues: stats, list, show, replay, purge.
    ///
    /// On Kafka (kafka://host:port/topic) a DLQ is a topic, read by a consumer group of
    /// the tool's own (`redrive-dlq-<topic>`, or `--group`) from the earliest offset, and
    /// Kafka never deletes a record: "removed" means "before the tool group's committed
    /// offset". stats, list and show read every letter after it and commit nothing.
    /// replay and purge remove a letter by moving the committed offset past it, which
    /// only moves over a contiguous run: a letter kept (not selected, refused, a dry
    /// run) holds its partition's offset. The letters replayed or purged after it are
    /// kept as done in the offset's metadata, as far as it holds them, and the next run
    /// skips them; on a broker that drops commit metadata the next run reads them again
    /// (and a replay would replay them again). A run prints their count as a warning;
    /// selecting every letter, or running again until none is kept, avoids it. Do not
    /// run two commands on one group at once.
    #[command(subcommand)]
    Dlq(Dlq),
}

#[derive(Debug, Subcommand)]
enum Dlq {
    /// Totals by error kind, error message, origin and age, with a bar chart.
    Stats {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        selection: SelectionArgs,
        /// How many error messages to show.
        #[arg(long, default_value_t = 10)]
        top: usize,
    },
    /// One line per letter (the selection's, all by default).
    List {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        selection: SelectionArgs,
        /// At most this many letters.
        #[arg(long)]
        limit: Option<u64>,
    },
    /// One letter: its envelope, headers and payload.
    Show {
        #[command(flatten)]
        target: Target,
        /// The letter's id (`message-id`, the original message's id, or the broker's).
        id: String,
        /// The whole payload, not its first 1 KiB.
        #[arg(long)]
        raw: bool,
    },
    /// Puts the selected letters back at their origin (or `--to`), at a rate.
    ///
    /// On Kafka a replayed letter is removed by moving the tool group's committed offset
    /// past it, which cannot pass a letter the run kept: letters replayed after a kept
    /// one are read, and would be replayed, again by the next run. The run prints their
    /// count; selecting every letter, or running until none is kept, avoids it.
    Replay {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        selection: SelectionArgs,
        /// Where to put them instead of each one's origin.
        #[arg(long)]
        to: Option<String>,
        /// At most this many letters a second (default: no limit, or `--config`'s).
        #[arg(long, value_parser = parse_rate)]
        rate: Option<f64>,
        /// At most this many selected letters.
        #[arg(long)]
        limit: Option<u64>,
        /// Publishes awaiting the broker's confirmation at once (default 16, or
        /// `--config`'s; on Kafka 1 unless given here). More is faster; a run killed
        /// mid-way may leave up to this many letters both replayed and still in the DLQ.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        in_flight: Option<u16>,
        /// Counts what would be replayed; replays nothing.
        #[arg(long)]
        dry_run: bool,
        /// The loop guard: refuses letters already replayed this many times (default 3,
        /// or `--config`'s).
        #[arg(long)]
        max_replays: Option<u32>,
        /// Replays letters past the loop guard too.
        #[arg(long)]
        force: bool,
    },
    /// Removes the selected letters for good.
    ///
    /// On Kafka no record is deleted: a purged letter is moved behind the tool group's
    /// committed offset, which cannot pass a letter the run kept; letters purged after
    /// a kept one are kept as done in its metadata as far as it holds them (the run
    /// prints their count).
    Purge {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        selection: SelectionArgs,
        /// At most this many selected letters.
        #[arg(long)]
        limit: Option<u64>,
        /// Does not ask (required when stdin is not a terminal).
        #[arg(long, short)]
        yes: bool,
    },
}

/// The DLQ and how to reach it.
#[derive(Debug, Args)]
struct Target {
    /// amqp://user:pass@host:5672/vhost, amqps://…, an SQS endpoint or queue URL
    /// http(s)://host/account/queue, or `kafka://host:port[,host:port…][/topic]`.
    broker_url: String,
    /// The DLQ: a queue name (or a queue URL on SQS; a topic on Kafka).
    dlq: String,
    /// Kafka: the tool's consumer group, whose committed offset marks the letters
    /// removed (default `redrive-dlq-<topic>`).
    #[arg(long)]
    group: Option<String>,
    /// One JSON document on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// RabbitMQ: the most letters a run reads (the consumer's prefetch; a run holds every
    /// letter it keeps until it ends).
    #[arg(long, default_value_t = 10_000)]
    prefetch: u16,
    /// SQS: the endpoint, instead of the URL's (an emulator).
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    endpoint_url: Option<String>,
    /// SQS: the visibility timeout to receive with; longer than the run.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    visibility: Duration,
    /// How long a wait for the next letter means the DLQ has been read to its end (on
    /// Kafka a run ends once each partition was read to its end at the start; this wait
    /// is the fallback).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    idle: Duration,
}

/// Which letters: every condition given must hold.
#[derive(Debug, Args, Default)]
struct SelectionArgs {
    /// Error kind (permanent, exhausted, abandoned); repeatable.
    #[arg(long)]
    kind: Vec<String>,
    /// Errors containing this text.
    #[arg(long)]
    error_contains: Option<String>,
    /// The queue it came from; repeatable.
    #[arg(long)]
    origin: Vec<String>,
    /// Dead-lettered at or after: RFC 3339, or a duration ago (`2h`).
    #[arg(long, value_parser = parse_time)]
    since: Option<SystemTime>,
    /// Dead-lettered before: RFC 3339, or a duration ago (`30m`).
    #[arg(long, value_parser = parse_time)]
    until: Option<SystemTime>,
    /// The letter with this id; repeatable.
    #[arg(long)]
    id: Vec<String>,
}

impl SelectionArgs {
    fn selection(&self) -> Selection {
        let mut s = Selection::all();
        for k in &self.kind {
            s = s.with_kind(k.clone());
        }
        if let Some(text) = &self.error_contains {
            s = s.with_error_containing(text.clone());
        }
        for o in &self.origin {
            s = s.with_origin(o.clone());
        }
        if let Some(t) = self.since {
            s = s.since(t);
        }
        if let Some(t) = self.until {
            s = s.until(t);
        }
        for id in &self.id {
            s = s.with_id(id.clone());
        }
        s
    }
}

/// An RFC 3339 time, or a duration before now.
fn parse_time(text: &str) -> Result<SystemTime, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(text) {
        return Ok(t);
    }
    match humantime::parse_duration(text) {
        Ok(ago) => SystemTime::now()
            .checked_sub(ago)
            .ok_or_else(|| format!("`{text}` ago is before the epoch")),
        Err(_) => Err(format!(
            "`{text}` is neither an RFC 3339 time (2026-01-31T12:00:00Z) nor a duration ago (2h, 30m)"
        )),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("redrive: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let result = run(cli).await;
        // lapin's I/O threads finish closing the connections on this runtime's reactor:
        // a moment for them, or they log errors as it shuts down.
        tokio::time::sleep(Duration::from_millis(100)).await;
        result
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("redrive: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Warnings to stderr, without the adapters' start-up advice about the queue's own
/// dead-letter guard (a DLQ has none, on purpose).
fn init_logging() {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = Targets::new()
        .with_default(LevelFilter::WARN)
        .with_target("redrive_rabbitmq::consumer::builder", LevelFilter::ERROR)
        .with_target("redrive_sqs::consumer", LevelFilter::ERROR);
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false),
        )
        .with(filter)
        .try_init();
}

/// A rate: letters a second, above 0.
fn parse_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!(
            "`{text}` is not a rate: give letters a second above 0 (500, 2.5)"
        )),
    }
}

/// Replay's defaults: `Replay::default()`, or the `[replay]` section of the settings
/// file (and its environment variables) when `--config` names one.
fn replay_defaults(config: Option<&std::path::Path>) -> Result<Replay, String> {
    match config {
        None => Ok(Replay::default()),
        Some(path) => redrive::config::Settings::load(path)
            .and_then(|s| s.replay())
            .map_err(|e| e.to_string()),
    }
}

async fn run(cli: Cli) -> Result<ExitCode, String> {
    let defaults = replay_defaults(cli.config.as_deref())?;
    let Top::Dlq(cmd) = cli.command;
    let target = match &cmd {
        Dlq::Stats { target, .. }
        | Dlq::List { target, .. }
        | Dlq::Show { target, .. }
        | Dlq::Replay { target, .. }
        | Dlq::Purge { target, .. } => target,
    };
    let url = BrokerUrl::parse(&target.broker_url)?;
    let connect = Connect {
        prefetch: target.prefetch,
        endpoint_url: target.endpoint_url.clone(),
        visibility: target.visibility,
    };
    let needs_publisher = matches!(&cmd, Dlq::Replay { dry_run: false, .. });
    let in_flight_given = matches!(
        &cmd,
        Dlq::Replay {
            in_flight: Some(_),
            ..
        }
    );
    // The bar's total, for its ETA: only where a bar is shown.
    let wants_depth =
        std::io::stderr().is_terminal() && matches!(&cmd, Dlq::Replay { .. } | Dlq::Purge { .. });
    match &url {
        BrokerUrl::Rabbit(amqp) => {
            let dlq = target.dlq.clone();
            let depth = match wants_depth {
                true => broker::rabbit_depth(amqp, &dlq).await,
                false => None,
            };
            let consumer = broker::rabbit_consumer(amqp, &dlq, &connect).await?;
            let publisher = if needs_publisher {
                Some(broker::rabbit_publisher(amqp).await?)
            } else {
                None
            };
            let ctx = commands::Context {
                where_: url.display(),
                dlq,
                json: target.json,
                idle: target.idle,
                read_cap: Some(u64::from(target.prefetch)),
                depth: depth.map(|d| d.min(u64::from(target.prefetch))),
                reread: None,
            };
            let closing = publisher.clone();
            let code = commands::run(cmd_of(cmd, &defaults), ctx, consumer, publisher).await;
            if let Some(p) = closing {
                p.close().await;
            }
            code
        }
        BrokerUrl::Sqs { endpoint, .. } => {
            let dlq = target.dlq.clone();
            let sqs = broker::sqs(endpoint, &connect).await;
            let depth = match wants_depth {
                true => broker::sqs_depth(&sqs, &dlq).await,
                false => None,
            };
            let consumer = settled::Settled::new(
                broker::sqs_consumer(&sqs, &dlq, &connect).await?,
                Duration::from_secs(10),
            );
            let publisher = needs_publisher.then(|| broker::sqs_publisher(&sqs));
            let ctx = commands::Context {
                where_: url.display(),
                dlq,
                json: target.json,
                idle: target.idle,
                read_cap: None,
                depth,
                reread: None,
            };
            commands::run(cmd_of(cmd, &defaults), ctx, consumer, publisher).await
        }
        BrokerUrl::Kafka { brokers, topic } => {
            let dlq = target.dlq.clone();
            if let Some(topic) = topic.as_ref().filter(|t| **t != dlq) {
                return Err(format!(
                    "the URL names the topic `{topic}` and the DLQ argument `{dlq}`: give one \
                     topic"
                ));
            }
            let group = target
                .group
                .clone()
                .unwrap_or_else(|| kafka::default_group(&dlq));
            let extent = kafka::extent(brokers, &group, &dlq).await?;
            let publisher = match needs_publisher {
                true => Some(kafka::publisher(brokers)?),
                false => None,
            };
            let consumer = kafka::consumer(brokers, &group, &dlq)?;
            let consumer = kafka::KafkaDlq::start(consumer, &extent, &group).await?;
            let ctx = commands::Context {
                where_: url.display(),
                dlq,
                json: target.json,
                idle: target.idle,
                read_cap: None,
                depth: Some(extent.depth()),
                reread: Some(consumer.reread()),
            };
            let command = match in_flight_given {
                true => cmd_of(cmd, &defaults),
                false => one_at_a_time(cmd_of(cmd, &defaults)),
            };
            commands::run(command, ctx, consumer, publisher).await
        }
    }
}

/// On Kafka a replay publishes one letter at a time unless `--in-flight` says
/// otherwise: each record goes to the broker in a produce request of its own, which
/// every Kafka-protocol broker counts exactly (tansu 0.6 miscounts a partition's high
/// watermark after multi-record batches), and reaches its origin in the DLQ's order.
/// With more in flight the order holds while every publish succeeds (the producer is
/// idempotent, and the publishes are queued in the DLQ's order); a letter whose publish
/// fails stays in the DLQ while later ones go.
fn one_at_a_time(cmd: commands::Command) -> commands::Command {
    match cmd {
        commands::Command::Replay { selection, replay } => commands::Command::Replay {
            selection,
            replay: replay.with_in_flight(1),
        },
        other => other,
    }
}

/// The command, without the target; a replay starts from `defaults`.
fn cmd_of(cmd: Dlq, defaults: &Replay) -> commands::Command {
    use commands::Command;
    match cmd {
        Dlq::Stats { selection, top, .. } => Command::Stats {
            selection: selection.selection(),
            top,
        },
        Dlq::List {
            selection, limit, ..
        } => Command::List {
            selection: selection.selection(),
            limit,
        },
        Dlq::Show { id, raw, .. } => Command::Show { id, raw },
        Dlq::Replay {
            selection,
            to,
            rate,
            in_flight,
            limit,
            dry_run,
            max_replays,
            force,
            ..
        } => {
            let mut replay = defaults.clone();
            if let Some(n) = max_replays {
                replay = replay.with_max_replays(n);
            }
            if let Some(to) = to {
                replay = replay.to(to);
            }
            if let Some(rate) = rate {
                replay = replay.with_rate(rate);
            }
            if let Some(n) = in_flight {
                replay = replay.with_in_flight(usize::from(n));
            }
            if let Some(n) = limit {
                replay = replay.with_limit(n);
            }
            if dry_run {
                replay = replay.dry_run();
            }
            if force {
                replay = replay.forced();
            }
            Command::Replay {
                selection: selection.selection(),
                replay,
            }
        }
        Dlq::Purge {
            selection,
            limit,
            yes,
            ..
        } => Command::Purge {
            selection: selection.selection(),
            limit,
            yes,
        },
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }

    #[test]
    fn times_are_rfc3339_or_a_duration_ago() {
        let t = super::parse_time("2026-01-31T12:00:00Z").unwrap();
        assert_eq!(
            humantime::format_rfc3339(t).to_string(),
            "2026-01-31T12:00:00Z"
        );
        let ago = super::parse_time("2h").unwrap();
        let d = std::time::SystemTime::now().duration_since(ago).unwrap();
        assert!((7199..7202).contains(&d.as_secs()), "{d:?}");
        assert!(super::parse_time("yesterday").is_err());
    }
}
