//! RabbitMQ adapter for redrive (in progress).
