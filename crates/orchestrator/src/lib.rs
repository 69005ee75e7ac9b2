//! The orchestrator: the only component that advances tasks. It consumes task requests and
//! step reports, applies them in batched transactions under the task row locks (readiness
//! by pending-parents count, fencing by attempt, finalization), publishes the step
//! executions that became ready, and only then acks its input. A retry scheduler and a
//! sweeper repair what crashes leave behind. What it keeps in memory between batches (the
//! small tasks it is working on) is checked under the lock before anything is written
//! from it, so any number of replicas may run.

mod dispatch;
mod engine;
mod kept;
mod metrics;
mod sweeper;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use futures::stream::{FuturesUnordered, StreamExt};
use tasker_messaging::{Ack, Consumer, Incoming};
use tasker_proto::messages::{Failed, FailureKind, StepReport, TaskRequest, step_report};
use tasker_runtime::{Admin, Config, prometheus_client::registry::Registry};
use tokio::{sync::mpsc, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

pub use engine::{Decided, Engine, Outcome, Work};
pub use kept::Created;

use crate::{dispatch::Dispatcher, metrics::Metrics};

/// Binds the admin listener, then runs until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    Orchestrator::bind(config).await?.run(shutdown).await
}

/// An orchestrator with its listener bound (so callers learn the port before it runs).
pub struct Orchestrator {
    config: Config,
    admin: Admin,
}

impl Orchestrator {
    pub async fn bind(config: Config) -> anyhow::Result<Orchestrator> {
        let admin = Admin::bind(config.orchestrator.admin_listen).await.context("binding the admin listener")?;
        Ok(Orchestrator { config, admin })
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr()
    }

    /// Runs until `shutdown`; a lost broker connection is re-established (with backoff)
    /// and consuming resumes (unacked input is redelivered, and fencing drops what was
    /// already applied).
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Orchestrator { config, admin } = self;
        let started =
            tasker_runtime::start_with_store(admin, &config, tasker_store::Workload::Keyed, &shutdown).await?;
        let Some(tasker_runtime::Started { stop, admin, store }) = started else {
            return Ok(()); // stopped while waiting for the database
        };
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        let slot = tasker_runtime::BrokerSlot::new();
        slot.register(&mut registry);
        tasker_runtime::register_store_metrics(&store, &mut registry);
        // ready: the database (schema current), the broker, and both input queues consumed
        let consumers = tasker_runtime::Consumers::expecting(2);
        admin.wire(vec![tasker_runtime::store_check(&store), slot.check(), consumers.check()], registry);
        let carried = Carried::default();
        let result = tasker_runtime::supervise("orchestrator", &stop, || {
            orchestrate(&config, &store, &metrics, &slot, &carried, &consumers, stop.clone())
        })
        .await;
        stop.cancel();
        let _ = admin.stopped().await;
        result
    }
}

/// One broker connection's life: the consumers, the retry scheduler and the sweeper, until
/// `stop` (Ok) or a failure (Err).
async fn orchestrate(
    config: &Config,
    store: &tasker_store::Store,
    metrics: &Metrics,
    slot: &tasker_runtime::BrokerSlot,
    carried: &Carried,
    consumers: &tasker_runtime::Consumers,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let settings = config.orchestrator.clone();
    let broker = Arc::new(tasker_runtime::connect_broker(&config.amqp, "orchestrator").await?);
    slot.set(Some(broker.clone()));
    broker.declare_orchestrator().await.context("declaring the orchestrator's queues")?;
    let engine = Engine::new(store.clone(), settings.backoff, config.limits);
    let dispatcher = Dispatcher::new(broker.clone(), metrics.clone(), config.limits.max_execution_bytes).await?;
    let own_dispatcher = dispatcher.clone();
    if carried.connections.fetch_add(1, std::sync::atomic::Ordering::Relaxed) > 0 {
        // back from a broker outage: workers are only now reporting what they kept
        *carried.last_outage.lock().expect("carried lock") = Some(std::time::Instant::now());
    }
    // executions committed while the last connection was being lost go out first
    let unpublished = std::mem::take(&mut *carried.unpublished.lock().expect("carried lock"));
    if !unpublished.is_empty() {
        tracing::info!(executions = unpublished.len(), "publishing executions committed before the broker was lost");
        if let Err(error) = dispatcher.send(unpublished.clone()).await {
            carried.unpublished.lock().expect("carried lock").extend(unpublished);
            return Err(error.into());
        }
    }
    let (retry_tx, retry_rx) = mpsc::unbounded_channel();
    let topology = broker.topology().clone();
    let tasks: Consumer<TaskRequest> = broker.consume(&topology.tasks_queue(), settings.prefetch).await?;
    let results: Consumer<StepReport> = broker.consume(&topology.results_queue(), settings.prefetch).await?;
    let _attached = [consumers.attach(), consumers.attach()];

    let local = stop.child_token();
    let mut set = JoinSet::new();
    tasker_runtime::watch_connection(&mut set, broker.clone(), local.clone());
    let pipeline = Pipeline {
        engine,
        dispatcher,
        retries: retry_tx,
        metrics: metrics.clone(),
        carried: carried.clone(),
        stop: local.clone(),
    };
    let batching = (settings.batch_size, settings.batches_in_flight);
    set.spawn(pipeline.clone().consume(tasks, task_work, batching, local.clone()));
    set.spawn(pipeline.clone().consume(results, report_work, batching, local.clone()));
    set.spawn(sweeper::retry_scheduler(
        pipeline.clone(),
        store.clone(),
        retry_rx,
        settings.retry_poll_interval,
        local.clone(),
    ));
    set.spawn(sweeper::sweeper(pipeline, store.clone(), settings.clone(), local.clone()));
    tracing::info!(prefix = topology.prefix(), "orchestrator running");

    let result = tasker_runtime::join_loops(set, &local, &stop).await;
    slot.set(None);
    own_dispatcher.close().await;
    let _ = broker.close().await;
    result
}

/// A task request's work: a task as its creator tells it was created is started from
/// that (kept from its first batch), any other evaluated.
fn task_work(request: TaskRequest) -> Option<(Uuid, Work)> {
    let id = request.task_id.parse().ok()?;
    let created = request.created.and_then(|created| kept::Created::from_request(id, created));
    Some((id, created.map_or(Work::Evaluate, |created| Work::Start(Arc::new(created)))))
}

/// The report that stands for one the database refused: the same attempt, failed
/// permanently, saying why (the engine makes the worker's text recordable, as for any
/// report).
fn refused_report(report: &StepReport, error: &anyhow::Error) -> StepReport {
    let message = format!("the worker's report could not be recorded: {error:#}");
    StepReport {
        outcome: Some(step_report::Outcome::Failed(Failed {
            message,
            kind: FailureKind::Permanent as i32,
            retry_after_ms: None,
        })),
        ..report.clone()
    }
}

fn report_work(report: StepReport) -> Option<(Uuid, Work)> {
    Some((report.task_id.parse().ok()?, Work::Report(report)))
}

/// What outlives one broker connection: executions committed but not yet published when
/// the connection was lost, and when the infrastructure last failed.
#[derive(Clone, Default)]
struct Carried {
    unpublished: Arc<std::sync::Mutex<Vec<tasker_store::Dispatch>>>,
    last_outage: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
    connections: Arc<std::sync::atomic::AtomicUsize>,
}

/// Whether a failure is the infrastructure's (the database unreachable, the broker not
/// confirming) rather than the work's: such work is retried in place and never counted
/// against its messages.
fn is_infrastructure(error: &anyhow::Error) -> bool {
    match error.downcast_ref::<tasker_store::Error>() {
        Some(e) => e.is_unavailable(),
        None => error.downcast_ref::<tasker_messaging::Error>().is_some(),
    }
}

/// Applies work and publishes what it dispatches; shared by the consumers, the retry
/// scheduler and the sweeper.
#[derive(Clone)]
pub(crate) struct Pipeline {
    engine: Engine,
    dispatcher: Dispatcher,
    retries: mpsc::UnboundedSender<chrono::DateTime<chrono::Utc>>,
    metrics: Metrics,
    carried: Carried,
    stop: CancellationToken,
}

impl Pipeline {
    /// Applies the items in one transaction, then publishes the dispatches (confirmed).
    /// While the database or the broker is unavailable, each step is retried in place
    /// (the caller keeps its input unacked); an error is returned only for a failure of
    /// the work itself, on shutdown, or when the broker connection is gone (then the
    /// committed executions are carried over to the next connection).
    pub(crate) async fn process(&self, items: &[(Uuid, Work)]) -> anyhow::Result<()> {
        // a batch serves many tasks: its span starts a trace of its own and links to each
        // task's (the engine adds the links once it has loaded the tasks)
        let span = tracing::info_span!("orchestrator batch", otel.kind = "consumer", items = items.len());
        self.process_in(items).instrument(span).await
    }

    async fn process_in(&self, items: &[(Uuid, Work)]) -> anyhow::Result<()> {
        let received = std::time::Instant::now();
        let mut outcome = self.holding("applying a batch", || async { Ok(self.engine.apply(items).await?) }).await?;
        // counted once the batch committed, however often it was tried
        self.metrics.apply(std::mem::take(&mut outcome.tally));
        self.metrics.batch(outcome.decided);
        if let Some(due) = outcome.next_retry_at {
            let _ = self.retries.send(due);
        }
        let dispatched = !outcome.dispatches.is_empty();
        let dispatches = &outcome.dispatches;
        let committed = received.elapsed();
        // a broker blocking the connection (a resource alarm) holds the publish as long as
        // it lasts; a stop meanwhile leaves them enqueued, for the sweeper to publish again
        let sent = self.holding("publishing step executions", || async {
            tokio::select! {
                sent = self.dispatcher.send(dispatches.clone()) => Ok(sent?),
                _ = self.stop.cancelled() => Err(anyhow::anyhow!("stopping while the executions were being published")),
            }
        });
        let sent = sent.await;
        if let Err(error) = sent {
            self.carried.unpublished.lock().expect("carried lock").extend(outcome.dispatches);
            return Err(error);
        }
        if dispatched {
            let total = received.elapsed();
            self.metrics.hop(total, &outcome.phases, total - committed);
        }
        Ok(())
    }

    /// Runs `op` until it succeeds, holding on through infrastructure failures while the
    /// broker connection lives and no stop was asked for.
    async fn holding<T, F, Fut>(&self, what: &'static str, mut op: F) -> anyhow::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = anyhow::Result<T>>,
    {
        let mut failures = 0;
        let result = loop {
            match op().await {
                Err(error)
                    if is_infrastructure(&error) && !self.stop.is_cancelled() && self.dispatcher.is_connected() =>
                {
                    failures += 1;
                    self.outage_now();
                    if failures == 1 {
                        self.metrics.paused(1);
                        tracing::warn!(
                            error = format!("{error:#}"),
                            what,
                            "infrastructure unavailable; holding the work and trying again"
                        );
                    }
                    tokio::select! {
                        _ = self.stop.cancelled() => {}
                        _ = tokio::time::sleep(tasker_runtime::hold_delay(failures)) => {}
                    }
                }
                result => break result,
            }
        };
        if failures > 0 {
            self.metrics.paused(-1);
            if result.is_ok() {
                tracing::info!(what, tries = failures + 1, "infrastructure back; held work done");
            }
        }
        result
    }

    /// The infrastructure is failing now (see [`Pipeline::outage_within`]).
    pub(crate) fn outage_now(&self) {
        *self.carried.last_outage.lock().expect("carried lock") = Some(std::time::Instant::now());
    }

    /// Whether the infrastructure has failed within `window`: the sweeper then leaves
    /// overdue steps alone, since their reports may be among the work held meanwhile.
    pub(crate) fn outage_within(&self, window: Duration) -> bool {
        self.carried.last_outage.lock().expect("carried lock").is_some_and(|t| t.elapsed() < window)
    }

    /// Consumes a queue in batches: apply in one transaction, publish, then ack. Up to
    /// `in_flight` batches run at once (their tasks' row locks order them where they
    /// meet, as between replicas). A batch that fails is split to isolate a poison
    /// message; messages that fail are requeued (and dead-lettered after the delivery
    /// limit).
    async fn consume<T: prost::Message + Default>(
        self,
        mut consumer: Consumer<T>,
        to_work: fn(T) -> Option<(Uuid, Work)>,
        (batch_size, in_flight): (usize, usize),
        stop: CancellationToken,
    ) -> anyhow::Result<()> {
        let mut running = FuturesUnordered::new();
        let mut failed = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                Some(done) = running.next(), if !running.is_empty() => if let Err(error) = done {
                    failed = Some(error);
                    break;
                },
                batch = consumer.next_batch(batch_size.max(1)), if running.len() < in_flight.max(1) => match batch {
                    Ok(batch) => running.push(self.clone().handle(batch, to_work)),
                    Err(error) => {
                        failed = Some(error.into());
                        break;
                    }
                },
            }
        }
        // the batches under way finish (or give up, seeing the stop or the lost
        // connection, and carry what they committed over) before this returns
        while let Some(done) = running.next().await {
            if let Err(error) = done {
                failed.get_or_insert(error);
            }
        }
        match failed {
            Some(error) => Err(error),
            None => {
                consumer.close().await;
                Ok(())
            }
        }
    }

    /// Applies one batch and settles its messages.
    async fn handle<T>(self, batch: Vec<Incoming<T>>, to_work: fn(T) -> Option<(Uuid, Work)>) -> anyhow::Result<()> {
        let mut items = Vec::with_capacity(batch.len());
        let mut acks = Vec::with_capacity(batch.len());
        for Incoming { message, ack, .. } in batch {
            match message.and_then(to_work) {
                Some(item) => {
                    items.push(item);
                    acks.push(ack);
                }
                None => {
                    tracing::warn!("undecodable message rejected to the dead-letter queue");
                    self.metrics.dead_lettered("undecodable");
                    ack.reject().await?;
                }
            }
        }
        if items.is_empty() {
            return Ok(());
        }
        match self.process(&items).await {
            // made together, the batch's acks go to the broker as one frame (`Ack::ack`)
            Ok(()) => {
                futures::future::try_join_all(acks.iter().map(Ack::ack)).await?;
            }
            // shutting down, or the connection is gone: the input goes back to the
            // queue unacked, without counting against it
            Err(_) if self.stop.is_cancelled() => {}
            Err(error) if is_infrastructure(&error) => return Err(error),
            Err(error) if items.len() == 1 => {
                let (item, ack) = (items.pop().expect("one item"), acks.pop().expect("one ack"));
                self.settle_failure(item, ack, error).await?;
            }
            Err(error) => {
                tracing::warn!(error = format!("{error:#}"), size = items.len(), "batch failed; applying one by one");
                for (item, ack) in items.into_iter().zip(acks) {
                    match self.process(std::slice::from_ref(&item)).await {
                        Ok(()) => ack.ack().await?,
                        Err(error) => self.settle_failure(item, ack, error).await?,
                    }
                }
            }
        }
        Ok(())
    }

    /// A message whose own transaction failed. A report carrying a value the database
    /// refuses to store would fail the same way on every delivery (and, dead-lettered, be
    /// republished by the sweeper for ever): it is decided once instead, its attempt
    /// failing permanently with the reason. Anything else is requeued, and dead-lettered by
    /// the broker after the delivery limit.
    async fn settle_failure(&self, item: (Uuid, Work), ack: Ack, error: anyhow::Error) -> anyhow::Result<()> {
        let refused = error.downcast_ref::<tasker_store::Error>().is_some_and(tasker_store::Error::is_refused_value);
        if let (true, (task_id, Work::Report(report))) = (refused, &item) {
            let failed = refused_report(report, &error);
            match self.process(&[(*task_id, Work::Report(failed))]).await {
                Ok(()) => {
                    tracing::warn!(%task_id, step_id = report.step_id, attempt = report.attempt, error = format!("{error:#}"),
                        "report refused by the database; its attempt failed");
                    ack.ack().await?;
                    return Ok(());
                }
                Err(again) => tracing::error!(error = format!("{again:#}"), "recording a refused report failed too"),
            }
        }
        tracing::error!(error = format!("{error:#}"), "message failed; requeued");
        ack.retry().await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(())
    }
}
