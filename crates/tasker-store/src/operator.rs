//! Operator actions: cancel a task, retry or resolve a failed step. Each checks the state
//! machines under the task lock, records who asked and why in the transition metadata, and
//! writes nothing when the action is illegal.

use serde_json::{Value, json};
use tasker_domain::{StepState, TaskState};
use uuid::Uuid;

use crate::rows::{step_view, step_view_by_id};
use crate::{Error, Result, StepChange, StepView, Store};

/// Who asked for an operator action, and why.
#[derive(Debug, Clone, Default)]
pub struct Actor {
    pub who: String,
    pub reason: String,
}

impl Actor {
    fn metadata(&self, action: &str) -> Value {
        json!({ "action": action, "actor": self.who, "reason": self.reason })
    }
}

impl Store {
    /// Cancels the task and every unfinished step.
    pub async fn cancel_task(&self, task_id: Uuid, actor: &Actor) -> Result<()> {
        let mut tx = self.begin().await?;
        let mut task = tx.lock_task(task_id).await?;
        if !task.status.can_become(TaskState::Cancelled) {
            return Err(Error::FailedPrecondition(format!(
                "task {task_id} is {}; it cannot be cancelled",
                task.status
            )));
        }
        let metadata = actor.metadata("cancel");
        let subject = task.subject();
        let open = [StepState::Pending, StepState::Enqueued, StepState::InProgress, StepState::WaitingForRetry];
        for mut step in tx.steps_in(task_id, &open).await? {
            tx.transition_step(&subject, &mut step, StepState::Cancelled, metadata.clone(), StepChange::default())?;
        }
        tx.transition_task(&mut task, TaskState::Cancelled, metadata)?;
        tx.commit().await
    }

    /// Puts an `error` step back to `pending` for a new round of `max_attempts` attempts
    /// (attempt numbers keep counting: see [`crate::StepRow::attempts_before_retry`]), and
    /// resumes the task.
    /// Returns the step as the retry left it (`pending`, read inside the retry's own
    /// transaction, so never a later attempt); the orchestrator then dispatches it.
    pub async fn retry_step(&self, step_id: Uuid, actor: &Actor) -> Result<StepView> {
        self.repair_step(step_id, StepState::Pending, None, actor.metadata("retry")).await
    }

    /// Marks an `error` step `resolved_manually` with the given results (JSON text), counts
    /// it as done for its children, and resumes the task. Returns the step as resolved.
    pub async fn resolve_step(&self, step_id: Uuid, results: &str, actor: &Actor) -> Result<StepView> {
        self.repair_step(step_id, StepState::ResolvedManually, Some(results.to_owned()), actor.metadata("resolve"))
            .await
    }

    async fn repair_step(
        &self,
        step_id: Uuid,
        to: StepState,
        results: Option<String>,
        metadata: Value,
    ) -> Result<StepView> {
        let task_id = self.step(step_id, false).await?.task_id;
        let mut tx = self.begin().await?;
        let mut task = tx.lock_task(task_id).await?;
        let mut step =
            tx.steps(&[step_id]).await?.pop().ok_or_else(|| Error::NotFound(format!("step {step_id} not found")))?;
        if step.status != StepState::Error {
            return Err(Error::FailedPrecondition(format!(
                "step {} is {}; only a step in error can be {}",
                step.name,
                step.status,
                if to == StepState::Pending { "retried" } else { "resolved" }
            )));
        }
        if !matches!(task.status, TaskState::InProgress | TaskState::Error) {
            return Err(Error::FailedPrecondition(format!("task {task_id} is {}", task.status)));
        }
        tx.transition_step(
            &task.subject(),
            &mut step,
            to,
            metadata.clone(),
            StepChange { results, ..Default::default() },
        )?;
        if to == StepState::ResolvedManually {
            tx.release_children(&[step_id]).await?;
        }
        if task.status == TaskState::Error {
            tx.transition_task(&mut task, TaskState::InProgress, metadata)?;
        }
        // read back in the same round trip, after the writes and before the commit: the
        // step exactly as this action left it, whatever the orchestrator does next
        let read = step_view_by_id();
        let rows = tx.commit_reading(&[(&read, &[&step_id])]).await?;
        let row = rows.first().and_then(|r| r.first());
        step_view(row.ok_or_else(|| Error::NotFound(format!("step {step_id} not found")))?)
    }
}
