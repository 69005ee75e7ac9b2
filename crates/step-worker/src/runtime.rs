use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use futures::FutureExt;
use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry as MetricsRegistry,
};
use serde_json::Value;
use tasker_domain::{
    TraceContext,
    payload::{self, PayloadError},
};
use tasker_messaging::{Command, Consumer, Incoming, Publisher};
use tasker_proto::messages::{
    Completed, Failed, FailureKind, Started, StepExecution, StepReport, step_report::Outcome,
};
use tasker_runtime::{Admin, Config};
use tokio::{
    sync::{Semaphore, watch},
    task::JoinSet,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

use crate::{Registry, StepError, StepInput};

/// A worker with its admin listener bound.
pub struct Worker {
    config: Config,
    registry: Registry,
    admin: Admin,
}

#[derive(Clone, Default)]
struct Metrics {
    executed: Counter,
    /// Deliveries of an attempt this worker had run or was running, answered with that
    /// run's report instead of running the handler again.
    answered: Counter,
    failed: Counter,
    in_flight: Gauge,
}

/// One attempt counted in `steps_in_flight` while it lives (an aborted attempt too).
struct InFlight(Gauge);

impl InFlight {
    fn count(gauge: &Gauge) -> InFlight {
        gauge.inc();
        InFlight(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Outcomes whose report was not confirmed when the broker connection was lost, by
/// `(step_id, attempt)`: the execution comes back (it was never acked) and is answered
/// from here instead of running the handler again. Shared across connections.
type Unreported = Arc<std::sync::Mutex<HashMap<(String, u32), StepReport>>>;

/// Most outcomes kept for lack of a connection (past it, a step may run again).
const MAX_UNREPORTED: usize = 10_000;

/// Attempts running on this worker, by `(step_id, attempt)`, each with its report once
/// it has an outcome. Shared across connections: a handler goes on running when
/// the connection its execution came on is lost, and another delivery of the same attempt
/// (the broker's redelivery once the worker is back, or a sweep's republish) waits for
/// that outcome instead of running the step a second time.
type Running = Arc<std::sync::Mutex<HashMap<(String, u32), watch::Receiver<Option<StepReport>>>>>;

/// The attempts of every connection, which outlive the connection they came on: spawned
/// on `tracker`, dropped (their handlers with them) once `abandon` is cancelled.
#[derive(Clone, Default)]
struct Attempts {
    tracker: TaskTracker,
    abandon: CancellationToken,
}

impl Attempts {
    fn spawn(&self, attempt: impl Future<Output = ()> + Send + 'static) {
        let abandon = self.abandon.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                _ = abandon.cancelled() => {}
                _ = attempt => {}
            }
        });
    }

    /// At shutdown: waits for the attempts running to settle, up to `within`, then drops
    /// the rest (unacked, their executions go back to the queue when the connection
    /// closes). Once drained, a later call returns at once.
    async fn drain(&self, within: Duration) {
        self.tracker.close();
        if tokio::time::timeout(within, self.tracker.wait()).await.is_err() {
            tracing::warn!(
                left = self.tracker.len(),
                "drain deadline passed; abandoning running steps (they will be redelivered)"
            );
            self.abandon.cancel();
            self.tracker.wait().await;
        }
    }
}

/// Takes an attempt out of [`Running`] when it ends, settled or dropped; a delivery
/// waiting for its outcome then hears that there will be none.
struct RunningEntry {
    running: Running,
    key: (String, u32),
}

impl Drop for RunningEntry {
    fn drop(&mut self) {
        self.running.lock().expect("running lock").remove(&self.key);
    }
}

#[derive(Clone)]
struct Runner {
    registry: Registry,
    publisher: Publisher,
    worker_id: String,
    metrics: Metrics,
    started_report_after: Duration,
    unreported: Unreported,
    running: Running,
    attempts: Attempts,
    /// `limits.max_results_bytes`: larger results are not sent (see [`sendable`]).
    max_results_bytes: usize,
}

impl Worker {
    pub async fn bind(config: Config, registry: Registry) -> anyhow::Result<Worker> {
        for ns in &config.worker.namespaces {
            anyhow::ensure!(
                tasker_domain::template::is_valid_name(ns),
                "worker.namespaces: `{ns}` is not a valid namespace name"
            );
        }
        anyhow::ensure!(!config.worker.namespaces.is_empty(), "worker.namespaces: serve at least one namespace");
        // a prefetch of 0 would be no limit at all to the broker
        anyhow::ensure!(config.worker.concurrency >= 1, "worker.concurrency: run at least one step at a time");
        let admin = Admin::bind(config.worker.admin_listen).await.context("binding the admin listener")?;
        Ok(Worker { config, registry, admin })
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr()
    }

    /// Runs until `shutdown`; a lost broker connection is re-established (with backoff)
    /// and consuming resumes.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Worker { config, registry, admin } = self;
        let worker_id = config.worker.id.clone().unwrap_or_else(default_worker_id);
        let mut metrics_registry = MetricsRegistry::default();
        let metrics = Metrics::default();
        let sub = metrics_registry.sub_registry_with_prefix("tasker_worker");
        sub.register("steps_executed", "Step attempts run", metrics.executed.clone());
        sub.register(
            "deliveries_answered",
            "Deliveries of an attempt already run or running here, answered with that run's report (redeliveries, sweeps' copies)",
            metrics.answered.clone(),
        );
        sub.register("steps_failed", "Step attempts that failed", metrics.failed.clone());
        sub.register("steps_in_flight", "Step attempts running on this worker now", metrics.in_flight.clone());
        let slot = tasker_runtime::BrokerSlot::new();
        slot.register(&mut metrics_registry);
        let stop = shutdown.child_token();
        let admin = admin.start(config.health.live_timeout, stop.clone());
        // ready: connected, and consuming the step queue of every namespace it serves
        let consumers = tasker_runtime::Consumers::expecting(config.worker.namespaces.len());
        admin.wire(vec![slot.check(), consumers.check()], metrics_registry);
        tracing::info!(worker_id, namespaces = ?config.worker.namespaces, handlers = ?registry.names(), "step worker starting");
        let lasting = Lasting {
            metrics,
            slot,
            unreported: Unreported::default(),
            running: Running::default(),
            attempts: Attempts::default(),
            consumers,
            slots: config
                .worker
                .namespaces
                .iter()
                .map(|ns| (ns.clone(), Arc::new(Semaphore::new(config.worker.concurrency as usize))))
                .collect(),
        };
        let result = tasker_runtime::supervise("step-worker", &stop, || {
            consume_all(&config, &registry, &worker_id, &lasting, stop.clone())
        })
        .await;
        stop.cancel();
        // attempts left from a connection lost just before the stop: they settle into
        // `unreported` at most, for the executions' redelivery to another worker to run
        lasting.attempts.drain(config.worker.drain_timeout).await;
        let _ = admin.stopped().await;
        result
    }
}

/// What outlives a broker connection.
struct Lasting {
    metrics: Metrics,
    slot: tasker_runtime::BrokerSlot,
    unreported: Unreported,
    running: Running,
    attempts: Attempts,
    consumers: tasker_runtime::Consumers,
    /// Each namespace's `worker.concurrency` permits, one held by each handler running.
    slots: HashMap<String, Arc<Semaphore>>,
}

/// One connection's life: consume every namespace until `stop` (Ok) or a failure (Err).
async fn consume_all(
    config: &Config,
    registry: &Registry,
    worker_id: &str,
    lasting: &Lasting,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let Lasting { metrics, slot, unreported, running, attempts, consumers, slots } = lasting;
    let settings = &config.worker;
    let broker = Arc::new(tasker_runtime::connect_broker(&config.amqp, "step-worker").await?);
    slot.set(Some(broker.clone()));
    let runner = Runner {
        registry: registry.clone(),
        publisher: broker.publisher().await?,
        worker_id: worker_id.to_owned(),
        metrics: metrics.clone(),
        started_report_after: settings.started_report_after,
        unreported: unreported.clone(),
        running: running.clone(),
        attempts: attempts.clone(),
        max_results_bytes: config.limits.max_results_bytes,
    };
    let local = stop.child_token();
    let mut set = JoinSet::new();
    tasker_runtime::watch_connection(&mut set, broker.clone(), local.clone());
    let mut attached = Vec::with_capacity(settings.namespaces.len());
    for ns in &settings.namespaces {
        broker.declare_steps(ns).await.with_context(|| format!("declaring the step queue of `{ns}`"))?;
        let queue = broker.topology().steps_queue(ns);
        let consumer: Consumer<StepExecution> = broker.consume(&queue, settings.concurrency).await?;
        attached.push(consumers.attach());
        set.spawn(runner.clone().consume(consumer, slots[ns].clone(), local.clone()));
    }
    tracing::info!(worker_id, "step worker consuming");
    let result = tasker_runtime::join_loops(set, &local, &stop).await;
    if stop.is_cancelled() {
        // shutting down: the steps running report on this connection before it closes.
        // A lost connection waits for none of them: they go on running and settle once
        // done, while the worker connects again at once (`Running`)
        attempts.drain(settings.drain_timeout).await;
    }
    slot.set(None);
    runner.publisher.close().await;
    // closing the connection returns any prefetched, unstarted executions to the queue
    let _ = broker.close().await;
    result
}

fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into());
    format!("{host}-{}", std::process::id())
}

impl Runner {
    /// Takes executions as they come until `stop`, each attempt in [`Attempts`], where it
    /// outlives this connection. The prefetch bounds how many this connection holds; the
    /// namespace's `slots`, how many handlers run at once, those of a connection lost
    /// meanwhile included: a delivery waits for a slot before its handler starts.
    async fn consume(
        self,
        mut consumer: Consumer<StepExecution>,
        slots: Arc<Semaphore>,
        stop: CancellationToken,
    ) -> anyhow::Result<()> {
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                incoming = consumer.next() => {
                    let incoming = incoming?;
                    self.attempts.spawn(self.clone().execute(incoming, slots.clone()));
                }
            }
        }
        consumer.close().await;
        Ok(())
    }

    async fn execute(self, incoming: Incoming<StepExecution>, slots: Arc<Semaphore>) {
        let Incoming { message, ack, headers, .. } = incoming;
        let Some(exec) = message else {
            tracing::warn!("undecodable step execution rejected to the dead-letter queue");
            let _ = ack.reject().await;
            return;
        };
        // the attempt's span is a child of the dispatch (AMQP headers, else the message's
        // own copy); a handler's spans nest under it
        let mut received = TraceContext::from_headers(&headers);
        if received.is_empty() {
            received = TraceContext::from_headers(&exec.trace_context);
        }
        let span = tracing::info_span!(
            "step attempt",
            otel.name = format!("{}.{} attempt", exec.task_name, exec.step_name),
            otel.kind = "consumer",
            task_id = %exec.task_id,
            step_id = %exec.step_id,
            step = %exec.step_name,
            attempt = exec.attempt,
            namespace = %exec.namespace,
            task = %exec.task_name,
            handler = %exec.handler,
            worker_id = %self.worker_id,
            outcome = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        tasker_runtime::trace::set_parent(&span, &received);
        let trace = tasker_runtime::trace::context_of(&span, &received).to_headers();
        let _in_flight = InFlight::count(&self.metrics.in_flight);
        self.attempt(exec, ack, trace, slots).instrument(span).await;
    }

    async fn attempt(
        self,
        exec: StepExecution,
        ack: tasker_messaging::Ack,
        trace: HashMap<String, String>,
        slots: Arc<Semaphore>,
    ) {
        let key = (exec.step_id.clone(), exec.attempt);
        let kept = self.unreported.lock().expect("unreported lock").remove(&key);
        if let Some(kept) = kept {
            tracing::info!(
                step_id = exec.step_id,
                attempt = exec.attempt,
                "reporting an outcome kept across a lost connection"
            );
            self.metrics.answered.inc();
            self.settle(kept, ack).await;
            return;
        }
        // the same attempt already running here (its connection lost since, or a sweep
        // republished it): its outcome is this delivery's too
        let claimed = {
            let mut running = self.running.lock().expect("running lock");
            match running.get(&key) {
                Some(waiting) => Err(waiting.clone()),
                None => {
                    let (outcome_to, waiting) = watch::channel(None);
                    running.insert(key.clone(), waiting);
                    Ok(outcome_to)
                }
            }
        };
        let (outcome_to, _entry) = match claimed {
            Ok(outcome_to) => (outcome_to, RunningEntry { running: self.running.clone(), key }),
            Err(mut waiting) => {
                tracing::info!(
                    step_id = exec.step_id,
                    attempt = exec.attempt,
                    "the attempt is running here already; waiting for its outcome"
                );
                let Ok(Some(first)) = waiting.wait_for(Option::is_some).await.map(|r| r.clone()) else {
                    // dropped unfinished (at shutdown): this delivery goes back unacked
                    return;
                };
                // the first delivery may have kept it for this one, or reported it itself
                self.unreported.lock().expect("unreported lock").remove(&key);
                self.metrics.answered.inc();
                self.settle(first, ack).await;
                return;
            }
        };
        // waits while the namespace's handlers fill `worker.concurrency`, those still running
        // from a connection lost meanwhile included; the step starts once it has a slot
        let slot = slots.acquire_owned().await.expect("the slots are never closed");
        let started_at_unix_ms = chrono::Utc::now().timestamp_millis();
        let report = |outcome| StepReport {
            task_id: exec.task_id.clone(),
            step_id: exec.step_id.clone(),
            attempt: exec.attempt,
            worker_id: self.worker_id.clone(),
            outcome: Some(outcome),
            started_at_unix_ms,
            trace_context: trace.clone(),
        };
        // A quick step's start travels with its outcome; a longer one is reported started
        // once it has run for `started_report_after`, while it goes on running.
        let run = self.run_handler(&exec);
        tokio::pin!(run);
        let quick = if self.started_report_after.is_zero() {
            None
        } else {
            tokio::time::timeout(self.started_report_after, &mut run).await.ok()
        };
        let outcome = match quick {
            Some(outcome) => outcome,
            None => {
                let started = [Command::Report(report(Outcome::Started(Started {})))];
                let (started, outcome) = tokio::join!(self.publisher.send(&started), run);
                if let Err(error) = started {
                    tracing::warn!(%error, step_id = exec.step_id, "could not report the start of a step");
                }
                outcome
            }
        };
        drop(slot);
        self.metrics.executed.inc();
        let outcome_name = match &outcome {
            Outcome::Completed(_) => "complete",
            Outcome::Failed(f) => match f.kind() {
                FailureKind::Permanent => "failed permanently",
                FailureKind::TimedOut => "timed out",
                _ => "failed, retryable",
            },
            Outcome::Started(_) => "started",
        };
        tracing::Span::current().record("outcome", outcome_name);
        if matches!(outcome, Outcome::Failed(_)) {
            self.metrics.failed.inc();
        }
        // deliveries of this attempt that came meanwhile, and those that come while this
        // one settles, answer with its report too (`_entry` leaves `Running` after)
        let report = report(outcome);
        outcome_to.send_replace(Some(report.clone()));
        self.settle(report, ack).await;
    }

    /// Reports an outcome and, once the broker confirmed it, acks the execution. A
    /// publish that fails while the connection lives is tried again in place (the broker
    /// pushing back is no reason to run the step again); when the connection is lost the
    /// execution goes back to its queue unacked, and the outcome waits in `unreported`
    /// for it to come back.
    async fn settle(&self, report: StepReport, ack: tasker_messaging::Ack) {
        let command = [Command::Report(report)];
        let mut failures = 0;
        loop {
            match self.publisher.send(&command).await {
                Ok(()) => break,
                Err(error) if self.publisher.is_open() => {
                    failures += 1;
                    tracing::warn!(%error, failures, "could not report a step outcome; trying again");
                    tokio::time::sleep(tasker_runtime::reconnect_delay(failures)).await;
                }
                Err(error) => {
                    let [Command::Report(report)] = command else { unreachable!("one report") };
                    tracing::warn!(%error, step_id = report.step_id, "broker connection lost before the outcome was reported; it is kept for the execution's return");
                    let mut unreported = self.unreported.lock().expect("unreported lock");
                    if report.outcome.is_some() && unreported.len() < MAX_UNREPORTED {
                        unreported.insert((report.step_id.clone(), report.attempt), report);
                    }
                    return;
                }
            }
        }
        if let Err(error) = ack.ack().await {
            tracing::warn!(%error, "could not ack a step execution");
        }
    }

    async fn run_handler(&self, exec: &StepExecution) -> Outcome {
        let timeout = Duration::from_millis(exec.timeout_ms.max(1));
        let input = match self.input(exec, tokio::time::Instant::now() + timeout) {
            Ok(input) => input,
            Err(message) => return failed(message, FailureKind::Permanent, None),
        };
        let Some(handler) = self.registry.get(&exec.handler) else {
            let message = format!("no handler `{}` on worker {}", exec.handler, self.worker_id);
            return failed(message, FailureKind::Permanent, None);
        };
        tracing::debug!(step = exec.step_name, attempt = exec.attempt, handler = exec.handler, "running step");
        // a handler that panics fails its attempt like any error (and is retried as one):
        // left to unwind, the panic would end the attempt with its delivery never settled,
        // holding one of the worker's prefetch slots until its connection closed
        let call = std::panic::AssertUnwindSafe(handler.call(input)).catch_unwind();
        let outcome = match tokio::time::timeout(timeout, call).await {
            Ok(Ok(Ok(results))) => Outcome::Completed(Completed { results_json: results.to_string() }),
            Ok(Ok(Err(StepError::Retryable(message)))) => failed(message, FailureKind::Retryable, None),
            Ok(Ok(Err(StepError::Permanent(message)))) => failed(message, FailureKind::Permanent, None),
            Ok(Ok(Err(StepError::RetryAfter { message, after }))) => {
                failed(message, FailureKind::Retryable, Some(after.as_millis() as u64))
            }
            Ok(Err(panic)) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a non-string payload".into());
                tracing::error!(
                    step = exec.step_name,
                    handler = exec.handler,
                    panic = what,
                    "the step handler panicked"
                );
                failed(format!("the handler panicked: {what}"), FailureKind::Retryable, None)
            }
            Err(_) => failed(format!("timed out after {} ms", timeout.as_millis()), FailureKind::TimedOut, None),
        };
        sendable(outcome, self.max_results_bytes)
    }

    fn input(&self, exec: &StepExecution, deadline: tokio::time::Instant) -> Result<StepInput, String> {
        let json = |field: &str, text: &str| -> Result<Value, String> {
            if text.is_empty() {
                return Ok(Value::Null);
            }
            serde_json::from_str(text).map_err(|e| format!("{field} is not valid JSON: {e}"))
        };
        let id = |field: &str, text: &str| text.parse().map_err(|_| format!("{field} `{text}` is not a UUID"));
        let parent_results = exec
            .parent_results_json
            .iter()
            .map(|(name, text)| Ok((name.clone(), json("parent results", text)?)))
            .collect::<Result<HashMap<_, _>, String>>()?;
        Ok(StepInput {
            task_id: id("task_id", &exec.task_id)?,
            step_id: id("step_id", &exec.step_id)?,
            step_name: exec.step_name.clone(),
            namespace: exec.namespace.clone(),
            task_name: exec.task_name.clone(),
            task_version: exec.task_version.clone(),
            attempt: exec.attempt,
            context: json("context", &exec.context_json)?,
            parent_results,
            config: json("config", &exec.config_json)?,
            deadline,
        })
    }
}

/// An outcome whose report the broker takes: results over `max_results_bytes` (which the
/// orchestrator would refuse anyway) fail the attempt for good, with the orchestrator's
/// words, and a failure message is cut as the orchestrator records it. A report past the
/// broker's largest message would close the channel at every try, and the execution,
/// never acked, would come back to run again and again.
fn sendable(outcome: Outcome, max_results_bytes: usize) -> Outcome {
    match outcome {
        Outcome::Completed(done) if done.results_json.len() > max_results_bytes => {
            let problem = PayloadError::TooLarge { size: done.results_json.len(), max: max_results_bytes };
            failed(format!("results refused: {problem}"), FailureKind::Permanent, None)
        }
        Outcome::Failed(mut failure) => {
            failure.message = payload::recordable(&failure.message, payload::MAX_ERROR_MESSAGE);
            Outcome::Failed(failure)
        }
        outcome => outcome,
    }
}

fn failed(message: String, kind: FailureKind, retry_after_ms: Option<u64>) -> Outcome {
    Outcome::Failed(Failed { message, kind: kind as i32, retry_after_ms })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_is_kept_small_enough_to_send() {
        let completed = |text: &str| Outcome::Completed(Completed { results_json: text.into() });
        // within the limit: as it was
        assert_eq!(sendable(completed(r#"{"a": 1}"#), 8), completed(r#"{"a": 1}"#));
        // over it: a permanent failure in the orchestrator's words, not the results
        let Outcome::Failed(refused) = sendable(completed(r#"{"a": 12}"#), 8) else { panic!("not refused") };
        assert_eq!(refused.message, "results refused: 9 bytes, more than the limit of 8");
        assert_eq!(refused.kind(), FailureKind::Permanent);
        // a long failure message is cut as the orchestrator records it; the rest is kept
        let long = failed("x".repeat(20_000), FailureKind::Retryable, Some(5));
        let Outcome::Failed(cut) = sendable(long, 8) else { panic!("not a failure") };
        assert_eq!(cut.message, format!("{}… (cut at 16384 characters)", "x".repeat(16_384)));
        assert_eq!((cut.kind(), cut.retry_after_ms), (FailureKind::Retryable, Some(5)));
        let short = failed("no".into(), FailureKind::Permanent, None);
        assert_eq!(sendable(short.clone(), 8), short);
    }
}
