//! TaskService: create, read, list, cancel and watch tasks.

use std::{
    collections::{HashMap, HashSet},
    pin::Pin,
    sync::{Arc, Mutex},
};

use futures::Stream;
use itertools::Itertools;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tasker_auth::Principal;
use tasker_domain::{CloudEvent, Limits, StepState, TaskState, event::StepRef};
use tasker_proto::v1::{self as pb, task_service_server::TaskService};
use tasker_store::{Actor, NewTask, Store, TaskFilter, TaskView};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use uuid::Uuid;

use crate::{
    auth::{Allowed, caller},
    catalog::Catalog,
    convert,
    error::{ApiError, ApiResult, parse_id, refused_in},
    feeds::{Feeds, Next},
    input,
    link::Link,
    spans,
};

const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 500;
/// Times CreateTask reads its template's latest version again because a newer one was
/// registered while it created the task, before it gives up (`ABORTED`).
const MAX_SUPERSEDED: u32 = 3;

#[derive(Clone)]
pub struct Tasks {
    pub(crate) store: Store,
    pub(crate) link: Link,
    pub(crate) limits: Limits,
    /// The templates tasks are created from, with their input schemas.
    pub(crate) catalog: Catalog,
    pub(crate) watches: Watches,
    /// The live events WatchTask streams follow (`feeds.rs`).
    pub(crate) feeds: Feeds,
    pub(crate) metrics: crate::metrics::ApiMetrics,
    /// Cancelled when task-api begins to stop: open WatchTask streams end then, rather
    /// than hold the shutdown until the tasks they watch are final.
    pub(crate) stopping: CancellationToken,
}

/// WatchTask streams open per caller, bounded (`api.max_watches_per_caller`).
#[derive(Clone)]
pub(crate) struct Watches {
    open: Arc<Mutex<HashMap<String, usize>>>,
    max: usize,
}

/// One open stream; closing it (dropping this) frees the caller's slot.
pub(crate) struct WatchSlot {
    watches: Watches,
    subject: String,
}

impl Watches {
    pub(crate) fn new(max: usize) -> Watches {
        Watches { open: Arc::default(), max }
    }

    fn open(&self, subject: &str) -> ApiResult<WatchSlot> {
        let mut open = self.open.lock().expect("watches lock");
        let count = open.entry(subject.to_owned()).or_default();
        if *count >= self.max {
            return Err(ApiError::TooLarge(format!(
                "{} WatchTask streams open for this caller, the limit (api.max_watches_per_caller)",
                self.max
            )));
        }
        *count += 1;
        Ok(WatchSlot { watches: self.clone(), subject: subject.to_owned() })
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut open = self.watches.open.lock().expect("watches lock");
        if let Some(count) = open.get_mut(&self.subject) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.subject);
            }
        }
    }
}

impl Tasks {
    /// Asks the orchestrator to look at a committed task, without waiting for the broker's
    /// confirm. A failure is logged, not returned: the task is committed, the request is
    /// sent again once the broker is back, and the sweeper re-requests tasks left pending
    /// whatever happens to this process.
    pub(crate) async fn request(&self, task_id: Uuid) {
        self.link.request_soon(task_id, None).await;
    }

    /// Creates a task for `caller` (who holds `tasks:create`; the namespace is checked once
    /// it is known to be a valid name).
    async fn create(
        &self,
        r: pb::CreateTaskRequest,
        caller: &Principal,
        trace: &tasker_domain::TraceContext,
    ) -> ApiResult<pb::CreateTaskResponse> {
        input::name("namespace", &r.namespace)?;
        caller.require_namespace(&r.namespace)?;
        input::name("name", &r.name)?;
        input::version("version", &r.version)?;
        input::text("idempotency_key", &r.idempotency_key, input::MAX_IDEMPOTENCY_KEY_BYTES)?;
        input::text("initiator", &r.initiator, input::MAX_TEXT_BYTES)?;
        input::text("source_system", &r.source_system, input::MAX_TEXT_BYTES)?;
        input::text("reason", &r.reason, input::MAX_TEXT_BYTES)?;
        input::tags(&r.tags)?;
        let context_text = if r.context_json.trim().is_empty() { "{}" } else { r.context_json.as_str() };
        input::json("context_json", context_text, self.limits.max_context_bytes)?;
        // parsed for the schema and the request hash only; the text is stored as given
        let context: Value = serde_json::from_str(context_text)
            .map_err(|e| ApiError::invalid("context_json", format!("not valid JSON: {e}")))?;
        if !context.is_object() {
            return Err(ApiError::invalid("context_json", "must be a JSON object"));
        }
        let version = if r.version.is_empty() { None } else { Some(r.version.as_str()) };
        let request_hash = request_hash(&r, &context);
        let mut superseded = 0;
        let outcome = loop {
            let known = self.catalog.get(&r.namespace, &r.name, version).await?;
            known.schema.as_ref().map(|schema| schema.validate(&context)).transpose()?;
            let new = NewTask {
                template: &known.record,
                context: context_text,
                tags: &r.tags,
                initiator: &r.initiator,
                source_system: &r.source_system,
                reason: &r.reason,
                priority: r.priority,
                idempotency_key: if r.idempotency_key.is_empty() { None } else { Some(r.idempotency_key.as_str()) },
                request_hash: &request_hash,
                actor: &caller.subject,
                trace,
                as_latest: version.is_none(),
            };
            match self.store.create_task(&new).await {
                // a newer version was registered (perhaps through another replica): use it
                Err(tasker_store::Error::Superseded(_)) if superseded < MAX_SUPERSEDED => {
                    superseded += 1;
                    self.catalog.forget_latest(&r.namespace, &r.name);
                }
                outcome => break outcome.map_err(refused_in("context_json"))?,
            }
        };
        let view = match outcome.view {
            Some(view) => {
                self.metrics.created(&view.task.namespace, &view.task.name);
                self.link.request_soon(outcome.task_id, crate::link::created(&view)).await;
                view
            }
            None => {
                let view = self.store.task(outcome.task_id, false).await?;
                // a retried request whose first attempt's publish may have been lost (the
                // process died between commit and publish): ask again, it is a no-op for
                // the orchestrator if the first one arrived
                if view.task.status == TaskState::Pending {
                    self.request(outcome.task_id).await;
                }
                view
            }
        };
        Ok(pb::CreateTaskResponse { task: Some(convert::task(&view)), deduplicated: outcome.deduplicated })
    }

    /// Lists tasks; `only` limits them to these namespaces (the caller's).
    async fn list(&self, r: pb::ListTasksRequest, only: Option<Vec<String>>) -> ApiResult<pb::ListTasksResponse> {
        input::optional_name("namespace", &r.namespace)?;
        input::optional_name("name", &r.name)?;
        let status = pb::TaskStatus::try_from(r.status)
            .map_err(|_| ApiError::invalid("status", format!("{} is not a TaskStatus", r.status)))?;
        let page_size = if r.page_size == 0 { DEFAULT_PAGE } else { r.page_size.min(MAX_PAGE) };
        let filter = TaskFilter {
            namespace: Some(r.namespace).filter(|s| !s.is_empty()),
            name: Some(r.name).filter(|s| !s.is_empty()),
            status: convert::task_state(status),
            created_after: input::instant("created_after", r.created_after.as_ref())?,
            created_before: input::instant("created_before", r.created_before.as_ref())?,
            namespaces: only,
            after: decode_page_token(&r.page_token)?,
            limit: page_size as i64,
        };
        let page = self.store.list_tasks(&filter).await?;
        Ok(pb::ListTasksResponse {
            tasks: page.tasks.iter().map(convert::task_row).collect(),
            next_page_token: page.next.map(encode_page_token).unwrap_or_default(),
        })
    }

    /// Taps the task's events first, then replays its history from the transition tables
    /// (event ids are transition ids, so nothing is sent twice), then streams live events
    /// until the task is final. A stream that falls behind its task's events (its client
    /// reads slower than they come) taps again and sends what it missed from the history.
    async fn watch(&self, task_id: Uuid, out: mpsc::Sender<Result<pb::Event, Status>>) -> ApiResult<()> {
        let head = self.store.task(task_id, false).await?.task;
        let pattern = format!("{}.{}.#", head.namespace, head.name);
        let mut seen = HashSet::new();
        loop {
            let mut live = self.feeds.tap(&pattern, task_id).await?;
            let view = self.store.task(task_id, true).await?;
            for event in history(&view) {
                if seen.insert(event.id) && out.send(Ok(event_message(&event))).await.is_err() {
                    return Ok(());
                }
            }
            if view.task.status.is_final() {
                return Ok(());
            }
            loop {
                let event = match live.next().await {
                    Next::Event(event) => event,
                    Next::Behind => break, // tap again, then the history since
                    Next::Ended => return Err(ApiError::Unavailable("event subscription ended".into())),
                };
                // the feed gives this tap its task's events only
                if !seen.insert(event.id) {
                    continue;
                }
                let is_final = event.kind.starts_with("dev.tasker.task.")
                    && event
                        .data
                        .get("to")
                        .and_then(Value::as_str)
                        .and_then(|s| s.parse::<TaskState>().ok())
                        .is_some_and(TaskState::is_final);
                if out.send(Ok(event_message(&event))).await.is_err() || is_final {
                    return Ok(());
                }
            }
        }
    }
}

/// The events a task's transitions announced, rebuilt from the audit tables, in order:
/// each owner's (the task's, each step's) in the order of its sort keys, as they happened
/// under the task's lock, and the owners' merged by time. Only the merge trusts the
/// clocks: transitions written by different processes (task-api's operator actions, the
/// orchestrator's replicas) carry each its own host's time, and a clock behind another's
/// must not put a step's `enqueued` before the `reset` it follows.
fn history(view: &TaskView) -> Vec<CloudEvent> {
    let t = &view.task;
    let subject = tasker_domain::event::EventSubject {
        task_id: t.id,
        namespace: t.namespace.clone(),
        task_name: t.name.clone(),
        task_version: t.version.clone(),
        trace: t.trace.clone(),
    };
    let metadata = |text: &str| serde_json::from_str::<Value>(text).unwrap_or(Value::Null);
    let mut owners: Vec<Vec<CloudEvent>> = Vec::with_capacity(view.steps.len() + 1);
    owners.push(
        view.transitions
            .iter()
            .filter_map(|tr| {
                let to = tr.to_state.parse::<TaskState>().ok()?;
                let from = tr.from_state.as_deref().and_then(|s| s.parse().ok());
                Some(CloudEvent::task(tr.id, &subject, from, to, &metadata(&tr.metadata), tr.created_at))
            })
            .collect(),
    );
    for step in &view.steps {
        owners.push(
            step.transitions
                .iter()
                .filter_map(|tr| {
                    let from = tr.from_state.as_deref().and_then(|s| s.parse::<StepState>().ok())?;
                    let to = tr.to_state.parse::<StepState>().ok()?;
                    let meta = metadata(&tr.metadata);
                    let attempt = meta.get("attempt").and_then(Value::as_u64).unwrap_or(step.attempts as u64) as u32;
                    let step_ref = StepRef { id: step.id, name: &step.name, attempt };
                    Some(CloudEvent::step(tr.id, &subject, step_ref, from, to, &meta, tr.created_at))
                })
                .collect(),
        );
    }
    merge_by_time(owners)
}

/// Merges lists each already in its own order into one, taking at each turn the earliest
/// (by time, then id: UUIDv7, in creation order within a process) of the lists' first
/// events, so no list's order is ever changed.
fn merge_by_time(owners: Vec<Vec<CloudEvent>>) -> Vec<CloudEvent> {
    owners.into_iter().kmerge_by(|a, b| (&a.time, a.id) < (&b.time, b.id)).collect()
}

fn event_message(event: &CloudEvent) -> pb::Event {
    let time = chrono::DateTime::parse_from_rfc3339(&event.time).ok().map(|t| convert::timestamp(t.to_utc()));
    pb::Event {
        id: event.id.to_string(),
        r#type: event.kind.clone(),
        routing_key: event.routingkey.clone(),
        time,
        data_json: event.data.to_string(),
    }
}

/// What makes two CreateTask requests "the same" for idempotency.
fn request_hash(r: &pb::CreateTaskRequest, context: &Value) -> String {
    let canonical = serde_json::json!({
        "namespace": r.namespace, "name": r.name, "version": r.version, "context": context,
        "tags": r.tags, "initiator": r.initiator, "source_system": r.source_system,
        "reason": r.reason, "priority": r.priority,
    });
    Sha256::digest(canonical.to_string().as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

fn encode_page_token((at, id): (chrono::DateTime<chrono::Utc>, Uuid)) -> String {
    format!("{}_{}", at.timestamp_micros(), id.simple())
}

fn decode_page_token(token: &str) -> ApiResult<Option<(chrono::DateTime<chrono::Utc>, Uuid)>> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || ApiError::invalid("page_token", "not a token this API returned");
    let (micros, id) = token.split_once('_').ok_or_else(bad)?;
    let at = chrono::DateTime::from_timestamp_micros(micros.parse().map_err(|_| bad())?).ok_or_else(bad)?;
    Ok(Some((at, id.parse().map_err(|_| bad())?)))
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

#[tonic::async_trait]
impl TaskService for Tasks {
    async fn create_task(
        &self,
        request: Request<pb::CreateTaskRequest>,
    ) -> Result<Response<pb::CreateTaskResponse>, Status> {
        let caller = caller(&request)?;
        caller.require("tasks:create")?;
        let received = spans::received(&request);
        let r = request.into_inner();
        let span = spans::create_task(&r.namespace, &r.name, &received);
        // the task's trace context is this span's (or, with no exporter, the caller's)
        let trace = tasker_runtime::trace::context_of(&span, &received);
        let created = self.create(r, &caller, &trace).instrument(span.clone()).await?;
        span.record("task_id", created.task.as_ref().map(|t| t.id.as_str()).unwrap_or_default());
        Ok(Response::new(created))
    }

    async fn get_task(&self, request: Request<pb::GetTaskRequest>) -> Result<Response<pb::Task>, Status> {
        let caller = caller(&request)?;
        caller.require("tasks:read")?;
        let r = request.into_inner();
        let id = parse_id("task_id", &r.task_id)?;
        let view = self.store.task(id, r.include_transitions).await.map_err(ApiError::from)?;
        caller.require_namespace(&view.task.namespace)?;
        Ok(Response::new(convert::task(&view)))
    }

    async fn list_tasks(
        &self,
        request: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        let caller = caller(&request)?;
        caller.require("tasks:list")?;
        let r = request.into_inner();
        if !r.namespace.is_empty() {
            caller.require_namespace(&r.namespace)?;
        }
        Ok(Response::new(self.list(r, caller.namespace_limit()).await?))
    }

    async fn cancel_task(&self, request: Request<pb::CancelTaskRequest>) -> Result<Response<pb::Task>, Status> {
        let caller = caller(&request)?;
        caller.require("tasks:cancel")?;
        let received = spans::received(&request);
        let r = request.into_inner();
        let id = parse_id("task_id", &r.task_id)?;
        input::text("reason", &r.reason, input::MAX_TEXT_BYTES)?;
        let task = self.store.task_ref(id).await.map_err(ApiError::from)?;
        caller.require_namespace(&task.namespace)?;
        let span = spans::operator("CancelTask", &task, &received);
        let actor = Actor { who: caller.subject, reason: r.reason };
        let cancelled = async {
            self.store.cancel_task(id, &actor).await.map_err(ApiError::from)?;
            self.store.task(id, false).await.map_err(ApiError::from)
        };
        let view = cancelled.instrument(span).await?;
        self.metrics.action(&view.task.namespace, &view.task.name, "cancel");
        Ok(Response::new(convert::task(&view)))
    }

    type WatchTaskStream = EventStream;

    async fn watch_task(
        &self,
        request: Request<pb::WatchTaskRequest>,
    ) -> Result<Response<Self::WatchTaskStream>, Status> {
        let caller = caller(&request)?;
        caller.require("tasks:watch")?;
        let id = parse_id("task_id", &request.into_inner().task_id)?;
        let head = self.store.task(id, false).await.map_err(ApiError::from)?.task;
        caller.require_namespace(&head.namespace)?;
        let slot = self.watches.open(&caller.subject)?;
        let (tx, rx) = mpsc::channel(64);
        let tasks = self.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let watching = tasks.watch(id, tx.clone());
            tokio::select! {
                // the client went away: stop, and free the slot
                _ = tx.closed() => {}
                // task-api is stopping: the caller watches again through another replica
                _ = tasks.stopping.cancelled() => {
                    let stopping = ApiError::Unavailable("task-api is shutting down; watch the task again".into());
                    let _ = tx.send(Err(stopping.into())).await;
                }
                result = watching => {
                    if let Err(error) = result {
                        let _ = tx.send(Err(error.into())).await;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Duration, Utc};
    use serde_json::json;
    use tasker_domain::{CloudEvent, StepState as S, TaskState as T, event::EventSubject, event::StepRef};

    use super::merge_by_time;

    /// An operator's retry, written by task-api on a host whose clock runs 10 ms ahead of
    /// the orchestrator's: the replayed history still has each owner's events in the order
    /// they happened (the step's `reset` before its new `enqueued`, the task's `resumed`
    /// after its `failed`), and the owners' merged by time.
    #[test]
    fn a_clock_behind_another_never_reorders_an_owners_events() {
        let subject = EventSubject {
            task_id: tasker_domain::new_id(),
            namespace: "ns".into(),
            task_name: "t".into(),
            task_version: "1.0.0".into(),
            trace: Default::default(),
        };
        let base: DateTime<Utc> = "2026-12-07T19:00:00Z".parse().unwrap();
        let at = |ms: i64| base + Duration::milliseconds(ms);
        let task = |from: Option<T>, to: T, ms: i64| {
            CloudEvent::task(tasker_domain::new_id(), &subject, from, to, &json!({}), at(ms))
        };
        let step_id = tasker_domain::new_id();
        let step = |from: S, to: S, ms: i64| {
            let step = StepRef { id: step_id, name: "a", attempt: 1 };
            CloudEvent::step(tasker_domain::new_id(), &subject, step, from, to, &json!({}), at(ms))
        };
        let task_events = vec![
            task(None, T::Pending, 0),
            task(Some(T::Pending), T::InProgress, 1),
            task(Some(T::InProgress), T::Error, 5),
            task(Some(T::Error), T::InProgress, 20), // task-api's clock
        ];
        let step_events = vec![
            step(S::Pending, S::Enqueued, 2),
            step(S::Enqueued, S::InProgress, 3),
            step(S::InProgress, S::Error, 4),
            step(S::Error, S::Pending, 19),    // task-api's clock
            step(S::Pending, S::Enqueued, 12), // the orchestrator's, 10 ms behind
            step(S::Enqueued, S::InProgress, 13),
        ];
        let merged = merge_by_time(vec![task_events, step_events]);
        let order: Vec<&str> = merged.iter().map(|e| e.routingkey.trim_start_matches("ns.t.")).collect();
        assert_eq!(
            order,
            [
                "task.created",
                "task.started",
                "step.enqueued",
                "step.started",
                "step.failed",
                "task.failed",
                "step.reset",
                // sorted by time alone, these two would come before the reset
                "step.enqueued",
                "step.started",
                // across owners the clocks decide: written with the reset, stamped later
                "task.resumed",
            ]
        );
    }
}
