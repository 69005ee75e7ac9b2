//! The HTTP admin endpoint each service serves: `/health/live` (the process answers, and
//! no dependency has been down longer than `health.live_timeout`), `/health/ready` (every
//! dependency check passes; 503 naming the failing ones otherwise), `/health/status`
//! (every check, passing or not, as JSON) and `/metrics` (Prometheus text).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Router, extract::State, http::StatusCode, http::header, response::IntoResponse, routing::get};
use futures::future::{BoxFuture, join_all};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How long a check may take before it counts as failing: a dependency that went silent
/// (a partition, a frozen host) fails the probe in time instead of hanging it.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// A named readiness check.
pub type ReadyCheck = (&'static str, Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>);

/// Builds a [`ReadyCheck`] from an async closure.
pub fn ready_check<F, Fut>(name: &'static str, check: F) -> ReadyCheck
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    (name, Arc::new(move || Box::pin(check())))
}

/// A bound admin listener (bind early, serve once the service is wired).
pub struct Admin {
    listener: TcpListener,
}

impl Admin {
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Admin> {
        Ok(Admin { listener: TcpListener::bind(addr).await? })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener has an address")
    }

    /// Serves until `shutdown`. Liveness fails once a check has failed, at every probe,
    /// for longer than `live_timeout`.
    pub async fn serve(
        self,
        checks: Vec<ReadyCheck>,
        registry: Registry,
        live_timeout: Duration,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let mut registry = registry;
        registry.register_collector(Box::new(StatementCounter));
        let registry = Arc::new(registry);
        let health = Arc::new(Health { checks, live_timeout, down_since: Mutex::default(), started: Instant::now() });
        let app = Router::new()
            .route("/health/live", get(live))
            .route("/health/ready", get(ready))
            .route("/health/status", get(status))
            .with_state(health)
            .route("/metrics", get(move || metrics(registry.clone())));
        axum::serve(self.listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await
    }
}

/// The checks, and since when each failing one has been failing.
struct Health {
    checks: Vec<ReadyCheck>,
    live_timeout: Duration,
    down_since: Mutex<HashMap<&'static str, Instant>>,
    started: Instant,
}

impl Health {
    /// Runs every check: each one's name, its problem (if failing) and how long it has
    /// been failing.
    async fn run_all(&self) -> Vec<(&'static str, Option<String>, Duration)> {
        let results = join_all(self.checks.iter().map(|(name, check)| {
            let fut = tokio::time::timeout(CHECK_TIMEOUT, check());
            async move { (*name, fut.await.unwrap_or_else(|_| Err(format!("no answer within {CHECK_TIMEOUT:?}")))) }
        }))
        .await;
        let mut down_since = self.down_since.lock().expect("health lock");
        results
            .into_iter()
            .map(|(name, result)| match result {
                Ok(()) => {
                    down_since.remove(name);
                    (name, None, Duration::ZERO)
                }
                Err(problem) => {
                    let since = *down_since.entry(name).or_insert_with(Instant::now);
                    (name, Some(problem), since.elapsed())
                }
            })
            .collect()
    }

    /// The failing checks, with how long each has been failing.
    async fn run(&self) -> Vec<(String, Duration)> {
        self.run_all()
            .await
            .into_iter()
            .filter_map(|(name, problem, down)| Some((format!("{name}: {}", problem?), down)))
            .collect()
    }
}

async fn ready(State(health): State<Arc<Health>>) -> (StatusCode, String) {
    let failing = health.run().await;
    if failing.is_empty() {
        (StatusCode::OK, "ready\n".into())
    } else {
        let lines: Vec<String> = failing.iter().map(|(what, down)| format!("{what} (for {down:.0?})")).collect();
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready\n{}\n", lines.join("\n")))
    }
}

/// Every check as JSON: `{"ready", "live", "version", "uptime_seconds", "checks": [{"name",
/// "ok", "problem", "failing_for_seconds"}]}`; 200 when ready, 503 otherwise.
async fn status(State(health): State<Arc<Health>>) -> impl IntoResponse {
    let checks = health.run_all().await;
    let ready = checks.iter().all(|(_, problem, _)| problem.is_none());
    let live = checks.iter().all(|(_, problem, down)| problem.is_none() || *down < health.live_timeout);
    let body = serde_json::json!({
        "ready": ready,
        "live": live,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": health.started.elapsed().as_secs(),
        "checks": checks.iter().map(|(name, problem, down)| serde_json::json!({
            "name": name,
            "ok": problem.is_none(),
            "problem": problem,
            "failing_for_seconds": down.as_secs_f64(),
        })).collect::<Vec<_>>(),
    });
    let code = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, [(header::CONTENT_TYPE, "application/json")], body.to_string())
}

/// Live unless a dependency has been down past the timeout: then a restart is the best
/// hope (a stuck connection pool, a wedged client), and the orchestrator should do it.
async fn live(State(health): State<Arc<Health>>) -> (StatusCode, String) {
    let failing = health.run().await;
    let dead: Vec<String> = failing
        .iter()
        .filter(|(_, down)| *down >= health.live_timeout)
        .map(|(what, down)| format!("{what} (for {down:.0?})"))
        .collect();
    if dead.is_empty() {
        (StatusCode::OK, "ok\n".into())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("dependencies down too long\n{}\n", dead.join("\n")))
    }
}

async fn metrics(registry: Arc<Registry>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &registry) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
            body,
        ),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, [(header::CONTENT_TYPE, "text/plain")], e.to_string()),
    }
}

/// `tasker_db_statements_total`: statements this process sent to Postgres.
#[derive(Debug)]
struct StatementCounter;

impl prometheus_client::collector::Collector for StatementCounter {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let counter = prometheus_client::metrics::counter::ConstCounter::new(tasker_store::statements_executed());
        let metric = encoder.encode_descriptor(
            "tasker_db_statements",
            "Statements sent to Postgres by this process",
            None,
            counter.metric_type(),
        )?;
        counter.encode(metric)
    }
}
