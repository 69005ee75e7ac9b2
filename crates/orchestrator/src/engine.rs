//! The workflow engine: applies a batch of work items in one transaction and returns the
//! step executions to publish once it commits.
//!
//! A batch costs two round trips to Postgres, whatever its size. (1) Lock the tasks and,
//! under the locks, read the steps the items name, the children of the steps reported
//! complete, the ready steps of tasks to evaluate, whether each task's other steps are
//! unfinished or live, and each small task in whole (to keep it: `kept`). Then, in
//! memory: apply every item (transitions are buffered), count down the children of each
//! completed step, enqueue what became ready and settle the tasks by how their steps
//! stand. (2) Write it all, read what the executions carry, and commit.
//! A batch of reports (or due retries) on tasks all kept, none in another batch under way,
//! costs one: what (1) would read comes from the kept tasks, and the fence that goes first
//! in (2) checks under the locks that they are unchanged; when one changed, the batch is
//! decided again from reads.
//! Every item is re-checked under the task lock: reports are fenced by attempt and state,
//! so duplicates, stale and late reports are dropped (and counted), never applied twice.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tasker_domain::{
    Backoff, FailureDecision, FailureKind, Limits, StepState, TaskState,
    backoff::decide,
    payload::{self, recordable},
};
use tasker_proto::messages::{StepReport, step_report::Outcome as Reported};
use tasker_store::{Dispatch, Loaded, Standing, StepChange, StepRow, Store, TaskHead, Tx};
use uuid::Uuid;

use crate::{
    kept::{self, Created, Keeper},
    metrics::Tally,
};

/// Something to do to a task.
#[derive(Debug, Clone)]
pub enum Work {
    /// Start the task if pending; dispatch whatever is ready; finalize if done.
    Evaluate,
    /// Evaluate a task its creator has just written, as it tells it: kept from this first
    /// batch on, so that the batch is decided without reading the task (fenced like any).
    Start(Arc<Created>),
    /// A worker's report on an attempt.
    Report(StepReport),
    /// A step whose retry may be due.
    Retry(Uuid),
    /// A step enqueued long ago and never started: publish the same attempt again.
    Republish { step: Uuid, older_than: std::time::Duration },
    /// A step in progress past its timeout plus grace: fail the attempt.
    Overdue { step: Uuid, grace: std::time::Duration },
}

impl Work {
    /// Whether a batch of such items may be decided from kept tasks: those that need
    /// nothing but the steps they name and these steps' children.
    fn decidable_from_kept(&self) -> bool {
        matches!(self, Work::Report(_) | Work::Retry(_) | Work::Evaluate | Work::Start(_))
    }

    fn step_id(&self) -> Option<Uuid> {
        match self {
            Work::Evaluate | Work::Start(_) => None,
            Work::Report(r) => r.step_id.parse().ok(),
            Work::Retry(step) | Work::Republish { step, .. } | Work::Overdue { step, .. } => Some(*step),
        }
    }
}

/// What a committed batch asks to happen next.
#[derive(Debug, Default)]
pub struct Outcome {
    pub dispatches: Vec<Dispatch>,
    /// The earliest retry this batch scheduled.
    pub next_retry_at: Option<DateTime<Utc>>,
    /// What the committed batch counted, for the metrics.
    pub tally: Tally,
    /// How long its parts took.
    pub phases: Phases,
    /// How the batch was decided.
    pub decided: Decided,
}

/// How a batch was decided.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Decided {
    /// From what its first round trip read under the locks.
    #[default]
    FromReads,
    /// From the tasks kept in memory, in one round trip.
    FromKept,
    /// From kept tasks first; the fence found one changed (by an operator, another
    /// replica), so from reads again.
    AgainFromReads,
}

/// Where a batch's time went: the first round trip (a pooled connection, `BEGIN`, the
/// locks and the reads; for a batch decided from kept tasks, the pooled connection and
/// what the reads would have returned, from memory), the work in memory, and the second
/// round trip (the writes, the executions' reads and the commit; first the fence, for a
/// batch decided from kept tasks).
#[derive(Debug, Default, Clone, Copy)]
pub struct Phases {
    pub read: Duration,
    pub apply: Duration,
    pub write: Duration,
}

#[derive(Clone)]
pub struct Engine {
    store: Store,
    backoff: Backoff,
    limits: Limits,
    kept: Keeper,
}

/// What a batch's items name: the tasks, the steps, the steps reported complete, and the
/// tasks to evaluate.
struct Named {
    tasks: Vec<Uuid>,
    steps: Vec<Uuid>,
    completed: Vec<Uuid>,
    evaluate: Vec<Uuid>,
}

impl Named {
    fn of(items: &[(Uuid, Work)]) -> Named {
        Named {
            tasks: items.iter().map(|(task, _)| *task).collect(),
            steps: items.iter().filter_map(|(_, w)| w.step_id()).collect(),
            completed: items
                .iter()
                .filter_map(|(_, w)| match w {
                    Work::Report(r) if matches!(r.outcome, Some(Reported::Completed(_))) => w.step_id(),
                    _ => None,
                })
                .collect(),
            evaluate: items
                .iter()
                .filter(|(_, w)| matches!(w, Work::Evaluate | Work::Start(_)))
                .map(|(task, _)| *task)
                .collect(),
        }
    }
}

/// The tasks and steps a committed batch left, as they are stored now.
struct After {
    tasks: HashMap<Uuid, TaskHead>,
    steps: HashMap<Uuid, StepRow>,
}

impl Engine {
    pub fn new(store: Store, backoff: Backoff, limits: Limits) -> Engine {
        Engine { store, backoff, limits, kept: Keeper::default() }
    }

    /// Applies the items in one transaction (tasks locked in id order) and commits.
    /// Borrowed, so that a batch held through an outage is tried again without a copy.
    pub async fn apply(&self, items: &[(Uuid, Work)]) -> tasker_store::Result<Outcome> {
        let clock = Instant::now();
        let named = Named::of(items);
        let busy = self.kept.busy(&named.tasks);
        for (_, work) in items {
            if let Work::Start(created) = work {
                self.kept.offer(created);
            }
        }
        let mut stale = false;
        let from_kept = !busy.shared && items.iter().all(|(_, w)| w.decidable_from_kept());
        if let Some(from) =
            from_kept.then(|| self.kept.load(&named.tasks, &named.steps, &named.completed, &named.evaluate)).flatten()
        {
            let told = from.told.clone();
            match self.decide_from_kept(items, from, clock).await {
                Err(error) if error.is_stale_kept() => {
                    // the fence names the tasks it found changed
                    let changed = error.stale_tasks().unwrap_or_else(|| named.tasks.clone());
                    tracing::debug!(
                        changed = changed.len(),
                        "a kept task changed; deciding the batch again from reads"
                    );
                    self.kept.stale(&changed);
                    stale = true;
                }
                // a request told a value the database cannot even hold (a config that is
                // not JSON, a NUL in a name): not the stored task either, whichever of the
                // told ones it was
                Err(error) if !told.is_empty() && error.is_refused_value() => {
                    tracing::debug!(told = told.len(), %error, "a task request told a value the database refuses; deciding the batch again from reads");
                    self.kept.stale(&told);
                    stale = true;
                }
                Ok(outcome) => return Ok(outcome),
                Err(error) => {
                    self.kept.forget(&named.tasks);
                    return Err(error);
                }
            }
        }
        let result = self.decide_from_reads(items, &named, clock, stale).await;
        if result.is_err() {
            self.kept.forget(&named.tasks);
        }
        drop(busy);
        result
    }

    /// One round trip: the fence, the writes, the executions' reads and the commit.
    async fn decide_from_kept(
        &self,
        items: &[(Uuid, Work)],
        from: kept::FromKept,
        clock: Instant,
    ) -> tasker_store::Result<Outcome> {
        let mut tx = self.store.begin().await?;
        tx.fence(
            from.loaded.tasks.values().map(|task| (task, kept::step_keys(&from.wholes[&task.id].steps))),
            from.told.iter().map(|id| (&from.loaded.tasks[id], &from.wholes[id])),
        );
        #[cfg(debug_assertions)]
        kept::check(&mut tx, &from).await?;
        let (mut outcome, after) = self.decide(items, tx, from.loaded, clock).await?;
        outcome.decided = Decided::FromKept;
        self.kept.keep(from.wholes, &after.tasks, &after.steps);
        Ok(outcome)
    }

    /// Two round trips: the locks and the reads (each small task in whole, to keep it as
    /// the batch leaves it), then the writes, the executions' reads and the commit.
    async fn decide_from_reads(
        &self,
        items: &[(Uuid, Work)],
        named: &Named,
        clock: Instant,
        stale: bool,
    ) -> tasker_store::Result<Outcome> {
        let mut tx = self.store.begin().await?;
        let whole = self.kept.to_read_whole(&named.tasks);
        let mut loaded = tx
            .load_batch(
                &named.tasks,
                &named.steps,
                &named.completed,
                &named.evaluate,
                (&whole, kept::MAX_STEPS_PER_TASK),
            )
            .await?;
        let wholes = std::mem::take(&mut loaded.whole);
        self.kept.unkeep(whole.into_iter().filter(|id| loaded.tasks.contains_key(id) && !wholes.contains_key(id)));
        let (mut outcome, after) = self.decide(items, tx, loaded, clock).await?;
        if stale {
            outcome.decided = Decided::AgainFromReads;
        }
        self.kept.keep(wholes, &after.tasks, &after.steps);
        Ok(outcome)
    }

    /// Applies the items to what the batch loaded, in memory, then writes it all and
    /// commits.
    async fn decide(
        &self,
        items: &[(Uuid, Work)],
        tx: Tx,
        loaded: Loaded,
        clock: Instant,
    ) -> tasker_store::Result<(Outcome, After)> {
        let read = clock.elapsed();
        let batch_span = tracing::Span::current();
        for task in loaded.tasks.values() {
            tasker_runtime::trace::link(&batch_span, &task.trace);
        }
        let mut batch = Batch {
            engine: self,
            tx,
            tasks: loaded.tasks,
            steps: loaded.steps,
            children: loaded.children,
            standing: loaded.standing,
            touched: HashSet::new(),
            ready: loaded.ready,
            enqueued: Vec::new(),
            republished: Vec::new(),
            next_retry_at: None,
            tally: Tally::default(),
            clock,
            phases: Phases { read, ..Phases::default() },
        };
        for (task_id, work) in items {
            batch.apply(*task_id, work)?;
        }
        batch.finish().await
    }
}

/// One batch's transaction and what it has done so far.
struct Batch<'a> {
    engine: &'a Engine,
    tx: Tx,
    tasks: HashMap<Uuid, TaskHead>,
    /// Every step the batch has read, as it is now.
    steps: HashMap<Uuid, StepRow>,
    /// The children of the steps reported complete.
    children: HashMap<Uuid, Vec<Uuid>>,
    /// How each task's steps that no item names stood when the batch read them.
    standing: HashMap<Uuid, Standing>,
    /// Tasks to settle at the end.
    touched: HashSet<Uuid>,
    /// Steps that may be ready to enqueue: of evaluated tasks, and children whose last
    /// parent completed (re-checked at the end).
    ready: Vec<Uuid>,
    /// Steps enqueued in this batch, to dispatch after commit.
    enqueued: Vec<Uuid>,
    /// Steps whose current attempt is published again.
    republished: Vec<Uuid>,
    next_retry_at: Option<DateTime<Utc>>,
    tally: Tally,
    /// Started with the batch; `phases` is filled in as it goes.
    clock: Instant,
    phases: Phases,
}

impl Batch<'_> {
    fn apply(&mut self, task_id: Uuid, work: &Work) -> tasker_store::Result<()> {
        let Some(task) = self.tasks.get(&task_id) else {
            tracing::warn!(%task_id, "work for an unknown task dropped");
            self.tally.dropped("unknown task");
            return Ok(());
        };
        let in_progress = task.status == TaskState::InProgress;
        self.touched.insert(task_id);
        match work {
            Work::Evaluate | Work::Start(_) => self.evaluate(task_id),
            Work::Report(report) => self.report(task_id, report),
            Work::Retry(step) if in_progress => self.retry(*step),
            Work::Republish { step, older_than } if in_progress => self.republish(*step, *older_than),
            Work::Overdue { step, grace } if in_progress => self.overdue(*step, *grace),
            Work::Retry(_) | Work::Republish { .. } | Work::Overdue { .. } => Ok(()),
        }
    }

    fn evaluate(&mut self, task_id: Uuid) -> tasker_store::Result<()> {
        let task = self.tasks.get_mut(&task_id).expect("locked task");
        if task.status == TaskState::Pending {
            self.tx.transition_task(task, TaskState::InProgress, json!({}))?;
        }
        // its ready steps were read with the batch and are enqueued at the end
        Ok(())
    }

    /// The step with this id if it belongs to the task.
    fn step_of(&self, task_id: Uuid, step_id: Uuid) -> Option<StepRow> {
        self.steps.get(&step_id).filter(|s| s.task_id == task_id).cloned()
    }

    fn transition(
        &mut self,
        step: &mut StepRow,
        to: StepState,
        mut metadata: Value,
        change: StepChange,
    ) -> tasker_store::Result<()> {
        // how long the attempt waited in its queue, and ran: recorded with the transition
        // (what analytics reads) and observed in the histograms
        let now = Utc::now();
        let task = &self.tasks[&step.task_id];
        if to == StepState::InProgress {
            let started = change.started_at.unwrap_or(now);
            if let Some(wait) = step.enqueued_at.map(|enqueued| millis_between(enqueued, started)) {
                metadata["wait_ms"] = json!(wait);
                self.tally.queue_wait(&task.namespace, &task.name, wait);
            }
        } else if step.status == StepState::InProgress
            && let Some(run) = step.started_at.map(|started| millis_between(started, now))
        {
            metadata["run_ms"] = json!(run);
            let outcome = match to {
                StepState::Complete => "complete",
                StepState::WaitingForRetry => "retry",
                _ => "error",
            };
            self.tally.run_time(&task.namespace, &task.name, outcome, run);
        }
        let subject = task.subject();
        self.tx.transition_step(&subject, step, to, metadata, change)?;
        if to == StepState::Enqueued {
            self.enqueued.push(step.id);
        }
        self.steps.insert(step.id, step.clone());
        Ok(())
    }

    /// How each task stands at the end of the batch: the steps it has in memory as they
    /// are now, and the rest as the batch read them. The batch changes only steps it has
    /// in memory, and none of those it does not name ends less live or less unfinished
    /// than it began: a child stays unfinished, a ready step is enqueued.
    fn standing(&self, open: &[Uuid]) -> HashMap<Uuid, Standing> {
        let mut standing: HashMap<Uuid, Standing> =
            open.iter().map(|id| (*id, self.standing.get(id).copied().unwrap_or_default())).collect();
        for step in self.steps.values() {
            if let Some(task) = standing.get_mut(&step.task_id) {
                task.count(step);
            }
        }
        standing
    }

    /// Debug builds (the tests) check each task's standing against counts over all its
    /// steps in the database, its writes included (one more round trip, before commit).
    #[cfg(debug_assertions)]
    async fn check_standing(&mut self, standing: &HashMap<Uuid, Standing>) -> tasker_store::Result<()> {
        if standing.is_empty() {
            return Ok(());
        }
        let open: Vec<Uuid> = standing.keys().copied().collect();
        let stored = self.tx.progress(&open).await?;
        for (id, standing) in standing {
            let counted = stored.get(id).copied().unwrap_or_default();
            assert_eq!(
                (standing.is_complete(), standing.is_stuck()),
                (counted.is_complete(), counted.is_stuck()),
                "task {id}: standing {standing:?} differs from the database's counts {counted:?}"
            );
        }
        Ok(())
    }

    /// Counts a completed step as done for each of its children; a child whose last
    /// parent this was becomes ready.
    fn release_children(&mut self, step_id: Uuid) {
        for child_id in self.children.get(&step_id).cloned().unwrap_or_default() {
            let Some(mut child) = self.steps.get(&child_id).cloned() else { continue };
            child.pending_parents -= 1;
            self.tx.parents_done(&child);
            if child.pending_parents == 0 {
                self.ready.push(child.id);
            }
            self.steps.insert(child.id, child);
        }
    }

    fn drop_stale(&mut self, task_id: Uuid, step: Uuid, attempt: u32, why: &'static str) {
        tracing::debug!(%task_id, step_id = %step, attempt, why, "stale step report dropped");
        self.tally.dropped(why);
    }

    fn report(&mut self, task_id: Uuid, report: &StepReport) -> tasker_store::Result<()> {
        let Ok(step_id) = report.step_id.parse::<Uuid>() else {
            self.drop_stale(task_id, Uuid::nil(), report.attempt, "malformed step id");
            return Ok(());
        };
        if self.tasks[&task_id].status != TaskState::InProgress {
            self.drop_stale(task_id, step_id, report.attempt, "task is not in progress");
            return Ok(());
        }
        let Some(mut step) = self.step_of(task_id, step_id) else {
            self.drop_stale(task_id, step_id, report.attempt, "unknown step");
            return Ok(());
        };
        if report.attempt != step.attempts as u32 {
            self.drop_stale(task_id, step_id, report.attempt, "not the current attempt");
            return Ok(());
        }
        // what a worker says is recorded, never trusted to be storable
        let worker = json!({ "worker": recordable(&report.worker_id, MAX_WORKER_ID) });
        let started_at = reported_start(report.started_at_unix_ms, &step);
        match &report.outcome {
            Some(Reported::Started(_)) => {
                if step.status != StepState::Enqueued {
                    self.drop_stale(task_id, step_id, report.attempt, "already started or settled");
                    return Ok(());
                }
                self.transition(
                    &mut step,
                    StepState::InProgress,
                    worker,
                    StepChange { started_at, ..Default::default() },
                )
            }
            Some(Reported::Completed(done)) => {
                if !self.begin_if_enqueued(&mut step, &worker, started_at)? {
                    self.drop_stale(task_id, step_id, report.attempt, "step is not running");
                    return Ok(());
                }
                match self.check_results(&done.results_json) {
                    Ok(results) => {
                        let change = StepChange { results: Some(results), ..Default::default() };
                        self.transition(&mut step, StepState::Complete, worker, change)?;
                        self.tally.completed();
                        self.release_children(step.id);
                        Ok(())
                    }
                    Err(problem) => self.fail(&mut step, FailureKind::Permanent, &problem, None, worker),
                }
            }
            Some(Reported::Failed(failed)) => {
                if !self.begin_if_enqueued(&mut step, &worker, started_at)? {
                    self.drop_stale(task_id, step_id, report.attempt, "step is not running");
                    return Ok(());
                }
                let kind = match failed.kind() {
                    tasker_proto::messages::FailureKind::Permanent => FailureKind::Permanent,
                    tasker_proto::messages::FailureKind::TimedOut => FailureKind::TimedOut,
                    _ => FailureKind::Retryable,
                };
                let retry_after = failed.retry_after_ms.map(std::time::Duration::from_millis);
                self.fail(
                    &mut step,
                    kind,
                    &recordable(&failed.message, payload::MAX_ERROR_MESSAGE),
                    retry_after,
                    worker,
                )
            }
            None => {
                self.drop_stale(task_id, step_id, report.attempt, "report without an outcome");
                Ok(())
            }
        }
    }

    /// An outcome may come without a `started` report (workers report the start of quick
    /// steps with their outcome) or overtake it: apply the start first.
    fn begin_if_enqueued(
        &mut self,
        step: &mut StepRow,
        worker: &Value,
        started_at: Option<DateTime<Utc>>,
    ) -> tasker_store::Result<bool> {
        if step.status == StepState::Enqueued {
            let change = StepChange { started_at, ..Default::default() };
            self.transition(step, StepState::InProgress, worker.clone(), change)?;
        }
        Ok(step.status == StepState::InProgress)
    }

    /// Results must be a payload the system can store and hand on to the step's children
    /// (size, JSON, depth, no U+0000: [`tasker_domain::payload`]); returns the JSON text to
    /// store, or why the attempt fails.
    fn check_results(&self, text: &str) -> Result<String, String> {
        let text = if text.trim().is_empty() { "null" } else { text };
        tasker_domain::payload::check(text, self.engine.limits.max_results_bytes)
            .map_err(|problem| format!("results refused: {problem}"))?;
        Ok(text.to_owned())
    }

    /// Applies the retry policy to a failed attempt.
    fn fail(
        &mut self,
        step: &mut StepRow,
        kind: FailureKind,
        message: &str,
        retry_after: Option<std::time::Duration>,
        mut metadata: Value,
    ) -> tasker_store::Result<()> {
        let error = json!({ "message": message, "kind": kind.as_str(), "attempt": step.attempts });
        metadata["error"] = error.clone();
        let backoff = &self.engine.backoff;
        // the budget and the backoff count attempts of the current round only
        let round = (step.attempts - step.attempts_before_retry) as u32;
        match decide(kind, round, step.max_attempts as u32, step.retryable, backoff, retry_after) {
            FailureDecision::Retry { delay } => {
                let due = Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default();
                metadata["retry_in_ms"] = json!(delay.as_millis() as u64);
                let change =
                    StepChange { error: Some(error.to_string()), next_attempt_at: Some(due), ..Default::default() };
                self.transition(step, StepState::WaitingForRetry, metadata, change)?;
                self.next_retry_at = Some(self.next_retry_at.map_or(due, |t| t.min(due)));
                self.tally.retried();
            }
            FailureDecision::Fail => {
                let change = StepChange { error: Some(error.to_string()), ..Default::default() };
                self.transition(step, StepState::Error, metadata, change)?;
                self.tally.failed();
            }
        }
        Ok(())
    }

    fn retry(&mut self, step_id: Uuid) -> tasker_store::Result<()> {
        let Some(mut step) = self.steps.get(&step_id).cloned() else { return Ok(()) };
        let due = step.next_attempt_at.is_some_and(|t| t <= Utc::now());
        if step.status == StepState::WaitingForRetry && due {
            self.transition(&mut step, StepState::Enqueued, json!({}), StepChange::default())?;
        }
        Ok(())
    }

    /// Publishes an enqueued attempt again when its execution was last published (at its
    /// enqueue, or by a sweep since) `older_than` ago. Decided from reads only (`Work`'s
    /// `decidable_from_kept`): a republish by another replica changes no sort key.
    fn republish(&mut self, step_id: Uuid, older_than: std::time::Duration) -> tasker_store::Result<()> {
        let Some(step) = self.steps.get_mut(&step_id) else { return Ok(()) };
        let now = Utc::now();
        let stale = step
            .last_published_at
            .is_some_and(|t| now.signed_duration_since(t).to_std().is_ok_and(|age| age >= older_than));
        if step.status == StepState::Enqueued && stale && !self.enqueued.contains(&step_id) {
            tracing::warn!(task_id = %step.task_id, step_id = %step.id, attempt = step.attempts, "step enqueued too long; publishing it again");
            step.last_published_at = Some(now);
            self.republished.push(step_id);
        }
        Ok(())
    }

    fn overdue(&mut self, step_id: Uuid, grace: std::time::Duration) -> tasker_store::Result<()> {
        let Some(mut step) = self.steps.get(&step_id).cloned() else { return Ok(()) };
        let deadline = step.started_at.map(|t| {
            t + chrono::Duration::milliseconds(step.timeout_ms) + chrono::Duration::from_std(grace).unwrap_or_default()
        });
        if step.status == StepState::InProgress && deadline.is_some_and(|d| d < Utc::now()) {
            let message = format!("no report within the step's timeout of {} ms", step.timeout_ms);
            self.fail(&mut step, FailureKind::TimedOut, &message, None, json!({ "sweeper": true }))?;
        }
        Ok(())
    }

    /// Enqueues what is ready, settles the tasks by how their steps stand, then the
    /// second round trip: writes it all, reads the dispatch data and commits.
    async fn finish(mut self) -> tasker_store::Result<(Outcome, After)> {
        let mut seen = HashSet::new();
        for id in std::mem::take(&mut self.ready) {
            let Some(mut step) = self.steps.get(&id).cloned() else { continue };
            let open = self.tasks.get(&step.task_id).is_some_and(|t| t.status == TaskState::InProgress);
            let ready = step.status == StepState::Pending && step.pending_parents == 0;
            if open && ready && seen.insert(id) {
                self.transition(&mut step, StepState::Enqueued, json!({}), StepChange::default())?;
            }
        }
        let open: Vec<Uuid> =
            self.touched.iter().copied().filter(|id| self.tasks[id].status == TaskState::InProgress).collect();
        let standing = self.standing(&open);
        // what is left is the second round trip (and in debug builds a check of its own)
        self.phases.apply = self.clock.elapsed() - self.phases.read;
        #[cfg(debug_assertions)]
        self.check_standing(&standing).await?;
        let stuck: Vec<Uuid> = open.iter().copied().filter(|id| standing[id].is_stuck()).collect();
        // a failed task's event says how many steps it left unfinished: counted, one more
        // round trip, only for those (the batch's writes are sent with it)
        let unfinished = if stuck.is_empty() { HashMap::new() } else { self.tx.progress(&stuck).await? };
        for task_id in open {
            let task = self.tasks.get_mut(&task_id).expect("locked task");
            let (to, metadata) = match standing[&task_id] {
                s if s.is_complete() => (TaskState::Complete, json!({})),
                s if s.is_stuck() => {
                    let left = unfinished.get(&task_id).map_or(0, |p| p.unfinished);
                    (TaskState::Error, json!({ "unfinished_steps": left }))
                }
                _ => continue,
            };
            self.tx.transition_task(task, to, metadata)?;
            let seconds = (Utc::now() - task.created_at).num_milliseconds().max(0) as f64 / 1000.0;
            let outcome = if to == TaskState::Complete { "complete" } else { "error" };
            self.tally.task_finished(&task.namespace, &task.name, outcome, seconds);
        }

        let mut to_dispatch: Vec<StepRow> = self
            .enqueued
            .iter()
            .filter_map(|id| self.steps.get(id))
            .filter(|s| s.status == StepState::Enqueued)
            .cloned()
            .collect();
        to_dispatch.extend(self.republished.iter().filter_map(|id| self.steps.get(id)).cloned());
        let dispatches = self.tx.commit_dispatching(&self.tasks, &to_dispatch, &self.republished).await?;
        self.phases.write = self.clock.elapsed() - self.phases.read - self.phases.apply;
        self.tally.dispatched(dispatches.len());
        let outcome = Outcome {
            dispatches,
            next_retry_at: self.next_retry_at,
            tally: self.tally,
            phases: self.phases,
            decided: Decided::FromReads,
        };
        Ok((outcome, After { tasks: self.tasks, steps: self.steps }))
    }
}

/// Longest worker id recorded (characters).
const MAX_WORKER_ID: usize = 256;

/// The start a worker reported (by its clock), kept between the step's enqueue and now,
/// so clock skew can never order a start before its enqueue or after its report.
/// Whole milliseconds from `from` to `to`, never negative (clocks of two machines).
fn millis_between(from: DateTime<Utc>, to: DateTime<Utc>) -> u64 {
    (to - from).num_milliseconds().max(0) as u64
}

fn reported_start(unix_ms: i64, step: &StepRow) -> Option<DateTime<Utc>> {
    let at = DateTime::from_timestamp_millis(unix_ms).filter(|_| unix_ms > 0)?;
    let now = Utc::now();
    let earliest = step.enqueued_at.unwrap_or(now).min(now);
    Some(at.clamp(earliest, now))
}
