//! `redrive::config`: a TOML file and environment variables configure a Stack and a
//! Worker; a wrong key or value is an error naming it, and its line or variable.
//!
//! Tests that read the environment run in figment's `Jail`, which sets the variables
//! for one test at a time (in a temporary directory of its own) and restores them.

use std::sync::Arc;
use std::time::Duration;

use figment::Jail;
use redrive::config::{Settings, SettingsError};
use redrive::memory::MemoryBroker;
use redrive::middleware::Stack;
use redrive::middleware::dead_letter::{DeadLetterConfig, DeadLetterLayer};
use redrive::middleware::idempotency::{IdempotencyConfig, IdempotencyLayer, MemoryStore};
use redrive::middleware::rate_limit::RateLimitConfig;
use redrive::middleware::retry::{RetryConfig, RetryLayer};
use redrive::middleware::trace::TraceLayer;
use redrive::{BoxError, Message, OrderingMode, OutgoingMessage, Publisher, Worker, handler};

/// examples/quickstart.rs's settings, with a timeout, a rate limit and a breaker.
const QUICKSTART: &str = r#"
[worker]
name = "quickstart"
concurrency = 32
ordering = "per_key"
redelivery = { initial = "10ms", max = "100ms" }

[retry]
max_tries = 3
backoff = { initial = "5ms", max = "50ms" }

[dead_letter]
max_attempts = 4
consumer_name = "quickstart"

[idempotency]
lease = "1m"
ttl = "12h"

[timeout]
per_try = "2s"

[rate_limit]
limit = 500
burst = 50

[circuit_breaker]
consecutive_failures = 10
open_for = "5s"
"#;

/// Runs `f` in a jail whose directory holds `redrive.toml` with `toml` in it.
#[allow(
    clippy::result_large_err,
    reason = "figment's Jail takes a closure that returns figment's Result"
)]
fn jail(toml: &str, f: impl FnOnce(&mut Jail)) {
    Jail::expect_with(|jail| {
        jail.create_file("redrive.toml", toml)?;
        f(jail);
        Ok(())
    });
}

fn toml_error(toml: &str) -> SettingsError {
    Settings::from_toml_str(toml).expect_err("the settings should be refused")
}

#[test]
fn a_file_and_the_environment_configure_the_stack_and_the_worker() {
    jail(QUICKSTART, |jail| {
        jail.set_env("REDRIVE_RETRY__MAX_TRIES", 4);
        jail.set_env("REDRIVE_DEAD_LETTER__DESTINATION", "orders-poison");
        jail.set_env("REDRIVE_WORKER__MAX_WAITING", 7);
        // Shares the prefix without naming a section: left alone.
        jail.set_env("REDRIVE_TEST_UNRELATED", "whatever");

        let settings = Settings::load("redrive.toml").expect("valid settings");
        let broker = MemoryBroker::new();
        let stack = Stack::new()
            .trace(TraceLayer::new())
            .dead_letter_layer(settings.dead_letter(Arc::new(broker.clone())).unwrap())
            .circuit_breaker(settings.circuit_breaker().unwrap())
            .idempotency_layer(settings.idempotency(Arc::new(MemoryStore::new())).unwrap())
            .rate_limit(settings.rate_limit().unwrap())
            .retry(settings.retry().unwrap())
            .timeout(settings.timeout().unwrap());
        assert_eq!(
            stack.describe(),
            // max_tries from the environment (4, not 3): retries after 5, 10 and 20 ms.
            "trace -> dead_letter(max_attempts=4, to=orders-poison) -> \
             circuit_breaker(consecutive_failures=10, open_for=5s) -> \
             idempotency(lease=60s, ttl=43200s) -> rate_limit(500/1s) -> \
             retry(max_tries=4, window=35ms, budget) -> timeout(2s) -> handler"
        );
        assert_eq!(
            settings.rate_limit_config().unwrap(),
            RateLimitConfig::per_second(500).with_burst(50)
        );

        let handler = handler::handler_fn(|_msg: Message| async { Ok::<_, BoxError>(()) });
        let builder = Worker::builder(broker.consumer("orders"))
            .stack(stack)
            .handler(handler);
        let worker = settings.worker(builder).unwrap().build().unwrap();
        let described = format!("{worker:?}");
        assert!(described.contains(r#"name: "quickstart""#), "{described}");
        // Ordered per key, so failed messages park: from the file and the environment.
        assert!(described.contains("park: true"), "{described}");
        assert!(described.contains("max_waiting: 7"), "{described}");

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let report = runtime.block_on(async {
            broker
                .publish("orders", OutgoingMessage::new("hello").with_key("c1"))
                .await
                .unwrap();
            worker
                .run_until(tokio::time::sleep(Duration::from_millis(50)))
                .await
        });
        assert_eq!(report.processed, 1, "{report:?}");
    });
}

/// README.md's "A handler on a queue" settings, as the config module's docs show them.
const README: &str = r#"
[worker]
concurrency = 32
ordering = "per_key"
shutdown_timeout = "30s"

[retry]
max_tries = 3
max_elapsed = "30s"
backoff = { initial = "100ms", max = "10s", jitter = "full" }

[idempotency]
lease = "30s"
ttl = "24h"

[dead_letter]
max_attempts = 5
"#;

#[test]
fn the_readme_file_builds_what_the_readme_code_builds() {
    let broker = MemoryBroker::new();
    let handler = || handler::handler_fn(|_msg: Message| async { Ok::<_, BoxError>(()) });

    let settings = Settings::from_toml_str(README).unwrap();
    let from_file = Stack::new()
        .retry(settings.retry().unwrap())
        .idempotency_layer(settings.idempotency(Arc::new(MemoryStore::new())).unwrap())
        .dead_letter_layer(settings.dead_letter(Arc::new(broker.clone())).unwrap())
        .trace(TraceLayer::new());
    let from_code = Stack::new()
        .retry(RetryLayer::new(RetryConfig::default()).unwrap())
        .idempotency_layer(
            IdempotencyLayer::new(Arc::new(MemoryStore::new()), IdempotencyConfig::default())
                .unwrap(),
        )
        .dead_letter_layer(
            DeadLetterLayer::new(
                Arc::new(broker.clone()),
                DeadLetterConfig::default().with_max_attempts(5),
            )
            .unwrap(),
        )
        .trace(TraceLayer::new());
    assert_eq!(from_file.describe(), from_code.describe());

    let file_worker = settings
        .worker(
            Worker::builder(broker.consumer("orders"))
                .stack(from_file)
                .handler(handler()),
        )
        .unwrap()
        .build()
        .unwrap();
    let code_worker = Worker::builder(broker.consumer("orders"))
        .stack(from_code)
        .handler(handler())
        .concurrency(32)
        .ordering(OrderingMode::PerKey)
        .shutdown_timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    assert_eq!(format!("{file_worker:?}"), format!("{code_worker:?}"));
}

#[test]
fn absent_sections_give_the_layers_defaults() {
    let settings = Settings::from_toml_str("").unwrap();
    let broker = MemoryBroker::new();
    let stack = Stack::new()
        .dead_letter_layer(settings.dead_letter(Arc::new(broker.clone())).unwrap())
        .circuit_breaker(settings.circuit_breaker().unwrap())
        .idempotency_layer(settings.idempotency(Arc::new(MemoryStore::new())).unwrap())
        .retry(settings.retry().unwrap())
        .timeout(settings.timeout().unwrap());
    assert_eq!(
        stack.describe(),
        "dead_letter(max_attempts=5, to=<source>-dlq) -> \
         circuit_breaker(consecutive_failures=5, open_for=30s) -> \
         idempotency(lease=30s, ttl=86400s) -> retry(max_tries=3, window=300ms, budget) -> \
         timeout(30s) -> handler"
    );
}

#[test]
fn a_rate_limit_without_its_section_is_an_error() {
    let err = Settings::default().rate_limit().unwrap_err();
    assert_eq!(err.key(), Some("rate_limit"));
    assert!(
        err.to_string().contains("add a [rate_limit] section"),
        "{err}"
    );
}

#[test]
fn off_turns_a_budget_a_hold_and_a_trigger_off() {
    let settings = Settings::from_toml_str(
        r#"
        [retry]
        budget = "off"
        max_elapsed = "off"
        backoff.jitter = 0.25
        [circuit_breaker]
        consecutive_failures = "off"
        failure_rate = { threshold = 0.5, min_calls = 10 }
        max_hold = "off"
        "#,
    )
    .unwrap();
    let stack = Stack::new()
        .circuit_breaker(settings.circuit_breaker().unwrap())
        .retry(settings.retry().unwrap());
    assert_eq!(
        stack.describe(),
        "circuit_breaker(failure_rate=0.5, open_for=30s) -> retry(max_tries=3, window=300ms) -> handler"
    );
    assert_eq!(
        settings.retry_config().unwrap().max_elapsed(),
        Duration::MAX
    );
}

#[test]
fn an_unknown_key_is_named_with_its_line() {
    let err = toml_error("[worker]\nconcurrency = 4\n\n[retry]\nmax_trys = 3\n");
    assert_eq!(err.key(), Some("retry.max_trys"));
    assert_eq!(err.line(), Some(5));
    let msg = err.to_string();
    assert!(
        msg.starts_with("unknown setting `retry.max_trys` at line 5: expected one of `max_tries`"),
        "{msg}"
    );
}

#[test]
fn an_unknown_section_is_named_with_its_line() {
    let err = toml_error("\n[retyr]\nmax_tries = 3\n");
    assert_eq!(err.key(), Some("retyr"));
    assert_eq!(err.line(), Some(2));
}

#[test]
fn an_unknown_key_in_a_file_names_the_file() {
    jail("[timeout]\nper_try = \"1s\"\nper_call = \"1s\"\n", |_| {
        let err = Settings::load("redrive.toml").unwrap_err();
        assert_eq!(err.file(), Some(std::path::Path::new("redrive.toml")));
        assert_eq!(err.line(), Some(3));
        let msg = err.to_string();
        assert!(
            msg.starts_with("unknown setting `timeout.per_call` at redrive.toml line 3"),
            "{msg}"
        );
    });
}

#[test]
fn a_value_of_the_wrong_type_is_named_with_its_line() {
    let err = toml_error("[retry]\nmax_tries = \"x\"\n");
    assert_eq!(err.key(), Some("retry.max_tries"));
    assert_eq!(err.line(), Some(2));
    assert_eq!(
        err.to_string(),
        "invalid setting `retry.max_tries` at line 2: found string \"x\", expected u32"
    );
}

#[test]
fn a_duration_that_is_not_one_is_named_with_its_line() {
    let err = toml_error("[idempotency]\nttl = \"1d\"\nlease = \"fast\"\n");
    assert_eq!(err.key(), Some("idempotency.lease"));
    assert_eq!(err.line(), Some(3));
    assert!(err.to_string().contains("expected a duration"), "{err}");
}

#[test]
fn an_unknown_word_lists_the_known_ones() {
    let err = toml_error("[worker]\nordering = \"per_kee\"\n");
    assert_eq!(err.key(), Some("worker.ordering"));
    assert_eq!(err.line(), Some(2));
    assert!(
        err.to_string()
            .contains("`unordered`, `per_key`, `per_partition`"),
        "{err}"
    );
    let err = toml_error("[retry.backoff]\njitter = \"wobbly\"\n");
    assert_eq!(err.key(), Some("retry.backoff.jitter"));
    assert!(err.to_string().contains("`decorrelated`"), "{err}");
}

#[test]
fn a_worker_value_that_cannot_work_is_named_with_its_line() {
    let err = toml_error("[worker]\nname = \"orders\"\nconcurrency = 0\n");
    assert_eq!(err.key(), Some("worker.concurrency"));
    assert_eq!(err.line(), Some(3));
    assert!(err.to_string().contains("set it to 1 or more"), "{err}");

    let err = toml_error("[worker.redelivery]\ninitial = \"2s\"\nmax = \"1s\"\n");
    assert_eq!(err.key(), Some("worker.redelivery"));
    assert_eq!(err.line(), Some(1));
}

#[test]
fn a_value_the_layer_refuses_is_named_with_its_line() {
    let err = toml_error("[retry]\nmax_elapsed = \"5s\"\nmax_tries = 0\n");
    assert_eq!(err.key(), Some("retry.max_tries"));
    assert_eq!(err.line(), Some(3));
    assert!(err.to_string().contains("`max_tries` is 0"), "{err}");

    let err = toml_error("[timeout]\nper_try = \"0s\"\n");
    assert_eq!(err.key(), Some("timeout.per_try"));
    assert_eq!(err.line(), Some(2));

    let err = toml_error("[rate_limit]\nlimit = 0\n");
    assert_eq!(err.key(), Some("rate_limit.limit"));
    assert_eq!(err.line(), Some(2));

    let err = toml_error("[idempotency]\nnamespace = \"\"\n");
    assert_eq!(err.key(), Some("idempotency.namespace"));

    let err = toml_error("[dead_letter]\nmax_attempts = 0\n");
    assert_eq!(err.key(), Some("dead_letter.max_attempts"));
}

#[test]
fn a_key_is_blamed_only_when_it_is_wrong_in_the_file() {
    // `consecutive_failures = "off"` would leave nothing to trip the breaker alone, but
    // the file has a failure rate: `open_for` is what is wrong.
    let err = toml_error(
        "[circuit_breaker]\nconsecutive_failures = \"off\"\nfailure_rate.threshold = 0.5\nopen_for = \"0s\"\n",
    );
    assert_eq!(err.key(), Some("circuit_breaker.open_for"));
    assert_eq!(err.line(), Some(4));

    let err = toml_error("[circuit_breaker]\nconsecutive_failures = \"off\"\n");
    assert_eq!(err.key(), Some("circuit_breaker.consecutive_failures"));
    assert!(
        err.to_string().contains("nothing can trip the breaker"),
        "{err}"
    );
}

#[test]
fn keys_wrong_only_together_name_what_holds_them() {
    let err =
        toml_error("[retry]\nmax_tries = 2\n[retry.backoff]\ninitial = \"2s\"\nmax = \"1s\"\n");
    assert_eq!(err.key(), Some("retry.backoff"));
    assert_eq!(err.line(), Some(3));
    assert!(err.to_string().contains("below its min"), "{err}");
}

#[test]
fn keys_wrong_only_together_name_the_first_whose_removal_mends_them() {
    // Either alone is fine (2,000,000 a second; 100 a millisecond), together they are
    // two messages a nanosecond.
    let err = toml_error("[rate_limit]\nper = \"1ms\"\nlimit = 2_000_000\n");
    assert_eq!(err.key(), Some("rate_limit.limit"));
    assert_eq!(err.line(), Some(3));
    assert!(err.to_string().contains("less than a nanosecond"), "{err}");
}

#[test]
fn a_required_key_is_named_with_its_section_line() {
    let err = toml_error("[worker]\nconcurrency = 2\n[rate_limit]\nburst = 5\n");
    assert_eq!(err.key(), Some("rate_limit.limit"));
    assert_eq!(err.line(), Some(3));
    assert!(
        err.to_string()
            .starts_with("missing setting `rate_limit.limit`"),
        "{err}"
    );
}

#[test]
fn a_file_that_is_not_toml_gives_the_line() {
    let err = toml_error("[worker]\nconcurrency = 2\nordering per_key\n");
    assert_eq!(err.key(), None);
    assert_eq!(err.line(), Some(3));
    assert!(
        err.to_string().starts_with("invalid TOML at line 3"),
        "{err}"
    );
}

#[test]
fn a_missing_file_is_named() {
    let err = Settings::load("/nonexistent/redrive.toml").unwrap_err();
    assert!(
        err.to_string()
            .starts_with("cannot read the settings file /nonexistent/redrive.toml"),
        "{err}"
    );
}

#[test]
fn a_bad_value_from_the_environment_names_the_variable() {
    jail(QUICKSTART, |jail| {
        jail.set_env("REDRIVE_RETRY__MAX_TRIES", "x");
        let err = Settings::load("redrive.toml").unwrap_err();
        assert_eq!(err.key(), Some("retry.max_tries"));
        assert_eq!(err.env_var(), Some("REDRIVE_RETRY__MAX_TRIES"));
        assert_eq!(err.line(), None);
        assert_eq!(
            err.to_string(),
            "invalid setting `retry.max_tries` from environment variable \
             REDRIVE_RETRY__MAX_TRIES: found string \"x\", expected u32"
        );
    });
}

#[test]
fn a_value_from_the_environment_the_worker_refuses_names_the_variable() {
    jail(QUICKSTART, |jail| {
        jail.set_env("REDRIVE_WORKER__CONCURRENCY", 0);
        let err = Settings::load("redrive.toml").unwrap_err();
        assert_eq!(err.key(), Some("worker.concurrency"));
        assert_eq!(err.env_var(), Some("REDRIVE_WORKER__CONCURRENCY"));
    });
}

#[test]
fn a_misspelt_variable_is_named() {
    jail(QUICKSTART, |jail| {
        jail.set_env("REDRIVE_RETRY__MAX_TRIE", 5);
        let err = Settings::load("redrive.toml").unwrap_err();
        assert_eq!(err.key(), Some("retry.max_trie"));
        assert_eq!(err.env_var(), Some("REDRIVE_RETRY__MAX_TRIE"));
        assert!(err.to_string().starts_with("unknown setting"), "{err}");
    });
}

#[test]
fn another_prefix_reads_other_variables() {
    jail(QUICKSTART, |jail| {
        jail.set_env("ORDERS_RETRY__MAX_TRIES", 2);
        jail.set_env("REDRIVE_RETRY__MAX_TRIES", 9);
        let settings = Settings::load_with_prefix("redrive.toml", "ORDERS_").unwrap();
        assert_eq!(settings.retry_config().unwrap().max_tries(), 2);
    });
}

#[test]
fn replay_sets_the_dead_letter_replays_defaults() {
    let none = Settings::from_toml_str("")
        .expect("settings")
        .replay()
        .expect("replay");
    assert_eq!(
        (none.max_replays, none.rate, none.in_flight, none.to),
        (3, None, 16, None)
    );

    let toml =
        "[replay]\nmax_replays = 1\nrate = 500\nin_flight = 4\ndestination = \"orders-retry\"\n";
    let r = Settings::from_toml_str(toml)
        .expect("settings")
        .replay()
        .expect("replay");
    assert_eq!(
        (r.max_replays, r.rate, r.in_flight, r.to.as_deref()),
        (1, Some(500.0), 4, Some("orders-retry"))
    );

    jail("[replay]\nrate = 2.5\n", |jail| {
        jail.set_env("REDRIVE_REPLAY__MAX_REPLAYS", 0);
        let r = Settings::load("redrive.toml")
            .expect("settings")
            .replay()
            .expect("replay");
        assert_eq!((r.max_replays, r.rate), (0, Some(2.5)));
    });
}

#[test]
fn a_replay_that_cannot_run_is_named_with_its_line() {
    let err = toml_error("[replay]\nmax_replays = 2\nrate = 0\n");
    assert_eq!(err.key(), Some("replay.rate"));
    assert_eq!(err.line(), Some(3));
    assert!(err.to_string().contains("above 0"), "{err}");

    let err = toml_error("[replay]\nin_flight = 0\n");
    assert_eq!(err.key(), Some("replay.in_flight"));
    assert_eq!(err.line(), Some(2));

    let err = toml_error("[replay]\nmax_replay = 2\n");
    assert_eq!(err.key(), Some("replay.max_replay"));
}
