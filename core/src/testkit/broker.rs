//! The scenarios on a bare consumer: what the broker delivers, redelivers and removes.

use std::collections::HashMap;
use std::time::Duration;

use super::support::{body, can_nack, expect_next, next, publish_n};
use super::{Backend, QUIET_PERIOD};
use crate::{Consumer, OutgoingMessage, Publisher};

/// Every message published is received with payload, headers and key intact; an ack
/// removes it for good.
pub async fn round_trip<B: Backend>(b: &B) {
    let dest = b.destination().await;
    let p = b.publisher();
    let mut sent = HashMap::new();
    for i in 0..20 {
        let msg = OutgoingMessage::new(format!("payload-{i}"))
            .with_key(format!("key-{}", i % 3))
            .with_header("x-text", format!("value {i}"))
            .expect("header")
            .with_header("X-Mixed-Case", "Kept")
            .expect("header");
        sent.insert(format!("payload-{i}"), msg.clone());
        p.publish(&dest, msg).await.expect("publish");
    }
    let mut c = b.consumer(&dest).await;
    for _ in 0..20 {
        let d = expect_next(&mut c, "round_trip").await;
        let m = &d.message;
        let want = sent
            .remove(&body(m))
            .unwrap_or_else(|| panic!("unexpected or duplicate message {:?}", body(m)));
        assert_eq!(m.key, want.key, "key of {}", body(m));
        for (name, value) in &want.headers {
            assert_eq!(
                m.headers.get(name).and_then(|v| v.as_str()),
                value.as_str(),
                "header {name} of {}",
                body(m)
            );
        }
        assert_eq!(m.metadata.attempt, 1, "first delivery of {}", body(m));
        assert_eq!(*m.metadata.source.destination, *dest);
        d.ack().await.expect("ack");
    }
    assert!(sent.is_empty(), "never received: {:?}", sent.keys());
    assert!(
        next(&mut c, QUIET_PERIOD).await.is_none(),
        "an acked message came back"
    );
    drop(c);
    let mut c = b.consumer(&dest).await;
    assert!(
        next(&mut c, QUIET_PERIOD).await.is_none(),
        "an acked message came back to a new consumer"
    );
}

/// A nacked message comes back with `attempt` + 1.
pub async fn nack_redelivers<B: Backend>(b: &B) {
    let dest = b.destination().await;
    let mut c = b.consumer(&dest).await;
    if !can_nack(&c, "nack_redelivers") {
        return;
    }
    publish_n(&b.publisher(), &dest, 1, 0).await;
    let first = expect_next(&mut c, "first delivery").await;
    let attempt = first.message.attempt();
    first.nack(Duration::ZERO).await.expect("nack");
    let second = expect_next(&mut c, "redelivery after nack").await;
    assert_eq!(body(&second.message), "m0");
    assert_eq!(
        second.message.attempt(),
        attempt + 1,
        "attempt after one nack"
    );
    second.nack(Duration::ZERO).await.expect("nack");
    let third = expect_next(&mut c, "second redelivery").await;
    assert_eq!(
        third.message.attempt(),
        attempt + 2,
        "attempt after two nacks"
    );
    third.ack().await.expect("ack");
}

/// A nack with a delay is not redelivered before the delay.
pub async fn nack_delay_honoured<B: Backend>(b: &B) {
    let dest = b.destination().await;
    let mut c = b.consumer(&dest).await;
    if !can_nack(&c, "nack_delay_honoured") {
        return;
    }
    let delay = Duration::from_secs(2);
    assert!(
        c.capabilities().max_nack_delay >= delay,
        "the backend declares a max nack delay below 2 s"
    );
    publish_n(&b.publisher(), &dest, 1, 0).await;
    let first = expect_next(&mut c, "first delivery").await;
    let nacked_at = tokio::time::Instant::now();
    first.nack(delay).await.expect("nack");
    let early = next(&mut c, delay - Duration::from_millis(300)).await;
    assert!(early.is_none(), "redelivered before its delay");
    let d = expect_next(&mut c, "delayed redelivery").await;
    assert!(
        nacked_at.elapsed() >= delay,
        "redelivered after {:?}",
        nacked_at.elapsed()
    );
    assert_eq!(d.message.attempt(), first.message.attempt() + 1);
    d.ack().await.expect("ack");
}

/// A message left unsettled comes back: after its lease where the broker has one,
/// else when its consumer goes away.
pub async fn unacked_comes_back<B: Backend>(b: &B) {
    let dest = b.destination().await;
    publish_n(&b.publisher(), &dest, 1, 0).await;
    let mut c = b.consumer(&dest).await;
    let lease = c.capabilities().lease;
    let counted = c.capabilities().delivery_count;
    let first = expect_next(&mut c, "first delivery").await;
    let again = match lease {
        Some(lease) if lease <= Duration::from_secs(20) => {
            let d = next(&mut c, lease + Duration::from_secs(10))
                .await
                .expect("the message did not come back after its lease");
            drop(first);
            d
        }
        _ => {
            drop(first);
            drop(c);
            c = b.consumer(&dest).await;
            expect_next(&mut c, "redelivery to a new consumer").await
        }
    };
    assert_eq!(body(&again.message), "m0");
    // A broker that keeps no delivery count cannot tell a new consumer about the
    // earlier delivery (the count lived in the old consumer's memory).
    if counted {
        assert!(
            again.message.attempt() >= 2,
            "attempt {}",
            again.message.attempt()
        );
    }
    again.ack().await.expect("ack");
}
