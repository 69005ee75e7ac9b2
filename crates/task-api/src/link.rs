//! task-api's broker connection, kept under the services' one supervision model: a lost
//! connection is noticed at once and made again with capped, jittered backoff, readiness
//! reports it down meanwhile, and task requests that could not be sent are kept and sent
//! once it is back (the orchestrator treats a repeated request as a no-op), so a task
//! created during an outage starts as soon as the broker returns rather than waiting for
//! the sweeper.
//!
//! A request is sent once its task is committed, and the caller is answered without
//! waiting for the broker's confirm ([`Link::request_soon`]): the task is in Postgres
//! whatever becomes of the request, a request the broker refuses or loses with the
//! connection is kept and sent again, and the sweeper re-requests a task left pending
//! whatever happens to this process. At shutdown the requests under way are finished
//! before the connection closes ([`Link::settle`]).

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use tasker_messaging::{Broker, Command, Publisher};
use tasker_proto::messages::{CreatedStep, CreatedTask, TaskRequest};
use tasker_runtime::{AmqpConfig, BrokerSlot};
use tasker_store::TaskView;
use tokio::sync::Semaphore;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use uuid::Uuid;

/// Most requests kept for lack of a connection; past it the sweeper's
/// `pending_task_timeout` still starts the tasks.
const MAX_UNSENT: usize = 100_000;

/// Most requests awaiting their confirms at once; past it a caller waits for room, so a
/// broker that stops confirming (a resource alarm) slows the API down as it would if
/// every caller awaited its own confirm.
const MAX_SENDING: usize = 1_024;

/// The connection in use and its publishing channel.
type Current = Option<(Arc<Broker>, Publisher)>;

#[derive(Clone)]
pub(crate) struct Link {
    current: Arc<Mutex<Current>>,
    unsent: Arc<Mutex<HashSet<Uuid>>>,
    /// The requests sent but not yet confirmed, and the room for more.
    sending: TaskTracker,
    room: Arc<Semaphore>,
}

impl Default for Link {
    fn default() -> Link {
        Link {
            current: Default::default(),
            unsent: Default::default(),
            sending: TaskTracker::new(),
            room: Arc::new(Semaphore::new(MAX_SENDING)),
        }
    }
}

impl Link {
    pub(crate) fn broker(&self) -> Option<Arc<Broker>> {
        self.current.lock().expect("link lock").as_ref().map(|(broker, _)| broker.clone())
    }

    /// The connection, waiting up to `patience` for one (at start, or while reconnecting).
    pub(crate) async fn broker_within(&self, patience: std::time::Duration) -> Option<Arc<Broker>> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            match self.broker() {
                Some(broker) => return Some(broker),
                None if tokio::time::Instant::now() >= deadline => return None,
                None => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        }
    }

    fn publisher(&self) -> Option<Publisher> {
        self.current.lock().expect("link lock").as_ref().map(|(_, publisher)| publisher.clone())
    }

    /// Asks the orchestrator to look at a committed task (`created`: as this process has
    /// just created it), and returns once the request is on its way, not confirmed: the
    /// confirm is awaited here in the background, and a request that fails is kept for
    /// the next connection like any other (by its task's id alone). Waits only while
    /// [`MAX_SENDING`] requests await their confirms.
    pub(crate) async fn request_soon(&self, task_id: Uuid, created: Option<CreatedTask>) {
        let request = TaskRequest { task_id: task_id.to_string(), trace_context: span_trace(), created };
        let permit = self.room.clone().acquire_owned().await.expect("the room for requests is never closed");
        let link = self.clone();
        self.sending.spawn(async move {
            link.send(vec![request]).await;
            drop(permit);
        });
    }

    /// Waits up to `patience` for the requests awaiting their confirms (at shutdown, before
    /// the connection closes); those still unconfirmed then are left to the sweeper.
    pub(crate) async fn settle(&self, patience: Duration) {
        self.sending.close();
        if tokio::time::timeout(patience, self.sending.wait()).await.is_err() {
            tracing::warn!(
                left = self.sending.len(),
                "task requests still unconfirmed at shutdown; the sweeper will re-request their tasks"
            );
        }
    }

    /// Sends these requests and awaits the broker's confirm; the tasks of what cannot be
    /// sent now are kept for the next connection. Never fails: the tasks are committed
    /// either way.
    async fn send(&self, requests: Vec<TaskRequest>) {
        let task_ids: Vec<Uuid> = requests.iter().filter_map(|r| r.task_id.parse().ok()).collect();
        let Some(publisher) = self.publisher() else {
            tracing::warn!(tasks = task_ids.len(), "broker unavailable; task requests kept until it is back");
            return self.keep(&task_ids);
        };
        // a blocked connection (a resource alarm) sends nothing until it clears: kept, they
        // go out when it does, and meanwhile hold no room of the requests awaiting confirms
        if publisher.blocked().is_some() {
            tracing::debug!(tasks = task_ids.len(), "broker blocked; task requests kept until it clears");
            return self.keep(&task_ids);
        }
        let commands: Vec<Command> = requests.into_iter().map(Command::Task).collect();
        if let Err(error) = publisher.send(&commands).await {
            tracing::warn!(%error, tasks = task_ids.len(), "task requests not published; kept until the broker is back");
            self.keep(&task_ids);
        }
    }

    /// Sends the requests kept while the broker was away or blocked.
    async fn send_kept(&self) {
        let kept: Vec<Uuid> = std::mem::take(&mut *self.unsent.lock().expect("link lock")).into_iter().collect();
        if kept.is_empty() {
            return;
        }
        tracing::info!(tasks = kept.len(), "sending the task requests kept while the broker was away or blocked");
        let trace = span_trace();
        for chunk in kept.chunks(500) {
            let requests = chunk
                .iter()
                .map(|id| TaskRequest { task_id: id.to_string(), trace_context: trace.clone(), created: None })
                .collect();
            self.send(requests).await;
        }
    }

    fn keep(&self, task_ids: &[Uuid]) {
        let mut unsent = self.unsent.lock().expect("link lock");
        for id in task_ids {
            if unsent.len() < MAX_UNSENT {
                unsent.insert(*id);
            }
        }
    }

    /// One connection's life: connect, declare, send what was kept (and again each time
    /// the broker lifts a block), then hold until the connection is lost (Err, for the
    /// supervisor) or `stop` (Ok).
    pub(crate) async fn maintain(
        &self,
        config: &AmqpConfig,
        slot: &BrokerSlot,
        stop: CancellationToken,
    ) -> anyhow::Result<()> {
        use anyhow::Context;
        let broker = Arc::new(tasker_runtime::connect_broker(config, "task-api").await?);
        broker.declare_orchestrator().await.context("declaring the orchestrator's queues")?;
        let publisher = broker.publisher().await?;
        *self.current.lock().expect("link lock") = Some((broker.clone(), publisher.clone()));
        slot.set(Some(broker.clone()));
        let closed = broker.closed();
        tokio::pin!(closed);
        self.send_kept().await;
        let lost = loop {
            tokio::select! {
                _ = stop.cancelled() => break false,
                _ = &mut closed => break true,
                _ = broker.unblocked() => self.send_kept().await,
            }
        };
        *self.current.lock().expect("link lock") = None;
        slot.set(None);
        publisher.close().await;
        let _ = broker.close().await;
        anyhow::ensure!(!lost, "the broker connection was lost");
        Ok(())
    }
}

/// The task as this process has just created it, for its request: lets the orchestrator
/// start a task small enough to keep without reading it first.
pub fn created(view: &TaskView) -> Option<CreatedTask> {
    if view.steps.len() > tasker_store::MAX_KEPT_STEPS {
        return None;
    }
    let index: HashMap<&str, u32> = view.steps.iter().enumerate().map(|(i, s)| (s.name.as_str(), i as u32)).collect();
    let mut parents: Vec<Vec<u32>> = vec![Vec::new(); view.steps.len()];
    for edge in &view.edges {
        parents[*index.get(edge.to_step.as_str())? as usize].push(*index.get(edge.from_step.as_str())?);
    }
    let steps = view
        .steps
        .iter()
        .zip(parents)
        .map(|(s, parents)| CreatedStep {
            id: s.id.to_string(),
            name: s.name.clone(),
            handler: s.handler.clone(),
            config_json: s.config.clone(),
            max_attempts: s.max_attempts as u32,
            retryable: s.retryable,
            timeout_ms: s.timeout_ms as u64,
            parents,
        })
        .collect();
    Some(CreatedTask {
        namespace: view.task.namespace.clone(),
        name: view.task.name.clone(),
        version: view.task.version.clone(),
        created_at_unix_us: view.task.created_at.timestamp_micros(),
        task_trace_context: view.task.trace.to_headers(),
        steps,
    })
}

/// The trace context of the span a request is sent from (CreateTask, an operator action),
/// which the request carries.
fn span_trace() -> HashMap<String, String> {
    tasker_runtime::trace::context_of(&tracing::Span::current(), &Default::default()).to_headers()
}
