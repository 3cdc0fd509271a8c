//! [`MemoryStore`]: idempotency keys in this process's memory.

use std::collections::VecDeque;
use std::fmt;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hashbrown::HashTable;
use tokio::time::Instant;

use super::{CommitStatus, IdempotencyStore, Reservation, StoreError, StoreFuture, Token};

/// Idempotency keys in this process's memory.
///
/// **One process only.** Keys are not shared with other processes or replicas and are
/// lost on restart, so it deduplicates redeliveries to this process only. Use it for
/// tests, examples and single-instance consumers; use `RedisStore` or `PostgresStore`
/// when more than one consumer process reads the queue.
///
/// **Bounded.** It holds at most [`MEMORY_STORE_CAPACITY`](super::MEMORY_STORE_CAPACITY) keys (1,000,000, set with
/// [`with_capacity`](Self::with_capacity)), whatever the TTL. At the bound a new key
/// takes the place of the committed key closest to expiry: deduplication then reaches
/// back less far than the TTL, which [`evicted`](Self::evicted) counts and a warning
/// says. A key reserved by a call in flight is never evicted; if every key is, the new
/// message is answered as reserved elsewhere and comes back later, never lost.
///
/// Leases and TTLs follow [`tokio::time`], so tests can run it under paused time.
/// Keys live in shards chosen by their hash, each behind its own lock, so calls for
/// different keys on several cores at once seldom wait for each other. Expired keys are
/// swept as reservations come to their shard, in expiry order (one queue per lease or
/// TTL length), so a sweep costs only the keys it removes.
pub struct MemoryStore {
    /// foldhash, seeded at random per store: several times faster than the standard
    /// library's SipHash on short keys. Its seeding makes colliding keys hard to choose
    /// without seeing the process's hashes, though it resists a determined attacker
    /// less than SipHash does; the store is for one trusted process (see above).
    hasher: foldhash::fast::RandomState,
    /// A power of two of them.
    shards: Box<[Mutex<State>]>,
    /// The most keys one shard holds: the store's capacity over its shards, rounded up.
    shard_capacity: usize,
    /// Committed keys removed early to make room.
    evicted: AtomicU64,
}

/// The most keys a [`MemoryStore`] holds unless told otherwise.
pub const DEFAULT_CAPACITY: usize = 1_000_000;

impl Default for MemoryStore {
    fn default() -> Self {
        Self::with_shards(default_shards())
    }
}

/// Removes the committed key that expires first, to make room for another. Only the
/// front of each expiry queue is looked at (past stale entries), so it costs no scan of
/// the keys. Returns `false`, removing nothing, when every front is a reservation in
/// flight.
fn evict_committed(
    index: &mut HashTable<u32>,
    entries: &mut Vec<Entry>,
    expiries: &mut [(Duration, ExpiryQueue)],
) -> bool {
    let mut oldest: Option<(usize, Instant)> = None;
    for (q, (_, queue)) in expiries.iter_mut().enumerate() {
        while let Some(&(at, hash)) = queue.front() {
            match find(index, entries, hash, |e| e.expires == at) {
                // Its key was committed, released or reserved again since.
                None => {
                    queue.pop_front();
                }
                Some(pos) => {
                    if entries[pos].committed && oldest.is_none_or(|(_, t)| at < t) {
                        oldest = Some((q, at));
                    }
                    break;
                }
            }
        }
    }
    let Some((q, _)) = oldest else {
        return false;
    };
    let Some((at, hash)) = expiries[q].1.pop_front() else {
        return false;
    };
    if let Some(pos) = find(index, entries, hash, |e| e.expires == at) {
        remove(index, entries, pos);
    }
    true
}

/// The most shards a store has: the shard is chosen by hash bits 40 to 49.
const MAX_SHARDS: usize = 1 << 10;

/// Four shards per core the machine has (counted as the thread shards are), at most 64.
fn default_shards() -> usize {
    (crate::shard::count() * 4).min(64)
}

/// Keys in the order they expire: when, and the key's hash.
type ExpiryQueue = VecDeque<(Instant, u64)>;

/// One shard's keys.
///
/// The keys live in a dense list, and the hash table holds only their positions in it
/// (four bytes each, and a byte of tag): for 100,000 keys the table takes about
/// 640 KiB, which a core's cache can hold, where a table of the entries themselves
/// would take 11 MiB. A fresh key then costs a write into that small table and an
/// append to the list, rather than cache misses at random places in a large table.
#[derive(Default)]
struct State {
    /// Positions in `entries`, by the key's hash.
    index: HashTable<u32>,
    /// The keys, in no order: removing one moves the last into its place.
    entries: Vec<Entry>,
    /// When keys expire, one queue per lease or TTL length, each in the order the
    /// expiries were set. For one length `d`, `now + d` only grows (`now` is read under
    /// the lock), so every queue is sorted and sweeping pops from the fronts: O(1) per
    /// key. A queue entry names its key by hash and expiry: one whose key has since been
    /// committed, released or reserved again matches no entry and is dropped when it
    /// comes up.
    expiries: Vec<(Duration, ExpiryQueue)>,
}

impl State {
    fn sweep(&mut self, now: Instant) {
        let State {
            index,
            entries,
            expiries,
        } = self;
        for (_, queue) in expiries.iter_mut() {
            while let Some(&(at, hash)) = queue.front() {
                if at > now {
                    break;
                }
                queue.pop_front();
                // Two keys with one hash and one expiry each have a queue entry: each
                // removes one of them.
                if let Some(pos) = find(index, entries, hash, |e| e.expires == at) {
                    remove(index, entries, pos);
                }
            }
        }
        // A caller that varies its lengths does not pile up empty queues; the usual
        // two (one lease, one TTL) stay, so they are not allocated again and again.
        if expiries.len() > KEPT_QUEUES {
            expiries.retain(|(_, queue)| !queue.is_empty());
        }
    }
}

/// The position in `entries` of an entry hashed `hash` for which `is` holds.
fn find(
    index: &HashTable<u32>,
    entries: &[Entry],
    hash: u64,
    is: impl Fn(&Entry) -> bool,
) -> Option<usize> {
    index
        .find(hash, |&i| {
            let e = &entries[i as usize];
            e.hash == hash && is(e)
        })
        .map(|&i| i as usize)
}

/// The position of `key` (hashed `hash`) in `entries`.
fn find_key(index: &HashTable<u32>, entries: &[Entry], hash: u64, key: &str) -> Option<usize> {
    find(index, entries, hash, |e| *e.key == *key)
}

/// Adds `entry`, a key not yet in the shard. Returns `false`, adding nothing, if the
/// shard already holds 2^32 keys (hundreds of gigabytes of them), more than a `u32`
/// position can name.
fn insert(index: &mut HashTable<u32>, entries: &mut Vec<Entry>, entry: Entry) -> bool {
    let Ok(at) = u32::try_from(entries.len()) else {
        return false;
    };
    // The new entry is not in `entries` yet, so growing the table hashes only the
    // others.
    index.insert_unique(entry.hash, at, |&i| entries[i as usize].hash);
    entries.push(entry);
    true
}

/// Removes the entry at `at`; the last entry takes its place.
fn remove(index: &mut HashTable<u32>, entries: &mut Vec<Entry>, at: usize) {
    let hash = entries[at].hash;
    if let Ok(slot) = index.find_entry(hash, |&i| i as usize == at) {
        slot.remove();
    }
    let last = entries.len() - 1;
    entries.swap_remove(at);
    if at != last {
        let moved = entries[at].hash;
        if let Some(slot) = index.find_mut(moved, |&i| i as usize == last) {
            // `at` is below `last`, which fit in a `u32`.
            *slot = at as u32;
        }
    }
}

/// Expiry queues kept even when empty.
const KEPT_QUEUES: usize = 4;

/// Queues the expiry at `at` of the key hashed `hash`, `after` from now, behind the
/// others of that length.
fn queue_expiry(
    expiries: &mut Vec<(Duration, ExpiryQueue)>,
    hash: u64,
    after: Duration,
    at: Instant,
) {
    match expiries.iter_mut().find(|(d, _)| *d == after) {
        Some((_, queue)) => queue.push_back((at, hash)),
        None => expiries.push((after, VecDeque::from([(at, hash)]))),
    }
}

struct Entry {
    key: Arc<str>,
    hash: u64,
    token: Token,
    committed: bool,
    expires: Instant,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store of `shards` shards (rounded up to a power of two, from 1 to
    /// 1,024), instead of four per core.
    pub fn with_shards(shards: usize) -> Self {
        let shards: Box<[Mutex<State>]> = (0..shards.clamp(1, MAX_SHARDS).next_power_of_two())
            .map(|_| Mutex::default())
            .collect();
        MemoryStore {
            hasher: foldhash::fast::RandomState::default(),
            shard_capacity: DEFAULT_CAPACITY.div_ceil(shards.len()),
            shards,
            evicted: AtomicU64::new(0),
        }
    }

    /// Holds at most about `keys` keys (at least one per shard; see the type's docs for
    /// what happens at the bound).
    #[must_use]
    pub fn with_capacity(mut self, keys: usize) -> Self {
        self.shard_capacity = keys.div_ceil(self.shards.len()).max(1);
        self
    }

    /// Committed keys removed before their TTL to stay within the capacity.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// Number of keys reserved or committed right now.
    pub fn len(&self) -> usize {
        let now = Instant::now();
        (0..self.shards.len())
            .map(|i| {
                self.lock(i)
                    .entries
                    .iter()
                    .filter(|e| e.expires > now)
                    .count()
            })
            .sum()
    }

    /// Whether no key is reserved or committed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self, shard: usize) -> MutexGuard<'_, State> {
        self.shards[shard].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The hash of `key` and the index of its shard.
    fn place(&self, key: &str) -> (u64, usize) {
        let hash = self.hasher.hash_one(key);
        // Bits 40 to 49: the tables use them for neither their buckets (the low bits, up
        // to 2^40 buckets) nor their tags (the top seven), so a shard's keys still
        // spread over its table.
        let shard = (hash >> 40) as usize & (self.shards.len() - 1);
        (hash, shard)
    }

    fn reserve_sync(&self, key: &Arc<str>, lease: Duration) -> Reservation {
        // Made before taking the lock, which other calls wait on.
        let token = Token::random();
        let (hash, shard) = self.place(key);
        let mut state = self.lock(shard);
        let now = Instant::now();
        state.sweep(now);
        let State {
            index,
            entries,
            expiries,
        } = &mut *state;
        let expires = now + lease;
        match find_key(index, entries, hash, key) {
            Some(at) if entries[at].expires > now => {
                let e = &entries[at];
                return if e.committed {
                    Reservation::Committed
                } else {
                    Reservation::Reserved {
                        remaining: e.expires - now,
                    }
                };
            }
            // Expired but not swept yet: taken afresh.
            Some(at) => {
                let e = &mut entries[at];
                e.token = token.clone();
                e.committed = false;
                e.expires = expires;
            }
            None => {
                if entries.len() >= self.shard_capacity {
                    if !evict_committed(index, entries, expiries) {
                        tracing::warn!(
                            keys = entries.len(),
                            "idempotency memory store is full of keys in flight; the message is delivered again"
                        );
                        return Reservation::Reserved { remaining: lease };
                    }
                    let evicted = self.evicted.fetch_add(1, Ordering::Relaxed) + 1;
                    if evicted.is_power_of_two() {
                        tracing::warn!(
                            evicted,
                            capacity = self.shard_capacity * self.shards.len(),
                            "idempotency memory store is full: committed keys are evicted before their TTL, \
                             so deduplication reaches back less far; raise the capacity or lower the TTL"
                        );
                    }
                }
                let entry = Entry {
                    key: key.clone(),
                    hash,
                    token: token.clone(),
                    committed: false,
                    expires,
                };
                if !insert(index, entries, entry) {
                    // Unreachable in practice (see `insert`); answered as a key held
                    // elsewhere, so the message is delivered again, never lost.
                    tracing::error!(
                        keys = entries.len(),
                        "idempotency memory store shard is full; the message is delivered again"
                    );
                    return Reservation::Reserved { remaining: lease };
                }
            }
        }
        queue_expiry(expiries, hash, lease, expires);
        Reservation::Fresh(token)
    }

    fn commit_sync(
        &self,
        key: &str,
        token: &Token,
        ttl: Duration,
    ) -> Result<CommitStatus, StoreError> {
        let (hash, shard) = self.place(key);
        let mut state = self.lock(shard);
        let now = Instant::now();
        let State {
            index,
            entries,
            expiries,
        } = &mut *state;
        let expires = now + ttl;
        match find_key(index, entries, hash, key).map(|at| &mut entries[at]) {
            Some(e) if e.token == *token && e.expires > now => {
                if e.committed {
                    return Ok(CommitStatus::AlreadyCommitted);
                }
                e.committed = true;
                e.expires = expires;
            }
            _ => return Err(StoreError::lease_lost(key)),
        }
        queue_expiry(expiries, hash, ttl, expires);
        Ok(CommitStatus::Committed)
    }

    fn extend_sync(&self, key: &str, token: &Token, lease: Duration) -> Result<(), StoreError> {
        let (hash, shard) = self.place(key);
        let mut state = self.lock(shard);
        let now = Instant::now();
        let State {
            index,
            entries,
            expiries,
        } = &mut *state;
        let expires = now + lease;
        match find_key(index, entries, hash, key).map(|at| &mut entries[at]) {
            Some(e) if e.token == *token && e.expires > now && !e.committed => {
                e.expires = expires;
            }
            _ => return Err(StoreError::lease_lost(key)),
        }
        queue_expiry(expiries, hash, lease, expires);
        Ok(())
    }

    fn release_sync(&self, key: &str, token: &Token) -> Result<(), StoreError> {
        let (hash, shard) = self.place(key);
        let mut state = self.lock(shard);
        let now = Instant::now();
        let State { index, entries, .. } = &mut *state;
        match find_key(index, entries, hash, key) {
            Some(at) if entries[at].token == *token && entries[at].expires > now => {
                if !entries[at].committed {
                    remove(index, entries, at);
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
        Box::pin(async move { Ok(self.reserve_sync(&key.into(), lease)) })
    }

    fn commit<'a>(
        &'a self,
        key: &'a str,
        token: &'a Token,
        ttl: Duration,
    ) -> StoreFuture<'a, CommitStatus> {
        Box::pin(async move { self.commit_sync(key, token, ttl) })
    }

    fn release<'a>(&'a self, key: &'a str, token: &'a Token) -> StoreFuture<'a, ()> {
        Box::pin(async move { self.release_sync(key, token) })
    }

    fn extend<'a>(
        &'a self,
        key: &'a str,
        token: &'a Token,
        lease: Duration,
    ) -> StoreFuture<'a, ()> {
        Box::pin(std::future::ready(self.extend_sync(key, token, lease)))
    }

    fn reserve_now(
        &self,
        key: &Arc<str>,
        lease: Duration,
    ) -> Option<Result<Reservation, StoreError>> {
        Some(Ok(self.reserve_sync(key, lease)))
    }

    fn commit_now(
        &self,
        key: &str,
        token: &Token,
        ttl: Duration,
    ) -> Option<Result<CommitStatus, StoreError>> {
        Some(self.commit_sync(key, token, ttl))
    }

    fn release_now(&self, key: &str, token: &Token) -> Option<Result<(), StoreError>> {
        Some(self.release_sync(key, token))
    }
}

#[cfg(test)]
mod tests;
