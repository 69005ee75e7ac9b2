//! A transaction that buffers its writes.
//!
//! Status columns, transition rows and outbox events are buffered and written in a
//! handful of batched statements: before any read (so reads see them) and before commit.
//! A `Tx` dropped without `commit` discards its connection, which rolls it back.

use crate::counter::Counted;
use chrono::{DateTime, Utc};
use deadpool_postgres::Object;
use serde_json::Value;
use tasker_domain::{
    CloudEvent, StepState, TaskState,
    event::{EventSubject, StepRef},
};
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use crate::{
    Result,
    orchestration::{StepRow, TaskHead},
};

#[derive(Debug)]
struct TransitionWrite {
    id: Uuid,
    owner: Uuid,
    task_id: Uuid,
    from: Option<&'static str>,
    to: &'static str,
    sort_key: i32,
    metadata: Value,
    at: DateTime<Utc>,
}

/// The columns of a step a transition may change, snapshotted after the change.
#[derive(Debug)]
struct StepWrite {
    id: Uuid,
    status: &'static str,
    attempts: i32,
    next_attempt_at: Option<DateTime<Utc>>,
    last_error: Option<String>,
    results: Option<String>,
    enqueued_at: Option<DateTime<Utc>>,
    started_at: Option<DateTime<Utc>>,
    completed_at: Option<DateTime<Utc>>,
}

impl StepRow {
    fn snapshot(&self, results: Option<String>) -> StepWrite {
        StepWrite {
            id: self.id,
            status: self.status.as_str(),
            attempts: self.attempts,
            next_attempt_at: self.next_attempt_at,
            last_error: self.last_error.clone(),
            results,
            enqueued_at: self.enqueued_at,
            started_at: self.started_at,
            completed_at: self.completed_at,
        }
    }
}

/// A task's changed columns: id, status, started_at, completed_at.
type TaskWrite = (Uuid, &'static str, Option<DateTime<Utc>>, Option<DateTime<Utc>>);

/// What a step transition writes besides its status and timestamps.
#[derive(Debug, Default)]
pub struct StepChange {
    /// JSON text: the step's results (complete, resolved).
    pub results: Option<String>,
    /// JSON text: the failure (waiting_for_retry, error).
    pub error: Option<String>,
    /// When the next attempt is due (waiting_for_retry).
    pub next_attempt_at: Option<DateTime<Utc>>,
}

pub struct Tx {
    client: Option<Object>,
    steps: Vec<StepWrite>,
    tasks: Vec<TaskWrite>,
    step_transitions: Vec<TransitionWrite>,
    task_transitions: Vec<TransitionWrite>,
    events: Vec<(Uuid, Uuid, String, String)>,
}

impl Tx {
    pub(crate) async fn begin(client: Object) -> Result<Tx> {
        crate::counter::count(1);
        client.batch_execute("BEGIN").await?;
        Ok(Tx {
            client: Some(client),
            steps: Vec::new(),
            tasks: Vec::new(),
            step_transitions: Vec::new(),
            task_transitions: Vec::new(),
            events: Vec::new(),
        })
    }

    /// The connection, after writing everything buffered so a read sees it.
    pub(crate) async fn reader(&mut self) -> Result<&Object> {
        self.flush().await?;
        Ok(self.client())
    }

    pub(crate) fn client(&self) -> &Object {
        self.client.as_ref().expect("transaction is open")
    }

    pub(crate) async fn execute(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        let client = self.reader().await?;
        let stmt = client.statement(sql).await?;
        Ok(client.execute(&stmt, params).await?)
    }

    pub(crate) async fn query(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>> {
        let client = self.reader().await?;
        let stmt = client.statement(sql).await?;
        Ok(client.query(&stmt, params).await?)
    }

    /// Moves a task to `to`: checks the transition is legal, then buffers the status
    /// change, its transition row and its event.
    pub fn transition_task(&mut self, task: &mut TaskHead, to: TaskState, metadata: Value) -> Result<()> {
        task.status.check(to)?;
        let now = Utc::now();
        let from = task.status;
        task.status = to;
        task.last_sort_key += 1;
        match to {
            TaskState::InProgress if task.started_at.is_none() => task.started_at = Some(now),
            TaskState::InProgress => task.completed_at = None,
            TaskState::Complete | TaskState::Error | TaskState::Cancelled => task.completed_at = Some(now),
            TaskState::Pending => {}
        }
        self.tasks.retain(|t| t.0 != task.id);
        self.tasks.push((task.id, to.as_str(), task.started_at, task.completed_at));
        let id = tasker_domain::new_id();
        let event = CloudEvent::task(id, &task.subject(), Some(from), to, &metadata, now);
        self.push_event(task.id, &event);
        self.task_transitions.push(TransitionWrite {
            id,
            owner: task.id,
            task_id: task.id,
            from: Some(from.as_str()),
            to: to.as_str(),
            sort_key: task.last_sort_key,
            metadata,
            at: now,
        });
        Ok(())
    }

    /// Moves a step to `to`: checks the transition is legal, sets the timestamps and
    /// attempt count the target state implies, and buffers the change, its transition row
    /// and its event.
    pub fn transition_step(
        &mut self,
        subject: &EventSubject,
        step: &mut StepRow,
        to: StepState,
        metadata: Value,
        change: StepChange,
    ) -> Result<()> {
        step.status.check(to)?;
        let now = Utc::now();
        let from = step.status;
        step.status = to;
        step.last_sort_key += 1;
        match to {
            StepState::Pending => {
                step.attempts = 0;
                step.enqueued_at = None;
                step.started_at = None;
                step.completed_at = None;
                step.next_attempt_at = None;
            }
            StepState::Enqueued => {
                step.attempts += 1;
                step.enqueued_at = Some(now);
                step.next_attempt_at = None;
            }
            StepState::InProgress => step.started_at = Some(now),
            StepState::WaitingForRetry => step.next_attempt_at = change.next_attempt_at,
            StepState::Complete | StepState::Error | StepState::ResolvedManually | StepState::Cancelled => {
                step.completed_at = Some(now)
            }
        }
        if change.error.is_some() {
            step.last_error = change.error;
        }
        let results = change.results;
        if let Some(existing) = self.steps.iter_mut().find(|w| w.id == step.id) {
            let keep_results = existing.results.take();
            *existing = step.snapshot(results.or(keep_results));
        } else {
            self.steps.push(step.snapshot(results));
        }
        let mut metadata = metadata;
        if let Value::Object(map) = &mut metadata {
            map.insert("attempt".into(), step.attempts.into());
        }
        let id = tasker_domain::new_id();
        let step_ref = StepRef { id: step.id, name: &step.name, attempt: step.attempts as u32 };
        let event = CloudEvent::step(id, subject, step_ref, from, to, &metadata, now);
        self.push_event(step.task_id, &event);
        self.step_transitions.push(TransitionWrite {
            id,
            owner: step.id,
            task_id: step.task_id,
            from: Some(from.as_str()),
            to: to.as_str(),
            sort_key: step.last_sort_key,
            metadata,
            at: now,
        });
        Ok(())
    }

    pub(crate) fn push_event(&mut self, task_id: Uuid, event: &CloudEvent) {
        let payload = serde_json::to_string(event).expect("events serialize");
        self.events.push((event.id, task_id, event.routingkey.clone(), payload));
    }

    /// Writes everything buffered: one statement per kind of row, pipelined on the
    /// connection (sent together, executed in order), so a flush costs about two round
    /// trips whatever the batch holds.
    async fn flush(&mut self) -> Result<()> {
        let client = self.client.as_ref().expect("transaction is open");
        futures::try_join!(
            write_steps(client, std::mem::take(&mut self.steps)),
            write_tasks(client, std::mem::take(&mut self.tasks)),
            write_transitions(
                client,
                "workflow_step_transitions",
                "workflow_step_id",
                std::mem::take(&mut self.step_transitions)
            ),
            write_transitions(client, "task_transitions", "task_id", std::mem::take(&mut self.task_transitions)),
            write_events(client, std::mem::take(&mut self.events)),
        )?;
        Ok(())
    }

    /// Writes everything buffered and commits.
    pub async fn commit(mut self) -> Result<()> {
        self.flush().await?;
        let client = self.client.take().expect("transaction is open");
        crate::counter::count(1);
        client.batch_execute("COMMIT").await?;
        Ok(())
    }

    /// Discards the transaction.
    pub async fn rollback(mut self) -> Result<()> {
        let client = self.client.take().expect("transaction is open");
        crate::counter::count(1);
        client.batch_execute("ROLLBACK").await?;
        Ok(())
    }
}

impl Drop for Tx {
    fn drop(&mut self) {
        // A transaction abandoned half-way (an error, a cancelled future) must not go back
        // to the pool: closing the connection makes the server roll it back.
        if let Some(client) = self.client.take() {
            drop(Object::take(client));
        }
    }
}

async fn write_steps(client: &Object, steps: Vec<StepWrite>) -> Result<()> {
    if steps.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = steps.iter().map(|s| s.id).collect();
    let status: Vec<&str> = steps.iter().map(|s| s.status).collect();
    let attempts: Vec<i32> = steps.iter().map(|s| s.attempts).collect();
    let next: Vec<Option<DateTime<Utc>>> = steps.iter().map(|s| s.next_attempt_at).collect();
    let error: Vec<Option<&str>> = steps.iter().map(|s| s.last_error.as_deref()).collect();
    let set_results: Vec<bool> = steps.iter().map(|s| s.results.is_some()).collect();
    let results: Vec<Option<&str>> = steps.iter().map(|s| s.results.as_deref()).collect();
    let enqueued: Vec<Option<DateTime<Utc>>> = steps.iter().map(|s| s.enqueued_at).collect();
    let started: Vec<Option<DateTime<Utc>>> = steps.iter().map(|s| s.started_at).collect();
    let completed: Vec<Option<DateTime<Utc>>> = steps.iter().map(|s| s.completed_at).collect();
    let stmt = client
        .statement(
            "UPDATE workflow_steps s SET status = u.status, attempts = u.attempts, \
               next_attempt_at = u.next_attempt_at, last_error = u.last_error::jsonb, \
               results = CASE WHEN u.set_results THEN u.results::jsonb ELSE s.results END, \
               enqueued_at = u.enqueued_at, started_at = u.started_at, completed_at = u.completed_at, \
               updated_at = now() \
             FROM unnest($1::uuid[], $2::text[], $3::int4[], $4::timestamptz[], $5::text[], $6::bool[], \
                         $7::text[], $8::timestamptz[], $9::timestamptz[], $10::timestamptz[]) \
               AS u(id, status, attempts, next_attempt_at, last_error, set_results, results, \
                    enqueued_at, started_at, completed_at) \
             WHERE s.id = u.id",
        )
        .await?;
    client
        .execute(
            &stmt,
            &[&ids, &status, &attempts, &next, &error, &set_results, &results, &enqueued, &started, &completed],
        )
        .await?;
    Ok(())
}

async fn write_tasks(client: &Object, tasks: Vec<TaskWrite>) -> Result<()> {
    if tasks.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = tasks.iter().map(|t| t.0).collect();
    let status: Vec<&str> = tasks.iter().map(|t| t.1).collect();
    let started: Vec<Option<DateTime<Utc>>> = tasks.iter().map(|t| t.2).collect();
    let completed: Vec<Option<DateTime<Utc>>> = tasks.iter().map(|t| t.3).collect();
    let stmt = client
        .statement(
            "UPDATE tasks t SET status = u.status, started_at = u.started_at, \
               completed_at = u.completed_at, updated_at = now() \
             FROM unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::timestamptz[]) \
               AS u(id, status, started_at, completed_at) \
             WHERE t.id = u.id",
        )
        .await?;
    client.execute(&stmt, &[&ids, &status, &started, &completed]).await?;
    Ok(())
}

async fn write_events(client: &Object, events: Vec<(Uuid, Uuid, String, String)>) -> Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = events.iter().map(|e| e.0).collect();
    let tasks: Vec<Uuid> = events.iter().map(|e| e.1).collect();
    let keys: Vec<&str> = events.iter().map(|e| e.2.as_str()).collect();
    let payloads: Vec<&str> = events.iter().map(|e| e.3.as_str()).collect();
    let stmt = client
        .statement(
            "INSERT INTO outbox (event_id, task_id, routing_key, payload) \
             SELECT e.event_id, e.task_id, e.routing_key, e.payload \
             FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[]) WITH ORDINALITY \
               AS e(event_id, task_id, routing_key, payload, n) ORDER BY e.n",
        )
        .await?;
    client.execute(&stmt, &[&ids, &tasks, &keys, &payloads]).await?;
    Ok(())
}

/// Flips `most_recent` off the previous rows of every owner, then inserts the new rows,
/// `most_recent` on the last one per owner.
async fn write_transitions(client: &Object, table: &str, owner_column: &str, rows: Vec<TransitionWrite>) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut owners: Vec<Uuid> = rows.iter().map(|r| r.owner).collect();
    owners.sort_unstable();
    owners.dedup();
    let flip = client
        .statement(&format!("UPDATE {table} SET most_recent = false WHERE {owner_column} = ANY($1) AND most_recent"))
        .await?;
    client.execute(&flip, &[&owners]).await?;

    let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
    let owner: Vec<Uuid> = rows.iter().map(|r| r.owner).collect();
    let task: Vec<Uuid> = rows.iter().map(|r| r.task_id).collect();
    let from: Vec<Option<&str>> = rows.iter().map(|r| r.from).collect();
    let to: Vec<&str> = rows.iter().map(|r| r.to).collect();
    let sort: Vec<i32> = rows.iter().map(|r| r.sort_key).collect();
    let most_recent: Vec<bool> =
        rows.iter().enumerate().map(|(i, r)| !rows[i + 1..].iter().any(|later| later.owner == r.owner)).collect();
    let metadata: Vec<&Value> = rows.iter().map(|r| &r.metadata).collect();
    let at: Vec<DateTime<Utc>> = rows.iter().map(|r| r.at).collect();
    let sql = if table == "task_transitions" {
        "INSERT INTO task_transitions (id, task_id, from_state, to_state, sort_key, most_recent, metadata, created_at) \
         SELECT u.id, u.owner, u.from_state, u.to_state, u.sort_key, u.most_recent, u.metadata, u.created_at \
         FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::int4[], $7::bool[], \
                     $8::jsonb[], $9::timestamptz[]) \
           AS u(id, owner, task_id, from_state, to_state, sort_key, most_recent, metadata, created_at)"
    } else {
        "INSERT INTO workflow_step_transitions \
           (id, workflow_step_id, task_id, from_state, to_state, sort_key, most_recent, metadata, created_at) \
         SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::int4[], $7::bool[], \
                              $8::jsonb[], $9::timestamptz[])"
    };
    let insert = client.statement(sql).await?;
    client.execute(&insert, &[&ids, &owner, &task, &from, &to, &sort, &most_recent, &metadata, &at]).await?;
    Ok(())
}
