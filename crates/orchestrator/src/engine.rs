//! The workflow engine: applies a batch of work items to their tasks in one transaction
//! and returns the step executions to publish once it commits.
//!
//! Every item is re-checked under the task lock: reports are fenced by attempt and state,
//! so duplicates, stale and late reports are dropped (and counted), never applied twice.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tasker_domain::{Backoff, FailureDecision, FailureKind, Limits, StepState, TaskState, backoff::decide};
use tasker_proto::messages::{StepReport, step_report::Outcome as Reported};
use tasker_store::{Dispatch, StepChange, StepRow, Store, TaskHead, Tx};
use uuid::Uuid;

use crate::metrics::Metrics;

/// Something to do to a task.
#[derive(Debug, Clone)]
pub enum Work {
    /// Start the task if pending; dispatch whatever is ready; finalize if done.
    Evaluate,
    /// A worker's report on an attempt.
    Report(StepReport),
    /// A step whose retry may be due.
    Retry(Uuid),
    /// A step enqueued long ago and never started: publish the same attempt again.
    Republish { step: Uuid, older_than: std::time::Duration },
    /// A step in progress past its timeout plus grace: fail the attempt.
    Overdue { step: Uuid, grace: std::time::Duration },
}

/// What a committed batch asks to happen next.
#[derive(Debug, Default)]
pub struct Outcome {
    pub dispatches: Vec<Dispatch>,
    /// The earliest retry this batch scheduled.
    pub next_retry_at: Option<DateTime<Utc>>,
}

#[derive(Clone)]
pub struct Engine {
    store: Store,
    backoff: Backoff,
    limits: Limits,
    metrics: Metrics,
}

impl Engine {
    pub fn new(store: Store, backoff: Backoff, limits: Limits, metrics: Metrics) -> Engine {
        Engine { store, backoff, limits, metrics }
    }

    /// Applies the items in one transaction (tasks locked in id order) and commits.
    pub async fn apply(&self, items: Vec<(Uuid, Work)>) -> tasker_store::Result<Outcome> {
        let mut tx = self.store.begin().await?;
        let ids: Vec<Uuid> = items.iter().map(|(task, _)| *task).collect();
        let mut tasks = tx.lock_tasks(&ids).await?;
        let mut by_task: Vec<(Uuid, Vec<Work>)> = Vec::new();
        for (task, work) in items {
            match by_task.iter_mut().find(|(t, _)| *t == task) {
                Some((_, list)) => list.push(work),
                None => by_task.push((task, vec![work])),
            }
        }
        let mut outcome = Outcome::default();
        for (task_id, works) in by_task {
            let Some(task) = tasks.get_mut(&task_id) else {
                tracing::warn!(%task_id, "work for an unknown task dropped");
                self.metrics.dropped(works.len());
                continue;
            };
            let mut run = TaskRun { tx: &mut tx, task, engine: self, enqueued: Vec::new(), outcome: &mut outcome };
            for work in works {
                run.apply(work).await?;
            }
            run.finish().await?;
        }
        tx.commit().await?;
        Ok(outcome)
    }
}

/// The work on one locked task within a batch.
struct TaskRun<'a> {
    tx: &'a mut Tx,
    task: &'a mut TaskHead,
    engine: &'a Engine,
    enqueued: Vec<StepRow>,
    outcome: &'a mut Outcome,
}

impl TaskRun<'_> {
    async fn apply(&mut self, work: Work) -> tasker_store::Result<()> {
        match work {
            Work::Evaluate => self.evaluate().await,
            Work::Report(report) => self.report(report).await,
            Work::Retry(step) => self.retry(step).await,
            Work::Republish { step, older_than } => self.republish(step, older_than).await,
            Work::Overdue { step, grace } => self.overdue(step, grace).await,
        }
    }

    async fn evaluate(&mut self) -> tasker_store::Result<()> {
        if self.task.status == TaskState::Pending {
            self.tx.transition_task(self.task, TaskState::InProgress, json!({}))?;
        }
        if self.task.status == TaskState::InProgress {
            let ready = self.tx.ready_steps(self.task.id).await?;
            for step in ready {
                self.enqueue(step)?;
            }
        }
        Ok(())
    }

    fn enqueue(&mut self, mut step: StepRow) -> tasker_store::Result<()> {
        let subject = self.task.subject();
        self.tx.transition_step(&subject, &mut step, StepState::Enqueued, json!({}), StepChange::default())?;
        self.enqueued.push(step);
        Ok(())
    }

    /// The step, if it belongs to this task.
    async fn step(&mut self, id: Uuid) -> tasker_store::Result<Option<StepRow>> {
        if let Some(step) = self.enqueued.iter().find(|s| s.id == id) {
            return Ok(Some(step.clone()));
        }
        let step = self.tx.steps(&[id]).await?.pop();
        Ok(step.filter(|s| s.task_id == self.task.id))
    }

    fn drop_stale(&self, step: Uuid, attempt: u32, why: &str) {
        tracing::debug!(task_id = %self.task.id, step_id = %step, attempt, why, "stale step report dropped");
        self.engine.metrics.dropped(1);
    }

    async fn report(&mut self, report: StepReport) -> tasker_store::Result<()> {
        let step_id: Uuid = match report.step_id.parse() {
            Ok(id) => id,
            Err(_) => {
                self.drop_stale(Uuid::nil(), report.attempt, "malformed step id");
                return Ok(());
            }
        };
        if self.task.status != TaskState::InProgress {
            self.drop_stale(step_id, report.attempt, "task is not in progress");
            return Ok(());
        }
        let Some(mut step) = self.step(step_id).await? else {
            self.drop_stale(step_id, report.attempt, "unknown step");
            return Ok(());
        };
        if report.attempt != step.attempts as u32 {
            self.drop_stale(step_id, report.attempt, "not the current attempt");
            return Ok(());
        }
        let worker = json!({ "worker": report.worker_id });
        let subject = self.task.subject();
        match report.outcome {
            Some(Reported::Started(_)) => {
                if step.status != StepState::Enqueued {
                    self.drop_stale(step_id, report.attempt, "already started or settled");
                    return Ok(());
                }
                self.tx.transition_step(&subject, &mut step, StepState::InProgress, worker, StepChange::default())?;
            }
            Some(Reported::Completed(done)) => {
                if !self.begin_if_enqueued(&mut step, &worker)? {
                    self.drop_stale(step_id, report.attempt, "step is not running");
                    return Ok(());
                }
                match self.check_results(&done.results_json) {
                    Ok(results) => {
                        let change = StepChange { results: Some(results), ..Default::default() };
                        self.tx.transition_step(&subject, &mut step, StepState::Complete, worker, change)?;
                        self.engine.metrics.completed();
                        for child in self.tx.release_children(step.id).await? {
                            self.enqueue(child)?;
                        }
                    }
                    Err(problem) => {
                        self.fail(&mut step, FailureKind::Permanent, &problem, None, worker)?;
                    }
                }
            }
            Some(Reported::Failed(failed)) => {
                if !self.begin_if_enqueued(&mut step, &worker)? {
                    self.drop_stale(step_id, report.attempt, "step is not running");
                    return Ok(());
                }
                let kind = match failed.kind() {
                    tasker_proto::messages::FailureKind::Permanent => FailureKind::Permanent,
                    tasker_proto::messages::FailureKind::TimedOut => FailureKind::TimedOut,
                    _ => FailureKind::Retryable,
                };
                let retry_after = failed.retry_after_ms.map(std::time::Duration::from_millis);
                self.fail(&mut step, kind, &failed.message, retry_after, worker)?;
            }
            None => self.drop_stale(step_id, report.attempt, "report without an outcome"),
        }
        self.remember(step);
        Ok(())
    }

    /// A result can overtake its own `started` report: apply the start first.
    fn begin_if_enqueued(&mut self, step: &mut StepRow, worker: &Value) -> tasker_store::Result<bool> {
        if step.status == StepState::Enqueued {
            let subject = self.task.subject();
            self.tx.transition_step(&subject, step, StepState::InProgress, worker.clone(), StepChange::default())?;
        }
        Ok(step.status == StepState::InProgress)
    }

    /// Results must be JSON within the size limit; returns the JSON text to store.
    fn check_results(&self, text: &str) -> Result<String, String> {
        let text = if text.trim().is_empty() { "null" } else { text };
        if text.len() > self.engine.limits.max_results_bytes {
            return Err(format!(
                "results are {} bytes, more than the limit of {}",
                text.len(),
                self.engine.limits.max_results_bytes
            ));
        }
        serde_json::from_str::<serde::de::IgnoredAny>(text).map_err(|e| format!("results are not valid JSON: {e}"))?;
        Ok(text.to_owned())
    }

    /// Applies the retry policy to a failed attempt.
    fn fail(
        &mut self,
        step: &mut StepRow,
        kind: FailureKind,
        message: &str,
        retry_after: Option<std::time::Duration>,
        metadata: Value,
    ) -> tasker_store::Result<()> {
        let error = json!({ "message": message, "kind": kind.as_str(), "attempt": step.attempts });
        let mut metadata = metadata;
        metadata["error"] = error.clone();
        let subject = self.task.subject();
        let decision = decide(
            kind,
            step.attempts as u32,
            step.max_attempts as u32,
            step.retryable,
            &self.engine.backoff,
            retry_after,
        );
        match decision {
            FailureDecision::Retry { delay } => {
                let due = Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default();
                metadata["retry_in_ms"] = json!(delay.as_millis() as u64);
                let change =
                    StepChange { error: Some(error.to_string()), next_attempt_at: Some(due), ..Default::default() };
                self.tx.transition_step(&subject, step, StepState::WaitingForRetry, metadata, change)?;
                self.outcome.next_retry_at = Some(self.outcome.next_retry_at.map_or(due, |t| t.min(due)));
                self.engine.metrics.retried();
            }
            FailureDecision::Fail => {
                let change = StepChange { error: Some(error.to_string()), ..Default::default() };
                self.tx.transition_step(&subject, step, StepState::Error, metadata, change)?;
                self.engine.metrics.failed();
            }
        }
        Ok(())
    }

    /// Keeps the latest copy of a step enqueued in this run in sync.
    fn remember(&mut self, step: StepRow) {
        if let Some(slot) = self.enqueued.iter_mut().find(|s| s.id == step.id) {
            *slot = step;
        }
    }

    async fn retry(&mut self, step_id: Uuid) -> tasker_store::Result<()> {
        if self.task.status != TaskState::InProgress {
            return Ok(());
        }
        let Some(step) = self.step(step_id).await? else { return Ok(()) };
        let due = step.next_attempt_at.is_some_and(|t| t <= Utc::now());
        if step.status == StepState::WaitingForRetry && due {
            self.enqueue(step)?;
        }
        Ok(())
    }

    async fn republish(&mut self, step_id: Uuid, older_than: std::time::Duration) -> tasker_store::Result<()> {
        let Some(step) = self.step(step_id).await? else { return Ok(()) };
        let stale = step
            .enqueued_at
            .is_some_and(|t| Utc::now().signed_duration_since(t).to_std().is_ok_and(|age| age >= older_than));
        if self.task.status == TaskState::InProgress && step.status == StepState::Enqueued && stale {
            tracing::warn!(task_id = %self.task.id, step_id = %step.id, attempt = step.attempts, "step enqueued too long; publishing it again");
            self.tx.touch_step(step.id).await?;
            let dispatches = self.tx.dispatches(self.task, std::slice::from_ref(&step)).await?;
            self.outcome.dispatches.extend(dispatches);
        }
        Ok(())
    }

    async fn overdue(&mut self, step_id: Uuid, grace: std::time::Duration) -> tasker_store::Result<()> {
        if self.task.status != TaskState::InProgress {
            return Ok(());
        }
        let Some(mut step) = self.step(step_id).await? else { return Ok(()) };
        let deadline = step.started_at.map(|t| {
            t + chrono::Duration::milliseconds(step.timeout_ms) + chrono::Duration::from_std(grace).unwrap_or_default()
        });
        if step.status == StepState::InProgress && deadline.is_some_and(|d| d < Utc::now()) {
            let message = format!("no report within the step's timeout of {} ms", step.timeout_ms);
            self.fail(&mut step, FailureKind::TimedOut, &message, None, json!({ "sweeper": true }))?;
            self.remember(step);
        }
        Ok(())
    }

    /// Dispatches what this run enqueued and settles the task if nothing more can run.
    async fn finish(self) -> tasker_store::Result<()> {
        let enqueued: Vec<StepRow> = self.enqueued.into_iter().filter(|s| s.status == StepState::Enqueued).collect();
        let dispatches = self.tx.dispatches(self.task, &enqueued).await?;
        self.engine.metrics.dispatched(dispatches.len());
        self.outcome.dispatches.extend(dispatches);
        if self.task.status != TaskState::InProgress {
            return Ok(());
        }
        let progress = self.tx.progress(self.task.id).await?;
        if progress.is_complete() {
            self.tx.transition_task(self.task, TaskState::Complete, json!({}))?;
        } else if progress.is_stuck() {
            self.tx.transition_task(self.task, TaskState::Error, json!({ "unfinished_steps": progress.unfinished }))?;
        }
        Ok(())
    }
}
