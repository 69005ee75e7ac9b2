//! The spans of API calls that belong to a task's trace: CreateTask starts the task's
//! trace (as a child of the caller's `traceparent`, when it sends one), and operator
//! actions join it (linked to the caller's own trace).

use std::collections::HashMap;

use tasker_domain::{
    TraceContext,
    trace::{TRACEPARENT, TRACESTATE},
};
use tasker_store::TaskRef;
use tonic::Request;
use tracing::Span;

/// The trace context the caller sent in its gRPC metadata (empty when none or malformed).
pub(crate) fn received<T>(request: &Request<T>) -> TraceContext {
    let metadata = request.metadata();
    let headers: HashMap<String, String> = [TRACEPARENT, TRACESTATE]
        .into_iter()
        .filter_map(|key| Some((key.to_owned(), metadata.get(key)?.to_str().ok()?.to_owned())))
        .collect();
    TraceContext::from_headers(&headers)
}

/// The span of a CreateTask call, a child of the caller's trace context.
pub(crate) fn create_task(namespace: &str, name: &str, received: &TraceContext) -> Span {
    let span = tracing::info_span!(
        "CreateTask",
        otel.kind = "server",
        rpc.service = "tasker.v1.TaskService",
        namespace = %namespace,
        task = %name,
        task_id = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    tasker_runtime::trace::set_parent(&span, received);
    span
}

/// The span of an operator action on a task: in the task's trace, linked to the caller's.
pub(crate) fn operator(action: &'static str, task: &TaskRef, received: &TraceContext) -> Span {
    let span = tracing::info_span!(
        "operator action",
        otel.name = action,
        otel.kind = "server",
        action,
        namespace = %task.namespace,
        trace_id = tracing::field::Empty,
    );
    tasker_runtime::trace::set_parent(&span, &task.trace);
    tasker_runtime::trace::link(&span, received);
    span
}
