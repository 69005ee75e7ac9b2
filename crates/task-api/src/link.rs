//! task-api's broker connection, kept under the services' one supervision model: a lost
//! connection is noticed at once and made again with capped, jittered backoff, readiness
//! reports it down meanwhile, and task requests that could not be sent are kept and sent
//! once it is back (the orchestrator treats a repeated request as a no-op), so a task
//! created during an outage starts as soon as the broker returns rather than waiting for
//! the sweeper.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
};

use tasker_messaging::{Broker, Command, Publisher};
use tasker_proto::messages::TaskRequest;
use tasker_runtime::{AmqpConfig, BrokerSlot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Most requests kept for lack of a connection; past it the sweeper's
/// `pending_task_timeout` still starts the tasks.
const MAX_UNSENT: usize = 100_000;

/// The connection in use and its publishing channel.
type Current = Option<(Arc<Broker>, Publisher)>;

#[derive(Clone, Default)]
pub(crate) struct Link {
    current: Arc<Mutex<Current>>,
    unsent: Arc<Mutex<HashSet<Uuid>>>,
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

    /// Asks the orchestrator to look at these tasks; what cannot be sent now is kept for
    /// the next connection. Never fails: the tasks are committed either way.
    pub(crate) async fn request(&self, task_ids: &[Uuid]) {
        let Some(publisher) = self.publisher() else {
            tracing::warn!(tasks = task_ids.len(), "broker unavailable; task requests kept until it is back");
            return self.keep(task_ids);
        };
        // the request carries the trace context of the span it is sent from (CreateTask,
        // an operator action)
        let trace = tasker_runtime::trace::context_of(&tracing::Span::current(), &Default::default()).to_headers();
        let commands: Vec<Command> = task_ids
            .iter()
            .map(|id| Command::Task(TaskRequest { task_id: id.to_string(), trace_context: trace.clone() }))
            .collect();
        if let Err(error) = publisher.send(&commands).await {
            tracing::warn!(%error, tasks = task_ids.len(), "task requests not published; kept until the broker is back");
            self.keep(task_ids);
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

    /// One connection's life: connect, declare, send what was kept, then hold until the
    /// connection is lost (Err, for the supervisor) or `stop` (Ok).
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
        let kept: Vec<Uuid> = std::mem::take(&mut *self.unsent.lock().expect("link lock")).into_iter().collect();
        if !kept.is_empty() {
            tracing::info!(tasks = kept.len(), "sending the task requests kept while the broker was away");
            for chunk in kept.chunks(500) {
                self.request(chunk).await;
            }
        }
        let lost = tokio::select! {
            _ = stop.cancelled() => false,
            _ = broker.closed() => true,
        };
        *self.current.lock().expect("link lock") = None;
        slot.set(None);
        publisher.close().await;
        let _ = broker.close().await;
        anyhow::ensure!(!lost, "the broker connection was lost");
        Ok(())
    }
}
