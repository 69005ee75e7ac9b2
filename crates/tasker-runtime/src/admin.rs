//! The HTTP admin endpoint each service serves: `/health/live` (the process answers, and
//! no dependency has been down longer than `health.live_timeout`), `/health/ready` (every
//! dependency check passes; 503 naming the failing ones otherwise), `/health/status`
//! (every check, passing or not, as JSON) and `/metrics` (Prometheus text).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use axum::{Router, extract::State, http::StatusCode, http::header, response::IntoResponse, routing::get};
use futures::future::{BoxFuture, join_all};
use prometheus_client::registry::Registry;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

/// How long a check may take before it counts as failing: a dependency that went silent
/// (a partition, a frozen host) fails the probe in time instead of hanging it.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// A named readiness check.
pub type ReadyCheck = (&'static str, Arc<dyn Fn() -> BoxFuture<'static, Result<(), Problem>> + Send + Sync>);

/// Why a readiness check fails.
#[derive(Debug, Clone)]
pub struct Problem {
    pub text: String,
    /// Whether restarting the service could help. When it could not (the broker blocking
    /// its connections for a resource alarm), readiness fails and liveness does not,
    /// however long it lasts.
    pub restart_helps: bool,
}

impl From<String> for Problem {
    fn from(text: String) -> Problem {
        Problem { text, restart_helps: true }
    }
}

/// Builds a [`ReadyCheck`] from an async closure.
pub fn ready_check<F, Fut, P>(name: &'static str, check: F) -> ReadyCheck
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), P>> + Send + 'static,
    P: Into<Problem>,
{
    (name, Arc::new(move || Box::pin(futures::FutureExt::map(check(), |r| r.map_err(Into::into)))))
}

/// A bound admin listener (bind early, serve from the start, wire once the service is).
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

    /// Serves at once, until `shutdown`, what the service has so far: until
    /// [`Serving::wire`] hands over its checks and metrics, readiness fails with what it is
    /// waiting for ([`Serving::waiting_for`]; "starting" at first), and liveness holds as
    /// for any failing check, failing once that has lasted `live_timeout`.
    pub fn start(self, live_timeout: Duration, shutdown: CancellationToken) -> Serving {
        let health = Arc::new(Health {
            checks: RwLock::new(Vec::new()),
            live_timeout,
            down_since: Mutex::default(),
            started: Instant::now(),
        });
        health.only_failing("startup", "starting".into());
        let registry = Arc::new(RwLock::new(Arc::new(with_statements(Registry::default()))));
        let encoded = registry.clone();
        let app = Router::new()
            .route("/health/live", get(live))
            .route("/health/ready", get(ready))
            .route("/health/status", get(status))
            .with_state(health.clone())
            .route("/metrics", get(move || metrics(encoded.read().expect("registry lock").clone())));
        let task = tokio::spawn(async move {
            axum::serve(self.listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await
        });
        Serving { health, registry, task }
    }
}

/// The admin endpoint being served (see [`Admin::start`]).
pub struct Serving {
    health: Arc<Health>,
    registry: Arc<RwLock<Arc<Registry>>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Serving {
    /// The service is not wired yet because `check` fails with `problem` (e.g. the
    /// database out of reach at start): readiness says so, under that check's name.
    pub fn waiting_for(&self, check: &'static str, problem: String) {
        self.health.only_failing(check, problem);
    }

    /// The service is wired: from now on readiness runs these checks and `/metrics`
    /// encodes this registry.
    pub fn wire(&self, checks: Vec<ReadyCheck>, registry: Registry) {
        *self.health.checks.write().expect("checks lock") = checks;
        *self.registry.write().expect("registry lock") = Arc::new(with_statements(registry));
    }

    /// Waits for the endpoint to stop (at `shutdown`).
    pub async fn stopped(mut self) -> std::io::Result<()> {
        (&mut self.task).await.unwrap_or_else(|e| Err(std::io::Error::other(e)))
    }
}

/// A service that returns early (an error at start) takes its endpoint down with it.
impl Drop for Serving {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn with_statements(mut registry: Registry) -> Registry {
    registry.register_collector(Box::new(StatementCounter));
    registry
}

/// The checks, and since when each failing one has been failing.
struct Health {
    checks: RwLock<Vec<ReadyCheck>>,
    live_timeout: Duration,
    down_since: Mutex<HashMap<&'static str, Instant>>,
    started: Instant,
}

impl Health {
    /// One check, failing with `problem`, in place of every other.
    fn only_failing(&self, check: &'static str, problem: String) {
        let failing = ready_check(check, move || std::future::ready(Err::<(), _>(problem.clone())));
        *self.checks.write().expect("checks lock") = vec![failing];
    }

    /// Runs every check: each one's name, its problem (if failing) and how long it has
    /// been failing.
    async fn run_all(&self) -> Vec<(&'static str, Option<Problem>, Duration)> {
        let checks = self.checks.read().expect("checks lock").clone();
        let results =
            join_all(checks.iter().map(|(name, check)| {
                let fut = tokio::time::timeout(CHECK_TIMEOUT, check());
                async move {
                    (*name, fut.await.unwrap_or_else(|_| Err(format!("no answer within {CHECK_TIMEOUT:?}").into())))
                }
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

    /// The failing checks, with how long each has been failing and whether that fails
    /// liveness ([`Health::dead`]).
    async fn run(&self) -> Vec<(String, Duration, bool)> {
        self.run_all()
            .await
            .into_iter()
            .filter_map(|(name, problem, down)| {
                let dead = self.dead(&problem, down);
                Some((format!("{name}: {}", problem?.text), down, dead))
            })
            .collect()
    }

    /// Whether a failing check has lasted `live_timeout` and a restart could help.
    fn dead(&self, problem: &Option<Problem>, down: Duration) -> bool {
        problem.as_ref().is_some_and(|p| p.restart_helps) && down >= self.live_timeout
    }
}

async fn ready(State(health): State<Arc<Health>>) -> (StatusCode, String) {
    let failing = health.run().await;
    if failing.is_empty() {
        (StatusCode::OK, "ready\n".into())
    } else {
        let lines: Vec<String> = failing.iter().map(|(what, down, _)| format!("{what} (for {down:.0?})")).collect();
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready\n{}\n", lines.join("\n")))
    }
}

/// Every check as JSON: `{"ready", "live", "version", "uptime_seconds", "checks": [{"name",
/// "ok", "problem", "failing_for_seconds"}]}`; 200 when ready, 503 otherwise.
async fn status(State(health): State<Arc<Health>>) -> impl IntoResponse {
    let checks = health.run_all().await;
    let ready = checks.iter().all(|(_, problem, _)| problem.is_none());
    let live = !checks.iter().any(|(_, problem, down)| health.dead(problem, *down));
    let body = serde_json::json!({
        "ready": ready,
        "live": live,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": health.started.elapsed().as_secs(),
        "checks": checks.iter().map(|(name, problem, down)| serde_json::json!({
            "name": name,
            "ok": problem.is_none(),
            "problem": problem.as_ref().map(|p| &p.text),
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
    let dead: Vec<String> =
        failing.iter().filter(|(_, _, dead)| *dead).map(|(what, down, _)| format!("{what} (for {down:.0?})")).collect();
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
