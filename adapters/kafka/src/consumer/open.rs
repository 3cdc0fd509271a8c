//! [`OpenRecords`]: a handle that reads what each partition holds open, for metrics.

use std::sync::{Mutex, Weak};

use crate::watermark::{PartitionBacklog, Watermarks};

use super::lock;

/// What is open in each partition a [`KafkaConsumer`](crate::KafkaConsumer) owns,
/// from [`KafkaConsumer::open_records`](crate::KafkaConsumer::open_records). Clones
/// read the same consumer; once it is dropped there is nothing to read.
#[derive(Clone, Debug)]
pub struct OpenRecords {
    pub(super) state: Weak<Mutex<Watermarks>>,
}

impl OpenRecords {
    /// Each partition the consumer owns, by topic and partition.
    pub fn partitions(&self) -> Vec<PartitionBacklog> {
        self.state
            .upgrade()
            .map(|state| lock(&state).backlog())
            .unwrap_or_default()
    }
}
