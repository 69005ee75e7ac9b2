//! Read models: what GetTask, GetStep and ListTasks return.

use chrono::{DateTime, Utc};
use tasker_domain::{StepState, TaskState};
use tokio_postgres::Row;
use uuid::Uuid;

use crate::Result;

#[derive(Debug, Clone)]
pub struct TaskRow {
    pub id: Uuid,
    pub namespace: String,
    pub name: String,
    pub version: String,
    pub status: TaskState,
    /// JSON text.
    pub context: String,
    pub tags: Vec<String>,
    pub initiator: String,
    pub source_system: String,
    pub reason: String,
    pub priority: i32,
    pub idempotency_key: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub trace: tasker_domain::TraceContext,
}

pub(crate) const TASK_COLUMNS: &str = "t.id, t.namespace, t.name, t.version, t.status, t.context::text, t.tags, \
    t.initiator, t.source_system, t.reason, t.priority, t.idempotency_key, t.created_at, t.started_at, t.completed_at, \
    t.traceparent, t.tracestate";

pub(crate) fn task_row(row: &Row) -> Result<TaskRow> {
    Ok(TaskRow {
        id: row.get(0),
        namespace: row.get(1),
        name: row.get(2),
        version: row.get(3),
        status: row.get::<_, &str>(4).parse()?,
        context: row.get(5),
        tags: row.get(6),
        initiator: row.get(7),
        source_system: row.get(8),
        reason: row.get(9),
        priority: row.get(10),
        idempotency_key: row.get(11),
        created_at: row.get(12),
        started_at: row.get(13),
        completed_at: row.get(14),
        trace: tasker_domain::TraceContext { traceparent: row.get(15), tracestate: row.get(16) },
    })
}

#[derive(Debug, Clone)]
pub struct StepView {
    pub id: Uuid,
    pub task_id: Uuid,
    pub name: String,
    pub handler: String,
    pub status: StepState,
    /// Attempts made in the step's whole life (the latest attempt's number).
    pub attempts: i32,
    /// Attempts made before the latest operator retry.
    pub attempts_before_retry: i32,
    pub max_attempts: i32,
    pub retryable: bool,
    pub timeout_ms: i64,
    pub dependency_level: i32,
    pub config: String,
    pub results: Option<String>,
    pub last_error: Option<String>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub transitions: Vec<TransitionRow>,
}

pub(crate) const STEP_VIEW_COLUMNS: &str = "s.id, s.task_id, s.name, s.handler, s.status, s.attempts, s.max_attempts, \
    s.retryable, s.timeout_ms, s.dependency_level, s.handler_config::text, s.results::text, s.last_error::text, \
    s.next_attempt_at, s.started_at, s.completed_at, s.attempts_before_retry";

/// One step by id (`$1`), as [`step_view`] reads it.
pub(crate) fn step_view_by_id() -> String {
    format!("SELECT {STEP_VIEW_COLUMNS} FROM workflow_steps s WHERE s.id = $1")
}

pub(crate) fn step_view(row: &Row) -> Result<StepView> {
    Ok(StepView {
        id: row.get(0),
        task_id: row.get(1),
        name: row.get(2),
        handler: row.get(3),
        status: row.get::<_, &str>(4).parse()?,
        attempts: row.get(5),
        max_attempts: row.get(6),
        retryable: row.get(7),
        timeout_ms: row.get(8),
        dependency_level: row.get(9),
        config: row.get(10),
        results: row.get(11),
        last_error: row.get(12),
        next_attempt_at: row.get(13),
        started_at: row.get(14),
        completed_at: row.get(15),
        attempts_before_retry: row.get(16),
        transitions: Vec::new(),
    })
}

#[derive(Debug, Clone)]
pub struct EdgeRow {
    pub from_step: String,
    pub to_step: String,
}

#[derive(Debug, Clone)]
pub struct TransitionRow {
    /// Also the id of the event that announced it.
    pub id: Uuid,
    pub owner: Uuid,
    pub from_state: Option<String>,
    pub to_state: String,
    pub sort_key: i32,
    /// JSON text.
    pub metadata: String,
    pub created_at: DateTime<Utc>,
}

pub(crate) fn transition_row(row: &Row) -> TransitionRow {
    TransitionRow {
        id: row.get(6),
        owner: row.get(0),
        from_state: row.get(1),
        to_state: row.get(2),
        sort_key: row.get(3),
        metadata: row.get(4),
        created_at: row.get(5),
    }
}

#[derive(Debug, Clone)]
pub struct TaskView {
    pub task: TaskRow,
    pub steps: Vec<StepView>,
    pub edges: Vec<EdgeRow>,
    /// The task's own transitions (when asked for).
    pub transitions: Vec<TransitionRow>,
}
