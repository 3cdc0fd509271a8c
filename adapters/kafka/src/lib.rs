//! Kafka adapter for redrive (in progress).
