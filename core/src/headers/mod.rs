//! Message headers: ordered, case-insensitive names, string or byte values, bounded.

use std::borrow::Cow;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use crate::cow_vec::CowVec;

/// A header value: text, or bytes that are not (or need not be) UTF-8.
///
/// Brokers carry both: AMQP and SQS attributes may be binary, Kafka header values
/// are always bytes. Adapters map a byte value that is valid UTF-8 to [`HeaderValue::Str`]
/// where the broker does not say which it is.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum HeaderValue {
    /// A UTF-8 string.
    Str(String),
    /// Raw bytes.
    Bytes(Bytes),
}

impl HeaderValue {
    /// The value as a string, if it is one (or is bytes that are valid UTF-8).
    pub fn as_str(&self) -> Option<&str> {
        match self {
            HeaderValue::Str(s) => Some(s),
            HeaderValue::Bytes(b) => std::str::from_utf8(b).ok(),
        }
    }

    /// The value's bytes, whatever its kind.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            HeaderValue::Str(s) => s.as_bytes(),
            HeaderValue::Bytes(b) => b,
        }
    }

    /// Length of the value in bytes.
    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }

    /// Whether the value is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Debug for HeaderValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderValue::Str(s) => fmt::Debug::fmt(s, f),
            HeaderValue::Bytes(b) => write!(f, "b{b:?}"),
        }
    }
}

impl From<&str> for HeaderValue {
    fn from(s: &str) -> Self {
        HeaderValue::Str(s.to_owned())
    }
}

impl From<String> for HeaderValue {
    fn from(s: String) -> Self {
        HeaderValue::Str(s)
    }
}

impl From<Bytes> for HeaderValue {
    fn from(b: Bytes) -> Self {
        HeaderValue::Bytes(b)
    }
}

impl From<Vec<u8>> for HeaderValue {
    fn from(b: Vec<u8>) -> Self {
        HeaderValue::Bytes(Bytes::from(b))
    }
}

impl From<&[u8]> for HeaderValue {
    fn from(b: &[u8]) -> Self {
        HeaderValue::Bytes(Bytes::copy_from_slice(b))
    }
}

/// Limits on a set of headers.
///
/// | limit | default |
/// |---|---|
/// | `max_count` | 128 headers |
/// | `max_bytes` (names + values) | 64 KiB |
///
/// Adapters narrow these to what their broker accepts (SQS: 10 message attributes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeaderLimits {
    /// Largest number of headers.
    pub max_count: usize,
    /// Largest total size of all names and values, in bytes.
    pub max_bytes: usize,
}

impl HeaderLimits {
    /// The default limits (see the table above).
    pub const DEFAULT: HeaderLimits = HeaderLimits {
        max_count: 128,
        max_bytes: 64 * 1024,
    };
}

impl Default for HeaderLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A header could not be added: the set would break its [`HeaderLimits`], or the name is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// Adding the header would exceed the count limit.
    #[error("cannot add header `{name}`: a message may carry at most {limit} headers")]
    TooMany {
        /// The header that did not fit.
        name: String,
        /// The count limit.
        limit: usize,
    },
    /// Adding the header would exceed the size limit.
    #[error(
        "cannot add header `{name}`: headers would take {size} bytes, above the limit of {limit} bytes"
    )]
    TooLarge {
        /// The header that did not fit.
        name: String,
        /// The size the headers would have taken.
        size: usize,
        /// The size limit.
        limit: usize,
    },
    /// The header name is empty.
    #[error("header names must not be empty")]
    EmptyName,
}

/// Ordered message headers with case-insensitive names.
///
/// Names keep the case they were given (brokers show them as sent); lookups ignore ASCII
/// case. Insertion order is kept, which matters for brokers and for readable DLQ envelopes.
/// Cloning is cheap: clones share the entries until one of them is changed.
///
/// ```
/// use redrive_core::Headers;
///
/// let mut headers = Headers::new();
/// headers.insert("Correlation-Id", "abc")?;
/// assert_eq!(headers.get_str("correlation-id"), Some("abc"));
/// # Ok::<(), redrive_core::HeaderError>(())
/// ```
#[derive(Clone, Default)]
pub struct Headers {
    entries: CowVec<Entry>,
    size: usize,
    limits: HeaderLimits,
    /// Past [`SEEN_FROM`] headers, a Bloom filter of every name added (ASCII case
    /// folded): a name it has not seen is new, so adding it needs no scan. Without it,
    /// building a message of 4,096 headers (RabbitMQ's limit) scanned the list for each
    /// one, quadratic in the header count: a hostile producer's message cost a
    /// consumer far more CPU than its size (`benches/headers.rs`; figures in
    /// BENCHMARKS.md). Names removed since stay set, which only sends a later insert of
    /// them down the scan.
    seen: Option<Arc<Seen>>,
}

impl PartialEq for Headers {
    fn eq(&self, other: &Self) -> bool {
        self.entries == other.entries && self.size == other.size && self.limits == other.limits
    }
}

impl Eq for Headers {}

/// Headers past which names are tracked in a [`Seen`] filter.
const SEEN_FROM: usize = 32;

/// A Bloom filter of 65,536 bits (8 KiB) and two probes: with 4,096 names, about one
/// insert in seventy of a new name still scans.
#[derive(Clone)]
struct Seen([u64; 1024]);

impl Seen {
    /// The two bits of `name`, case folded, under this process's random seed (so a
    /// producer cannot choose names that all collide).
    fn bits(name: &str) -> [usize; 2] {
        static SEED: OnceLock<foldhash::fast::RandomState> = OnceLock::new();
        let mut h = SEED.get_or_init(Default::default).build_hasher();
        for b in name.bytes() {
            h.write_u8(b.to_ascii_lowercase());
        }
        let h = h.finish();
        [(h & 0xffff) as usize, ((h >> 16) & 0xffff) as usize]
    }

    fn may_contain(&self, bits: [usize; 2]) -> bool {
        bits.iter().all(|&b| self.0[b / 64] & (1 << (b % 64)) != 0)
    }

    fn add(&mut self, bits: [usize; 2]) {
        for b in bits {
            self.0[b / 64] |= 1 << (b % 64);
        }
    }
}

/// A name as given: borrowed when it is a `&'static str` (the [`names`](crate::names)
/// constants), so setting a well-known header copies nothing.
type Name = Cow<'static, str>;

type Entry = (Name, HeaderValue);

impl Headers {
    /// Empty headers with the default limits.
    pub fn new() -> Self {
        Self::default()
    }

    /// Empty headers with the given limits.
    pub fn with_limits(limits: HeaderLimits) -> Self {
        Headers {
            entries: CowVec::default(),
            size: 0,
            limits,
            seen: None,
        }
    }

    /// Whether no header is named `name`, known without a scan: only once there are
    /// enough headers to keep a filter, and only for a name it has not seen.
    fn surely_absent(&self, name: &str) -> bool {
        self.seen
            .as_deref()
            .is_some_and(|seen| !seen.may_contain(Seen::bits(name)))
    }

    /// Appends an entry known to fit, keeping the filter up to date.
    fn push(&mut self, name: Name, value: HeaderValue) {
        self.size += name.len() + value.len();
        match &mut self.seen {
            Some(seen) => Arc::make_mut(seen).add(Seen::bits(&name)),
            None if self.entries.as_slice().len() >= SEEN_FROM => {
                let mut seen = Seen([0; 1024]);
                seen.add(Seen::bits(&name));
                for (n, _) in self.entries.as_slice() {
                    seen.add(Seen::bits(n));
                }
                self.seen = Some(Arc::new(seen));
            }
            None => {}
        }
        self.entries.make_mut().push((name, value));
    }

    /// The limits these headers enforce.
    pub fn limits(&self) -> HeaderLimits {
        self.limits
    }

    /// Number of headers.
    pub fn len(&self) -> usize {
        self.entries.as_slice().len()
    }

    /// Whether there are no headers.
    pub fn is_empty(&self) -> bool {
        self.entries.as_slice().is_empty()
    }

    /// Total size of names and values in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    fn position(&self, name: &str) -> Option<usize> {
        self.entries
            .as_slice()
            .iter()
            .position(|(n, _)| n.eq_ignore_ascii_case(name))
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&HeaderValue> {
        self.position(name).map(|i| &self.entries.as_slice()[i].1)
    }

    /// The first value of `name`, if it is a string.
    pub fn get_str(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(HeaderValue::as_str)
    }

    /// Every value of `name`, in order.
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a HeaderValue> + 'a {
        self.entries
            .as_slice()
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// Whether a header named `name` is present.
    pub fn contains(&self, name: &str) -> bool {
        self.position(name).is_some()
    }

    fn check(
        &self,
        name: &str,
        added: usize,
        removed: usize,
        count: usize,
    ) -> Result<(), HeaderError> {
        if name.is_empty() {
            return Err(HeaderError::EmptyName);
        }
        if count > self.limits.max_count {
            return Err(HeaderError::TooMany {
                name: name.to_owned(),
                limit: self.limits.max_count,
            });
        }
        let size = self.size - removed + added;
        if size > self.limits.max_bytes {
            return Err(HeaderError::TooLarge {
                name: name.to_owned(),
                size,
                limit: self.limits.max_bytes,
            });
        }
        Ok(())
    }

    /// Sets `name` to `value`, replacing every earlier value of that name.
    ///
    /// Returns the first value it replaced. Fails, leaving the headers unchanged, if the
    /// result would break the limits.
    pub fn insert(
        &mut self,
        name: impl Into<String>,
        value: impl Into<HeaderValue>,
    ) -> Result<Option<HeaderValue>, HeaderError> {
        self.insert_name(Cow::Owned(name.into()), value.into())
    }

    /// [`insert`](Self::insert) with a name known at compile time, such as the
    /// [`names`](crate::names) constants: the name is kept as it is, not copied.
    pub fn insert_static(
        &mut self,
        name: &'static str,
        value: impl Into<HeaderValue>,
    ) -> Result<Option<HeaderValue>, HeaderError> {
        self.insert_name(Cow::Borrowed(name), value.into())
    }

    fn insert_name(
        &mut self,
        name: Name,
        value: HeaderValue,
    ) -> Result<Option<HeaderValue>, HeaderError> {
        if self.surely_absent(&name) {
            return self.append_name(name, value).map(|()| None);
        }
        let removed: usize = self
            .entries
            .as_slice()
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(&name))
            .map(|(n, v)| n.len() + v.len())
            .sum();
        let present = self.get_all(&name).count();
        self.check(
            &name,
            name.len() + value.len(),
            removed,
            self.entries.as_slice().len() - present + 1,
        )?;
        match self.position(&name) {
            Some(i) => {
                let entries = self.entries.make_mut();
                let old = std::mem::replace(&mut entries[i], (name, value));
                let mut j = i + 1;
                while j < entries.len() {
                    if entries[j].0.eq_ignore_ascii_case(&old.0) {
                        entries.remove(j);
                    } else {
                        j += 1;
                    }
                }
                let added = entries[i].0.len() + entries[i].1.len();
                self.size = self.size - removed + added;
                Ok(Some(old.1))
            }
            None => {
                self.push(name, value);
                Ok(None)
            }
        }
    }

    /// Adds a value for `name`, keeping earlier ones.
    pub fn append(
        &mut self,
        name: impl Into<String>,
        value: impl Into<HeaderValue>,
    ) -> Result<(), HeaderError> {
        self.append_name(Cow::Owned(name.into()), value.into())
    }

    /// Adds an entry after the others if the limits allow one more.
    fn append_name(&mut self, name: Name, value: HeaderValue) -> Result<(), HeaderError> {
        self.check(
            &name,
            name.len() + value.len(),
            0,
            self.entries.as_slice().len() + 1,
        )?;
        self.push(name, value);
        Ok(())
    }

    /// Removes every value of `name` and returns the first.
    pub fn remove(&mut self, name: &str) -> Option<HeaderValue> {
        if !self.contains(name) {
            return None;
        }
        let mut first = None;
        let mut size = self.size;
        self.entries.make_mut().retain_mut(|(n, v)| {
            if n.eq_ignore_ascii_case(name) {
                size -= n.len() + v.len();
                if first.is_none() {
                    first = Some(std::mem::replace(v, HeaderValue::Str(String::new())));
                }
                false
            } else {
                true
            }
        });
        self.size = size;
        first
    }

    /// Removes every header whose name satisfies `f`.
    pub fn retain(&mut self, mut f: impl FnMut(&str, &HeaderValue) -> bool) {
        if self.entries.as_slice().iter().all(|(n, v)| f(n, v)) {
            return;
        }
        let mut size = self.size;
        self.entries.make_mut().retain(|(n, v)| {
            let keep = f(n, v);
            if !keep {
                size -= n.len() + v.len();
            }
            keep
        });
        self.size = size;
    }

    /// The headers in order, as `(name, value)`.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &HeaderValue)> {
        self.entries.as_slice().iter().map(|(n, v)| (&**n, v))
    }
}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<'a> IntoIterator for &'a Headers {
    type Item = (&'a str, &'a HeaderValue);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (Cow<'static, str>, HeaderValue)>,
        fn(&'a (Cow<'static, str>, HeaderValue)) -> (&'a str, &'a HeaderValue),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.as_slice().iter().map(|(n, v)| (&**n, v))
    }
}

#[cfg(test)]
mod tests;
