//! What a Worker did: the [`Report`] it returns when it stops.

/// What a Worker did, returned when it stops.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Report {
    /// Deliveries taken from the consumer.
    pub received: u64,
    /// Deliveries acked (and the ack accepted by the broker).
    pub acked: u64,
    /// Handled successfully (acked, or the ack failed and is in `settle_errors`).
    pub processed: u64,
    /// Dead-lettered by the stack (counted like `processed`).
    pub dead_lettered: u64,
    /// Skipped as duplicates (counted like `processed`).
    pub deduplicated: u64,
    /// Skipped deliberately by a layer (counted like `processed`).
    pub skipped: u64,
    /// Deliveries nacked after a failure.
    pub nacked: u64,
    /// Times a failed message was parked by the Worker.
    pub parked: u64,
    /// Handler calls that panicked.
    pub panicked: u64,
    /// Worker tasks that panicked outside the handler (an adapter's acker, the Worker
    /// itself; a user's classifier or error `Display` is caught where it runs and the
    /// message still settled). Their slot, parked place and ordering key were freed and
    /// their message left to its acker's drop: the broker delivers it again, possibly
    /// after later messages of its key (an order kept forever behind a task that is gone
    /// would stop the key for good).
    pub crashed: u64,
    /// Deliveries handed back unprocessed at shutdown (waiting or parked).
    pub handed_back: u64,
    /// Deliveries still running at the shutdown deadline, handed back.
    pub in_flight_at_deadline: u64,
    /// Settle or lease calls the broker refused (the broker redelivers those messages).
    pub settle_errors: u64,
}
