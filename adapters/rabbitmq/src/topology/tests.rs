use lapin::types::AMQPValue;

use super::arguments::{
    X_DEAD_LETTER_EXCHANGE, X_DEAD_LETTER_ROUTING_KEY, X_DEAD_LETTER_STRATEGY, X_DELIVERY_LIMIT,
    X_MESSAGE_TTL, X_OVERFLOW, X_QUEUE_TYPE,
};
use super::*;

#[test]
fn delays_go_to_power_of_two_buckets() {
    let t = Topology::new("q");
    assert_eq!(t.delay_queue(Duration::from_millis(1)), "q.delay.128ms");
    assert_eq!(t.delay_queue(Duration::from_millis(128)), "q.delay.128ms");
    assert_eq!(t.delay_queue(Duration::from_millis(129)), "q.delay.256ms");
    assert_eq!(t.delay_queue(Duration::from_millis(1024)), "q.delay.1024ms");
    assert_eq!(t.delay_queue(Duration::from_millis(1025)), "q.delay.2048ms");
    let all = t.with_max_delay(Duration::from_secs(1)).delay_queues();
    assert_eq!(all.first().unwrap(), "q.delay.128ms");
    assert_eq!(all.last().unwrap(), "q.delay.1024ms");
    assert_eq!(all.len(), 4);
    assert_eq!(
        Topology::new("q")
            .with_max_delay(MAX_DELAY)
            .delay_queues()
            .len(),
        26
    );
}

#[test]
fn a_quorum_queue_has_quorum_delay_queues_that_dead_letter_at_least_once() {
    let t = Topology::new("q").with_kind(QueueKind::Quorum);
    assert_eq!(
        t.delay_queue(Duration::from_millis(1000)),
        "q.delay-quorum.1024ms",
        "not the name of a classic delay queue an older version declared"
    );
    let args = t.delay_queue_arguments(10);
    let arg = |name: &str| args.inner().get(name).cloned();
    let text = |s: &str| Some(AMQPValue::LongString(s.into()));
    assert_eq!(arg(X_QUEUE_TYPE), text("quorum"));
    assert_eq!(arg(X_MESSAGE_TTL), Some(AMQPValue::LongLongInt(1024)));
    assert_eq!(arg(X_DEAD_LETTER_EXCHANGE), text(""));
    assert_eq!(arg(X_DEAD_LETTER_ROUTING_KEY), text("q"));
    assert_eq!(arg(X_DEAD_LETTER_STRATEGY), text("at-least-once"));
    assert_eq!(arg(X_OVERFLOW), text("reject-publish"));
    // The largest bucket's TTL stays within what RabbitMQ takes.
    let top = t.with_max_delay(MAX_DELAY);
    let last = top.bucket_exps().last().unwrap();
    assert_eq!(
        top.delay_queue_arguments(last).inner().get(X_MESSAGE_TTL),
        Some(&AMQPValue::LongLongInt(i64::from(u32::MAX)))
    );

    // A classic queue's delay queues keep their names and arguments.
    let classic = Topology::new("q");
    assert_eq!(
        classic.delay_queue(Duration::from_millis(1000)),
        "q.delay.1024ms"
    );
    assert_eq!(classic.delay_queue_arguments(10).inner().len(), 2);
}

#[test]
fn validation_says_what_to_change() {
    let err = Topology::new("q")
        .with_max_delay(MAX_DELAY + Duration::from_millis(1))
        .validate()
        .unwrap_err();
    assert!(err.to_string().contains("lower it"), "{err}");
    assert!(Topology::new("").validate().is_err());
    assert!(
        Topology::new("q")
            .with_dead_letter_queue("q")
            .validate()
            .is_err()
    );
    assert!(Topology::new("x".repeat(250)).validate().is_err());
    Topology::new("q").validate().unwrap();
    let err = Topology::new("q")
        .with_delivery_limit(0)
        .validate()
        .unwrap_err();
    assert!(err.to_string().contains("at least 1"), "{err}");
}

#[test]
fn only_a_quorum_queue_with_a_dlq_gets_the_delivery_limit() {
    let arg = |t: &Topology, name: &str| t.queue_arguments().inner().get(name).cloned();
    let guarded = Topology::new("q")
        .with_kind(QueueKind::Quorum)
        .with_dead_letter_queue("q-dlq");
    assert_eq!(guarded.delivery_limit(), Some(DEFAULT_DELIVERY_LIMIT));
    assert_eq!(
        arg(&guarded, X_DELIVERY_LIMIT),
        Some(AMQPValue::LongLongInt(20))
    );
    assert_eq!(
        arg(&guarded, X_DEAD_LETTER_ROUTING_KEY),
        Some(AMQPValue::LongString("q-dlq".into()))
    );
    assert_eq!(
        arg(&guarded, X_DEAD_LETTER_STRATEGY),
        Some(AMQPValue::LongString("at-least-once".into()))
    );
    assert!(guarded.unguarded().is_none());
    // The DLQ itself gets its kind only.
    assert_eq!(guarded.kind_arguments().inner().len(), 1);

    let no_dlq = Topology::new("q").with_kind(QueueKind::Quorum);
    assert_eq!(no_dlq.delivery_limit(), None);
    assert_eq!(
        arg(&no_dlq, X_DELIVERY_LIMIT),
        None,
        "a limit without a DLX drops"
    );
    assert!(
        no_dlq
            .unguarded()
            .unwrap()
            .contains("with_dead_letter_queue")
    );

    let classic = Topology::new("q").with_dead_letter_queue("q-dlq");
    assert_eq!(classic.queue_arguments().inner().len(), 0);
    assert!(classic.unguarded().unwrap().contains("use a quorum queue"));

    let off = guarded.without_delivery_limit();
    assert_eq!(off.queue_arguments().inner().len(), 1);
    assert!(off.unguarded().is_some());
}
