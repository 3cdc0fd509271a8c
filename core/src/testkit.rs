//! The conformance suite every adapter runs.
