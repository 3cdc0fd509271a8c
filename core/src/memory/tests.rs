use super::*;

async fn publish(b: &MemoryBroker, q: &str, body: &'static str) {
    b.publish(q, OutgoingMessage::new(body)).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn unacked_message_comes_back_after_its_lease_and_late_ack_fails() {
    let b = MemoryBroker::new();
    b.declare(
        "q",
        QueueConfig::default().with_lease(Duration::from_secs(5)),
    );
    publish(&b, "q", "a").await;
    let mut c = b.consumer("q");
    let first = c.receive().await.unwrap().unwrap();
    tokio::time::advance(Duration::from_secs(6)).await;
    let second = c.receive().await.unwrap().unwrap();
    assert_eq!(second.message.attempt(), 2);
    assert!(matches!(first.ack().await, Err(Error::LeaseExpired)));
    second.ack().await.unwrap();
    assert_eq!(b.messages("q").len(), 0);
}

#[tokio::test(start_paused = true)]
async fn extend_keeps_the_message_invisible() {
    let b = MemoryBroker::new();
    b.declare(
        "q",
        QueueConfig::default().with_lease(Duration::from_secs(5)),
    );
    publish(&b, "q", "a").await;
    let mut c = b.consumer("q");
    let d = c.receive().await.unwrap().unwrap();
    tokio::time::advance(Duration::from_secs(4)).await;
    d.extend(Duration::from_secs(5)).await.unwrap();
    tokio::time::advance(Duration::from_secs(4)).await;
    assert_eq!(b.in_flight("q"), 1);
    assert_eq!(b.depth("q"), 0);
    d.ack().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn delayed_nack_returns_to_the_head_in_order() {
    let b = MemoryBroker::new();
    for body in ["a", "b", "c"] {
        publish(&b, "q", body).await;
    }
    let mut c = b.consumer("q");
    let a = c.receive().await.unwrap().unwrap();
    a.nack(Duration::from_secs(2)).await.unwrap();
    let next = c.receive().await.unwrap().unwrap();
    assert_eq!(next.message.payload, "b");
    next.nack(Duration::ZERO).await.unwrap();
    tokio::time::advance(Duration::from_secs(3)).await;
    let q = b.queue("q");
    let order: Vec<Bytes> = [(); 3]
        .iter()
        .map(|_| {
            let mut s = q.lock();
            s.promote(Instant::now());
            s.ready.pop_front().unwrap().msg.payload
        })
        .collect();
    assert_eq!(order, vec!["a", "b", "c"]);
}

#[tokio::test(start_paused = true)]
async fn dead_letter_policy_moves_after_max_deliveries() {
    let b = MemoryBroker::new();
    b.declare("q", QueueConfig::default().with_dead_letter(2, "dlq"));
    publish(&b, "q", "poison").await;
    let mut c = b.consumer("q");
    for attempt in 1..=2 {
        let d = c.receive().await.unwrap().unwrap();
        assert_eq!(d.message.attempt(), attempt);
        d.nack(Duration::ZERO).await.unwrap();
    }
    let got = tokio::time::timeout(Duration::from_secs(1), c.receive()).await;
    assert!(got.is_err(), "no third delivery");
    let dlq = b.messages("dlq");
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].payload, "poison");
}
