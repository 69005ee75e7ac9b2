//! Trace context between spans and carriers. A task's trace context
//! ([`TraceContext`]: W3C `traceparent`/`tracestate`) travels in gRPC metadata, AMQP
//! headers and CloudEvents; these helpers make a `tracing` span its child, link a span to
//! it, or read it off a span. Without an exporter the spans carry no OpenTelemetry
//! context, and the context received is handed on unchanged.

use std::collections::HashMap;

use opentelemetry::trace::TraceContextExt;
use tasker_domain::TraceContext;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

fn extract(trace: &TraceContext) -> opentelemetry::Context {
    let headers = trace.to_headers();
    opentelemetry::global::get_text_map_propagator(|propagator| propagator.extract(&headers))
}

/// Makes `span` a child of `trace` (nothing when `trace` is empty), and records the trace
/// id in the span's `trace_id` field when it declares one.
pub fn set_parent(span: &Span, trace: &TraceContext) {
    if !trace.is_empty() {
        let _ = span.set_parent(extract(trace));
    }
    record_trace_id(span, trace);
}

/// Links `span` to `trace` (a batch serving many tasks links to each of them).
pub fn link(span: &Span, trace: &TraceContext) {
    if trace.is_empty() {
        return;
    }
    let context = extract(trace);
    let span_context = context.span().span_context().clone();
    if span_context.is_valid() {
        span.add_link(span_context);
    }
}

/// The trace context to hand on from `span`: its own when spans are recorded, else
/// `received` unchanged.
pub fn context_of(span: &Span, received: &TraceContext) -> TraceContext {
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return received.clone();
    }
    let mut headers = HashMap::new();
    opentelemetry::global::get_text_map_propagator(|propagator| propagator.inject_context(&context, &mut headers));
    let own = TraceContext::from_headers(&headers);
    if own.is_empty() { received.clone() } else { own }
}

/// Records the trace id (of the span's own context when recorded, else of `trace`) in the
/// span's `trace_id` field, so log lines written in it carry it.
fn record_trace_id(span: &Span, trace: &TraceContext) {
    let context = span.context();
    let own = context.span().span_context().clone();
    if own.is_valid() {
        span.record("trace_id", own.trace_id().to_string());
    } else if let Some(id) = trace.trace_id() {
        span.record("trace_id", id);
    }
}
