//! Tasker's pure domain: task and step states with their transition rules, the workflow
//! template model and its validation, the retry/backoff policy and the lifecycle event
//! catalog. No I/O and no framework types: everything here is testable with no database
//! and no broker, and every other crate takes these rules from here.

pub mod backoff;
pub mod event;
pub mod limits;
pub mod payload;
pub mod state;
pub mod template;
pub mod trace;

pub use backoff::{Backoff, FailureDecision, FailureKind};
pub use event::{CloudEvent, EventKind, EventSubject};
pub use limits::Limits;
pub use payload::{PayloadError, quote};
pub use state::{IllegalTransition, StepState, TaskState};
pub use template::{StepTemplate, Template, TemplateError};
pub use trace::TraceContext;

/// A new time-ordered identifier (UUIDv7): safe to expose, sorts by creation time.
pub fn new_id() -> uuid::Uuid {
    uuid::Uuid::now_v7()
}
