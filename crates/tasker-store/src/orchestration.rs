//! What the orchestrator reads and changes inside a [`Tx`]: task locks, steps, readiness,
//! the data a dispatch carries, and the sweeps over stuck work.

use crate::counter::Counted;
use std::collections::HashMap;

use chrono::{DateTime, Utc};
use tasker_domain::{StepState, TaskState, event::EventSubject};
use tokio_postgres::{Row, types::ToSql};
use uuid::Uuid;

use crate::{Error, Result, Store, Tx};

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
    pub(crate) last_sort_key: i32,
}

impl TaskHead {
    pub fn subject(&self) -> EventSubject {
        EventSubject {
            task_id: self.id,
            namespace: self.namespace.clone(),
            task_name: self.name.clone(),
            task_version: self.version.clone(),
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
    pub attempts: i32,
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
}

const STEP_COLUMNS: &str = "s.id, s.task_id, s.name, s.handler, s.handler_config::text, s.status, s.attempts, \
    s.max_attempts, s.retryable, s.timeout_ms, s.pending_parents, s.next_attempt_at, s.last_error::text, \
    s.enqueued_at, s.started_at, s.completed_at, \
    COALESCE((SELECT t.sort_key FROM workflow_step_transitions t WHERE t.workflow_step_id = s.id AND t.most_recent), 0)";

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
        last_sort_key: row.get(16),
    })
}

/// How far a task has got: counts over its unfinished steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
}

impl Tx {
    /// Locks the tasks (in id order, so concurrent batches cannot deadlock) and returns
    /// them by id. Unknown ids are left out.
    pub async fn lock_tasks(&mut self, ids: &[Uuid]) -> Result<HashMap<Uuid, TaskHead>> {
        let mut ids = ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        let rows = self
            .query(
                "SELECT t.id, t.status, t.namespace, t.name, t.version, t.started_at, t.completed_at, \
                   COALESCE((SELECT tt.sort_key FROM task_transitions tt WHERE tt.task_id = t.id AND tt.most_recent), 0) \
                 FROM tasks t WHERE t.id = ANY($1) ORDER BY t.id FOR UPDATE OF t",
                &[&ids],
            )
            .await?;
        rows.iter()
            .map(|row| {
                let head = TaskHead {
                    id: row.get(0),
                    status: row.get::<_, &str>(1).parse()?,
                    namespace: row.get(2),
                    name: row.get(3),
                    version: row.get(4),
                    started_at: row.get(5),
                    completed_at: row.get(6),
                    last_sort_key: row.get(7),
                };
                Ok((head.id, head))
            })
            .collect()
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
        let sql = format!("SELECT {STEP_COLUMNS} FROM workflow_steps s WHERE s.id = ANY($1)");
        let rows = self.query(&sql, &[&ids]).await?;
        let order: HashMap<&Uuid, usize> = ids.iter().enumerate().map(|(i, id)| (id, i)).collect();
        let mut steps: Vec<StepRow> = rows.iter().map(step_row).collect::<Result<_>>()?;
        steps.sort_by_key(|s| order.get(&s.id).copied());
        Ok(steps)
    }

    /// Pending steps of these tasks whose parents are all done.
    pub async fn ready_steps(&mut self, task_ids: &[Uuid]) -> Result<Vec<StepRow>> {
        let sql = format!(
            "SELECT {STEP_COLUMNS} FROM workflow_steps s \
             WHERE s.task_id = ANY($1) AND s.status = 'pending' AND s.pending_parents = 0 \
             ORDER BY s.task_id, s.dependency_level, s.id"
        );
        let rows = self.query(&sql, &[&task_ids]).await?;
        rows.iter().map(step_row).collect()
    }

    /// Unfinished steps of the task that the given states include.
    pub async fn steps_in(&mut self, task_id: Uuid, states: &[StepState]) -> Result<Vec<StepRow>> {
        let states: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
        let sql = format!(
            "SELECT {STEP_COLUMNS} FROM workflow_steps s \
             WHERE s.task_id = $1 AND s.status NOT IN ('complete', 'resolved_manually') AND s.status = ANY($2) \
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
        let released = self
            .query(
                "UPDATE workflow_steps c SET pending_parents = c.pending_parents - e.done \
                 FROM (SELECT to_step_id, count(*)::int4 AS done FROM workflow_step_edges \
                       WHERE from_step_id = ANY($1) GROUP BY to_step_id) e \
                 WHERE c.id = e.to_step_id \
                 RETURNING c.id, c.pending_parents, c.status",
                &[&step_ids],
            )
            .await?;
        let ready: Vec<Uuid> = released
            .iter()
            .filter(|r| r.get::<_, i32>(1) == 0 && r.get::<_, &str>(2) == StepState::Pending.as_str())
            .map(|r| r.get(0))
            .collect();
        if ready.is_empty() {
            return Ok(Vec::new());
        }
        self.steps(&ready).await
    }

    /// Marks an enqueued step as published again now (the sweeper's re-publish).
    pub async fn touch_step(&mut self, step_id: Uuid) -> Result<()> {
        self.execute("UPDATE workflow_steps SET enqueued_at = now(), updated_at = now() WHERE id = $1", &[&step_id])
            .await?;
        Ok(())
    }

    /// Counts over the unfinished steps of each task (a task with none is absent: it is
    /// complete).
    pub async fn progress(&mut self, task_ids: &[Uuid]) -> Result<HashMap<Uuid, Progress>> {
        let rows = self
            .query(
                "SELECT task_id, count(*), \
                   count(*) FILTER (WHERE status IN ('enqueued', 'in_progress', 'waiting_for_retry')), \
                   count(*) FILTER (WHERE status = 'pending' AND pending_parents = 0) \
                 FROM workflow_steps WHERE task_id = ANY($1) AND status NOT IN ('complete', 'resolved_manually') \
                 GROUP BY task_id",
                &[&task_ids],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), Progress { unfinished: r.get(1), active: r.get(2), ready: r.get(3) }))
            .collect())
    }

    /// Builds the executions for steps just enqueued (of any of the given tasks): each
    /// task's context and each step's parents' results by name, in two statements.
    pub async fn dispatches(&mut self, tasks: &HashMap<Uuid, TaskHead>, steps: &[StepRow]) -> Result<Vec<Dispatch>> {
        if steps.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = steps.iter().map(|s| s.id).collect();
        let mut task_ids: Vec<Uuid> = steps.iter().map(|s| s.task_id).collect();
        task_ids.sort_unstable();
        task_ids.dedup();
        // both reads pipelined: sent together, one round trip
        let client = self.reader().await?;
        let (contexts_stmt, parents_stmt) = futures::try_join!(
            client.statement("SELECT id, context::text FROM tasks WHERE id = ANY($1)"),
            client.statement(
                "SELECT e.to_step_id, p.name, COALESCE(p.results::text, 'null') \
                 FROM workflow_step_edges e JOIN workflow_steps p ON p.id = e.from_step_id \
                 WHERE e.to_step_id = ANY($1)"
            ),
        )?;
        let (task_param, step_param): ([&(dyn ToSql + Sync); 1], [&(dyn ToSql + Sync); 1]) = ([&task_ids], [&ids]);
        let (contexts, parents) =
            futures::try_join!(client.query(&contexts_stmt, &task_param), client.query(&parents_stmt, &step_param))?;
        let contexts: HashMap<Uuid, String> = contexts.iter().map(|r| (r.get(0), r.get(1))).collect();
        let mut by_child: HashMap<Uuid, HashMap<String, String>> = HashMap::new();
        for row in &parents {
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
                })
            })
            .collect()
    }
}

/// Stuck-work queries: cheap (partial indexes), no locks; the caller re-checks each
/// finding under the task lock.
impl Store {
    /// Tasks still `pending` after `older_than` (their request may have been lost).
    pub async fn stale_pending_tasks(&self, older_than: std::time::Duration, limit: i64) -> Result<Vec<Uuid>> {
        let client = self.client().await?;
        let stmt = client
            .statement(
                "SELECT id FROM tasks WHERE status = 'pending' \
                 AND updated_at < now() - make_interval(secs => $1::float8) ORDER BY updated_at LIMIT $2",
            )
            .await?;
        let rows = client.query(&stmt, &[&older_than.as_secs_f64(), &limit]).await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
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

    /// `(task, step)` of attempts enqueued longer than `older_than` ago and never started.
    pub async fn stale_enqueued_steps(&self, older_than: std::time::Duration, limit: i64) -> Result<Vec<(Uuid, Uuid)>> {
        let client = self.client().await?;
        let stmt = client
            .statement(
                "SELECT task_id, id FROM workflow_steps WHERE status = 'enqueued' \
                 AND updated_at < now() - make_interval(secs => $1::float8) ORDER BY updated_at LIMIT $2",
            )
            .await?;
        let rows = client.query(&stmt, &[&older_than.as_secs_f64(), &limit]).await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
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
