use std::time::Duration;

use super::MemoryStore;
use crate::idempotency::Reservation;

// The store contract runs from `tests/idempotency_memory.rs`, through the public
// `idempotency::testkit`.

#[tokio::test(start_paused = true)]
async fn a_store_of_many_shards_counts_every_shard() {
    let store = MemoryStore::with_shards(64);
    for i in 0..1000 {
        store.reserve_sync(&format!("n{i}").into(), Duration::from_secs(10));
    }
    assert!(store.len() >= 1000);
    let used = (0..64)
        .filter(|&s| !store.lock(s).entries.is_empty())
        .count();
    assert!(used > 32, "keys spread over the shards: {used} of 64 used");
}

#[tokio::test(start_paused = true)]
async fn at_capacity_the_committed_key_nearest_expiry_makes_room() {
    let store = MemoryStore::with_shards(1).with_capacity(3);
    let (lease, ttl) = (Duration::from_secs(10), Duration::from_secs(3600));
    for i in 0..3 {
        let key = format!("k{i}");
        let Reservation::Fresh(t) = store.reserve_sync(&key.as_str().into(), lease) else {
            panic!("fresh");
        };
        store.commit_sync(&key, &t, ttl).unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    assert!(matches!(
        store.reserve_sync(&"k3".into(), lease),
        Reservation::Fresh(_)
    ));
    assert_eq!(store.lock(0).entries.len(), 3, "the bound holds");
    assert_eq!(store.evicted(), 1);
    // k0 was nearest its expiry: it went; k1 and k2 are still deduplicated.
    assert!(matches!(
        store.reserve_sync(&"k1".into(), lease),
        Reservation::Committed
    ));
    assert!(matches!(
        store.reserve_sync(&"k0".into(), lease),
        Reservation::Fresh(_)
    ));
}

#[tokio::test(start_paused = true)]
async fn at_capacity_keys_in_flight_are_never_evicted() {
    let store = MemoryStore::with_shards(1).with_capacity(2);
    let lease = Duration::from_secs(10);
    for key in ["a", "b"] {
        assert!(matches!(
            store.reserve_sync(&key.into(), lease),
            Reservation::Fresh(_)
        ));
    }
    // Full of reservations: the new message is answered as held elsewhere.
    assert!(matches!(
        store.reserve_sync(&"c".into(), lease),
        Reservation::Reserved { .. }
    ));
    assert!(matches!(
        store.reserve_sync(&"a".into(), lease),
        Reservation::Reserved { .. }
    ));
    assert_eq!(store.evicted(), 0);
}

#[tokio::test(start_paused = true)]
async fn keys_removed_from_the_middle_leave_every_other_key_findable() {
    let store = MemoryStore::with_shards(1);
    let lease = Duration::from_secs(60);
    let mut tokens = Vec::new();
    for i in 0..300 {
        let Reservation::Fresh(token) = store.reserve_sync(&format!("k{i}").into(), lease) else {
            panic!("fresh key");
        };
        tokens.push(token);
    }
    // Each release moves the last key into the gap it leaves.
    for i in (0..300).step_by(3) {
        store.release_sync(&format!("k{i}"), &tokens[i]).unwrap();
    }
    assert_eq!(store.lock(0).entries.len(), 200);
    for (i, token) in tokens.iter().enumerate() {
        let again = store.reserve_sync(&format!("k{i}").into(), lease);
        if i % 3 == 0 {
            assert!(matches!(again, Reservation::Fresh(_)), "k{i} was released");
        } else {
            assert!(
                matches!(again, Reservation::Reserved { .. }),
                "k{i} is still reserved: {again:?}"
            );
            store.commit_sync(&format!("k{i}"), token, lease).unwrap();
        }
    }
}

// The sweeping tests use one shard: a reservation sweeps its own shard.
#[tokio::test(start_paused = true)]
async fn expired_keys_are_swept() {
    let store = MemoryStore::with_shards(1);
    for i in 0..1000 {
        store.reserve_sync(&format!("k{i}").into(), Duration::from_secs(1));
    }
    assert_eq!(store.len(), 1000);
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(store.is_empty());
    store.reserve_sync(&"j".into(), Duration::from_secs(1));
    let state = store.lock(0);
    assert_eq!(
        state.entries.len(),
        1,
        "the next reservation swept the expired keys"
    );
    let queued: usize = state.expiries.iter().map(|(_, q)| q.len()).sum();
    assert_eq!(queued, 1);
}

#[tokio::test(start_paused = true)]
async fn committed_keys_go_at_their_ttl_whatever_their_lease() {
    let store = MemoryStore::with_shards(1);
    let lease = Duration::from_secs(60);
    for i in 0..100 {
        let key = format!("k{i}");
        let Reservation::Fresh(token) = store.reserve_sync(&key.as_str().into(), lease) else {
            panic!("fresh key");
        };
        store
            .commit_sync(&key, &token, Duration::from_secs(1))
            .unwrap();
    }
    tokio::time::advance(Duration::from_secs(2)).await;
    store.reserve_sync(&"j".into(), lease);
    assert_eq!(store.lock(0).entries.len(), 1, "only j is left");
    assert!(matches!(
        store.reserve_sync(&"k7".into(), lease),
        Reservation::Fresh(_)
    ));
    tokio::time::advance(Duration::from_secs(61)).await;
    store.reserve_sync(&"z".into(), Duration::from_secs(5));
    let state = store.lock(0);
    assert_eq!(state.entries.len(), 1, "only z is left");
    let queued: usize = state.expiries.iter().map(|(_, q)| q.len()).sum();
    assert_eq!(queued, 1, "the stale lease entries went with their lease");
}

#[tokio::test(start_paused = true)]
async fn varying_lengths_leave_no_pile_of_empty_queues() {
    let store = MemoryStore::with_shards(1);
    for i in 1..=20 {
        store.reserve_sync(&format!("k{i}").into(), Duration::from_secs(i));
    }
    assert_eq!(store.lock(0).expiries.len(), 20);
    tokio::time::advance(Duration::from_secs(30)).await;
    store.reserve_sync(&"j".into(), Duration::from_secs(1));
    assert_eq!(store.lock(0).expiries.len(), 1, "only j's queue is left");
}
