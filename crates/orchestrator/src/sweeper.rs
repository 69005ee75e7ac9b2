//! The retry scheduler and the stuck-work sweeper. Both only find candidates (cheap,
//! indexed, lock-free queries); the engine re-checks each under its task lock, so several
//! orchestrator replicas can run them at once.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use tasker_runtime::OrchestratorConfig;
use tasker_store::Store;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{Pipeline, Work};

const SWEEP_LIMIT: i64 = 500;
const RETENTION_BATCH: i64 = 500;
const RETENTION_BATCHES: usize = 20;

/// Re-dispatches steps whose retry is due. Wakes at the earliest due time this process
/// scheduled, and at least every `poll` (for retries other replicas scheduled).
pub(crate) async fn retry_scheduler(
    pipeline: Pipeline,
    store: Store,
    mut scheduled: mpsc::UnboundedReceiver<DateTime<Utc>>,
    poll: std::time::Duration,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut next_due: Option<DateTime<Utc>> = None;
    loop {
        let until_due = next_due.map(|due| (due - Utc::now()).to_std().unwrap_or_default()).unwrap_or(poll).min(poll);
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            got = scheduled.recv() => {
                if let Some(due) = got {
                    next_due = Some(next_due.map_or(due, |d| d.min(due)));
                }
                continue;
            }
            _ = tokio::time::sleep(until_due) => {}
        }
        next_due = None;
        loop {
            let due = match store.due_retries(SWEEP_LIMIT).await {
                Ok(due) => due,
                Err(error) => {
                    tracing::warn!(%error, "retry scheduler could not read due retries");
                    break;
                }
            };
            let full = due.len() as i64 == SWEEP_LIMIT;
            if due.is_empty() {
                break;
            }
            let items: Vec<_> = due.into_iter().map(|(task, step)| (task, Work::Retry(step))).collect();
            if let Err(error) = pipeline.process(&items).await {
                tracing::warn!(error = format!("{error:#}"), "retry scheduler batch failed");
                break;
            }
            if !full {
                break;
            }
        }
    }
}

/// Repairs crash gaps every `sweep_interval`: pending tasks, and tasks in progress with
/// nothing running or scheduled (an operator's repair whose request was lost), are
/// evaluated again, steps enqueued too long are published again (same attempt), steps in
/// progress past their timeout plus grace fail as timed out (these last two not while the
/// broker blocks the connection, nor for `timeout_grace` + `sweep_interval` after it or an
/// outage).
pub(crate) async fn sweeper(
    pipeline: Pipeline,
    store: Store,
    config: OrchestratorConfig,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut interval = tokio::time::interval(config.sweep_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = interval.tick() => {}
        }
        if let Err(error) = sweep(&pipeline, &store, &config).await {
            tracing::warn!(error = format!("{error:#}"), "sweep failed");
        }
    }
}

async fn sweep(pipeline: &Pipeline, store: &Store, config: &OrchestratorConfig) -> anyhow::Result<()> {
    let mut items = Vec::new();
    for task in store.stalled_tasks(config.pending_task_timeout, SWEEP_LIMIT).await? {
        items.push((task, Work::Evaluate));
    }
    // a broker blocking its connections (a resource alarm) holds the executions and the
    // workers' reports; right after it, or an outage, executions held meanwhile have just
    // gone out and reports are on their way: what looks stale or overdue is not lost
    if pipeline.dispatcher.is_blocked() {
        pipeline.outage_now();
    }
    let settled = !pipeline.outage_within(config.timeout_grace + config.sweep_interval);
    let mut checked: HashMap<String, bool> = HashMap::new();
    let stale =
        if settled { store.stale_enqueued_steps(config.enqueued_step_timeout, SWEEP_LIMIT).await? } else { vec![] };
    for (task, step, namespace) in stale {
        let republish = match checked.get(&namespace) {
            Some(answer) => *answer,
            None => {
                let answer = pipeline.dispatcher.is_drained_and_served(&namespace).await?;
                if !answer {
                    tracing::debug!(namespace, "steps enqueued long ago, but their queue has a backlog or no worker");
                }
                *checked.entry(namespace).or_insert(answer)
            }
        };
        if republish {
            items.push((task, Work::Republish { step, older_than: config.enqueued_step_timeout }));
        }
    }
    if settled {
        for (task, step) in store.overdue_steps(config.timeout_grace, SWEEP_LIMIT).await? {
            items.push((task, Work::Overdue { step, grace: config.timeout_grace }));
        }
    }
    if let Ok(Some(depth)) = pipeline.dispatcher.dead_letter_depth().await {
        pipeline.metrics.dead_letter_depth(depth);
    }
    if !items.is_empty() {
        tracing::info!(items = items.len(), "sweeper repairing stuck work");
        pipeline.process(&items).await?;
    }
    if let Some(age) = config.retention {
        retire(pipeline, store, age).await?;
    }
    Ok(())
}

/// Deletes finished tasks past the retention age: batches of `RETENTION_BATCH`, at most
/// `RETENTION_BATCHES` per sweep, so a long backlog (retention just turned on) drains over
/// several sweeps without holding the database.
async fn retire(pipeline: &Pipeline, store: &Store, age: std::time::Duration) -> anyhow::Result<()> {
    for _ in 0..RETENTION_BATCHES {
        let deleted = store.delete_finished_tasks(age, RETENTION_BATCH).await?;
        pipeline.metrics.retired(deleted);
        if deleted > 0 {
            tracing::debug!(deleted, "finished tasks past retention deleted");
        }
        if (deleted as i64) < RETENTION_BATCH {
            break;
        }
        tokio::task::yield_now().await;
    }
    Ok(())
}
