//! The HTTP admin endpoint each service serves: `/health/live` (the process answers) and
//! `/health/ready` (every dependency check passes; 503 naming the failing ones otherwise)
//! and `/metrics` (Prometheus text).

use std::{net::SocketAddr, sync::Arc};

use axum::{Router, extract::State, http::StatusCode, http::header, response::IntoResponse, routing::get};
use futures::future::{BoxFuture, join_all};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

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

    /// Serves until `shutdown`.
    pub async fn serve(
        self,
        checks: Vec<ReadyCheck>,
        registry: Registry,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let mut registry = registry;
        registry.register_collector(Box::new(StatementCounter));
        let registry = Arc::new(registry);
        let app = Router::new()
            .route("/health/live", get(|| async { "ok\n" }))
            .route("/health/ready", get(ready))
            .with_state(Arc::new(checks))
            .route("/metrics", get(move || metrics(registry.clone())));
        axum::serve(self.listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await
    }
}

async fn ready(State(checks): State<Arc<Vec<ReadyCheck>>>) -> (StatusCode, String) {
    let results = join_all(checks.iter().map(|(name, check)| {
        let fut = check();
        async move { (*name, fut.await) }
    }))
    .await;
    let failing: Vec<String> =
        results.into_iter().filter_map(|(name, r)| r.err().map(|e| format!("{name}: {e}"))).collect();
    if failing.is_empty() {
        (StatusCode::OK, "ready\n".into())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready\n{}\n", failing.join("\n")))
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
