//! The lifecycle event catalog (design §5): one event per transition, published on the
//! `{prefix}.events` topic exchange as CloudEvents 1.0 JSON (structured mode) with routing
//! key `{namespace}.{task_name}.{task|step}.{event}`.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::{StepState, TaskState};

/// Every event Tasker publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// The task was created (`→ pending`).
    TaskCreated,
    /// The orchestrator began the task (`pending → in_progress`).
    TaskStarted,
    /// An operator retried or resolved a step of a failed task (`error → in_progress`).
    TaskResumed,
    TaskCompleted,
    /// Nothing more can run and a step failed (`in_progress → error`).
    TaskFailed,
    TaskCancelled,
    /// An attempt was dispatched to the workers (`pending | waiting_for_retry → enqueued`).
    StepEnqueued,
    /// A worker began the attempt (`enqueued → in_progress`).
    StepStarted,
    StepCompleted,
    /// The attempt failed and another is scheduled (`in_progress → waiting_for_retry`).
    StepRetrying,
    /// The step failed for good (`in_progress → error`).
    StepFailed,
    StepCancelled,
    /// An operator resolved the failed step (`error → resolved_manually`).
    StepResolved,
    /// An operator asked for the failed step to run again (`error → pending`).
    StepReset,
}

impl EventKind {
    pub const ALL: &'static [EventKind] = &[
        EventKind::TaskCreated,
        EventKind::TaskStarted,
        EventKind::TaskResumed,
        EventKind::TaskCompleted,
        EventKind::TaskFailed,
        EventKind::TaskCancelled,
        EventKind::StepEnqueued,
        EventKind::StepStarted,
        EventKind::StepCompleted,
        EventKind::StepRetrying,
        EventKind::StepFailed,
        EventKind::StepCancelled,
        EventKind::StepResolved,
        EventKind::StepReset,
    ];

    /// The event a task transition announces.
    pub fn for_task(from: Option<TaskState>, to: TaskState) -> EventKind {
        match (from, to) {
            (None, _) => EventKind::TaskCreated,
            (Some(TaskState::Error), TaskState::InProgress) => EventKind::TaskResumed,
            (_, TaskState::Pending | TaskState::InProgress) => EventKind::TaskStarted,
            (_, TaskState::Complete) => EventKind::TaskCompleted,
            (_, TaskState::Error) => EventKind::TaskFailed,
            (_, TaskState::Cancelled) => EventKind::TaskCancelled,
        }
    }

    /// The event a step transition announces.
    pub fn for_step(to: StepState) -> EventKind {
        match to {
            StepState::Pending => EventKind::StepReset,
            StepState::Enqueued => EventKind::StepEnqueued,
            StepState::InProgress => EventKind::StepStarted,
            StepState::Complete => EventKind::StepCompleted,
            StepState::WaitingForRetry => EventKind::StepRetrying,
            StepState::Error => EventKind::StepFailed,
            StepState::ResolvedManually => EventKind::StepResolved,
            StepState::Cancelled => EventKind::StepCancelled,
        }
    }

    /// `task` or `step`.
    pub fn entity(self) -> &'static str {
        if self.is_task() { "task" } else { "step" }
    }

    pub fn is_task(self) -> bool {
        matches!(
            self,
            EventKind::TaskCreated
                | EventKind::TaskStarted
                | EventKind::TaskResumed
                | EventKind::TaskCompleted
                | EventKind::TaskFailed
                | EventKind::TaskCancelled
        )
    }

    /// The last routing-key segment: `created`, `completed`, ….
    pub fn name(self) -> &'static str {
        match self {
            EventKind::TaskCreated => "created",
            EventKind::TaskStarted | EventKind::StepStarted => "started",
            EventKind::TaskResumed => "resumed",
            EventKind::TaskCompleted | EventKind::StepCompleted => "completed",
            EventKind::TaskFailed | EventKind::StepFailed => "failed",
            EventKind::TaskCancelled | EventKind::StepCancelled => "cancelled",
            EventKind::StepEnqueued => "enqueued",
            EventKind::StepRetrying => "retrying",
            EventKind::StepResolved => "resolved",
            EventKind::StepReset => "reset",
        }
    }

    /// The CloudEvents `type`: `dev.tasker.{task|step}.{event}`.
    pub fn type_name(self) -> String {
        format!("dev.tasker.{}.{}", self.entity(), self.name())
    }

    pub fn routing_key(self, namespace: &str, task_name: &str) -> String {
        format!("{namespace}.{task_name}.{}.{}", self.entity(), self.name())
    }
}

/// The task an event is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventSubject {
    pub task_id: Uuid,
    pub namespace: String,
    pub task_name: String,
    pub task_version: String,
    /// The task's trace context, put on each of its events.
    pub trace: crate::TraceContext,
}

/// The step a step event is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepRef<'a> {
    pub id: Uuid,
    pub name: &'a str,
    pub attempt: u32,
}

/// A CloudEvents 1.0 event in structured JSON form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudEvent {
    pub specversion: String,
    pub id: Uuid,
    pub source: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub subject: String,
    pub time: String,
    pub datacontenttype: String,
    /// Extension: the routing key the event is published with.
    pub routingkey: String,
    /// Distributed-tracing extension: the trace context of the task (its creation span),
    /// absent when there is none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub traceparent: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tracestate: String,
    pub data: Value,
}

impl CloudEvent {
    pub const CONTENT_TYPE: &'static str = "application/cloudevents+json";

    /// The event for a task transition; `id` is the transition's id, so the audit row and
    /// the event name each other. `metadata` is the transition's metadata.
    pub fn task(
        id: Uuid,
        subject: &EventSubject,
        from: Option<TaskState>,
        to: TaskState,
        metadata: &Value,
        at: DateTime<Utc>,
    ) -> CloudEvent {
        let kind = EventKind::for_task(from, to);
        let data = json!({
            "task_id": subject.task_id,
            "namespace": subject.namespace,
            "task_name": subject.task_name,
            "task_version": subject.task_version,
            "from": from.map(TaskState::as_str),
            "to": to.as_str(),
            "metadata": metadata,
        });
        Self::build(id, kind, subject, format!("task/{}", subject.task_id), data, at)
    }

    /// The event for a step transition; `id` is the transition's id.
    pub fn step(
        id: Uuid,
        subject: &EventSubject,
        step: StepRef<'_>,
        from: StepState,
        to: StepState,
        metadata: &Value,
        at: DateTime<Utc>,
    ) -> CloudEvent {
        let kind = EventKind::for_step(to);
        let data = json!({
            "task_id": subject.task_id,
            "namespace": subject.namespace,
            "task_name": subject.task_name,
            "task_version": subject.task_version,
            "step_id": step.id,
            "step_name": step.name,
            "attempt": step.attempt,
            "from": from.as_str(),
            "to": to.as_str(),
            "metadata": metadata,
        });
        Self::build(id, kind, subject, format!("task/{}/step/{}", subject.task_id, step.id), data, at)
    }

    fn build(
        id: Uuid,
        kind: EventKind,
        subject: &EventSubject,
        subject_path: String,
        data: Value,
        at: DateTime<Utc>,
    ) -> Self {
        CloudEvent {
            specversion: "1.0".into(),
            id,
            source: format!("/tasker/{}/{}", subject.namespace, subject.task_name),
            kind: kind.type_name(),
            subject: subject_path,
            time: at.to_rfc3339_opts(SecondsFormat::Micros, true),
            datacontenttype: "application/json".into(),
            routingkey: kind.routing_key(&subject.namespace, &subject.task_name),
            traceparent: subject.trace.traceparent.clone(),
            tracestate: subject.trace.tracestate.clone(),
            data,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject() -> EventSubject {
        EventSubject {
            task_id: Uuid::nil(),
            namespace: "payments".into(),
            task_name: "process_refund".into(),
            task_version: "2.1.0".into(),
            trace: Default::default(),
        }
    }

    #[test]
    fn the_task_trace_context_rides_on_its_events() {
        let mut traced = subject();
        traced.trace.traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into();
        let at = Utc::now();
        let with =
            serde_json::to_value(CloudEvent::task(Uuid::now_v7(), &traced, None, TaskState::Pending, &json!({}), at))
                .unwrap();
        assert_eq!(with["traceparent"], traced.trace.traceparent);
        assert!(with.get("tracestate").is_none(), "empty extensions are left out");
        let without = serde_json::to_value(CloudEvent::task(
            Uuid::now_v7(),
            &subject(),
            None,
            TaskState::Pending,
            &json!({}),
            at,
        ))
        .unwrap();
        assert!(without.get("traceparent").is_none());
    }

    #[test]
    fn every_transition_has_an_event() {
        for from in StepState::ALL {
            for to in StepState::ALL {
                if from.can_become(*to) {
                    let k = EventKind::for_step(*to);
                    assert!(!k.is_task(), "{from} -> {to}");
                }
            }
        }
        assert_eq!(EventKind::for_task(None, TaskState::Pending), EventKind::TaskCreated);
        assert_eq!(EventKind::for_task(Some(TaskState::Pending), TaskState::InProgress), EventKind::TaskStarted);
        assert_eq!(EventKind::for_task(Some(TaskState::Error), TaskState::InProgress), EventKind::TaskResumed);
        assert_eq!(EventKind::for_task(Some(TaskState::InProgress), TaskState::Error), EventKind::TaskFailed);
    }

    #[test]
    fn routing_keys_and_types() {
        assert_eq!(EventKind::TaskCompleted.routing_key("payments", "refund"), "payments.refund.task.completed");
        assert_eq!(EventKind::StepRetrying.routing_key("a", "b"), "a.b.step.retrying");
        assert_eq!(EventKind::StepFailed.type_name(), "dev.tasker.step.failed");
        let names: std::collections::HashSet<_> = EventKind::ALL.iter().map(|k| k.routing_key("n", "t")).collect();
        assert_eq!(names.len(), EventKind::ALL.len(), "routing keys are distinct");
    }

    #[test]
    fn cloud_event_is_structured_json() {
        let at = DateTime::parse_from_rfc3339("2026-01-02T03:04:05Z").unwrap().with_timezone(&Utc);
        let step = StepRef { id: Uuid::max(), name: "refund", attempt: 2 };
        let ev = CloudEvent::step(
            Uuid::now_v7(),
            &subject(),
            step,
            StepState::InProgress,
            StepState::Complete,
            &json!({}),
            at,
        );
        let v = serde_json::to_value(&ev).unwrap();
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["type"], "dev.tasker.step.completed");
        assert_eq!(v["time"], "2026-01-02T03:04:05.000000Z");
        assert_eq!(v["routingkey"], "payments.process_refund.step.completed");
        assert_eq!(v["data"]["attempt"], 2);
        assert_eq!(v["data"]["from"], "in_progress");
        assert_eq!(v["id"].as_str().unwrap().len(), 36);
    }
}
