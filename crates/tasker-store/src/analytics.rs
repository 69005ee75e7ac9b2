//! Analytics over the recorded history: every figure is computed from the transition
//! tables (an attempt's run time and queue wait are in the metadata of the transitions
//! that end them), through the time indexes of migration `…_analytics.sql`, so a window
//! touches only its own rows however long the history is. Read-only.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use tokio_postgres::Row;
use uuid::Uuid;

use crate::{Result, Store, counter::Counted};

/// A time window `[start, end)`, and the namespaces to look at (`None`: all).
#[derive(Debug, Clone)]
pub struct Scope {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub namespaces: Option<Vec<String>>,
}

/// Continuous percentiles of a set of milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub count: u64,
}

/// Figures of one namespace and task name (both empty: every task together).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PerformanceRow {
    pub namespace: String,
    pub task_name: String,
    pub tasks_created: u64,
    pub tasks_completed: u64,
    pub tasks_failed: u64,
    pub tasks_cancelled: u64,
    pub task_duration_ms: Percentiles,
    pub step_attempts: u64,
    pub step_attempts_failed: u64,
    pub step_duration_ms: Percentiles,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepFigures {
    pub namespace: String,
    pub task_name: String,
    pub step_name: String,
    pub duration_ms: Percentiles,
    pub retries: u64,
    pub failures: u64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskFigures {
    pub namespace: String,
    pub task_name: String,
    pub duration_ms: Percentiles,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ErrorFigures {
    pub message: String,
    pub count: u64,
    pub last_seen: DateTime<Utc>,
    pub namespace: String,
    pub task_name: String,
    pub step_name: String,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct BottleneckRows {
    pub slowest_steps: Vec<StepFigures>,
    pub slowest_tasks: Vec<TaskFigures>,
    pub most_retried_steps: Vec<StepFigures>,
    pub top_errors: Vec<ErrorFigures>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OldestTask {
    pub id: Uuid,
    pub namespace: String,
    pub name: String,
    pub status: tasker_domain::TaskState,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct HealthRows {
    pub tasks_by_state: BTreeMap<String, u64>,
    pub steps_by_state: BTreeMap<String, u64>,
    pub oldest_unfinished: Option<OldestTask>,
    pub retry_backlog: u64,
    pub retries_due: u64,
}

const PERCENTILES: &str = "percentile_cont(ARRAY[0.5, 0.95, 0.99]::float8[]) WITHIN GROUP (ORDER BY";

/// Tasks created in the window, by namespace and name, and all together (`GROUPING` = 1).
const CREATED: &str = "SELECT t.namespace, t.name, GROUPING(t.namespace), count(*) \
     FROM tasks t WHERE t.created_at >= $1 AND t.created_at < $2 \
       AND ($3::text[] IS NULL OR t.namespace = ANY($3)) \
     GROUP BY GROUPING SETS ((t.namespace, t.name), ())";

/// Tasks that finished in the window and how long they took from creation.
fn finished() -> String {
    format!(
        "SELECT t.namespace, t.name, GROUPING(t.namespace), \
           count(*) FILTER (WHERE tt.to_state = 'complete'), \
           count(*) FILTER (WHERE tt.to_state = 'error'), \
           count(*) FILTER (WHERE tt.to_state = 'cancelled'), \
           {PERCENTILES} extract(epoch FROM tt.created_at - t.created_at) * 1000) \
             FILTER (WHERE tt.to_state <> 'cancelled'), \
           count(*) FILTER (WHERE tt.to_state <> 'cancelled') \
         FROM task_transitions tt JOIN tasks t ON t.id = tt.task_id \
         WHERE tt.to_state IN ('complete', 'error', 'cancelled') \
           AND tt.created_at >= $1 AND tt.created_at < $2 \
           AND ($3::text[] IS NULL OR t.namespace = ANY($3)) \
         GROUP BY GROUPING SETS ((t.namespace, t.name), ())"
    )
}

/// Step attempts that ended in the window: the transitions out of `in_progress` the
/// engine recorded, with their run time (`run_ms`); with the steps' names when asked.
fn ended(with_steps: bool) -> String {
    let steps = if with_steps { "JOIN workflow_steps s ON s.id = st.workflow_step_id " } else { "" };
    format!(
        "FROM workflow_step_transitions st {steps}JOIN tasks t ON t.id = st.task_id \
         WHERE st.from_state = 'in_progress' AND st.to_state IN ('complete', 'error', 'waiting_for_retry') \
           AND st.created_at >= $1 AND st.created_at < $2 \
           AND ($3::text[] IS NULL OR t.namespace = ANY($3))"
    )
}

fn attempts() -> String {
    format!(
        "SELECT t.namespace, t.name, GROUPING(t.namespace), count(*), \
           count(*) FILTER (WHERE st.to_state <> 'complete'), \
           {PERCENTILES} (st.metadata->>'run_ms')::float8), count(st.metadata->'run_ms') \
         {} GROUP BY GROUPING SETS ((t.namespace, t.name), ())",
        ended(false)
    )
}

fn steps() -> String {
    format!(
        "SELECT t.namespace, t.name, s.name, \
           {PERCENTILES} (st.metadata->>'run_ms')::float8), count(st.metadata->'run_ms'), \
           count(*) FILTER (WHERE st.to_state = 'waiting_for_retry'), \
           count(*) FILTER (WHERE st.to_state = 'error') \
         {} GROUP BY t.namespace, t.name, s.name",
        ended(true)
    )
}

fn errors() -> String {
    format!(
        "SELECT st.metadata->'error'->>'message', count(*), max(st.created_at), \
           (array_agg(t.namespace ORDER BY st.created_at DESC))[1], \
           (array_agg(t.name ORDER BY st.created_at DESC))[1], \
           (array_agg(s.name ORDER BY st.created_at DESC))[1] \
         {} AND st.to_state <> 'complete' AND st.metadata->'error'->>'message' IS NOT NULL \
         GROUP BY 1 ORDER BY 2 DESC, 3 DESC LIMIT $4",
        ended(true)
    )
}

const TASKS_BY_STATE: &str = "SELECT t.status, count(*) FROM tasks t \
     WHERE $1::text[] IS NULL OR t.namespace = ANY($1) GROUP BY t.status";
const STEPS_BY_STATE: &str = "SELECT s.status, count(*) FROM workflow_steps s GROUP BY s.status";
const STEPS_BY_STATE_IN: &str = "SELECT s.status, count(*) FROM workflow_steps s JOIN tasks t ON t.id = s.task_id \
     WHERE t.namespace = ANY($1) GROUP BY s.status";
const OLDEST_UNFINISHED: &str = "SELECT t.id, t.namespace, t.name, t.status, t.created_at FROM tasks t \
     WHERE t.status IN ('pending', 'in_progress') AND ($1::text[] IS NULL OR t.namespace = ANY($1)) \
     ORDER BY t.created_at LIMIT 1";
const RETRY_BACKLOG: &str = "SELECT count(*), count(*) FILTER (WHERE s.next_attempt_at <= now()) \
     FROM workflow_steps s JOIN tasks t ON t.id = s.task_id \
     WHERE s.status = 'waiting_for_retry' AND ($1::text[] IS NULL OR t.namespace = ANY($1))";

fn percentiles(row: &Row, at: usize, count_at: usize) -> Percentiles {
    let count = row.get::<_, i64>(count_at).max(0) as u64;
    match row.get::<_, Option<Vec<Option<f64>>>>(at) {
        Some(values) if count > 0 => {
            let v = |i: usize| values.get(i).copied().flatten().unwrap_or_default();
            Percentiles { p50: v(0), p95: v(1), p99: v(2), count }
        }
        _ => Percentiles::default(),
    }
}

/// The (namespace, name) key of a grouping-sets row: empty for the overall row.
fn key(row: &Row) -> (String, String) {
    if row.get::<_, i32>(2) == 1 { (String::new(), String::new()) } else { (row.get(0), row.get(1)) }
}

impl Store {
    /// Performance figures over the scope: one row for every task together (empty
    /// namespace and name) first, then one per namespace and task name, in order.
    pub async fn performance(&self, scope: &Scope) -> Result<Vec<PerformanceRow>> {
        let client = self.client().await?;
        let (created, finished, attempts) = (
            client.statement(CREATED).await?,
            client.statement(&finished()).await?,
            client.statement(&attempts()).await?,
        );
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&scope.start, &scope.end, &scope.namespaces];
        // one snapshot: a task is counted by all three or by none
        let reads = async {
            tokio::try_join!(
                client.query(&created, &params),
                client.query(&finished, &params),
                client.query(&attempts, &params),
            )
        };
        let read = crate::one_snapshot(&client, reads).await;
        let (created, finished, attempts) = crate::closed_on_error(client, read)?;
        let mut rows: BTreeMap<(String, String), PerformanceRow> = BTreeMap::new();
        rows.entry(Default::default()).or_default();
        fn entry<'a>(rows: &'a mut BTreeMap<(String, String), PerformanceRow>, row: &Row) -> &'a mut PerformanceRow {
            let (namespace, task_name) = key(row);
            rows.entry((namespace.clone(), task_name.clone())).or_insert_with(|| PerformanceRow {
                namespace,
                task_name,
                ..Default::default()
            })
        }
        for row in &created {
            entry(&mut rows, row).tasks_created = row.get::<_, i64>(3) as u64;
        }
        for row in &finished {
            let figures = entry(&mut rows, row);
            figures.tasks_completed = row.get::<_, i64>(3) as u64;
            figures.tasks_failed = row.get::<_, i64>(4) as u64;
            figures.tasks_cancelled = row.get::<_, i64>(5) as u64;
            figures.task_duration_ms = percentiles(row, 6, 7);
        }
        for row in &attempts {
            let figures = entry(&mut rows, row);
            figures.step_attempts = row.get::<_, i64>(3) as u64;
            figures.step_attempts_failed = row.get::<_, i64>(4) as u64;
            figures.step_duration_ms = percentiles(row, 5, 6);
        }
        Ok(rows.into_values().collect())
    }

    /// The slowest steps and tasks, the most retried steps and the commonest errors in the
    /// scope, `limit` of each.
    pub async fn bottlenecks(&self, scope: &Scope, limit: usize) -> Result<BottleneckRows> {
        let client = self.client().await?;
        let (finished, steps, errors) = (
            client.statement(&finished()).await?,
            client.statement(&steps()).await?,
            client.statement(&errors()).await?,
        );
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&scope.start, &scope.end, &scope.namespaces];
        let limit_param = limit as i64;
        let error_params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&scope.start, &scope.end, &scope.namespaces, &limit_param];
        let reads = async {
            tokio::try_join!(
                client.query(&finished, &params),
                client.query(&steps, &params),
                client.query(&errors, &error_params),
            )
        };
        let read = crate::one_snapshot(&client, reads).await;
        let (finished, steps, errors) = crate::closed_on_error(client, read)?;
        let mut slowest_tasks: Vec<TaskFigures> = finished
            .iter()
            .filter(|row| row.get::<_, i32>(2) == 0)
            .map(|row| TaskFigures {
                namespace: row.get(0),
                task_name: row.get(1),
                duration_ms: percentiles(row, 6, 7),
            })
            .filter(|t| t.duration_ms.count > 0)
            .collect();
        slowest_tasks.sort_by(|a, b| b.duration_ms.p95.total_cmp(&a.duration_ms.p95));
        slowest_tasks.truncate(limit);
        let all_steps: Vec<StepFigures> = steps
            .iter()
            .map(|row| StepFigures {
                namespace: row.get(0),
                task_name: row.get(1),
                step_name: row.get(2),
                duration_ms: percentiles(row, 3, 4),
                retries: row.get::<_, i64>(5) as u64,
                failures: row.get::<_, i64>(6) as u64,
            })
            .collect();
        let mut slowest_steps: Vec<StepFigures> =
            all_steps.iter().filter(|s| s.duration_ms.count > 0).cloned().collect();
        slowest_steps.sort_by(|a, b| b.duration_ms.p95.total_cmp(&a.duration_ms.p95));
        slowest_steps.truncate(limit);
        let mut most_retried_steps: Vec<StepFigures> = all_steps.into_iter().filter(|s| s.retries > 0).collect();
        most_retried_steps.sort_by(|a, b| b.retries.cmp(&a.retries).then(b.failures.cmp(&a.failures)));
        most_retried_steps.truncate(limit);
        let top_errors = errors
            .iter()
            .map(|row| ErrorFigures {
                message: row.get(0),
                count: row.get::<_, i64>(1) as u64,
                last_seen: row.get(2),
                namespace: row.get(3),
                task_name: row.get(4),
                step_name: row.get(5),
            })
            .collect();
        Ok(BottleneckRows { slowest_steps, slowest_tasks, most_retried_steps, top_errors })
    }

    /// What is in the system now, in the given namespaces (`None`: all).
    pub async fn system_health(&self, namespaces: Option<&[String]>) -> Result<HealthRows> {
        let client = self.client().await?;
        let namespaces: Option<Vec<String>> = namespaces.map(<[String]>::to_vec);
        let steps_sql = if namespaces.is_some() { STEPS_BY_STATE_IN } else { STEPS_BY_STATE };
        let (tasks, steps, oldest, backlog) = (
            client.statement(TASKS_BY_STATE).await?,
            client.statement(steps_sql).await?,
            client.statement(OLDEST_UNFINISHED).await?,
            client.statement(RETRY_BACKLOG).await?,
        );
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&namespaces];
        let step_params = if namespaces.is_some() { &params[..] } else { &[] };
        // one snapshot: no task counted complete while a step of it is counted running
        let reads = async {
            tokio::try_join!(
                client.query(&tasks, &params),
                client.query(&steps, step_params),
                client.query_opt(&oldest, &params),
                client.query_one(&backlog, &params),
            )
        };
        let read = crate::one_snapshot(&client, reads).await;
        let (tasks, steps, oldest, backlog) = crate::closed_on_error(client, read)?;
        let by_state =
            |rows: &[Row]| rows.iter().map(|row| (row.get::<_, String>(0), row.get::<_, i64>(1) as u64)).collect();
        let oldest_unfinished = match oldest {
            Some(row) => Some(OldestTask {
                id: row.get(0),
                namespace: row.get(1),
                name: row.get(2),
                status: row.get::<_, &str>(3).parse()?,
                created_at: row.get(4),
            }),
            None => None,
        };
        Ok(HealthRows {
            tasks_by_state: by_state(&tasks),
            steps_by_state: by_state(&steps),
            oldest_unfinished,
            retry_backlog: backlog.get::<_, i64>(0) as u64,
            retries_due: backlog.get::<_, i64>(1) as u64,
        })
    }
}
