//! Publishing step executions: one confirmed, pipelined publish per batch, declaring each
//! namespace's step queue the first time it is used.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use prost::Message;
use tasker_messaging::{Broker, Command, Publisher};
use tasker_proto::messages::{Failed, FailureKind, StepExecution, StepReport, step_report::Outcome};
use tasker_store::Dispatch;

use crate::metrics::Metrics;

#[derive(Clone)]
pub struct Dispatcher {
    broker: Arc<Broker>,
    publisher: Publisher,
    declared: Arc<Mutex<HashSet<String>>>,
    metrics: Metrics,
    /// `limits.max_execution_bytes`.
    max_execution_bytes: usize,
}

impl Dispatcher {
    pub async fn new(
        broker: Arc<Broker>,
        metrics: Metrics,
        max_execution_bytes: usize,
    ) -> tasker_messaging::Result<Dispatcher> {
        let publisher = broker.publisher().await?;
        Ok(Dispatcher { broker, publisher, declared: Default::default(), metrics, max_execution_bytes })
    }

    /// Whether the broker connection is open.
    pub fn is_connected(&self) -> bool {
        self.broker.is_connected()
    }

    /// Whether the broker blocks the connection (a resource alarm).
    pub fn is_blocked(&self) -> bool {
        self.broker.blocked().is_some()
    }

    /// Messages waiting in the dead-letter queue, if it exists.
    pub async fn dead_letter_depth(&self) -> tasker_messaging::Result<Option<u32>> {
        let queue = self.broker.topology().dead_letter_queue();
        Ok(self.broker.queue_state(&queue).await?.map(|q| q.ready))
    }

    /// Closes the publishing channel (at shutdown, before the connection).
    pub async fn close(&self) {
        self.publisher.close().await;
    }

    /// Publishes the executions and awaits their confirms, retrying a few times; the
    /// sweeper re-publishes whatever still fails.
    ///
    /// An execution larger than `limits.max_execution_bytes` is not published: the broker
    /// would close the channel on it (past its own largest message), and every try after
    /// every reconnection would fail the same way. Its attempt fails for good instead,
    /// through the orchestrator's own results queue, like any worker's report.
    pub async fn send(&self, dispatches: Vec<Dispatch>) -> tasker_messaging::Result<()> {
        if dispatches.is_empty() {
            return Ok(());
        }
        self.declare(&dispatches).await?;
        // one span per dispatch, in its task's trace, open until the broker confirmed it;
        // the execution carries its context, so the worker's attempt is its child
        let spans: Vec<tracing::Span> = dispatches.iter().map(dispatch_span).collect();
        let commands: Vec<Command> = dispatches
            .into_iter()
            .zip(&spans)
            .map(|(d, span)| {
                let trace = tasker_runtime::trace::context_of(span, &d.trace).to_headers();
                let execution = execution(d, trace);
                match execution.encoded_len() {
                    size if size > self.max_execution_bytes => self.refusal(execution, size),
                    _ => Command::Step(execution),
                }
            })
            .collect();
        let mut attempt = 0;
        loop {
            match self.publisher.send(&commands).await {
                Ok(()) => return Ok(()),
                Err(error) if attempt < 3 => {
                    attempt += 1;
                    tracing::warn!(%error, attempt, "publishing step executions failed; trying again");
                    tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// The permanent failure of an execution too large to publish.
    fn refusal(&self, execution: StepExecution, size: usize) -> Command {
        let message = format!(
            "execution refused: {size} bytes, more than limits.max_execution_bytes ({}): the task's context \
             and the parents' results it carries are too large to send",
            self.max_execution_bytes
        );
        tracing::warn!(step_id = execution.step_id, step = execution.step_name, size, "{message}");
        Command::Report(StepReport {
            task_id: execution.task_id,
            step_id: execution.step_id,
            attempt: execution.attempt,
            worker_id: "orchestrator".into(),
            outcome: Some(Outcome::Failed(Failed {
                message,
                kind: FailureKind::Permanent as i32,
                retry_after_ms: None,
            })),
            started_at_unix_ms: 0,
            trace_context: execution.trace_context,
        })
    }

    /// Whether the executions of a namespace's stale steps should be published again: only
    /// when its queue is served and has nothing waiting. Messages waiting (a backlog) or no
    /// worker at all mean the executions may simply not have been taken yet; publishing
    /// them again would only pile up copies. Once the queue is served and drained, a step
    /// still enqueued lost its execution.
    pub async fn is_drained_and_served(&self, namespace: &str) -> tasker_messaging::Result<bool> {
        let queue = self.broker.topology().steps_queue(namespace);
        Ok(self.broker.queue_state(&queue).await?.is_some_and(|q| q.consumers > 0 && q.ready == 0))
    }

    /// Declares the step queue of each namespace not declared yet by this process (the
    /// lock is not held across the broker round trip; declaring twice is harmless).
    ///
    /// A queue that exists with other arguments (a worker declared it its own way) is
    /// still a queue the namespace's workers consume: the executions go to it, and the
    /// mismatch is an alert (an ERROR log naming the arguments to use, and the
    /// `tasker_orchestrator_queue_mismatch` gauge), not a silent stall. Such a queue may
    /// lack the dead-lettering Tasker relies on for poison messages.
    async fn declare(&self, dispatches: &[Dispatch]) -> tasker_messaging::Result<()> {
        let missing: HashSet<String> = {
            let declared = self.declared.lock().expect("declared lock");
            dispatches.iter().map(|d| &d.namespace).filter(|ns| !declared.contains(*ns)).cloned().collect()
        };
        for namespace in missing {
            match self.broker.declare_steps(&namespace).await {
                Ok(()) => {}
                Err(error @ tasker_messaging::Error::Mismatch { .. }) => {
                    let queue = self.broker.topology().steps_queue(&namespace);
                    tracing::error!(%namespace, %queue, %error, "step queue declared with other arguments; dispatching to it anyway");
                    self.metrics.queue_mismatch(&queue);
                }
                Err(error) => return Err(error),
            }
            self.declared.lock().expect("declared lock").insert(namespace);
        }
        Ok(())
    }
}

fn dispatch_span(d: &Dispatch) -> tracing::Span {
    let span = tracing::info_span!(
        "dispatch",
        otel.name = format!("dispatch {}.{}", d.task_name, d.step_name),
        otel.kind = "producer",
        task_id = %d.task_id,
        step_id = %d.step_id,
        step = %d.step_name,
        attempt = d.attempt,
        namespace = %d.namespace,
        task = %d.task_name,
        trace_id = tracing::field::Empty,
    );
    tasker_runtime::trace::set_parent(&span, &d.trace);
    span
}

fn execution(d: Dispatch, trace_context: HashMap<String, String>) -> StepExecution {
    StepExecution {
        task_id: d.task_id.to_string(),
        step_id: d.step_id.to_string(),
        attempt: d.attempt,
        namespace: d.namespace,
        task_name: d.task_name,
        task_version: d.task_version,
        step_name: d.step_name,
        handler: d.handler,
        config_json: d.config,
        context_json: d.context,
        parent_results_json: d.parent_results,
        timeout_ms: d.timeout_ms,
        trace_context,
    }
}
