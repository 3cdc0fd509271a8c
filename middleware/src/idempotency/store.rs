//! The [`IdempotencyStore`] trait and what it trades in.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use redrive_core::delivery::BoxFuture;

use super::StoreError;

/// The future an [`IdempotencyStore`] method returns.
pub type StoreFuture<'a, T> = BoxFuture<'a, Result<T, StoreError>>;

/// A random value that identifies one reservation of a key.
///
/// Stores check it on commit and release, so a consumer whose lease expired cannot
/// commit or release a reservation another consumer has taken since. A random token is
/// kept inline (no allocation); one read back from a store is shared. Either way,
/// cloning it is cheap, and tokens compare by their text.
#[derive(Clone)]
pub struct Token(Repr);

#[derive(Clone)]
enum Repr {
    /// 128 random bits as 32 lowercase hex digits (ASCII).
    Hex([u8; 32]),
    /// A value read back from a store.
    Shared(Arc<str>),
}

/// Each byte's two lowercase hex digits, so a token is written a byte at a time.
const HEX_PAIRS: [[u8; 2]; 256] = {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut pairs = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        pairs[i] = [HEX[i >> 4], HEX[i & 0xf]];
        i += 1;
    }
    pairs
};

impl Token {
    /// A new random token (128 bits, as 32 hex digits).
    pub fn random() -> Self {
        let bytes = fastrand::u128(..).to_be_bytes();
        let mut digits = [0u8; 32];
        for (pair, byte) in digits.chunks_exact_mut(2).zip(bytes) {
            pair.copy_from_slice(&HEX_PAIRS[usize::from(byte)]);
        }
        Token(Repr::Hex(digits))
    }

    /// A token with this value, as a store reads it back.
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        Token(Repr::Shared(value.into()))
    }

    /// The token's text, as bytes: what tokens are compared and hashed by, without
    /// checking UTF-8 again on every commit.
    fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Hex(digits) => digits,
            Repr::Shared(s) => s.as_bytes(),
        }
    }

    /// The token's value.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            // Only `random` makes this variant, from ASCII hex digits.
            Repr::Hex(digits) => std::str::from_utf8(digits).unwrap_or_default(),
            Repr::Shared(s) => s,
        }
    }
}

impl PartialEq for Token {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Token {}

impl std::hash::Hash for Token {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({})", self.as_str())
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What [`IdempotencyStore::reserve`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reservation {
    /// The key was free (or its last lease had expired); it is now reserved for the
    /// caller, who holds this token.
    Fresh(Token),
    /// The key was committed: the message was processed before.
    Committed,
    /// Another reservation holds the key for `remaining` more.
    Reserved {
        /// The lease left.
        remaining: Duration,
    },
}

/// What [`IdempotencyStore::commit`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CommitStatus {
    /// The reservation was turned into a commit.
    Committed,
    /// This token had already committed the key (the handler committed it in its own
    /// transaction); nothing changed.
    AlreadyCommitted,
}

/// Where idempotency keys are reserved and committed.
///
/// Methods return boxed futures so the trait is object-safe: a layer can hold an
/// `Arc<dyn IdempotencyStore>`.
///
/// # Contract
/// - `reserve` is atomic: of consumers racing for a free key, exactly one gets
///   [`Reservation::Fresh`].
/// - A reservation lasts `lease`; after that the key is free again and a new `reserve`
///   replaces the reservation (and its token).
/// - `extend` renews the reservation that `token` holds for another `lease` from now;
///   the layer calls it while the inner service runs, so a slow call keeps its key.
/// - `commit` succeeds only for the token of a reservation that holds the key and whose
///   lease has not expired; otherwise it fails with [`StoreError::lease_lost`], also
///   when the lease merely expired and nobody took the key since (every store answers
///   a late commit the same way). Committing again with the token that committed is
///   [`CommitStatus::AlreadyCommitted`] and changes nothing.
/// - A committed key stays committed for `ttl`, then is free again.
/// - `release` frees the key if the token still holds its reservation; a key this token
///   committed stays committed (`Ok`); otherwise it fails with
///   [`StoreError::lease_lost`] and changes nothing.
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Reserves `key` for `lease`, unless it is committed or reserved by someone else.
    fn reserve<'a>(&'a self, key: &'a str, lease: Duration) -> StoreFuture<'a, Reservation>;

    /// Marks `key`, reserved with `token`, as processed for `ttl`.
    fn commit<'a>(
        &'a self,
        key: &'a str,
        token: &'a Token,
        ttl: Duration,
    ) -> StoreFuture<'a, CommitStatus>;

    /// Frees `key`, reserved with `token`, so the message can be processed again.
    fn release<'a>(&'a self, key: &'a str, token: &'a Token) -> StoreFuture<'a, ()>;

    /// Renews the reservation of `key` that `token` holds, for `lease` from now.
    ///
    /// # Errors
    /// [`StoreError::lease_lost`] when `token` no longer holds a live reservation of
    /// `key`: its lease expired, another reservation replaced it, or it was committed
    /// or released.
    fn extend<'a>(&'a self, key: &'a str, token: &'a Token, lease: Duration)
    -> StoreFuture<'a, ()>;

    /// [`reserve`](Self::reserve), answered at once by a store that needs no I/O for
    /// it (the in-memory store), so no future is boxed per message. `None`, the
    /// default, sends the layer to `reserve`. The key comes shared, so a store that
    /// keeps it can keep this `Arc` instead of copying it.
    fn reserve_now(
        &self,
        key: &Arc<str>,
        lease: Duration,
    ) -> Option<Result<Reservation, StoreError>> {
        let _ = (key, lease);
        None
    }

    /// [`commit`](Self::commit), answered at once by a store that needs no I/O for it;
    /// `None`, the default, sends the layer to `commit`.
    fn commit_now(
        &self,
        key: &str,
        token: &Token,
        ttl: Duration,
    ) -> Option<Result<CommitStatus, StoreError>> {
        let _ = (key, token, ttl);
        None
    }

    /// [`release`](Self::release), answered at once by a store that needs no I/O for
    /// it; `None`, the default, when it cannot. The layer calls it when a call holding a
    /// reservation is dropped before it completes, where no future can be awaited.
    fn release_now(&self, key: &str, token: &Token) -> Option<Result<(), StoreError>> {
        let _ = (key, token);
        None
    }
}

/// `d` in whole milliseconds, rounded up, at least 1.
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) fn millis_ceil(d: Duration) -> u64 {
    let ms = d.as_nanos().div_ceil(1_000_000);
    u64::try_from(ms).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::{HEX_PAIRS, Token};

    #[test]
    fn hex_pairs_spell_every_byte() {
        for (byte, pair) in HEX_PAIRS.iter().enumerate() {
            assert_eq!(pair, format!("{byte:02x}").as_bytes());
        }
    }

    #[test]
    fn random_tokens_are_32_hex_digits_and_differ() {
        let a = Token::random();
        let b = Token::random();
        assert_eq!(a.as_str().len(), 32);
        assert!(
            a.as_str()
                .bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)),
            "{a}"
        );
        assert_ne!(a, b);
        let leading = (0..64)
            .map(|_| Token::random())
            .any(|t| !t.as_str().starts_with('0'));
        assert!(leading, "the high bits are used");
    }

    #[test]
    fn a_token_read_back_equals_the_random_one_it_was_written_from() {
        use std::collections::hash_map::DefaultHasher;
        use std::hash::{Hash, Hasher};
        let hash = |t: &Token| {
            let mut h = DefaultHasher::new();
            t.hash(&mut h);
            h.finish()
        };
        let issued = Token::random();
        let read = Token::new(issued.to_string());
        assert_eq!(issued, read);
        assert_eq!(hash(&issued), hash(&read));
        assert_ne!(read, Token::new("other"));
    }
}
