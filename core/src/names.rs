//! Header names redrive reads and writes, in one place.
//!
//! Names are matched without regard to ASCII case ([`Headers`](crate::Headers)).

/// W3C trace context: the producer's span.
pub const TRACEPARENT: &str = "traceparent";
/// W3C trace context: vendor state.
pub const TRACESTATE: &str = "tracestate";
/// The canonical correlation id header.
pub const CORRELATION_ID: &str = "x-correlation-id";
/// Other names a correlation id is commonly sent under; read, never written.
pub const CORRELATION_ID_ALIASES: &[&str] = &["correlation-id", "x-request-id"];
/// A producer-assigned message id.
pub const MESSAGE_ID: &str = "message-id";
/// A producer-assigned idempotency key.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// The delivery attempt, maintained by adapters whose broker does not count deliveries.
pub const ATTEMPT: &str = "x-redrive-attempt";
/// The ordering key, carried as a header by adapters whose broker has no key of its own.
pub const ORDERING_KEY: &str = "x-redrive-key";
/// Why a dead letter was dead-lettered (`permanent`, `exhausted`, `abandoned`): every
/// dead letter carries it, so an adapter can tell a dead letter from other messages.
pub const ERROR_KIND: &str = "x-redrive-error-kind";
