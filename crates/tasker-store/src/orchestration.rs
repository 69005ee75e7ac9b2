//! What the orchestrator reads and changes inside a [`Tx`]: task locks, steps, readiness,
//! the data a dispatch carries, and the sweeps over stuck work.

use crate::counter::Counted;
use std::collections::HashMap;

use chrono::{DateTime, Utc};
use tasker_domain::{StepState, TaskState, event::EventSubject};
use tokio_postgres::{Row, types::ToSql};
use uuid::Uuid;

use crate::{Error, Result, Store, Tx, tx::Read};

/// A locked task: what the engine needs to decide and to label events.
#[derive(Debug, Clone)]
pub struct TaskHead {
    pub id: Uuid,
    pub status: TaskState,
    pub namespace: String,
    pub name: String,
    pub version: String,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    /// The trace context the task was created in.
    pub trace: tasker_domain::TraceContext,
    pub(crate) last_sort_key: i32,
}

impl TaskHead {
    /// The sort key of the task's latest transition: raised by one with every transition.
    pub fn sort_key(&self) -> i32 {
        self.last_sort_key
    }

    pub fn subject(&self) -> EventSubject {
        EventSubject {
            task_id: self.id,
            namespace: self.namespace.clone(),
            task_name: self.name.clone(),
            task_version: self.version.clone(),
            trace: self.trace.clone(),
        }
    }
}

/// A step as the engine sees it.
#[derive(Debug, Clone)]
pub struct StepRow {
    pub id: Uuid,
    pub task_id: Uuid,
    pub name: String,
    pub handler: String,
    /// JSON text.
    pub config: String,
    pub status: StepState,
    /// Attempts made in the step's whole life: the current attempt's number, never reused.
    pub attempts: i32,
    /// Attempts made before the latest operator retry (the current round began after them).
    pub attempts_before_retry: i32,
    pub max_attempts: i32,
    pub retryable: bool,
    pub timeout_ms: i64,
    pub pending_parents: i32,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub enqueued_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub(crate) last_sort_key: i32,
    /// While the step is `enqueued`: when its execution was last published, at its enqueue
    /// or by the sweeper since (the row's `updated_at`, which a republish alone changes;
    /// `enqueued_at` stays the attempt's enqueue). Only a batch that read the step under
    /// its task's lock knows it: a republish changes no sort key, so the copy a replica
    /// keeps may lag, and the sweeper's re-check is never decided from kept tasks.
    pub last_published_at: Option<DateTime<Utc>>,
}

const STEP_COLUMNS: &str = "s.id, s.task_id, s.name, s.handler, s.handler_config::text, s.status, s.attempts, \
    s.max_attempts, s.retryable, s.timeout_ms, s.pending_parents, s.next_attempt_at, s.last_error::text, \
    s.enqueued_at, s.started_at, s.completed_at, s.attempts_before_retry, s.last_sort_key, \
    CASE WHEN s.status = 'enqueued' THEN s.updated_at END";

/// How many columns `STEP_COLUMNS` has (a query may add its own after them).
const STEP_COLUMN_COUNT: usize = 19;

fn step_row(row: &Row) -> Result<StepRow> {
    Ok(StepRow {
        id: row.get(0),
        task_id: row.get(1),
        name: row.get(2),
        handler: row.get(3),
        config: row.get(4),
        status: row.get::<_, &str>(5).parse()?,
        attempts: row.get(6),
        max_attempts: row.get(7),
        retryable: row.get(8),
        timeout_ms: row.get(9),
        pending_parents: row.get(10),
        next_attempt_at: row.get(11),
        last_error: row.get(12),
        enqueued_at: row.get(13),
        started_at: row.get(14),
        completed_at: row.get(15),
        attempts_before_retry: row.get(16),
        last_sort_key: row.get(17),
        last_published_at: row.get(18),
    })
}

impl StepRow {
    /// The sort key of the step's latest transition: raised by one with every transition.
    pub fn sort_key(&self) -> i32 {
        self.last_sort_key
    }
}

/// How far a task has got: counts over its unfinished steps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Steps neither complete nor resolved.
    pub unfinished: i64,
    /// Steps enqueued, in progress or waiting for a retry.
    pub active: i64,
    /// Pending steps whose parents are all done.
    pub ready: i64,
}

impl Progress {
    /// Every step complete or resolved.
    pub fn is_complete(&self) -> bool {
        self.unfinished == 0
    }

    /// Nothing is running or can run, yet steps are unfinished: a step failed.
    pub fn is_stuck(&self) -> bool {
        self.unfinished > 0 && self.active == 0 && self.ready == 0
    }
}

/// What a task's steps hold, as far as settling the task needs to know: whether any is
/// unfinished, and whether any is live (running, or able to run). Read for the steps a
/// batch does not name; the batch adds the steps it has in memory as they end up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Standing {
    /// A step is neither complete nor resolved.
    pub unfinished: bool,
    /// A step is enqueued, in progress or waiting for a retry, or pending with every
    /// parent done.
    pub live: bool,
}

impl Standing {
    /// Adds a step as it is now.
    pub fn count(&mut self, step: &StepRow) {
        self.unfinished |= !matches!(step.status, StepState::Complete | StepState::ResolvedManually);
        self.live |= matches!(step.status, StepState::Enqueued | StepState::InProgress | StepState::WaitingForRetry)
            || (step.status == StepState::Pending && step.pending_parents == 0);
    }

    /// Every step complete or resolved.
    pub fn is_complete(&self) -> bool {
        !self.unfinished
    }

    /// Nothing is running or can run, yet steps are unfinished: a step failed.
    pub fn is_stuck(&self) -> bool {
        self.unfinished && !self.live
    }
}

/// Everything a worker needs to run one attempt.
#[derive(Debug, Clone)]
pub struct Dispatch {
    pub task_id: Uuid,
    pub step_id: Uuid,
    pub attempt: u32,
    pub namespace: String,
    pub task_name: String,
    pub task_version: String,
    pub step_name: String,
    pub handler: String,
    pub config: String,
    pub context: String,
    pub parent_results: HashMap<String, String>,
    pub timeout_ms: u64,
    /// The task's trace context.
    pub trace: tasker_domain::TraceContext,
}

/// The parameters of a one-parameter statement.
type Param1<'a> = [&'a (dyn ToSql + Sync); 1];

/// Locks the tasks. Only columns of `tasks` itself: a row lock that waited re-reads the
/// locked row at its latest version, but anything else in the statement (a subquery on
/// the transitions, say) keeps the snapshot from before the wait. So the last sort key is
/// a column of the task, kept with every transition.
const LOCK_TASKS: &str = "SELECT t.id, t.status, t.namespace, t.name, t.version, t.started_at, t.completed_at, t.created_at, \
     t.traceparent, t.tracestate, t.last_sort_key \
     FROM tasks t WHERE t.id = ANY($1) ORDER BY t.id FOR UPDATE OF t";

fn task_head(row: &Row) -> Result<TaskHead> {
    Ok(TaskHead {
        id: row.get(0),
        status: row.get::<_, &str>(1).parse()?,
        namespace: row.get(2),
        name: row.get(3),
        version: row.get(4),
        started_at: row.get(5),
        completed_at: row.get(6),
        created_at: row.get(7),
        trace: tasker_domain::TraceContext { traceparent: row.get(8), tracestate: row.get(9) },
        last_sort_key: row.get(10),
    })
}

/// The locked tasks by id (rows of `LOCK_TASKS`).
fn task_heads(locked: &[Row]) -> Result<HashMap<Uuid, TaskHead>> {
    locked.iter().map(|row| task_head(row).map(|task| (task.id, task))).collect()
}

fn steps_sql() -> String {
    format!("SELECT {STEP_COLUMNS} FROM workflow_steps s WHERE s.id = ANY($1)")
}

/// A step of `workflow_steps s` neither complete nor resolved (the predicate of the
/// `workflow_steps_unfinished` index).
const UNFINISHED: &str = "s.status NOT IN ('complete', 'resolved_manually')";
/// A step running or about to: dispatched, in progress, or waiting for a retry.
const ACTIVE: &str = "s.status IN ('enqueued', 'in_progress', 'waiting_for_retry')";
/// A pending step with no parent left to wait for.
const READY: &str = "s.status = 'pending' AND s.pending_parents = 0";

fn ready_steps_sql() -> String {
    format!(
        "SELECT {STEP_COLUMNS} FROM workflow_steps s \
         WHERE s.task_id = ANY($1) AND {READY} \
         ORDER BY s.task_id, s.dependency_level, s.id"
    )
}

/// Counts each of the steps in $1 as done for its children; returns every child it
/// counted for (a child is ready when it reaches 0 and is still pending).
fn release_children_sql() -> String {
    format!(
        "UPDATE workflow_steps s SET pending_parents = s.pending_parents - e.done \
         FROM (SELECT to_step_id, count(*)::int4 AS done FROM workflow_step_edges \
               WHERE from_step_id = ANY($1) GROUP BY to_step_id) e \
         WHERE s.id = e.to_step_id \
         RETURNING {STEP_COLUMNS}"
    )
}

fn progress_sql() -> String {
    format!(
        "SELECT s.task_id, count(*), count(*) FILTER (WHERE {ACTIVE}), count(*) FILTER (WHERE {READY}) \
         FROM workflow_steps s WHERE s.task_id = ANY($1) AND {UNFINISHED} GROUP BY s.task_id"
    )
}

/// How many of a task's unfinished steps [`standing_sql`] looks at in one pass.
const STANDING_SAMPLE: i64 = 32;

/// Each task's [`Standing`] over its steps other than those in $2, at a cost that does not
/// grow with the task (a count over its unfinished steps, in every batch, would). One pass
/// over at most [`STANDING_SAMPLE`] of its unfinished steps (its entries in
/// `workflow_steps_unfinished`) answers both questions for a task that has no more than
/// that, or that has a live one among them; only a task with more, none of them live, is
/// asked again with existence tests that stop at the first step that passes (the ready
/// test visits pending steps until one qualifies).
fn standing_sql() -> String {
    let others = |cond: &str| format!("workflow_steps s WHERE s.task_id = t.id AND {cond} AND s.id <> ALL($2)");
    // `OFFSET 0` keeps each test a probe per task, evaluated only when reached: without
    // it Postgres may plan an EXISTS as a hash of the matching steps of every task, built
    // in full on every call
    let exists = |cond: &str| format!("EXISTS (SELECT FROM {} OFFSET 0)", others(cond));
    format!(
        "SELECT t.id, f.seen > 0, f.live OR (f.seen = {STANDING_SAMPLE} AND ({} OR {})) \
         FROM unnest($1::uuid[]) AS t(id), LATERAL ( \
           SELECT count(*) AS seen, COALESCE(bool_or({ACTIVE} OR ({READY})), false) AS live \
           FROM (SELECT s.status, s.pending_parents FROM {} LIMIT {STANDING_SAMPLE}) s \
         ) f",
        exists(ACTIVE),
        exists(READY),
        others(UNFINISHED),
    )
}

const CONTEXTS: &str = "SELECT id, context::text FROM tasks WHERE id = ANY($1)";

const PARENT_RESULTS: &str = "SELECT e.to_step_id, p.name, COALESCE(p.results::text, 'null') \
     FROM workflow_step_edges e JOIN workflow_steps p ON p.id = e.from_step_id \
     WHERE e.to_step_id = ANY($1)";

fn ready_children(released: &[Row]) -> Result<Vec<StepRow>> {
    released
        .iter()
        .map(step_row)
        .filter(|s| s.as_ref().map_or(true, |s| s.pending_parents == 0 && s.status == StepState::Pending))
        .collect()
}

/// The rows of [`whole_steps_sql`] by task, leaving out each task with more than `max`.
fn whole_tasks(rows: &[Row], max: i64) -> Result<HashMap<Uuid, WholeTask>> {
    let mut tasks: HashMap<Uuid, WholeTask> = HashMap::new();
    for row in rows {
        let step = step_row(row)?;
        let task = tasks.entry(step.task_id).or_default();
        let children: Vec<Uuid> = row.get(STEP_COLUMN_COUNT);
        if !children.is_empty() {
            task.children.insert(step.id, children);
        }
        task.steps.insert(step.id, step);
    }
    tasks.retain(|_, task| task.steps.len() as i64 <= max);
    Ok(tasks)
}

fn progress_by_task(rows: &[Row]) -> HashMap<Uuid, Progress> {
    rows.iter().map(|r| (r.get(0), Progress { unfinished: r.get(1), active: r.get(2), ready: r.get(3) })).collect()
}

fn standing_by_task(rows: &[Row]) -> HashMap<Uuid, Standing> {
    rows.iter().map(|r| (r.get(0), Standing { unfinished: r.get(1), live: r.get(2) })).collect()
}

/// Every step of each task in $1 (at most $2 + 1 of a task: one more than the caller
/// keeps, to tell a task too big), each with the ids of its children.
fn whole_steps_sql() -> String {
    format!(
        "SELECT {STEP_COLUMNS}, ARRAY(SELECT e.to_step_id FROM workflow_step_edges e WHERE e.from_step_id = s.id) \
         FROM unnest($1::uuid[]) AS t(id), \
         LATERAL (SELECT * FROM workflow_steps x WHERE x.task_id = t.id LIMIT $2::int8 + 1) s"
    )
}

/// Most steps a task may have for the orchestrator to keep it (and for its creator to
/// tell it the task as created).
pub const MAX_KEPT_STEPS: usize = 64;

/// A task's steps, all of them, and its edges: what the orchestrator keeps in memory.
#[derive(Debug, Clone, Default)]
pub struct WholeTask {
    pub steps: HashMap<Uuid, StepRow>,
    /// Each step's children (only steps that have some).
    pub children: HashMap<Uuid, Vec<Uuid>>,
}

impl WholeTask {
    /// A task's steps as its creation wrote them (`Store::create_task`): each `pending`,
    /// waiting for its parents, with no attempt made and no transition of its own. `None`
    /// when a parent is not among the steps, or a step is told twice.
    pub fn created(task_id: Uuid, steps: Vec<CreatedStep>) -> Option<WholeTask> {
        let ids: Vec<Uuid> = steps.iter().map(|s| s.id).collect();
        let mut whole = WholeTask::default();
        for step in steps {
            for parent in &step.parents {
                whole.children.entry(*ids.get(*parent)?).or_default().push(step.id);
            }
            let row = StepRow {
                id: step.id,
                task_id,
                name: step.name,
                handler: step.handler,
                config: step.config,
                status: StepState::Pending,
                attempts: 0,
                attempts_before_retry: 0,
                max_attempts: step.max_attempts,
                retryable: step.retryable,
                timeout_ms: step.timeout_ms,
                pending_parents: step.parents.len() as i32,
                next_attempt_at: None,
                last_error: None,
                enqueued_at: None,
                started_at: None,
                completed_at: None,
                last_sort_key: 0,
                last_published_at: None,
            };
            whole.steps.insert(row.id, row);
        }
        // an id told twice
        (whole.steps.len() == ids.len()).then_some(whole)
    }
}

/// A step of a task as its creator tells it: what [`WholeTask::created`] takes.
#[derive(Debug, Clone)]
pub struct CreatedStep {
    pub id: Uuid,
    pub name: String,
    pub handler: String,
    /// JSON text.
    pub config: String,
    pub max_attempts: i32,
    pub retryable: bool,
    pub timeout_ms: i64,
    /// Its parents, as indexes into the task's steps.
    pub parents: Vec<usize>,
}

impl TaskHead {
    /// A task as its creation wrote it (`Store::create_task`): `pending`, with its first
    /// transition.
    pub fn created(
        id: Uuid,
        namespace: String,
        name: String,
        version: String,
        created_at: DateTime<Utc>,
        trace: tasker_domain::TraceContext,
    ) -> TaskHead {
        TaskHead {
            id,
            status: TaskState::Pending,
            namespace,
            name,
            version,
            started_at: None,
            completed_at: None,
            created_at,
            trace,
            last_sort_key: 1,
        }
    }
}

/// What an orchestrator batch reads in its first round trip, under the task locks.
#[derive(Debug, Default)]
pub struct Loaded {
    pub tasks: HashMap<Uuid, TaskHead>,
    /// Every step read: those the items name, the children of the steps reported
    /// complete, and the ready steps of the tasks to evaluate.
    pub steps: HashMap<Uuid, StepRow>,
    /// The children of each step reported complete.
    pub children: HashMap<Uuid, Vec<Uuid>>,
    /// The ready steps of the tasks to evaluate, in dispatch order.
    pub ready: Vec<Uuid>,
    /// How each task's steps other than `steps` stand (before the batch changes them).
    pub standing: HashMap<Uuid, Standing>,
    /// The tasks asked for in whole that have no more steps than asked for, in whole.
    pub whole: HashMap<Uuid, WholeTask>,
}

impl Tx {
    /// Locks the tasks (in id order, so concurrent batches cannot deadlock) and returns
    /// them by id. Unknown ids are left out.
    pub async fn lock_tasks(&mut self, ids: &[Uuid]) -> Result<HashMap<Uuid, TaskHead>> {
        let mut ids = ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        let t: Param1 = [&ids];
        task_heads(&self.query(LOCK_TASKS, &t).await?)
    }

    /// The first round trip of an orchestrator batch: locks the tasks (in id order) and,
    /// once the server holds the locks, reads the `steps`, the children of the steps in
    /// `completed`, the ready steps of the tasks in `evaluate`, how every task's other
    /// steps stand, and the tasks of `whole.0` in whole if they have no more than
    /// `whole.1` steps.
    pub async fn load_batch(
        &mut self,
        task_ids: &[Uuid],
        steps: &[Uuid],
        completed: &[Uuid],
        evaluate: &[Uuid],
        whole: (&[Uuid], i64),
    ) -> Result<Loaded> {
        let mut ids = task_ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        let (steps_sql, ready_sql, standing_sql) = (steps_sql(), ready_steps_sql(), standing_sql());
        let children_sql = format!(
            "SELECT {STEP_COLUMNS}, e.from_step_id FROM workflow_step_edges e \
             JOIN workflow_steps s ON s.id = e.to_step_id WHERE e.from_step_id = ANY($1)"
        );
        let whole_sql = whole_steps_sql();
        let (t, st, c, e): (Param1, Param1, Param1, Param1) = ([&ids], [&steps], [&completed], [&evaluate]);
        let others: [&(dyn ToSql + Sync); 2] = [&ids, &steps];
        let (whole_ids, whole_max) = whole;
        let w: [&(dyn ToSql + Sync); 2] = [&whole_ids, &whole_max];
        let reads = [
            (LOCK_TASKS, &t[..]),
            (steps_sql.as_str(), &st[..]),
            (children_sql.as_str(), &c[..]),
            (ready_sql.as_str(), &e[..]),
            (standing_sql.as_str(), &others[..]),
            (whole_sql.as_str(), &w[..]),
        ];
        // skip the reads with nothing to read (the lock and the standing always run)
        let wanted =
            [true, !steps.is_empty(), !completed.is_empty(), !evaluate.is_empty(), true, !whole_ids.is_empty()];
        let reads: Vec<Read> = reads.into_iter().zip(wanted).filter(|(_, w)| *w).map(|(r, _)| r).collect();
        let mut rows = self.round_trip(&reads, false).await?.into_iter();
        let mut loaded = Loaded { tasks: task_heads(&rows.next().unwrap_or_default())?, ..Loaded::default() };
        if wanted[1] {
            for row in rows.next().unwrap_or_default() {
                let step = step_row(&row)?;
                loaded.steps.insert(step.id, step);
            }
        }
        if wanted[2] {
            for row in rows.next().unwrap_or_default() {
                let child = step_row(&row)?;
                loaded.children.entry(row.get(STEP_COLUMN_COUNT)).or_default().push(child.id);
                loaded.steps.entry(child.id).or_insert(child);
            }
        }
        if wanted[3] {
            for row in rows.next().unwrap_or_default() {
                let step = step_row(&row)?;
                loaded.ready.push(step.id);
                loaded.steps.entry(step.id).or_insert(step);
            }
        }
        loaded.standing = standing_by_task(&rows.next().unwrap_or_default());
        if wanted[5] {
            loaded.whole = whole_tasks(&rows.next().unwrap_or_default(), whole_max)?;
        }
        Ok(loaded)
    }

    /// Locks one task; `NotFound` when there is none.
    pub async fn lock_task(&mut self, task_id: Uuid) -> Result<TaskHead> {
        self.lock_tasks(&[task_id])
            .await?
            .remove(&task_id)
            .ok_or_else(|| Error::NotFound(format!("task {task_id} not found")))
    }

    /// The steps with these ids, in the order asked (unknown ids left out).
    pub async fn steps(&mut self, ids: &[Uuid]) -> Result<Vec<StepRow>> {
        let rows = self.query(&steps_sql(), &[&ids]).await?;
        let order: HashMap<&Uuid, usize> = ids.iter().enumerate().map(|(i, id)| (id, i)).collect();
        let mut steps: Vec<StepRow> = rows.iter().map(step_row).collect::<Result<_>>()?;
        steps.sort_by_key(|s| order.get(&s.id).copied());
        Ok(steps)
    }

    /// Pending steps of these tasks whose parents are all done.
    pub async fn ready_steps(&mut self, task_ids: &[Uuid]) -> Result<Vec<StepRow>> {
        self.query(&ready_steps_sql(), &[&task_ids]).await?.iter().map(step_row).collect()
    }

    /// Unfinished steps of the task that the given states include.
    pub async fn steps_in(&mut self, task_id: Uuid, states: &[StepState]) -> Result<Vec<StepRow>> {
        let states: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
        let sql = format!(
            "SELECT {STEP_COLUMNS} FROM workflow_steps s \
             WHERE s.task_id = $1 AND {UNFINISHED} AND s.status = ANY($2) \
             ORDER BY s.dependency_level, s.id"
        );
        let rows = self.query(&sql, &[&task_id, &states]).await?;
        rows.iter().map(step_row).collect()
    }

    /// Counts each of these steps as done for its children, in one statement; returns the
    /// children that became ready (every parent done, still pending).
    pub async fn release_children(&mut self, step_ids: &[Uuid]) -> Result<Vec<StepRow>> {
        if step_ids.is_empty() {
            return Ok(Vec::new());
        }
        ready_children(&self.query(&release_children_sql(), &[&step_ids]).await?)
    }

    /// Counts over the unfinished steps of each task (a task with none is absent: it is
    /// complete).
    pub async fn progress(&mut self, task_ids: &[Uuid]) -> Result<HashMap<Uuid, Progress>> {
        Ok(progress_by_task(&self.query(&progress_sql(), &[&task_ids]).await?))
    }

    /// One round trip: writes what is buffered, marks the `republished` steps as published
    /// again now, reads what the executions of `steps` carry (each task's context, each
    /// step's parents' results by name) and commits. Returns the executions to publish.
    pub async fn commit_dispatching(
        mut self,
        tasks: &HashMap<Uuid, TaskHead>,
        steps: &[StepRow],
        republished: &[Uuid],
    ) -> Result<Vec<Dispatch>> {
        if !republished.is_empty() {
            self.push_write(
                "UPDATE workflow_steps SET updated_at = now() WHERE id = ANY($1)",
                vec![Box::new(republished.to_vec())],
            );
        }
        if steps.is_empty() {
            self.commit().await?;
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = steps.iter().map(|s| s.id).collect();
        let mut task_ids: Vec<Uuid> = steps.iter().map(|s| s.task_id).collect();
        task_ids.sort_unstable();
        task_ids.dedup();
        let (t, st): (Param1, Param1) = ([&task_ids], [&ids]);
        let mut rows = self.commit_reading(&[(CONTEXTS, &t[..]), (PARENT_RESULTS, &st[..])]).await?.into_iter();
        let contexts: HashMap<Uuid, String> =
            rows.next().unwrap_or_default().iter().map(|r| (r.get(0), r.get(1))).collect();
        let mut by_child: HashMap<Uuid, HashMap<String, String>> = HashMap::new();
        for row in rows.next().unwrap_or_default() {
            by_child.entry(row.get(0)).or_default().insert(row.get(1), row.get(2));
        }
        steps
            .iter()
            .map(|s| {
                let task =
                    tasks.get(&s.task_id).ok_or_else(|| Error::Corrupt(format!("step {} without its task", s.id)))?;
                Ok(Dispatch {
                    task_id: task.id,
                    step_id: s.id,
                    attempt: s.attempts as u32,
                    namespace: task.namespace.clone(),
                    task_name: task.name.clone(),
                    task_version: task.version.clone(),
                    step_name: s.name.clone(),
                    handler: s.handler.clone(),
                    config: s.config.clone(),
                    context: contexts.get(&task.id).cloned().unwrap_or_else(|| "{}".into()),
                    parent_results: by_child.remove(&s.id).unwrap_or_default(),
                    timeout_ms: s.timeout_ms.max(0) as u64,
                    trace: task.trace.clone(),
                })
            })
            .collect()
    }
}

/// Stuck-work queries: cheap (partial indexes), no locks; the caller re-checks each
/// finding under the task lock.
impl Store {
    /// Tasks unchanged for `older_than` that wait for an evaluation whose request may have
    /// been lost: those still `pending` (a create's), and those in progress with no step
    /// enqueued, in progress or waiting for a retry (an operator's retry or resolve's: a
    /// batch never leaves a task so, it dispatches what is ready or settles the task; the
    /// partial index `tasks_in_progress`). One statement, up to `limit` of each.
    pub async fn stalled_tasks(&self, older_than: std::time::Duration, limit: i64) -> Result<Vec<Uuid>> {
        let client = self.client().await?;
        let stmt = client
            .statement(
                "(SELECT id FROM tasks WHERE status = 'pending' \
                   AND updated_at < now() - make_interval(secs => $1::float8) ORDER BY updated_at LIMIT $2) \
                 UNION ALL \
                 (SELECT t.id FROM tasks t WHERE t.status = 'in_progress' \
                   AND t.updated_at < now() - make_interval(secs => $1::float8) \
                   AND NOT EXISTS (SELECT FROM workflow_steps s WHERE s.task_id = t.id \
                     AND s.status IN ('enqueued', 'in_progress', 'waiting_for_retry')) \
                   ORDER BY t.updated_at LIMIT $2)",
            )
            .await?;
        let rows = client.query(&stmt, &[&older_than.as_secs_f64(), &limit]).await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Deletes up to `limit` tasks finished (complete, error, cancelled) more than
    /// `older_than` ago, with their steps, edges and transitions, in one statement (rows
    /// another transaction holds are skipped, not waited for). Returns how many went.
    pub async fn delete_finished_tasks(&self, older_than: std::time::Duration, limit: i64) -> Result<u64> {
        let client = self.client().await?;
        let stmt = client
            .statement(
                "WITH doomed AS ( \
                   SELECT id FROM tasks WHERE status IN ('complete', 'error', 'cancelled') \
                   AND completed_at < now() - make_interval(secs => $1::float8) \
                   ORDER BY completed_at LIMIT $2 FOR UPDATE SKIP LOCKED \
                 ), doomed_steps AS ( \
                   SELECT s.id FROM workflow_steps s WHERE s.task_id IN (SELECT id FROM doomed) \
                 ), edges AS ( \
                   DELETE FROM workflow_step_edges WHERE from_step_id IN (SELECT id FROM doomed_steps) \
                 ), step_history AS ( \
                   DELETE FROM workflow_step_transitions WHERE workflow_step_id IN (SELECT id FROM doomed_steps) \
                 ), task_history AS ( \
                   DELETE FROM task_transitions WHERE task_id IN (SELECT id FROM doomed) \
                 ), steps AS ( \
                   DELETE FROM workflow_steps WHERE task_id IN (SELECT id FROM doomed) \
                 ) \
                 DELETE FROM tasks WHERE id IN (SELECT id FROM doomed)",
            )
            .await?;
        Ok(client.execute(&stmt, &[&older_than.as_secs_f64(), &limit]).await?)
    }

    /// `(task, step)` of retries due now.
    pub async fn due_retries(&self, limit: i64) -> Result<Vec<(Uuid, Uuid)>> {
        let client = self.client().await?;
        let stmt = client
            .statement(
                "SELECT task_id, id FROM workflow_steps WHERE status = 'waiting_for_retry' \
                 AND next_attempt_at <= now() ORDER BY next_attempt_at LIMIT $1",
            )
            .await?;
        let rows = client.query(&stmt, &[&limit]).await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// When the next retry is due, if any step waits for one.
    pub async fn next_retry_at(&self) -> Result<Option<DateTime<Utc>>> {
        let client = self.client().await?;
        let stmt = client
            .statement("SELECT min(next_attempt_at) FROM workflow_steps WHERE status = 'waiting_for_retry'")
            .await?;
        Ok(client.query_one(&stmt, &[]).await?.get(0))
    }

    /// `(task, step, namespace)` of attempts enqueued longer than `older_than` ago and
    /// never started.
    pub async fn stale_enqueued_steps(
        &self,
        older_than: std::time::Duration,
        limit: i64,
    ) -> Result<Vec<(Uuid, Uuid, String)>> {
        let client = self.client().await?;
        let stmt = client
            .statement(
                "SELECT s.task_id, s.id, t.namespace FROM workflow_steps s JOIN tasks t ON t.id = s.task_id \
                 WHERE s.status = 'enqueued' AND s.updated_at < now() - make_interval(secs => $1::float8) \
                 ORDER BY s.updated_at LIMIT $2",
            )
            .await?;
        let rows = client.query(&stmt, &[&older_than.as_secs_f64(), &limit]).await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect())
    }

    /// `(task, step)` of attempts in progress past their timeout plus `grace`.
    pub async fn overdue_steps(&self, grace: std::time::Duration, limit: i64) -> Result<Vec<(Uuid, Uuid)>> {
        let client = self.client().await?;
        let stmt = client
            .statement(
                "SELECT task_id, id FROM workflow_steps WHERE status = 'in_progress' \
                 AND started_at + make_interval(secs => timeout_ms / 1000.0 + $1::float8) < now() \
                 ORDER BY started_at LIMIT $2",
            )
            .await?;
        let rows = client.query(&stmt, &[&grace.as_secs_f64(), &limit]).await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }
}
