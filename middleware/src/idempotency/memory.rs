//! [`MemoryStore`]: idempotency keys in this process's memory.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, MutexGuard};
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
/// Expired keys are swept every 1024 reservations.
#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    entries: HashMap<String, Entry>,
    reserves: u32,
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
        state.reserves = state.reserves.wrapping_add(1);
        if state.reserves % 1024 == 0 {
            state.entries.retain(|_, e| e.expires > now);
        }
        match state.entries.get(key) {
            Some(e) if e.expires > now && e.committed => Reservation::Committed,
            Some(e) if e.expires > now => Reservation::Reserved {
                remaining: e.expires - now,
            },
            _ => {
                let token = Token::random();
                state.entries.insert(
                    key.to_owned(),
                    Entry {
                        token: token.clone(),
                        committed: false,
                        expires: now + lease,
                    },
                );
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
        match state.entries.get_mut(key) {
            Some(e) if e.token == *token && e.expires > now => {
                if e.committed {
                    return Ok(CommitStatus::AlreadyCommitted);
                }
                e.committed = true;
                e.expires = now + ttl;
                Ok(CommitStatus::Committed)
            }
            _ => Err(StoreError::lease_lost(key)),
        }
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
        for i in 0..24 {
            store.reserve_now(&format!("j{i}"), Duration::from_secs(1));
        }
        assert_eq!(
            store.lock().entries.len(),
            24,
            "the 1024th reservation swept the expired keys"
        );
    }
}
