//! [`CowVec`]: a vector shared between clones until one of them changes it.

use std::sync::Arc;

use smallvec::SmallVec;

/// A vector shared between clones until one changes it, allocating nothing while
/// empty. Headers and extensions keep their entries in one, so cloning a message never
/// copies them and a message without any costs no allocation.
///
/// The first [`INLINE`] entries live inside the shared allocation itself, so the first
/// push allocates once, not twice (the `Arc` and then the vector's buffer).
#[derive(Debug)]
pub(crate) struct CowVec<T>(Option<Arc<Entries<T>>>);

/// Entries kept in the `Arc`'s own allocation: a message carries a handful at most.
const INLINE: usize = 4;

pub(crate) type Entries<T> = SmallVec<[T; INLINE]>;

impl<T> CowVec<T> {
    /// The entries.
    pub(crate) fn as_slice(&self) -> &[T] {
        self.0.as_deref().map_or(&[], SmallVec::as_slice)
    }

    /// Whether nothing was ever allocated.
    #[cfg(test)]
    pub(crate) fn is_unallocated(&self) -> bool {
        self.0.is_none()
    }

    /// Whether `self` and `other` share one allocation.
    #[cfg(test)]
    pub(crate) fn shares_with(&self, other: &Self) -> bool {
        matches!((&self.0, &other.0), (Some(a), Some(b)) if Arc::ptr_eq(a, b))
    }
}

impl<T: Clone> CowVec<T> {
    /// The entries to change, copied first if a clone shares them.
    pub(crate) fn make_mut(&mut self) -> &mut Entries<T> {
        Arc::make_mut(self.0.get_or_insert_with(|| Arc::new(SmallVec::new())))
    }
}

impl<T> Default for CowVec<T> {
    fn default() -> Self {
        CowVec(None)
    }
}

impl<T> Clone for CowVec<T> {
    fn clone(&self) -> Self {
        CowVec(self.0.clone())
    }
}

/// Equal when the entries are: an emptied vector equals one never filled.
impl<T: PartialEq> PartialEq for CowVec<T> {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl<T: Eq> Eq for CowVec<T> {}
