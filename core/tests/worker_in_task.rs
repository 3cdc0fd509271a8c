//! Worker behaviour with handler calls polled in the Worker's task ([`Execution::InTask`]).
#![cfg(feature = "memory")]

use redrive_core::Execution;

const EXECUTION: Execution = Execution::InTask;

include!("worker/cases.rs");
