//! Worker behaviour with each handler call on its own task ([`Execution::Spawned`]).
#![cfg(feature = "memory")]

use redrive_core::Execution;

const EXECUTION: Execution = Execution::Spawned;

include!("worker/cases.rs");
