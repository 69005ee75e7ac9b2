//! One task is one trace: a client's `traceparent` on CreateTask, and every span after it
//! (the CreateTask span, each dispatch, each worker attempt with the handler's own spans
//! inside, the orchestrator batches linked to it) exported over OTLP to a collector in
//! the test, with the same `traceparent` on every lifecycle event of the task.
//!
//! The services run in-process on this test's current-thread runtime, so the spans of
//! all of them are recorded by the subscriber this test installs for its thread.

use std::{collections::HashMap, time::Duration};

use serde_json::{Value, json};
use step_worker::{Registry, StepError, StepHandler, StepInput};
use tasker_proto::v1 as pb;
use tasker_runtime::TelemetryConfig;
use tasker_test_support::{CollectedSpan, OtlpCollector, System, TestEnv, WorkerSpec};
use tracing::Instrument;

use crate::support::*;

const BROKEN: &str = "namespace: traced\nname: broken\nversion: 1.0.0\nsteps:\n  - { name: once, handler: fail, max_attempts: 1, config: { times: 1 } }\n";
const FLOW: &str = "namespace: traced\nname: pipeline\nversion: 1.0.0\nsteps:\n  - { name: charge, handler: charge }\n  - { name: flaky, handler: fail, depends_on: [charge], max_attempts: 2, config: { times: 1 } }\n  - { name: notify, handler: echo, depends_on: [flaky] }\n";

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// A handler with a span of its own, as a user's handler would have.
struct Charge;

#[async_trait::async_trait]
impl StepHandler for Charge {
    async fn call(&self, _input: StepInput) -> Result<Value, StepError> {
        let work = async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            Ok(json!({ "charged": 42 }))
        };
        work.instrument(tracing::info_span!("charge card", amount = 42)).await
    }
}

fn one<'a>(spans: &'a [CollectedSpan], what: &str, pick: impl Fn(&CollectedSpan) -> bool) -> &'a CollectedSpan {
    let found: Vec<&CollectedSpan> = spans.iter().filter(|s| pick(s)).collect();
    assert_eq!(found.len(), 1, "exactly one {what}: {found:#?}");
    found[0]
}

#[tokio::test]
async fn one_task_is_one_trace_from_create_task_through_every_attempt() {
    let collector = OtlpCollector::start().await;
    let telemetry = TelemetryConfig { export_interval: Duration::from_millis(100), ..Default::default() };
    let (_telemetry, _recording) =
        tasker_runtime::trace_this_thread(&collector.endpoint(), &telemetry, "tasker-e2e").expect("tracing");
    let env = TestEnv::new().await;
    let mut registry = Registry::with_builtins();
    registry.register("charge", Charge);
    let system = System::start(&env, vec![WorkerSpec::new("tracer", &["traced"]).registry(registry)]).await;
    system.register(&env, FLOW).await;
    let (_broker, mut events) = env.subscribe(&["traced.#"]).await;

    let mut request = tonic::Request::new(pb::CreateTaskRequest {
        namespace: "traced".into(),
        name: "pipeline".into(),
        context_json: "{}".into(),
        ..Default::default()
    });
    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    request.metadata_mut().insert("traceparent", traceparent.parse().unwrap());
    request.metadata_mut().insert("tracestate", "vendor=abc".parse().unwrap());
    let created = system.tasks().create_task(request).await.unwrap().into_inner().task.unwrap();
    let task = system.wait_final(&created.id).await;
    assert_eq!(task.status(), pb::TaskStatus::Complete);

    let spans = collector
        .wait_for(|spans| {
            let attempts = spans.iter().filter(|s| s.trace_id == CLIENT_TRACE && s.name.ends_with(" attempt")).count();
            attempts >= 4 && spans.iter().any(|s| s.name == "charge card")
        })
        .await;
    let traced: Vec<CollectedSpan> = spans.iter().filter(|s| s.trace_id == CLIENT_TRACE).cloned().collect();

    // CreateTask continues the client's trace
    let create = one(&traced, "CreateTask span", |s| s.name == "CreateTask");
    assert_eq!(create.parent_span_id, CLIENT_SPAN);
    assert_eq!(create.attributes["task_id"], task.id);
    assert_eq!(create.service, "tasker-e2e");
    assert!(create.resource.contains_key("service.version") && create.resource.contains_key("service.instance.id"));

    // each dispatch is a child of CreateTask; each attempt a child of its dispatch
    let dispatches: HashMap<&str, &CollectedSpan> =
        traced.iter().filter(|s| s.name.starts_with("dispatch ")).map(|s| (s.span_id.as_str(), s)).collect();
    assert_eq!(dispatches.len(), 4, "charge, flaky twice, notify: {dispatches:#?}");
    assert!(dispatches.values().all(|d| d.parent_span_id == create.span_id));
    let mut attempts: Vec<(String, String, String)> = Vec::new();
    for attempt in traced.iter().filter(|s| s.name.ends_with(" attempt")) {
        let dispatch = dispatches.get(attempt.parent_span_id.as_str()).expect("an attempt's parent is its dispatch");
        assert_eq!(dispatch.attributes["step"], attempt.attributes["step"]);
        assert_eq!(dispatch.attributes["attempt"], attempt.attributes["attempt"]);
        assert_eq!(attempt.attributes["worker_id"], "tracer");
        attempts.push((
            attempt.attributes["step"].clone(),
            attempt.attributes["attempt"].clone(),
            attempt.attributes["outcome"].clone(),
        ));
    }
    attempts.sort();
    let expected = [
        ("charge", "1", "complete"),
        ("flaky", "1", "failed, retryable"),
        ("flaky", "2", "complete"),
        ("notify", "1", "complete"),
    ]
    .map(|(a, b, c)| (a.to_owned(), b.to_owned(), c.to_owned()));
    assert_eq!(attempts, expected);

    // the handler's own span nests under its attempt
    let charge_attempt = one(&traced, "charge attempt", |s| s.name == "pipeline.charge attempt");
    let card = one(&traced, "handler span", |s| s.name == "charge card");
    assert_eq!(card.parent_span_id, charge_attempt.span_id);

    // the batches that touched the task have traces of their own, linked to the task's
    let linked = spans
        .iter()
        .filter(|s| s.name == "orchestrator batch")
        .filter(|s| s.links.iter().any(|(trace, span)| trace == CLIENT_TRACE && *span == create.span_id))
        .count();
    assert!(linked >= 4, "batches linked to the task: {linked}");
    assert!(spans.iter().filter(|s| s.name == "orchestrator batch").all(|s| s.trace_id != CLIENT_TRACE));

    // every event of the task carries the task's trace context: the CreateTask span's
    let received = collect_until(&mut events, |r| r.iter().any(|e| e.kind() == "dev.tasker.task.completed")).await;
    let expected_parent = format!("00-{CLIENT_TRACE}-{}-01", create.span_id);
    assert!(received.len() >= 10, "{} events", received.len());
    for event in &received {
        assert_eq!(event.event["traceparent"], expected_parent.as_str(), "{}", event.routing_key);
        assert_eq!(event.event["tracestate"], "vendor=abc", "{}", event.routing_key);
    }

    // an operator action joins the trace of the task it acts on, linked to the caller's
    system.register(&env, BROKEN).await;
    let other_trace = "0af7651916cd43dd8448eb211c80319c";
    let mut request = tonic::Request::new(pb::CreateTaskRequest {
        namespace: "traced".into(),
        name: "broken".into(),
        ..Default::default()
    });
    request.metadata_mut().insert("traceparent", format!("00-{other_trace}-b7ad6b7169203331-01").parse().unwrap());
    let broken = system.tasks().create_task(request).await.unwrap().into_inner().task.unwrap();
    let failed = system.wait_final(&broken.id).await;
    assert_eq!(failed.status(), pb::TaskStatus::Error);
    let operator_trace = "11111111111111111111111111111111";
    let mut retry =
        tonic::Request::new(pb::RetryStepRequest { step_id: failed.steps[0].id.clone(), reason: "again".into() });
    retry.metadata_mut().insert("traceparent", format!("00-{operator_trace}-2222222222222222-01").parse().unwrap());
    system.steps().retry_step(retry).await.unwrap();
    assert_eq!(system.wait_final(&broken.id).await.status(), pb::TaskStatus::Complete);
    let spans = collector
        .wait_for(|spans| {
            spans.iter().filter(|s| s.trace_id == other_trace && s.name.ends_with(" attempt")).count() >= 2
                && spans.iter().any(|s| s.name == "RetryStep")
        })
        .await;
    let created = one(&spans, "second CreateTask", |s| s.name == "CreateTask" && s.trace_id == other_trace);
    let action = one(&spans, "RetryStep span", |s| s.name == "RetryStep");
    assert_eq!((action.trace_id.as_str(), action.parent_span_id.as_str()), (other_trace, created.span_id.as_str()));
    assert_eq!(action.links, [(operator_trace.to_owned(), "2222222222222222".to_owned())]);

    system.stop().await;
    env.cleanup().await;
}

/// Without an exporter, a caller's trace context still reaches the task's events
/// unchanged (nothing else to hand on), and a malformed one is ignored.
#[tokio::test]
async fn without_an_exporter_the_callers_trace_context_reaches_the_events() {
    let env = TestEnv::new().await;
    let system = System::start(&env, vec![WorkerSpec::new("plain", &["traced"])]).await;
    system.register(&env, &FLOW.replace("handler: charge", "handler: echo")).await;
    let (_broker, mut events) = env.subscribe(&["traced.#"]).await;
    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    for (sent, expected) in [(traceparent.as_str(), Some(traceparent.as_str())), ("00-zz-not-hex-01", None)] {
        let mut request = tonic::Request::new(pb::CreateTaskRequest {
            namespace: "traced".into(),
            name: "pipeline".into(),
            ..Default::default()
        });
        request.metadata_mut().insert("traceparent", sent.parse().unwrap());
        let created = system.tasks().create_task(request).await.unwrap().into_inner().task.unwrap();
        system.wait_final(&created.id).await;
        let received = collect_until(&mut events, |r| {
            r.iter().any(|e| e.kind() == "dev.tasker.task.completed" && e.task_id() == created.id)
        })
        .await;
        for event in received.iter().filter(|e| e.task_id() == created.id) {
            assert_eq!(event.event.get("traceparent").and_then(Value::as_str), expected, "{}", event.routing_key);
        }
    }
    system.stop().await;
    env.cleanup().await;
}
