//! task-api: Tasker's public gRPC API (tonic). Templates (register, read, list), tasks
//! (create, read, list, cancel, watch) and steps (read, retry, resolve), plus gRPC health
//! (NOT_SERVING until the database and broker are reached) and server reflection, and the
//! HTTP admin endpoint. It never advances a task itself beyond operator actions: after
//! writing, it asks the orchestrator to look at the task.

mod analytics;
mod auth;
mod catalog;
mod convert;
mod error;
mod feeds;
mod input;
mod link;
mod metrics;
mod spans;
mod steps;
mod tasks;
mod templates;

use std::{net::SocketAddr, sync::Arc};

use anyhow::Context;
use prometheus_client::registry::Registry;
use tasker_proto::v1::{
    analytics_service_server::AnalyticsServiceServer, step_service_server::StepServiceServer,
    task_service_server::TaskServiceServer, template_service_server::TemplateServiceServer,
};
use tasker_runtime::{Admin, Config};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;

pub use error::ApiError;
pub use link::created;

use crate::{
    auth::Gate,
    feeds::Feeds,
    link::Link,
    steps::Steps,
    tasks::{Tasks, Watches},
    templates::Templates,
};

/// How long shutdown waits for the confirms of task requests already sent.
const SETTLE_REQUESTS: std::time::Duration = std::time::Duration::from_secs(5);

/// Binds both listeners, then serves until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    TaskApi::bind(config).await?.run(shutdown).await
}

/// The API with its gRPC and admin listeners bound.
pub struct TaskApi {
    config: Config,
    grpc: TcpListener,
    admin: Admin,
    tls: Option<tonic::transport::ServerTlsConfig>,
}

impl TaskApi {
    pub async fn bind(config: Config) -> anyhow::Result<TaskApi> {
        // certificate files are read (and a bad one refused) before anything else starts
        let tls = tasker_runtime::tls::server_config(&config.api.tls)?;
        let grpc = TcpListener::bind(config.api.listen)
            .await
            .with_context(|| format!("binding the gRPC listener on {}", config.api.listen))?;
        let admin = Admin::bind(config.api.admin_listen).await.context("binding the admin listener")?;
        Ok(TaskApi { config, grpc, admin, tls })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc.local_addr().expect("bound listener has an address")
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr()
    }

    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let TaskApi { config, grpc, admin, tls } = self;
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_not_serving::<TaskServiceServer<Tasks>>().await;
        health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
        // both versions of the reflection protocol: grpcurl speaks v1, many tools
        // (grpcio-reflection, GUI clients) still speak only v1alpha
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(tasker_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection().build_v1().context("building the reflection service")?;
        let reflection_v1alpha = reflection().build_v1alpha().context("building the reflection service")?;

        let grpc = Arc::new(grpc);
        // until the store is open, every call is answered UNAVAILABLE rather than left
        // waiting
        let opened = CancellationToken::new();
        let mut waiting =
            tokio::spawn(answer_unavailable(grpc.clone(), tls.clone(), health_service.clone(), opened.clone()));
        let started =
            tasker_runtime::start_with_store(admin, &config, tasker_store::Workload::General, &shutdown).await;
        // its calls are answered at once, but an open stream (a gRPC health watch) would
        // hold its graceful stop for ever: it is waited for a moment only. Its connections
        // have been told to go away (GOAWAY) and take no new calls either way; a stream
        // left open ends when its client drops it (a health watch hears SERVING meanwhile)
        opened.cancel();
        match tokio::time::timeout(WAITING_SERVER_GRACE, &mut waiting).await {
            Ok(stopped) => stopped.context("the server answering while waiting for the database")??,
            Err(_) => waiting.abort(),
        }
        let Some(tasker_runtime::Started { stop, admin, store }) = started? else {
            return Ok(()); // stopped while waiting for the database
        };
        // the link outlives the API at shutdown: the requests of the last calls answered
        // are confirmed before it closes
        let link_stop = CancellationToken::new();
        let link = Link::default();
        let slot = tasker_runtime::BrokerSlot::new();
        let mut registry = Registry::default();
        slot.register(&mut registry);
        tasker_runtime::register_store_metrics(&store, &mut registry);
        let api_metrics = metrics::ApiMetrics::register(&mut registry);
        let link_loop = {
            let (link, slot, stop, amqp) = (link.clone(), slot.clone(), link_stop.clone(), config.amqp.clone());
            tokio::spawn(async move {
                tasker_runtime::supervise("task-api", &stop, || link.maintain(&amqp, &slot, stop.clone())).await
            })
        };
        let catalog = catalog::Catalog::new(store.clone());
        let templates = Templates { store: store.clone(), limits: config.limits, catalog: catalog.clone() };
        if let Some(dir) = &config.api.templates_dir {
            let n = templates.load_dir(dir).await?;
            tracing::info!(dir = %dir.display(), templates = n, "templates loaded");
        }
        let tasks = Tasks {
            store: store.clone(),
            link: link.clone(),
            limits: config.limits,
            catalog,
            watches: Watches::new(config.api.max_watches_per_caller),
            feeds: Feeds::new(link.clone(), config.api.watch_buffer, api_metrics.clone()),
            metrics: api_metrics,
            stopping: stop.clone(),
        };
        let steps = Steps { tasks: tasks.clone() };
        let analytics = analytics::Analytics { store: store.clone() };
        health.set_serving::<TaskServiceServer<Tasks>>().await;
        health.set_serving::<TemplateServiceServer<Templates>>().await;
        health.set_serving::<StepServiceServer<Steps>>().await;
        health.set_serving::<AnalyticsServiceServer<analytics::Analytics>>().await;
        health.set_service_status("", tonic_health::ServingStatus::Serving).await;

        admin.wire(vec![tasker_runtime::store_check(&store), slot.check()], registry);
        let addr = grpc.local_addr()?;
        let gate = Gate::new(&config.auth).context("auth")?;
        // room for the largest payload the limits allow (twice over, so a request a little
        // past a limit gets the API's own RESOURCE_EXHAUSTED naming the field) and the rest of
        // the message; anything larger is refused by the transport before it is read
        let limits = &config.limits;
        let decode_limit =
            2 * limits.max_context_bytes.max(limits.max_results_bytes).max(limits.max_template_bytes) + 64 * 1024;
        if config.auth.mode == tasker_auth::Mode::None {
            if addr.ip().is_loopback() {
                tracing::warn!(%addr, "auth.mode = none: every caller may do anything (loopback only)");
            } else {
                tracing::warn!(%addr, "AUTH IS OFF (auth.mode = none) on a non-loopback address: ANYONE WHO CAN REACH THIS PORT MAY CREATE, CANCEL, RETRY AND RESOLVE ANY TASK; set auth.mode = jwt");
            }
        }
        // a client that vanished without closing is let go once a ping goes unanswered
        let mut server = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(config.api.keepalive_interval))
            .http2_keepalive_timeout(Some(config.api.keepalive_timeout));
        let tls_mode = match (&tls, &config.api.tls.client_ca_file) {
            (None, _) => "off",
            (Some(_), None) => "on",
            (Some(_), Some(_)) => "on, client certificates required",
        };
        if let Some(tls) = tls {
            server = server.tls_config(tls).context("api.tls")?;
        }
        tracing::info!(%addr, auth = ?config.auth.mode, tls = tls_mode, "task-api serving");
        // health stays open; every API service is behind the gate
        let served = server
            .add_service(health_service)
            .add_optional_service(config.auth.reflection.then_some(reflection_v1))
            .add_optional_service(config.auth.reflection.then_some(reflection_v1alpha))
            .add_service(InterceptedService::new(
                TemplateServiceServer::new(templates).max_decoding_message_size(decode_limit),
                gate.clone(),
            ))
            .add_service(InterceptedService::new(
                TaskServiceServer::new(tasks).max_decoding_message_size(decode_limit),
                gate.clone(),
            ))
            .add_service(InterceptedService::new(
                StepServiceServer::new(steps).max_decoding_message_size(decode_limit),
                gate.clone(),
            ))
            .add_service(InterceptedService::new(AnalyticsServiceServer::new(analytics), gate))
            .serve_with_incoming_shutdown(incoming(grpc), stop.clone().cancelled_owned())
            .await
            .context("gRPC server");
        stop.cancel();
        link.settle(SETTLE_REQUESTS).await;
        link_stop.cancel();
        let _ = admin.stopped().await;
        let _ = link_loop.await;
        served
    }
}

/// The accepted connections, with Nagle's algorithm off: tonic sets `TCP_NODELAY` only on
/// listeners it binds itself, and with it on, a response written while an earlier one on
/// the same HTTP/2 connection is unacknowledged waits for the client's delayed ACK (up to
/// 40 ms on Linux): concurrent requests on one channel were each that much slower.
fn incoming(listener: Arc<TcpListener>) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.and_then(|(stream, _)| {
            stream.set_nodelay(true)?;
            Ok(stream)
        });
        Some((accepted, listener))
    })
}

/// How long task-api waits, once its database is there, for the server that answered
/// meanwhile to see its connections closed.
const WAITING_SERVER_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Serves on `listener` until `done`: the gRPC health service (every service not
/// serving yet), and UNAVAILABLE for every other call. task-api does this while it waits
/// for its database at start, so that callers retry instead of waiting on a connection
/// nobody answers.
async fn answer_unavailable(
    listener: Arc<TcpListener>,
    tls: Option<tonic::transport::ServerTlsConfig>,
    health: tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    done: CancellationToken,
) -> anyhow::Result<()> {
    let mut routes = tonic::service::Routes::new(health);
    let router = std::mem::take(routes.axum_router_mut());
    *routes.axum_router_mut() = router.fallback(|| async { ApiError::waiting_for_database().into_http() });
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls).context("api.tls")?;
    }
    server
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming(listener), done.cancelled_owned())
        .await
        .context("gRPC server, waiting for the database")
}
