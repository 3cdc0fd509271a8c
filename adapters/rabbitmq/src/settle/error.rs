//! [`TagGap`]: a delivery tag the channel's window cannot explain.

/// A delivery tag further ahead than the channel's window allows: the broker (or a proxy
/// between) broke the protocol, and the channel cannot be trusted with a multiple ack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TagGap {
    /// The tag that arrived.
    pub(crate) tag: u64,
    /// The tag expected.
    pub(crate) expected: u64,
    /// The channel's prefetch.
    pub(crate) window: u64,
}

impl std::fmt::Display for TagGap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "delivery tag {} arrived where {} was expected: {} deliveries skipped, more than \
             the channel's prefetch of {} allows (a broker or proxy broke the protocol); \
             the channel is closed and its deliveries come again",
            self.tag,
            self.expected,
            self.tag - self.expected,
            self.window
        )
    }
}
