//! Task creation (task, steps, edges, first transition and event in one transaction) and
//! the task read models.

use crate::counter::Counted;
use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::json;
use tasker_domain::{CloudEvent, StepState, TaskState, event::EventSubject};
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use crate::{
    Error, Result, Store, TemplateRecord,
    rows::{
        EdgeRow, STEP_VIEW_COLUMNS, StepView, TASK_COLUMNS, TaskRow, TaskView, TransitionRow, step_view,
        step_view_by_id, task_row, transition_row,
    },
    templates::LATEST_FIRST,
};

/// The ids of the steps of task `$1`, as an array to probe an index with.
const STEPS_OF_TASK: &str = "ARRAY(SELECT id FROM workflow_steps WHERE task_id = $1)";

/// A step's transition rows, in the column order `transition_row` reads.
const STEP_TRANSITIONS: &str = "SELECT workflow_step_id, from_state, to_state, sort_key, metadata::text, created_at, id \
    FROM workflow_step_transitions";

/// A validated CreateTask request.
#[derive(Debug, Clone)]
pub struct NewTask<'a> {
    pub template: &'a TemplateRecord,
    /// JSON text of an object, already checked against the input schema.
    pub context: &'a str,
    pub tags: &'a [String],
    pub initiator: &'a str,
    pub source_system: &'a str,
    pub reason: &'a str,
    pub priority: i32,
    pub idempotency_key: Option<&'a str>,
    /// A digest of the request, compared when the idempotency key is seen again.
    pub request_hash: &'a str,
    /// Who created it (the authenticated subject), for the audit trail.
    pub actor: &'a str,
    /// The trace context of its creation, carried with everything about it.
    pub trace: &'a tasker_domain::TraceContext,
    /// The template was picked as its name's latest version (the request named none):
    /// the task is written only if that is still so when it is written, else
    /// `Error::Superseded` and nothing is written. A caller that keeps templates in memory
    /// reads the latest again and retries.
    pub as_latest: bool,
}

/// What operator actions need of a task before acting on it.
#[derive(Debug, Clone)]
pub struct TaskRef {
    pub namespace: String,
    /// The task's name (its template's).
    pub name: String,
    pub trace: tasker_domain::TraceContext,
}

#[derive(Debug, Clone)]
pub struct CreateOutcome {
    pub task_id: Uuid,
    /// The idempotency key matched an earlier, identical request.
    pub deduplicated: bool,
    /// The task as just written (not for a deduplicated request: read it).
    pub view: Option<TaskView>,
}

/// ListTasks filters. `after` is the keyset cursor (created_at, id) of the last row seen.
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    pub namespace: Option<String>,
    /// Only tasks of these namespaces (a caller's), when given.
    pub namespaces: Option<Vec<String>>,
    pub name: Option<String>,
    pub status: Option<TaskState>,
    pub created_after: Option<DateTime<Utc>>,
    pub created_before: Option<DateTime<Utc>>,
    pub after: Option<(DateTime<Utc>, Uuid)>,
    pub limit: i64,
}

#[derive(Debug, Clone)]
pub struct TaskPage {
    pub tasks: Vec<TaskRow>,
    /// Cursor for the next page, when there may be one.
    pub next: Option<(DateTime<Utc>, Uuid)>,
}

impl Store {
    /// Writes the task, its steps and edges, its first transition and `task.created` in
    /// one transaction. With an idempotency key already used: the original task when the
    /// request is the same, `AlreadyExists` when it differs; nothing is written either way.
    pub async fn create_task(&self, new: &NewTask<'_>) -> Result<CreateOutcome> {
        let template = &new.template.template;
        let task_id = tasker_domain::new_id();
        let now = Utc::now();
        let ids: Vec<Uuid> = template.steps.iter().map(|_| tasker_domain::new_id()).collect();
        let by_name: HashMap<&str, Uuid> =
            template.steps.iter().zip(&ids).map(|(s, id)| (s.name.as_str(), *id)).collect();
        let names: Vec<&str> = template.steps.iter().map(|s| s.name.as_str()).collect();
        let handlers: Vec<&str> = template.steps.iter().map(|s| s.handler.as_str()).collect();
        let configs: Vec<String> = template.steps.iter().map(|s| s.config.to_string()).collect();
        let retryable: Vec<bool> = template.steps.iter().map(|s| s.retryable).collect();
        let max_attempts: Vec<i32> = template.steps.iter().map(|s| s.max_attempts as i32).collect();
        let timeouts: Vec<i64> = template.steps.iter().map(|s| s.timeout_ms as i64).collect();
        let parents: Vec<i32> = template.steps.iter().map(|s| s.depends_on.len() as i32).collect();
        let levels: Vec<i32> = template.steps.iter().map(|s| s.dependency_level as i32).collect();
        let (from, to): (Vec<Uuid>, Vec<Uuid>) = template
            .steps
            .iter()
            .flat_map(|s| s.depends_on.iter().map(|d| (by_name[d.as_str()], by_name[s.name.as_str()])))
            .unzip();
        let metadata = json!({ "initiator": new.initiator, "reason": new.reason, "actor": new.actor });
        let transition_id = tasker_domain::new_id();
        let subject = EventSubject {
            task_id,
            namespace: template.namespace.clone(),
            task_name: template.name.clone(),
            task_version: template.version.to_string(),
            trace: new.trace.clone(),
        };
        let event = CloudEvent::task(transition_id, &subject, None, TaskState::Pending, &metadata, now);
        let payload = serde_json::to_string(&event).map_err(|e| Error::Corrupt(format!("event: {e}")))?;
        let version = template.version.to_string();
        // One statement, so one round trip and its own transaction: the task, and only if
        // it was inserted (not an idempotency-key conflict) its steps, edges, first
        // transition and event.
        let client = self.client().await?;
        let stmt = client
            .statement(&format!(
                "WITH fresh AS ( \
                   SELECT NOT $32 OR $2 = (SELECT n.id FROM named_tasks n JOIN task_namespaces ns \
                     ON ns.id = n.namespace_id WHERE ns.name = $3 AND n.name = $4 {LATEST_FIRST} LIMIT 1) AS ok \
                 ), task AS ( \
                   INSERT INTO tasks (id, named_task_id, namespace, name, version, status, context, tags, initiator, \
                     source_system, reason, priority, idempotency_key, request_hash, created_at, updated_at, \
                     traceparent, tracestate, last_sort_key) \
                   SELECT $1, $2, $3, $4, $5, 'pending', $6::text::jsonb, $7, $8, $9, $10, $11, $12, $13, $14, $14, \
                     $30, $31, 1 FROM fresh WHERE fresh.ok \
                   ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING RETURNING id \
                 ), steps AS ( \
                   INSERT INTO workflow_steps (id, task_id, name, handler, handler_config, retryable, max_attempts, \
                     timeout_ms, status, pending_parents, dependency_level, updated_at) \
                   SELECT u.id, task.id, u.name, u.handler, u.config::jsonb, u.retryable, u.max_attempts, \
                     u.timeout_ms, 'pending', u.parents, u.level, $14 \
                   FROM task, unnest($15::uuid[], $16::text[], $17::text[], $18::text[], $19::bool[], $20::int4[], \
                                     $21::int8[], $22::int4[], $23::int4[]) \
                     AS u(id, name, handler, config, retryable, max_attempts, timeout_ms, parents, level) \
                 ), edges AS ( \
                   INSERT INTO workflow_step_edges (task_id, from_step_id, to_step_id) \
                   SELECT task.id, u.f, u.t FROM task, unnest($24::uuid[], $25::uuid[]) AS u(f, t) \
                 ), transition AS ( \
                   INSERT INTO task_transitions (id, task_id, from_state, to_state, sort_key, metadata, created_at) \
                   SELECT $26, task.id, NULL, 'pending', 1, $27, $14 FROM task \
                 ), event AS ( \
                   INSERT INTO outbox (event_ids, routing_keys, payloads) \
                   SELECT ARRAY[$26::uuid], ARRAY[$28::text], ARRAY[$29::text] FROM task \
                 ) \
                 SELECT fresh.ok, task.id FROM fresh LEFT JOIN task ON true"
            ))
            .await?;
        let params: &[&(dyn ToSql + Sync)] = &[
            &task_id,
            &new.template.id,
            &template.namespace,
            &template.name,
            &version,
            &new.context,
            &new.tags,
            &new.initiator,
            &new.source_system,
            &new.reason,
            &new.priority,
            &new.idempotency_key,
            &new.request_hash,
            &now,
            &ids,
            &names,
            &handlers,
            &configs,
            &retryable,
            &max_attempts,
            &timeouts,
            &parents,
            &levels,
            &from,
            &to,
            &transition_id,
            &metadata,
            &event.routingkey,
            &payload,
            &new.trace.traceparent,
            &new.trace.tracestate,
            &new.as_latest,
        ];
        let written = client.query_one(&stmt, params).await?;
        drop(client);
        let inserted = written.get::<_, Option<Uuid>>(1).is_some();
        if inserted {
            self.waker.soon();
        }
        if !written.get::<_, bool>(0) {
            return Err(Error::Superseded(format!(
                "template {}/{}: a version newer than {version} was registered",
                template.namespace, template.name
            )));
        }
        if !inserted {
            return self.deduplicate(new).await;
        }
        let task = TaskRow {
            id: task_id,
            namespace: template.namespace.clone(),
            name: template.name.clone(),
            version: template.version.to_string(),
            status: TaskState::Pending,
            context: new.context.to_owned(),
            tags: new.tags.to_vec(),
            initiator: new.initiator.to_owned(),
            source_system: new.source_system.to_owned(),
            reason: new.reason.to_owned(),
            priority: new.priority,
            idempotency_key: new.idempotency_key.map(str::to_owned),
            created_at: now,
            started_at: None,
            completed_at: None,
            trace: new.trace.clone(),
        };
        let mut steps: Vec<StepView> = template
            .steps
            .iter()
            .zip(&ids)
            .zip(configs)
            .map(|((s, id), config)| StepView {
                id: *id,
                task_id,
                name: s.name.clone(),
                handler: s.handler.clone(),
                status: StepState::Pending,
                attempts: 0,
                attempts_before_retry: 0,
                max_attempts: s.max_attempts as i32,
                retryable: s.retryable,
                timeout_ms: s.timeout_ms as i64,
                dependency_level: s.dependency_level as i32,
                config,
                results: None,
                last_error: None,
                next_attempt_at: None,
                started_at: None,
                completed_at: None,
                transitions: Vec::new(),
            })
            .collect();
        // in the order GetTask reads them back: by level, then as created (ids are ordered;
        // a registered template's steps are in topological order, so this keeps its order)
        steps.sort_by_key(|s| (s.dependency_level, s.id));
        let edges = edge_rows(&steps, from.into_iter().zip(to))?;
        let view = TaskView { task, steps, edges, transitions: Vec::new() };
        Ok(CreateOutcome { task_id, deduplicated: false, view: Some(view) })
    }

    async fn deduplicate(&self, new: &NewTask<'_>) -> Result<CreateOutcome> {
        let client = self.client().await?;
        let stmt = client.statement("SELECT id, request_hash FROM tasks WHERE idempotency_key = $1").await?;
        let row = client
            .query_opt(&stmt, &[&new.idempotency_key])
            .await?
            .ok_or_else(|| Error::Corrupt("idempotency key conflict without a task".into()))?;
        if row.get::<_, Option<&str>>(1) == Some(new.request_hash) {
            Ok(CreateOutcome { task_id: row.get(0), deduplicated: true, view: None })
        } else {
            Err(Error::AlreadyExists(format!(
                "idempotency_key `{}` was already used for a different request",
                new.idempotency_key.unwrap_or_default()
            )))
        }
    }

    /// A task with its steps and edges, and transitions when asked for, in one round trip
    /// and one snapshot (the task's status is that of its last transition, its steps'
    /// those of theirs). The edges and the step transitions are read by the keys of the
    /// task's steps (`STEPS_OF_TASK`), an index probe each whatever the statistics say: as
    /// a join, a planner that misjudged a task's size hashed the whole edges table instead.
    pub async fn task(&self, id: Uuid, include_transitions: bool) -> Result<TaskView> {
        let client = self.client().await?;
        let task_stmt = client.statement(&format!("SELECT {TASK_COLUMNS} FROM tasks t WHERE t.id = $1")).await?;
        let steps_stmt = client
            .statement(&format!(
                "SELECT {STEP_VIEW_COLUMNS} FROM workflow_steps s WHERE s.task_id = $1 ORDER BY s.dependency_level, s.id"
            ))
            .await?;
        let edges_stmt = client
            .statement(&format!(
                "SELECT from_step_id, to_step_id FROM workflow_step_edges WHERE from_step_id = ANY({STEPS_OF_TASK})"
            ))
            .await?;
        let params: [&(dyn ToSql + Sync); 1] = [&id];
        let history = async {
            if !include_transitions {
                return Ok(None);
            }
            let own = client
                .statement(
                    "SELECT task_id, from_state, to_state, sort_key, metadata::text, created_at, id \
                     FROM task_transitions WHERE task_id = $1 ORDER BY sort_key",
                )
                .await?;
            let of_steps = client
                .statement(&format!(
                    "{STEP_TRANSITIONS} WHERE workflow_step_id = ANY({STEPS_OF_TASK}) ORDER BY workflow_step_id, sort_key"
                ))
                .await?;
            futures::try_join!(client.query(&own, &params), client.query(&of_steps, &params)).map(Some)
        };
        let reads = async {
            futures::try_join!(
                client.query_opt(&task_stmt, &params),
                client.query(&steps_stmt, &params),
                client.query(&edges_stmt, &params),
                history,
            )
        };
        let read = crate::one_snapshot(&client, reads).await;
        let (task, steps, edges, history) = crate::closed_on_error(client, read)?;
        let task = task_row(&task.ok_or_else(|| Error::NotFound(format!("task {id} not found")))?)?;
        let mut steps: Vec<StepView> = steps.iter().map(step_view).collect::<Result<_>>()?;
        let edges = edge_rows(&steps, edges.iter().map(|row| (row.get(0), row.get(1))))?;
        let mut transitions = Vec::new();
        if let Some((own, of_steps)) = history {
            transitions = own.iter().map(transition_row).collect();
            let mut by_step: HashMap<Uuid, Vec<TransitionRow>> = HashMap::new();
            for row in &of_steps {
                let t = transition_row(row);
                by_step.entry(t.owner).or_default().push(t);
            }
            for step in &mut steps {
                step.transitions = by_step.remove(&step.id).unwrap_or_default();
            }
        }
        Ok(TaskView { task, steps, edges, transitions })
    }

    /// One step, with its transitions when asked for.
    pub async fn step(&self, id: Uuid, include_transitions: bool) -> Result<StepView> {
        let client = self.client().await?;
        let stmt = client.statement(&step_view_by_id()).await?;
        if !include_transitions {
            let row = client.query_opt(&stmt, &[&id]).await?;
            return step_view(&row.ok_or_else(|| Error::NotFound(format!("step {id} not found")))?);
        }
        let history =
            client.statement(&format!("{STEP_TRANSITIONS} WHERE workflow_step_id = $1 ORDER BY sort_key")).await?;
        let params: [&(dyn ToSql + Sync); 1] = [&id];
        let reads = async { futures::try_join!(client.query_opt(&stmt, &params), client.query(&history, &params)) };
        let read = crate::one_snapshot(&client, reads).await;
        let (row, transitions) = crate::closed_on_error(client, read)?;
        let mut step = step_view(&row.ok_or_else(|| Error::NotFound(format!("step {id} not found")))?)?;
        step.transitions = transitions.iter().map(transition_row).collect();
        Ok(step)
    }

    /// The namespace and trace context of a task (for permission checks and the spans of
    /// operator actions).
    pub async fn task_ref(&self, id: Uuid) -> Result<TaskRef> {
        self.task_ref_of("SELECT namespace, name, traceparent, tracestate FROM tasks WHERE id = $1", id, "task").await
    }

    /// The namespace and trace context of a step's task.
    pub async fn step_ref(&self, id: Uuid) -> Result<TaskRef> {
        let sql = "SELECT t.namespace, t.name, t.traceparent, t.tracestate FROM workflow_steps s \
                   JOIN tasks t ON t.id = s.task_id WHERE s.id = $1";
        self.task_ref_of(sql, id, "step").await
    }

    async fn task_ref_of(&self, sql: &str, id: Uuid, what: &str) -> Result<TaskRef> {
        let client = self.client().await?;
        let stmt = client.statement(sql).await?;
        let row =
            client.query_opt(&stmt, &[&id]).await?.ok_or_else(|| Error::NotFound(format!("{what} {id} not found")))?;
        Ok(TaskRef {
            namespace: row.get(0),
            name: row.get(1),
            trace: tasker_domain::TraceContext { traceparent: row.get(2), tracestate: row.get(3) },
        })
    }

    /// Tasks matching the filter, newest first, one page.
    pub async fn list_tasks(&self, filter: &TaskFilter) -> Result<TaskPage> {
        let client = self.client().await?;
        let stmt = client
            .statement(&format!(
                "SELECT {TASK_COLUMNS} FROM tasks t \
                 WHERE ($1::text IS NULL OR t.namespace = $1) AND ($2::text IS NULL OR t.name = $2) \
                   AND ($3::text IS NULL OR t.status = $3) \
                   AND ($4::timestamptz IS NULL OR t.created_at >= $4) AND ($5::timestamptz IS NULL OR t.created_at < $5) \
                   AND ($6::timestamptz IS NULL OR (t.created_at, t.id) < ($6, $7::uuid)) \
                   AND ($9::text[] IS NULL OR t.namespace = ANY($9)) \
                 ORDER BY t.created_at DESC, t.id DESC LIMIT $8"
            ))
            .await?;
        let (after_at, after_id) = filter.after.unzip();
        let status = filter.status.map(|s| s.as_str());
        let limit = filter.limit.max(1);
        let rows = client
            .query(
                &stmt,
                &[
                    &filter.namespace,
                    &filter.name,
                    &status,
                    &filter.created_after,
                    &filter.created_before,
                    &after_at,
                    &after_id,
                    &(limit + 1),
                    &filter.namespaces,
                ],
            )
            .await?;
        let mut tasks: Vec<TaskRow> = rows.iter().map(task_row).collect::<Result<_>>()?;
        let more = tasks.len() as i64 > limit;
        tasks.truncate(limit as usize);
        let next = if more { tasks.last().map(|t| (t.created_at, t.id)) } else { None };
        Ok(TaskPage { tasks, next })
    }
}

/// A task's edges, given as (parent id, child id), by its steps' names: parents in the
/// order of their dependency level and name, then children by name. CreateTask and
/// GetTask both answer in this order.
fn edge_rows(steps: &[StepView], edges: impl IntoIterator<Item = (Uuid, Uuid)>) -> Result<Vec<EdgeRow>> {
    let by_id: HashMap<Uuid, &StepView> = steps.iter().map(|s| (s.id, s)).collect();
    let step = |id: Uuid| {
        by_id
            .get(&id)
            .copied()
            .ok_or_else(|| Error::Corrupt(format!("an edge names step {id}, which is not one of its task's")))
    };
    let mut edges = edges.into_iter().map(|(from, to)| Ok((step(from)?, step(to)?))).collect::<Result<Vec<_>>>()?;
    edges.sort_by(|(f1, t1), (f2, t2)| {
        (f1.dependency_level, &f1.name, &t1.name).cmp(&(f2.dependency_level, &f2.name, &t2.name))
    });
    Ok(edges.into_iter().map(|(f, t)| EdgeRow { from_step: f.name.clone(), to_step: t.name.clone() }).collect())
}
