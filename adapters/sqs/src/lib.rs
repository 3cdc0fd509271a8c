//! AWS SQS adapter for redrive (in progress).
