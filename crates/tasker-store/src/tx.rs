//! A transaction that buffers its writes and pipelines its round trips.
//!
//! Status columns, transition rows and outbox events are buffered and written in one
//! statement (an `unnest` write per kind of row, each a data-modifying `WITH`), sent in the
//! same pipeline as the next read (so the read sees them) or as the COMMIT. `BEGIN` itself
//! goes out with the first round trip, so a transaction costs one round trip per dependent
//! read, plus one to commit, whatever it writes. A `Tx` dropped without `commit` discards
//! its connection, which rolls it back.

use crate::counter::Counted;
use crate::outbox::RelayWaker;
use std::borrow::Cow;

use chrono::{DateTime, Utc};
use deadpool_postgres::Object;
use futures::future::try_join_all;
use serde_json::Value;
use tasker_domain::{
    CloudEvent, StepState, TaskState,
    event::{EventSubject, StepRef},
};
use tokio_postgres::{Row, types::ToSql};
use uuid::Uuid;

use crate::{
    Result,
    orchestration::{StepRow, TaskHead, WholeTask},
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
    attempts_before_retry: i32,
    pending_parents: i32,
    next_attempt_at: Option<DateTime<Utc>>,
    last_error: Option<String>,
    results: Option<String>,
    enqueued_at: Option<DateTime<Utc>>,
    started_at: Option<DateTime<Utc>>,
    completed_at: Option<DateTime<Utc>>,
    last_sort_key: i32,
}

impl StepRow {
    fn snapshot(&self, results: Option<String>) -> StepWrite {
        StepWrite {
            id: self.id,
            status: self.status.as_str(),
            attempts: self.attempts,
            attempts_before_retry: self.attempts_before_retry,
            pending_parents: self.pending_parents,
            next_attempt_at: self.next_attempt_at,
            last_error: self.last_error.clone(),
            results,
            enqueued_at: self.enqueued_at,
            started_at: self.started_at,
            completed_at: self.completed_at,
            last_sort_key: self.last_sort_key,
        }
    }
}

/// The columns of a task a transition may change, snapshotted after the change.
#[derive(Debug)]
struct TaskWrite {
    id: Uuid,
    status: &'static str,
    started_at: Option<DateTime<Utc>>,
    completed_at: Option<DateTime<Utc>>,
    last_sort_key: i32,
}

impl TaskHead {
    fn snapshot(&self) -> TaskWrite {
        TaskWrite {
            id: self.id,
            status: self.status.as_str(),
            started_at: self.started_at,
            completed_at: self.completed_at,
            last_sort_key: self.last_sort_key,
        }
    }
}

/// What a step transition writes besides its status and timestamps.
#[derive(Debug, Default)]
pub struct StepChange {
    /// JSON text: the step's results (complete, resolved).
    pub results: Option<String>,
    /// JSON text: the failure (waiting_for_retry, error).
    pub error: Option<String>,
    /// When the next attempt is due (waiting_for_retry).
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// When the attempt began, if known better than "now" (in_progress).
    pub started_at: Option<DateTime<Utc>>,
}

/// A parameter of a buffered write, owned until the pipeline that sends it.
type Param = Box<dyn ToSql + Sync + Send>;

/// A statement to send in the next round trip, with its parameters.
struct Write {
    sql: Cow<'static, str>,
    params: Vec<Param>,
}

/// A read (or any statement whose rows the caller wants) for [`Tx::round_trip`].
pub(crate) type Read<'a> = (&'a str, &'a [&'a (dyn ToSql + Sync)]);

pub struct Tx {
    client: Option<Object>,
    /// `BEGIN` has been sent.
    begun: bool,
    /// Events were written: wake the relay once committed.
    notify: bool,
    /// A task reached a final state: wake the relay at once, not lazily, for the event
    /// its watchers wait on.
    urgent: bool,
    waker: RelayWaker,
    /// Statements to send ahead of the buffered rows (e.g. a sweeper's touch).
    writes: Vec<Write>,
    steps: Vec<StepWrite>,
    tasks: Vec<TaskWrite>,
    step_transitions: Vec<TransitionWrite>,
    task_transitions: Vec<TransitionWrite>,
    events: EventsWrite,
}

impl Tx {
    /// A transaction on this connection; nothing is sent until the first round trip.
    pub(crate) fn new(client: Object, waker: RelayWaker) -> Tx {
        Tx {
            client: Some(client),
            begun: false,
            notify: false,
            urgent: false,
            waker,
            writes: Vec::new(),
            steps: Vec::new(),
            tasks: Vec::new(),
            step_transitions: Vec::new(),
            task_transitions: Vec::new(),
            events: EventsWrite::default(),
        }
    }

    /// One round trip: sends `BEGIN` (the first time), every buffered write, the reads
    /// and, with `commit`, `COMMIT`, all in one pipeline (the server runs them in that
    /// order; the first error aborts the rest), and returns each read's rows.
    pub(crate) async fn round_trip(&mut self, reads: &[Read<'_>], commit: bool) -> Result<Vec<Vec<Row>>> {
        let writes = self.take_writes();
        let client = self.client.as_ref().expect("transaction is open");
        // prepared statements are cached per connection: after the first use these are
        // look-ups (a new connection prepares them all in one pipelined round trip), so
        // everything below goes out back to back
        let (write_statements, read_statements) = futures::try_join!(
            try_join_all(writes.iter().map(|w| client.statement(&w.sql))),
            try_join_all(reads.iter().map(|(sql, _)| client.statement(sql))),
        )?;
        let write_params: Vec<Vec<&(dyn ToSql + Sync)>> =
            writes.iter().map(|w| w.params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect()).collect();
        let notify = commit && self.notify;
        let begin = !self.begun;
        // from here on the connection may hold an open transaction: never pool it as is
        self.begun = true;
        crate::counter::count(u64::from(begin) + u64::from(commit));
        // futures are first polled, and so sent, in the order they are listed
        let work = async {
            futures::try_join!(
                async { if begin { client.batch_execute("BEGIN").await } else { Ok(()) } },
                try_join_all(write_statements.iter().zip(&write_params).map(|(st, params)| client.execute(st, params))),
                try_join_all(read_statements.iter().zip(reads).map(|(st, (_, params))| client.query(st, params))),
                async { if commit { client.batch_execute("COMMIT").await } else { Ok(()) } },
            )
        };
        let (_, _, rows, _) = match crate::outbox::waking(client, notify && self.urgent, work).await {
            Ok(done) => done,
            Err(error) => return Err(self.failed_trip(error.into()).await),
        };
        if notify && !self.urgent {
            self.waker.soon();
        }
        Ok(rows)
    }

    /// After a round trip failed: a fence that found a kept task changed has aborted the
    /// transaction (or, with the `COMMIT` in the same pipeline, ended it), so it is ended
    /// here and the connection goes back to the pool clean; after any other failure the
    /// connection is discarded with the `Tx`.
    async fn failed_trip(&mut self, error: crate::Error) -> crate::Error {
        if error.is_stale_kept() {
            let client = self.client.as_ref().expect("transaction is open");
            crate::counter::count(1);
            if client.batch_execute("ROLLBACK").await.is_ok() {
                self.begun = false;
            }
        }
        error
    }

    /// Sends, ahead of everything else in the next round trip, the fence of a batch decided
    /// from tasks kept in memory: it locks them (in id order) and, with the locks held,
    /// aborts the transaction with [`crate::Error::is_stale_kept`] unless each task's
    /// `last_sort_key` and the sum of its steps' are still those of `kept`. Right behind
    /// it goes, for each task of `told` (kept from its request: the requester's word, which
    /// the keys alone do not check), the check that the task is the one stored: its head,
    /// every step and every edge as its `WholeTask` has them, aborting likewise.
    pub fn fence<'a>(
        &mut self,
        kept: impl IntoIterator<Item = (&'a TaskHead, i64)>,
        told: impl IntoIterator<Item = (&'a TaskHead, &'a WholeTask)>,
    ) {
        let mut kept: Vec<(Uuid, i32, i64)> =
            kept.into_iter().map(|(task, steps)| (task.id, task.last_sort_key, steps)).collect();
        kept.sort_unstable();
        let ids: Vec<Uuid> = kept.iter().map(|k| k.0).collect();
        let task_keys: Vec<i32> = kept.iter().map(|k| k.1).collect();
        let step_keys: Vec<i64> = kept.iter().map(|k| k.2).collect();
        let fence = Write {
            sql: Cow::Borrowed("SELECT tasker_fence($1, $2, $3)"),
            params: vec![boxed(ids), boxed(task_keys), boxed(step_keys)],
        };
        let checks = told.into_iter().map(|(head, whole)| created_check(head, whole));
        self.writes.splice(0..0, std::iter::once(fence).chain(checks));
    }

    /// Writes what is buffered and runs one read, in one round trip.
    pub(crate) async fn query(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        Ok(self.round_trip(&[(sql, params)], false).await?.pop().unwrap_or_default())
    }

    /// Buffers a statement to send with the next round trip, before the buffered rows.
    pub(crate) fn push_write(&mut self, sql: impl Into<Cow<'static, str>>, params: Vec<Param>) {
        self.writes.push(Write { sql: sql.into(), params });
    }

    /// Moves a task to `to`: checks the transition is legal, then buffers the status
    /// change, its transition row and its event.
    pub fn transition_task(&mut self, task: &mut TaskHead, to: TaskState, metadata: Value) -> Result<()> {
        task.status.check(to)?;
        let now = as_stored(Utc::now());
        let from = task.status;
        task.status = to;
        task.last_sort_key += 1;
        self.urgent |= to.is_final();
        match to {
            TaskState::InProgress if task.started_at.is_none() => task.started_at = Some(now),
            TaskState::InProgress => task.completed_at = None,
            TaskState::Complete | TaskState::Error | TaskState::Cancelled => task.completed_at = Some(now),
            TaskState::Pending => {}
        }
        self.tasks.retain(|t| t.id != task.id);
        self.tasks.push(task.snapshot());
        let id = tasker_domain::new_id();
        let event = CloudEvent::task(id, &task.subject(), Some(from), to, &metadata, now);
        self.push_event(&event);
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
        let now = as_stored(Utc::now());
        let from = step.status;
        step.status = to;
        step.last_sort_key += 1;
        step.last_published_at = (to == StepState::Enqueued).then_some(now);
        match to {
            StepState::Pending => {
                // an operator retry: a new round, but attempt numbers keep counting, so a
                // report of an earlier attempt can never pass for one of this round
                step.attempts_before_retry = step.attempts;
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
            StepState::InProgress => step.started_at = Some(change.started_at.map_or(now, as_stored)),
            StepState::WaitingForRetry => step.next_attempt_at = change.next_attempt_at.map(as_stored),
            StepState::Complete | StepState::Error | StepState::ResolvedManually | StepState::Cancelled => {
                step.completed_at = Some(now)
            }
        }
        if change.error.is_some() {
            step.last_error = change.error;
        }
        self.buffer_step(step, change.results);
        let mut metadata = metadata;
        if let Value::Object(map) = &mut metadata {
            map.insert("attempt".into(), step.attempts.into());
        }
        let id = tasker_domain::new_id();
        let step_ref = StepRef { id: step.id, name: &step.name, attempt: step.attempts as u32 };
        let event = CloudEvent::step(id, subject, step_ref, from, to, &metadata, now);
        self.push_event(&event);
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

    /// Buffers a step's counted-down `pending_parents` (its parents completed in memory,
    /// under the task lock).
    pub fn parents_done(&mut self, step: &StepRow) {
        self.buffer_step(step, None);
    }

    /// Buffers the step's row as it is now, keeping results buffered earlier.
    fn buffer_step(&mut self, step: &StepRow, results: Option<String>) {
        if let Some(existing) = self.steps.iter_mut().find(|w| w.id == step.id) {
            let keep_results = existing.results.take();
            *existing = step.snapshot(results.or(keep_results));
        } else {
            self.steps.push(step.snapshot(results));
        }
    }

    pub(crate) fn push_event(&mut self, event: &CloudEvent) {
        self.events.ids.push(event.id);
        self.events.routing_keys.push(event.routingkey.clone());
        self.events.payloads.push(serde_json::to_string(event).expect("events serialize"));
    }

    /// Writes everything buffered and commits: one round trip.
    pub async fn commit(self) -> Result<()> {
        self.commit_reading(&[]).await.map(drop)
    }

    /// Writes everything buffered, runs the reads and commits, in one round trip; returns
    /// the reads' rows.
    pub(crate) async fn commit_reading(mut self, reads: &[Read<'_>]) -> Result<Vec<Vec<Row>>> {
        if !self.begun && reads.is_empty() && self.is_clean() {
            return Ok(Vec::new());
        }
        let rows = self.round_trip(reads, true).await?;
        self.begun = false;
        Ok(rows)
    }

    /// Discards the transaction.
    pub async fn rollback(mut self) -> Result<()> {
        if self.begun {
            let client = self.client.as_ref().expect("transaction is open");
            crate::counter::count(1);
            client.batch_execute("ROLLBACK").await?;
            self.begun = false;
        }
        Ok(())
    }

    fn is_clean(&self) -> bool {
        self.writes.is_empty()
            && self.steps.is_empty()
            && self.tasks.is_empty()
            && self.step_transitions.is_empty()
            && self.task_transitions.is_empty()
            && self.events.ids.is_empty()
    }

    /// The statements pushed, then the buffered rows as one statement.
    fn take_writes(&mut self) -> Vec<Write> {
        let mut writes = std::mem::take(&mut self.writes);
        self.notify |= !self.events.ids.is_empty();
        let rows = [
            steps_write(std::mem::take(&mut self.steps)),
            tasks_write(std::mem::take(&mut self.tasks)),
            transitions_write(STEP_TRANSITIONS_INSERT, std::mem::take(&mut self.step_transitions)),
            transitions_write(TASK_TRANSITIONS_INSERT, std::mem::take(&mut self.task_transitions)),
            events_write(std::mem::take(&mut self.events)),
        ];
        writes.extend(together(rows.into_iter().flatten().collect()));
        writes
    }
}

/// A time as the database stores it (whole microseconds, the rest cut off as the driver
/// sends it), so that a row the engine holds in memory after a write equals the row read
/// back.
fn as_stored(at: DateTime<Utc>) -> DateTime<Utc> {
    use chrono::SubsecRound;
    at.trunc_subsecs(6)
}

impl Drop for Tx {
    fn drop(&mut self) {
        // A transaction abandoned half-way (an error, a cancelled future) must not go back
        // to the pool: closing the connection makes the server roll it back.
        if let Some(client) = self.client.take()
            && self.begun
        {
            drop(Object::take(client));
        }
    }
}

/// The buffered rows' statements as one: each a data-modifying `WITH` of a single
/// statement. They write different tables and none reads what another writes (a row's
/// foreign keys are checked at the statement's end, as before), so this is the same work
/// with one portal, one snapshot and one reply in the pipeline instead of up to five.
fn together(mut writes: Vec<Write>) -> Option<Write> {
    if writes.len() <= 1 {
        return writes.pop();
    }
    let mut sql = String::from("WITH ");
    let mut params = Vec::new();
    for (i, write) in writes.into_iter().enumerate() {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!("w{i} AS ({})", renumbered(&write.sql, params.len())));
        params.extend(write.params);
    }
    sql.push_str(" SELECT 1");
    Some(Write { sql: Cow::Owned(sql), params })
}

/// `sql` with each parameter `$n` written `$(n + offset)`.
fn renumbered(sql: &str, offset: usize) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut rest = sql;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..=at]);
        rest = &rest[at + 1..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if let Ok(n) = rest[..digits].parse::<usize>() {
            out.push_str(&(n + offset).to_string());
            rest = &rest[digits..];
        }
    }
    out.push_str(rest);
    out
}

/// `tasker_fence_created` for a task kept from its request: the task as `whole` has it.
fn created_check(head: &TaskHead, whole: &WholeTask) -> Write {
    let steps: Vec<&StepRow> = whole.steps.values().collect();
    let (edge_from, edge_to): (Vec<Uuid>, Vec<Uuid>) = whole
        .children
        .iter()
        .flat_map(|(parent, children)| children.iter().map(move |child| (*parent, *child)))
        .unzip();
    let head_text = vec![
        head.namespace.clone(),
        head.name.clone(),
        head.version.clone(),
        head.trace.traceparent.clone(),
        head.trace.tracestate.clone(),
    ];
    Write {
        sql: Cow::Borrowed("SELECT tasker_fence_created($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"),
        params: vec![
            boxed(head.id),
            boxed(head_text),
            boxed(steps.iter().map(|s| s.id).collect::<Vec<Uuid>>()),
            boxed(steps.iter().map(|s| s.name.clone()).collect::<Vec<String>>()),
            boxed(steps.iter().map(|s| s.handler.clone()).collect::<Vec<String>>()),
            boxed(steps.iter().map(|s| s.config.clone()).collect::<Vec<String>>()),
            boxed(steps.iter().map(|s| s.max_attempts).collect::<Vec<i32>>()),
            boxed(steps.iter().map(|s| s.retryable).collect::<Vec<bool>>()),
            boxed(steps.iter().map(|s| s.timeout_ms).collect::<Vec<i64>>()),
            boxed(steps.iter().map(|s| s.pending_parents).collect::<Vec<i32>>()),
            boxed(edge_from),
            boxed(edge_to),
        ],
    }
}

fn boxed<T: ToSql + Sync + Send + 'static>(value: T) -> Param {
    Box::new(value)
}

fn steps_write(steps: Vec<StepWrite>) -> Option<Write> {
    if steps.is_empty() {
        return None;
    }
    let ids: Vec<Uuid> = steps.iter().map(|s| s.id).collect();
    let status: Vec<&'static str> = steps.iter().map(|s| s.status).collect();
    let attempts: Vec<i32> = steps.iter().map(|s| s.attempts).collect();
    let pending_parents: Vec<i32> = steps.iter().map(|s| s.pending_parents).collect();
    let before_retry: Vec<i32> = steps.iter().map(|s| s.attempts_before_retry).collect();
    let next: Vec<Option<DateTime<Utc>>> = steps.iter().map(|s| s.next_attempt_at).collect();
    let set_results: Vec<bool> = steps.iter().map(|s| s.results.is_some()).collect();
    let enqueued: Vec<Option<DateTime<Utc>>> = steps.iter().map(|s| s.enqueued_at).collect();
    let started: Vec<Option<DateTime<Utc>>> = steps.iter().map(|s| s.started_at).collect();
    let completed: Vec<Option<DateTime<Utc>>> = steps.iter().map(|s| s.completed_at).collect();
    let sort_keys: Vec<i32> = steps.iter().map(|s| s.last_sort_key).collect();
    let (error, results): (Vec<Option<String>>, Vec<Option<String>>) =
        steps.into_iter().map(|s| (s.last_error, s.results)).unzip();
    Some(Write {
        sql: Cow::Borrowed(
            "UPDATE workflow_steps s SET status = u.status, attempts = u.attempts, \
               next_attempt_at = u.next_attempt_at, last_error = u.last_error::jsonb, \
               results = CASE WHEN u.set_results THEN u.results::jsonb ELSE s.results END, \
               enqueued_at = u.enqueued_at, started_at = u.started_at, completed_at = u.completed_at, \
               pending_parents = u.pending_parents, attempts_before_retry = u.before_retry, \
               last_sort_key = u.last_sort_key, updated_at = now() \
             FROM unnest($1::uuid[], $2::text[], $3::int4[], $4::timestamptz[], $5::text[], $6::bool[], \
                         $7::text[], $8::timestamptz[], $9::timestamptz[], $10::timestamptz[], $11::int4[], \
                         $12::int4[], $13::int4[]) \
               AS u(id, status, attempts, next_attempt_at, last_error, set_results, results, \
                    enqueued_at, started_at, completed_at, pending_parents, before_retry, last_sort_key) \
             WHERE s.id = u.id",
        ),
        params: vec![
            boxed(ids),
            boxed(status),
            boxed(attempts),
            boxed(next),
            boxed(error),
            boxed(set_results),
            boxed(results),
            boxed(enqueued),
            boxed(started),
            boxed(completed),
            boxed(pending_parents),
            boxed(before_retry),
            boxed(sort_keys),
        ],
    })
}

fn tasks_write(tasks: Vec<TaskWrite>) -> Option<Write> {
    if tasks.is_empty() {
        return None;
    }
    let ids: Vec<Uuid> = tasks.iter().map(|t| t.id).collect();
    let status: Vec<&'static str> = tasks.iter().map(|t| t.status).collect();
    let started: Vec<Option<DateTime<Utc>>> = tasks.iter().map(|t| t.started_at).collect();
    let completed: Vec<Option<DateTime<Utc>>> = tasks.iter().map(|t| t.completed_at).collect();
    let sort_keys: Vec<i32> = tasks.iter().map(|t| t.last_sort_key).collect();
    Some(Write {
        sql: Cow::Borrowed(
            "UPDATE tasks t SET status = u.status, started_at = u.started_at, \
               completed_at = u.completed_at, last_sort_key = u.last_sort_key, updated_at = now() \
             FROM unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::timestamptz[], $5::int4[]) \
               AS u(id, status, started_at, completed_at, last_sort_key) \
             WHERE t.id = u.id",
        ),
        params: vec![boxed(ids), boxed(status), boxed(started), boxed(completed), boxed(sort_keys)],
    })
}

/// Events buffered for one outbox row: the columns' arrays, in the order the events were
/// made.
#[derive(Default)]
struct EventsWrite {
    ids: Vec<Uuid>,
    routing_keys: Vec<String>,
    payloads: Vec<String>,
}

/// One outbox row for the events buffered since the last round trip (as a rule, all of a
/// transaction's).
fn events_write(events: EventsWrite) -> Option<Write> {
    if events.ids.is_empty() {
        return None;
    }
    Some(Write {
        sql: Cow::Borrowed("INSERT INTO outbox (event_ids, routing_keys, payloads) VALUES ($1, $2, $3)"),
        params: vec![boxed(events.ids), boxed(events.routing_keys), boxed(events.payloads)],
    })
}

/// The transition tables' inserts, with the same parameters. Their rows are never changed
/// once written (the current one is the row whose sort key is its owner's `last_sort_key`).
const STEP_TRANSITIONS_INSERT: &str = "INSERT INTO workflow_step_transitions \
       (id, workflow_step_id, task_id, from_state, to_state, sort_key, metadata, created_at) \
     SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::int4[], \
                          $7::jsonb[], $8::timestamptz[])";
const TASK_TRANSITIONS_INSERT: &str = "INSERT INTO task_transitions \
       (id, task_id, from_state, to_state, sort_key, metadata, created_at) \
     SELECT u.id, u.owner, u.from_state, u.to_state, u.sort_key, u.metadata, u.created_at \
     FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::int4[], $7::jsonb[], \
                 $8::timestamptz[]) \
       AS u(id, owner, task_id, from_state, to_state, sort_key, metadata, created_at)";

/// Inserts the new transition rows with `insert` (one of the two above), one statement.
fn transitions_write(insert: &'static str, rows: Vec<TransitionWrite>) -> Option<Write> {
    if rows.is_empty() {
        return None;
    }
    let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
    let owner: Vec<Uuid> = rows.iter().map(|r| r.owner).collect();
    let task: Vec<Uuid> = rows.iter().map(|r| r.task_id).collect();
    let from: Vec<Option<&'static str>> = rows.iter().map(|r| r.from).collect();
    let to: Vec<&'static str> = rows.iter().map(|r| r.to).collect();
    let sort: Vec<i32> = rows.iter().map(|r| r.sort_key).collect();
    let at: Vec<DateTime<Utc>> = rows.iter().map(|r| r.at).collect();
    let metadata: Vec<Value> = rows.into_iter().map(|r| r.metadata).collect();
    Some(Write {
        sql: Cow::Borrowed(insert),
        params: vec![
            boxed(ids),
            boxed(owner),
            boxed(task),
            boxed(from),
            boxed(to),
            boxed(sort),
            boxed(metadata),
            boxed(at),
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(sql: &'static str, params: usize) -> Write {
        Write { sql: Cow::Borrowed(sql), params: (0..params).map(|n| boxed(n as i32)).collect() }
    }

    #[test]
    fn parameters_are_numbered_on_past_the_statements_before() {
        assert_eq!(
            renumbered("a = $1 AND b = ANY($2::int4[]) AND c = $10", 3),
            "a = $4 AND b = ANY($5::int4[]) AND c = $13"
        );
        assert_eq!(renumbered("no parameters, a lone $ sign", 5), "no parameters, a lone $ sign");
    }

    #[test]
    fn the_buffered_rows_go_as_one_statement() {
        assert!(together(Vec::new()).is_none());
        let one = together(vec![write("UPDATE a SET x = $1", 1)]).expect("one");
        assert_eq!(one.sql, "UPDATE a SET x = $1");
        let all = together(vec![
            write("UPDATE a SET x = $1 WHERE id = $2", 2),
            write("INSERT INTO b VALUES ($1, $2, $3)", 3),
        ])
        .expect("one");
        assert_eq!(
            all.sql,
            "WITH w0 AS (UPDATE a SET x = $1 WHERE id = $2), w1 AS (INSERT INTO b VALUES ($3, $4, $5)) SELECT 1"
        );
        assert_eq!(all.params.len(), 5);
    }
}
