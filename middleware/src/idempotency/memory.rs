//! [`MemoryStore`]: idempotency keys in this process's memory.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use super::{CommitStatus, IdempotencyStore, Reservation, StoreError, StoreFuture, Token};

/// Idempotency keys in this process's memory.
///
/// **One process only.** Keys are not shared with other processes or replicas and are
/// lost on restart, so it deduplicates redeliveries to this process only. Use it for
/// tests, examples and single-instance consumers; use `RedisStore` or `PostgresStore`
/// when more than one consumer process reads the queue.
///
/// Leases and TTLs follow [`tokio::time`], so tests can run it under paused time.
/// Expired keys are swept as reservations come, in expiry order (a heap), so a sweep
/// costs only the keys it removes.
#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    entries: HashMap<Arc<str>, Entry>,
    /// Every expiry set, earliest first; an entry whose key has since a later expiry
    /// (committed) or is gone is skipped when it comes up.
    expiries: BinaryHeap<Reverse<(Instant, Arc<str>)>>,
}

impl State {
    fn sweep(&mut self, now: Instant) {
        while let Some(Reverse((at, _))) = self.expiries.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((at, key))) = self.expiries.pop() else {
                break;
            };
            if self
                .entries
                .get(&key)
                .is_some_and(|e| e.expires <= now && e.expires == at)
            {
                self.entries.remove(&key);
            }
        }
    }

    fn expire_at(&mut self, key: Arc<str>, at: Instant) {
        self.expiries.push(Reverse((at, key)));
    }
}

struct Entry {
    token: Token,
    committed: bool,
    expires: Instant,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of keys reserved or committed right now.
    pub fn len(&self) -> usize {
        let now = Instant::now();
        self.lock()
            .entries
            .values()
            .filter(|e| e.expires > now)
            .count()
    }

    /// Whether no key is reserved or committed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reserve_now(&self, key: &str, lease: Duration) -> Reservation {
        let now = Instant::now();
        let mut state = self.lock();
        state.sweep(now);
        match state.entries.get(key) {
            Some(e) if e.expires > now && e.committed => Reservation::Committed,
            Some(e) if e.expires > now => Reservation::Reserved {
                remaining: e.expires - now,
            },
            _ => {
                let token = Token::random();
                let key: Arc<str> = key.into();
                let expires = now + lease;
                state.entries.insert(
                    key.clone(),
                    Entry {
                        token: token.clone(),
                        committed: false,
                        expires,
                    },
                );
                state.expire_at(key, expires);
                Reservation::Fresh(token)
            }
        }
    }

    fn commit_now(
        &self,
        key: &str,
        token: &Token,
        ttl: Duration,
    ) -> Result<CommitStatus, StoreError> {
        let now = Instant::now();
        let mut state = self.lock();
        let expires = now + ttl;
        let Some(shared) = state.entries.get_key_value(key).map(|(k, _)| k.clone()) else {
            return Err(StoreError::lease_lost(key));
        };
        match state.entries.get_mut(key) {
            Some(e) if e.token == *token && e.expires > now => {
                if e.committed {
                    return Ok(CommitStatus::AlreadyCommitted);
                }
                e.committed = true;
                e.expires = expires;
            }
            _ => return Err(StoreError::lease_lost(key)),
        }
        state.expire_at(shared, expires);
        Ok(CommitStatus::Committed)
    }

    fn release_now(&self, key: &str, token: &Token) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut state = self.lock();
        match state.entries.get(key) {
            Some(e) if e.token == *token && e.expires > now => {
                if !e.committed {
                    state.entries.remove(key);
                }
                Ok(())
            }
            _ => Err(StoreError::lease_lost(key)),
        }
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("keys", &self.len())
            .finish()
    }
}

impl IdempotencyStore for MemoryStore {
    fn reserve<'a>(&'a self, key: &'a str, lease: Duration) -> StoreFuture<'a, Reservation> {
        Box::pin(async move { Ok(self.reserve_now(key, lease)) })
    }

    fn commit<'a>(
        &'a self,
        key: &'a str,
        token: &'a Token,
        ttl: Duration,
    ) -> StoreFuture<'a, CommitStatus> {
        Box::pin(async move { self.commit_now(key, token, ttl) })
    }

    fn release<'a>(&'a self, key: &'a str, token: &'a Token) -> StoreFuture<'a, ()> {
        Box::pin(async move { self.release_now(key, token) })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::MemoryStore;
    use crate::idempotency::contract;

    #[tokio::test(start_paused = true)]
    async fn passes_the_store_contract() {
        let store = MemoryStore::new();
        contract::run_all(&store, Duration::from_secs(1)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn expired_keys_are_swept() {
        let store = MemoryStore::new();
        for i in 0..1000 {
            store.reserve_now(&format!("k{i}"), Duration::from_secs(1));
        }
        assert_eq!(store.len(), 1000);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(store.is_empty());
        store.reserve_now("j", Duration::from_secs(1));
        let state = store.lock();
        assert_eq!(
            state.entries.len(),
            1,
            "the next reservation swept the expired keys"
        );
        assert_eq!(state.expiries.len(), 1);
    }
}
