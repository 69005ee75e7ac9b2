//! Logs and traces. Logs go to stdout, pretty or JSON (JSON lines carry the fields of the
//! span they were written in: `task_id`, `step_id`, `attempt`, `trace_id`). Spans are
//! exported over OTLP/gRPC in batches when `telemetry.otlp_endpoint` is set, with the
//! service's name, version and instance as resource attributes; W3C trace context is the
//! propagation format everywhere ([`crate::trace`]).

use std::time::Duration;

use anyhow::Context;
use opentelemetry::{KeyValue, trace::TracerProvider as _};
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider},
};
use tracing_subscriber::{EnvFilter, Layer, fmt, layer::SubscriberExt, util::SubscriberInitExt};

use crate::{LogConfig, LogFormat, TelemetryConfig};

/// Keeps the span exporter alive; [`Telemetry::shutdown`] flushes what is buffered.
#[must_use = "dropping it without shutdown loses the spans not yet exported"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports every span still buffered (a bounded wait), then stops the exporter. The
    /// wait blocks a thread of its own: the export itself needs the runtime.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else { return };
        let flushed = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(Duration::from_secs(5))).await;
        if let Ok(Err(error)) = flushed {
            tracing::warn!(%error, "flushing spans at shutdown failed");
        }
    }
}

/// Records the spans of this thread only (not a global subscriber) to `endpoint`, with
/// the W3C propagator: for tests, whose current-thread runtime runs every task they
/// spawn on this thread. Spans go out every `export_interval`; drop the guard to stop.
pub fn trace_this_thread(
    endpoint: &str,
    telemetry: &TelemetryConfig,
    service: &str,
) -> anyhow::Result<(Telemetry, tracing::subscriber::DefaultGuard)> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let provider = provider(endpoint, telemetry, service)?;
    let subscriber = tracing_subscriber::registry()
        .with(EnvFilter::new("info"))
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("tasker")));
    let guard = tracing::subscriber::set_default(subscriber);
    Ok((Telemetry { provider: Some(provider) }, guard))
}

/// Installs the global subscriber: `RUST_LOG` if set, else the configured filter; pretty
/// or JSON lines; and the OTLP span exporter when configured. Must run inside the Tokio
/// runtime (the exporter's gRPC client). A second call installs nothing.
pub fn init_tracing(log: &LogConfig, telemetry: &TelemetryConfig, service: &str) -> anyhow::Result<Telemetry> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&log.filter));
    let logs = match log.format {
        LogFormat::Json => fmt::layer()
            .with_target(false)
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
        LogFormat::Pretty => fmt::layer().with_target(false).compact().boxed(),
    };
    // an empty endpoint (an unset variable in docker-compose) is no endpoint
    let provider = match telemetry.otlp_endpoint.as_deref().map(str::trim).filter(|e| !e.is_empty()) {
        Some(endpoint) => Some(provider(endpoint, telemetry, service)?),
        None => None,
    };
    let spans = provider.as_ref().map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("tasker")));
    let _ = tracing_subscriber::registry().with(filter).with(logs).with(spans).try_init();
    Ok(Telemetry { provider })
}

fn provider(endpoint: &str, telemetry: &TelemetryConfig, service: &str) -> anyhow::Result<SdkTracerProvider> {
    use opentelemetry_otlp::WithExportConfig;
    anyhow::ensure!(
        (0.0..=1.0).contains(&telemetry.sample_ratio),
        "telemetry.sample_ratio: {} is not between 0 and 1",
        telemetry.sample_ratio
    );
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .context("telemetry.otlp_endpoint")?;
    let instance = telemetry.instance.clone().unwrap_or_else(default_instance);
    let resource = Resource::builder()
        .with_service_name(service.to_owned())
        .with_attributes([
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("service.instance.id", instance),
            KeyValue::new("service.namespace", "tasker"),
        ])
        .build();
    let batches = BatchSpanProcessor::builder(exporter)
        .with_batch_config(BatchConfigBuilder::default().with_scheduled_delay(telemetry.export_interval).build())
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(batches)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(telemetry.sample_ratio))))
        .with_resource(resource)
        .build())
}

fn default_instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default();
    format!("{}-{}", if host.is_empty() { "localhost" } else { &host }, std::process::id())
}
