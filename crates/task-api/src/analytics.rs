//! AnalyticsService: performance over a window, bottlenecks, and what is in the system
//! now, computed by the store from the transition history. Needs `analytics:read`; a caller
//! limited to some namespaces gets figures of those only.

use chrono::{Duration, Utc};
use tasker_auth::Principal;
use tasker_proto::v1::{self as pb, analytics_service_server::AnalyticsService};
use tasker_store::{Scope, Store};
use tonic::{Request, Response, Status};

use crate::{
    auth::{Allowed, caller},
    convert::timestamp,
    error::{ApiError, ApiResult},
    input,
};

/// Default and largest window, in seconds.
pub const DEFAULT_WINDOW_SECONDS: u32 = 3600;
pub const MAX_WINDOW_SECONDS: u32 = 30 * 24 * 3600;
/// Default and largest number of entries in a bottleneck list.
pub const DEFAULT_LIMIT: u32 = 10;
pub const MAX_LIMIT: u32 = 100;

#[derive(Clone)]
pub struct Analytics {
    pub(crate) store: Store,
}

/// The namespaces to look at: the one asked for (if the caller may see it), else all the
/// caller may see (`None`: every namespace).
fn namespaces(caller: &Principal, namespace: &str) -> ApiResult<Option<Vec<String>>> {
    caller.require("analytics:read")?;
    input::optional_name("namespace", namespace)?;
    if namespace.is_empty() {
        return Ok(caller.namespace_limit());
    }
    caller.require_namespace(namespace)?;
    Ok(Some(vec![namespace.to_owned()]))
}

fn scope(caller: &Principal, window_seconds: u32, namespace: &str) -> ApiResult<Scope> {
    let namespaces = namespaces(caller, namespace)?;
    let seconds = match window_seconds {
        0 => DEFAULT_WINDOW_SECONDS,
        s if s > MAX_WINDOW_SECONDS => {
            return Err(ApiError::invalid(
                "window_seconds",
                format!("{s} is more than the limit of {MAX_WINDOW_SECONDS} (30 days)"),
            ));
        }
        s => s,
    };
    let end = Utc::now();
    Ok(Scope { start: end - Duration::seconds(i64::from(seconds)), end, namespaces })
}

fn percentiles(p: &tasker_store::Percentiles) -> Option<pb::Percentiles> {
    Some(pb::Percentiles { p50: p.p50, p95: p.p95, p99: p.p99, count: p.count })
}

fn performance_figures(row: &tasker_store::PerformanceRow, minutes: f64) -> pb::PerformanceFigures {
    let finished = row.tasks_completed + row.tasks_failed + row.tasks_cancelled;
    let rate = |n: u64| if finished == 0 { 0.0 } else { n as f64 / finished as f64 };
    pb::PerformanceFigures {
        namespace: row.namespace.clone(),
        task_name: row.task_name.clone(),
        tasks_created: row.tasks_created,
        tasks_completed: row.tasks_completed,
        tasks_failed: row.tasks_failed,
        tasks_cancelled: row.tasks_cancelled,
        tasks_finished_per_minute: finished as f64 / minutes,
        completion_rate: rate(row.tasks_completed),
        error_rate: rate(row.tasks_failed),
        task_duration_ms: percentiles(&row.task_duration_ms),
        step_attempts: row.step_attempts,
        step_attempts_failed: row.step_attempts_failed,
        step_duration_ms: percentiles(&row.step_duration_ms),
    }
}

fn step_figures(s: &tasker_store::StepFigures) -> pb::StepFigures {
    pb::StepFigures {
        namespace: s.namespace.clone(),
        task_name: s.task_name.clone(),
        step_name: s.step_name.clone(),
        duration_ms: percentiles(&s.duration_ms),
        retries: s.retries,
        failures: s.failures,
    }
}

#[tonic::async_trait]
impl AnalyticsService for Analytics {
    async fn get_performance(
        &self,
        request: Request<pb::PerformanceRequest>,
    ) -> Result<Response<pb::Performance>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let scope = scope(&caller, r.window_seconds, &r.namespace)?;
        let rows = self.store.performance(&scope).await.map_err(ApiError::from)?;
        let minutes = (scope.end - scope.start).num_milliseconds() as f64 / 60_000.0;
        let mut figures = rows.iter().map(|row| performance_figures(row, minutes));
        // the store puts the overall row (empty namespace and name) first
        let overall = figures.next();
        Ok(Response::new(pb::Performance {
            window_start: Some(timestamp(scope.start)),
            window_end: Some(timestamp(scope.end)),
            overall,
            by_task: figures.collect(),
        }))
    }

    async fn get_bottlenecks(
        &self,
        request: Request<pb::BottlenecksRequest>,
    ) -> Result<Response<pb::Bottlenecks>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let scope = scope(&caller, r.window_seconds, &r.namespace)?;
        let limit = match r.limit {
            0 => DEFAULT_LIMIT,
            l if l > MAX_LIMIT => {
                return Err(ApiError::invalid("limit", format!("{l} is more than the limit of {MAX_LIMIT}")).into());
            }
            l => l,
        };
        let rows = self.store.bottlenecks(&scope, limit as usize).await.map_err(ApiError::from)?;
        Ok(Response::new(pb::Bottlenecks {
            window_start: Some(timestamp(scope.start)),
            window_end: Some(timestamp(scope.end)),
            slowest_steps: rows.slowest_steps.iter().map(step_figures).collect(),
            slowest_tasks: rows
                .slowest_tasks
                .iter()
                .map(|t| pb::TaskFigures {
                    namespace: t.namespace.clone(),
                    task_name: t.task_name.clone(),
                    duration_ms: percentiles(&t.duration_ms),
                })
                .collect(),
            most_retried_steps: rows.most_retried_steps.iter().map(step_figures).collect(),
            top_errors: rows
                .top_errors
                .iter()
                .map(|e| pb::ErrorFigures {
                    message: e.message.clone(),
                    count: e.count,
                    last_seen: Some(timestamp(e.last_seen)),
                    namespace: e.namespace.clone(),
                    task_name: e.task_name.clone(),
                    step_name: e.step_name.clone(),
                })
                .collect(),
        }))
    }

    async fn get_system_health(
        &self,
        request: Request<pb::SystemHealthRequest>,
    ) -> Result<Response<pb::SystemHealth>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let namespaces = namespaces(&caller, &r.namespace)?;
        let rows = self.store.system_health(namespaces.as_deref()).await.map_err(ApiError::from)?;
        let now = Utc::now();
        Ok(Response::new(pb::SystemHealth {
            tasks_by_state: rows.tasks_by_state.into_iter().collect(),
            steps_by_state: rows.steps_by_state.into_iter().collect(),
            oldest_unfinished_task: rows.oldest_unfinished.map(|t| pb::OldestTask {
                task_id: t.id.to_string(),
                namespace: t.namespace,
                task_name: t.name,
                status: crate::convert::task_status(t.status) as i32,
                created_at: Some(timestamp(t.created_at)),
                age_seconds: (now - t.created_at).num_milliseconds().max(0) as f64 / 1000.0,
            }),
            retry_backlog: rows.retry_backlog,
            retries_due: rows.retries_due,
        }))
    }
}
