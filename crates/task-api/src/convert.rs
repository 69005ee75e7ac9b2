//! Store rows and domain values → protobuf messages.

use chrono::{DateTime, Utc};
use tasker_domain::{StepState, TaskState};
use tasker_proto::v1 as pb;
use tasker_store::{StepView, TaskRow, TaskView, TemplateRecord, TransitionRow};

pub fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: at.timestamp(), nanos: at.timestamp_subsec_nanos() as i32 }
}

pub fn task_status(s: TaskState) -> pb::TaskStatus {
    match s {
        TaskState::Pending => pb::TaskStatus::Pending,
        TaskState::InProgress => pb::TaskStatus::InProgress,
        TaskState::Complete => pb::TaskStatus::Complete,
        TaskState::Error => pb::TaskStatus::Error,
        TaskState::Cancelled => pb::TaskStatus::Cancelled,
    }
}

pub fn task_state(s: pb::TaskStatus) -> Option<TaskState> {
    match s {
        pb::TaskStatus::Unspecified => None,
        pb::TaskStatus::Pending => Some(TaskState::Pending),
        pb::TaskStatus::InProgress => Some(TaskState::InProgress),
        pb::TaskStatus::Complete => Some(TaskState::Complete),
        pb::TaskStatus::Error => Some(TaskState::Error),
        pb::TaskStatus::Cancelled => Some(TaskState::Cancelled),
    }
}

pub fn step_status(s: StepState) -> pb::StepStatus {
    match s {
        StepState::Pending => pb::StepStatus::Pending,
        StepState::Enqueued => pb::StepStatus::Enqueued,
        StepState::InProgress => pb::StepStatus::InProgress,
        StepState::WaitingForRetry => pb::StepStatus::WaitingForRetry,
        StepState::Complete => pb::StepStatus::Complete,
        StepState::Error => pb::StepStatus::Error,
        StepState::ResolvedManually => pb::StepStatus::ResolvedManually,
        StepState::Cancelled => pb::StepStatus::Cancelled,
    }
}

pub fn template(record: &TemplateRecord) -> pb::Template {
    let t = &record.template;
    pb::Template {
        namespace: t.namespace.clone(),
        name: t.name.clone(),
        version: t.version.to_string(),
        description: t.description.clone(),
        steps: t
            .steps
            .iter()
            .map(|s| pb::StepTemplate {
                name: s.name.clone(),
                handler: s.handler.clone(),
                depends_on: s.depends_on.clone(),
                max_attempts: s.max_attempts,
                retryable: s.retryable,
                timeout_ms: s.timeout_ms,
                config_json: s.config.to_string(),
            })
            .collect(),
        input_schema_json: t.input_schema.as_ref().map(|s| s.to_string()).unwrap_or_default(),
        created_at: Some(timestamp(record.created_at)),
    }
}

pub fn transition(t: &TransitionRow) -> pb::Transition {
    pb::Transition {
        from_state: t.from_state.clone().unwrap_or_default(),
        to_state: t.to_state.clone(),
        sort_key: t.sort_key as u32,
        metadata_json: t.metadata.clone(),
        created_at: Some(timestamp(t.created_at)),
        id: t.id.to_string(),
    }
}

pub fn step(s: &StepView) -> pb::Step {
    pb::Step {
        id: s.id.to_string(),
        task_id: s.task_id.to_string(),
        name: s.name.clone(),
        handler: s.handler.clone(),
        status: step_status(s.status) as i32,
        attempts: s.attempts as u32,
        attempts_before_retry: s.attempts_before_retry as u32,
        max_attempts: s.max_attempts as u32,
        retryable: s.retryable,
        timeout_ms: s.timeout_ms as u64,
        dependency_level: s.dependency_level as u32,
        config_json: s.config.clone(),
        results_json: s.results.clone().unwrap_or_default(),
        last_error_json: s.last_error.clone().unwrap_or_default(),
        next_attempt_at: s.next_attempt_at.map(timestamp),
        started_at: s.started_at.map(timestamp),
        completed_at: s.completed_at.map(timestamp),
        transitions: s.transitions.iter().map(transition).collect(),
    }
}

pub fn task_row(t: &TaskRow) -> pb::Task {
    pb::Task {
        id: t.id.to_string(),
        namespace: t.namespace.clone(),
        name: t.name.clone(),
        version: t.version.clone(),
        status: task_status(t.status) as i32,
        context_json: t.context.clone(),
        tags: t.tags.clone(),
        initiator: t.initiator.clone(),
        source_system: t.source_system.clone(),
        reason: t.reason.clone(),
        priority: t.priority,
        idempotency_key: t.idempotency_key.clone().unwrap_or_default(),
        created_at: Some(timestamp(t.created_at)),
        started_at: t.started_at.map(timestamp),
        completed_at: t.completed_at.map(timestamp),
        steps: Vec::new(),
        edges: Vec::new(),
        transitions: Vec::new(),
    }
}

pub fn task(view: &TaskView) -> pb::Task {
    let mut task = task_row(&view.task);
    task.steps = view.steps.iter().map(step).collect();
    task.edges =
        view.edges.iter().map(|e| pb::Edge { from_step: e.from_step.clone(), to_step: e.to_step.clone() }).collect();
    task.transitions = view.transitions.iter().map(transition).collect();
    task
}
