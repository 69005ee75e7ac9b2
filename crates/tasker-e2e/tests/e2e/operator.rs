//! Scenarios 11–14: resolve, retry, cancel, and illegal operator actions.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use serde_json::{Value, json};
use step_worker::{Registry, StepError, StepHandler, StepInput};
use tasker_proto::v1 as pb;
use tasker_test_support::{System, TestEnv, WorkerSpec};
use tonic::{Code, Request};

use crate::support::*;

const BROKEN: &str = r#"
namespace: ops
name: broken
version: 1.0.0
steps:
  - { name: first, handler: noop }
  - { name: broken, handler: fail, depends_on: [first], max_attempts: 2, config: { times: 3 } }
  - { name: child, handler: echo, depends_on: [broken] }
"#;

async fn failed_task(env: &TestEnv, system: &System) -> pb::Task {
    system.register(env, BROKEN).await;
    let task = system.wait_final(&system.submit("ops", "broken", json!({})).await.id).await;
    assert_eq!(task.status(), pb::TaskStatus::Error);
    task
}

fn as_operator<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("x-tasker-actor", "ops-oncall".parse().unwrap());
    request
}

#[tokio::test]
async fn resolving_a_failed_step_lets_its_children_run_with_the_given_results() {
    let env = TestEnv::new().await;
    let system = System::start(&env, vec![WorkerSpec::new("w1", &["ops"])]).await;
    let task = failed_task(&env, &system).await;
    let broken = steps_by_name(&task)["broken"].clone();

    let request = pb::ResolveStepRequest {
        step_id: broken.id.clone(),
        reason: "charged by hand".into(),
        results_json: r#"{"charge_id": "manual-7"}"#.into(),
    };
    let resolved = system.steps().resolve_step(as_operator(request)).await.unwrap().into_inner();
    assert_eq!(resolved.status(), pb::StepStatus::ResolvedManually);

    let done = system.wait_final(&task.id).await;
    assert_eq!(done.status(), pb::TaskStatus::Complete);
    let steps = steps_by_name(&done);
    let child: Value = serde_json::from_str(&steps["child"].results_json).unwrap();
    assert_eq!(child["parents"]["broken"], json!({ "charge_id": "manual-7" }));
    let resolution = steps["broken"].transitions.last().unwrap();
    assert_eq!((resolution.from_state.as_str(), resolution.to_state.as_str()), ("error", "resolved_manually"));
    let meta = metadata(resolution);
    assert_eq!((meta["actor"].as_str(), meta["reason"].as_str()), (Some("ops-oncall"), Some("charged by hand")));
    let task_path: Vec<&str> = done.transitions.iter().map(|t| t.to_state.as_str()).collect();
    assert_eq!(task_path, ["pending", "in_progress", "error", "in_progress", "complete"]);
    system.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn retrying_a_failed_step_gives_it_a_fresh_round_of_attempts_numbered_on() {
    let env = TestEnv::new().await;
    let system = System::start(&env, vec![WorkerSpec::new("w1", &["ops"])]).await;
    let task = failed_task(&env, &system).await;
    let broken = steps_by_name(&task)["broken"].clone();
    assert_eq!(broken.attempts, 2);

    let request = pb::RetryStepRequest { step_id: broken.id.clone(), reason: "gateway is back".into() };
    let reset = system.steps().retry_step(as_operator(request)).await.unwrap().into_inner();
    // the retry's own write, never what the orchestrator has done with the step since
    assert_eq!(reset.status(), pb::StepStatus::Pending);
    assert_eq!((reset.attempts, reset.attempts_before_retry), (2, 2), "numbers go on; the round starts after 2");
    let done = system.wait_final(&task.id).await;
    // `fail` with times 3 fails attempts 1–3: the new round's first attempt (number 3)
    // fails and its second (number 4) succeeds. Had the round not been fresh, attempt 3
    // would have been past max_attempts 2 and failed the step for good.
    let again = steps_by_name(&done)["broken"].clone();
    assert_eq!((again.attempts, again.attempts_before_retry), (4, 2));
    let states: Vec<&str> = again.transitions.iter().map(|t| t.to_state.as_str()).collect();
    let reset = states.iter().position(|s| *s == "pending").expect("reset transition");
    assert_eq!(
        &states[reset..],
        ["pending", "enqueued", "in_progress", "waiting_for_retry", "enqueued", "in_progress", "complete"]
    );
    assert_eq!(metadata(&again.transitions[reset])["actor"], "ops-oncall");
    let attempts: Vec<u64> =
        again.transitions[reset + 1..].iter().map(|t| metadata(t)["attempt"].as_u64().unwrap()).collect();
    assert_eq!(attempts, [3, 3, 3, 4, 4, 4], "no attempt number is used twice");
    assert_eq!(done.status(), pb::TaskStatus::Complete);
    system.stop().await;
    env.cleanup().await;
}

/// Fails its first `n` calls on this worker, whatever the attempt number: an outage
/// that an operator waits out before retrying.
struct Outage {
    calls: Arc<AtomicU32>,
    n: u32,
}

#[async_trait::async_trait]
impl StepHandler for Outage {
    async fn call(&self, _input: StepInput) -> Result<Value, StepError> {
        if self.calls.fetch_add(1, Ordering::SeqCst) < self.n {
            Err(StepError::retryable("downstream is down"))
        } else {
            Ok(json!({ "recovered": true }))
        }
    }
}

#[tokio::test]
async fn a_retried_step_that_succeeds_completes_the_task() {
    let env = TestEnv::new().await;
    let calls = Arc::new(AtomicU32::new(0));
    let mut registry = Registry::with_builtins();
    registry.register("outage", Outage { calls: calls.clone(), n: 2 });
    let system = System::start(&env, vec![WorkerSpec::new("w1", &["ops"]).registry(registry)]).await;
    system
        .register(
            &env,
            r#"
namespace: ops
name: outage
version: 1.0.0
steps:
  - { name: call_partner, handler: outage, max_attempts: 2 }
  - { name: child, handler: echo, depends_on: [call_partner] }
"#,
        )
        .await;
    let task = system.wait_final(&system.submit("ops", "outage", json!({})).await.id).await;
    assert_eq!(task.status(), pb::TaskStatus::Error);
    let failed = steps_by_name(&task)["call_partner"].clone();
    assert_eq!(failed.attempts, 2);

    let request = pb::RetryStepRequest { step_id: failed.id, reason: "partner is back".into() };
    let reset = system.steps().retry_step(as_operator(request)).await.unwrap().into_inner();
    assert_eq!((reset.attempts, reset.attempts_before_retry), (2, 2), "a new round after two attempts");
    let done = system.wait_final(&task.id).await;
    assert_eq!(done.status(), pb::TaskStatus::Complete);
    let steps = steps_by_name(&done);
    assert_eq!(steps["call_partner"].attempts, 3, "one attempt of the new round was enough");
    let child: Value = serde_json::from_str(&steps["child"].results_json).unwrap();
    assert_eq!(child["parents"]["call_partner"]["recovered"], true);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    let task_path: Vec<&str> = done.transitions.iter().map(|t| t.to_state.as_str()).collect();
    assert_eq!(task_path, ["pending", "in_progress", "error", "in_progress", "complete"]);
    system.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn cancelling_a_running_task_cancels_every_unfinished_step() {
    let env = TestEnv::new().await;
    let system = System::start(&env, vec![WorkerSpec::new("w1", &["ops"])]).await;
    system
        .register(
            &env,
            r#"
namespace: ops
name: long
version: 1.0.0
steps:
  - { name: quick, handler: noop }
  - { name: slow, handler: sleep, depends_on: [quick], config: { ms: 1500 } }
  - { name: later, handler: noop, depends_on: [slow] }
  - { name: waiting, handler: fail, depends_on: [quick], max_attempts: 5, config: { retry_after_ms: 1900 } }
"#,
        )
        .await;
    let (_broker, mut events) = env.subscribe(&["ops.#"]).await;
    let created = system.submit("ops", "long", json!({})).await;
    system
        .wait_for(&created.id, |t| {
            let steps = steps_by_name(t);
            steps["slow"].status() == pb::StepStatus::InProgress
                && steps["waiting"].status() == pb::StepStatus::WaitingForRetry
        })
        .await;
    let request = pb::CancelTaskRequest { task_id: created.id.clone(), reason: "customer withdrew".into() };
    let cancelled = system.tasks().cancel_task(as_operator(request)).await.unwrap().into_inner();
    assert_eq!(cancelled.status(), pb::TaskStatus::Cancelled);

    // the running step finishes on its worker; its report must be dropped, and nothing more
    // may be dispatched
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let after = system.wait_final(&created.id).await;
    let steps = steps_by_name(&after);
    assert_eq!(steps["quick"].status(), pb::StepStatus::Complete);
    for name in ["slow", "later", "waiting"] {
        assert_eq!(steps[name].status(), pb::StepStatus::Cancelled, "{name}");
        let last = steps[name].transitions.last().unwrap();
        assert_eq!(last.to_state, "cancelled", "{name}: nothing after the cancellation");
        assert_eq!(metadata(last)["reason"], "customer withdrew");
    }
    assert_eq!(steps["later"].attempts, 0, "never dispatched");
    assert_eq!(steps["waiting"].attempts, 1, "its retry never went out");
    let received = collect_until(&mut events, |r| r.iter().any(|e| e.kind() == "dev.tasker.task.cancelled")).await;
    let cancel_at = received.iter().position(|r| r.kind() == "dev.tasker.task.cancelled").unwrap();
    assert!(
        received[cancel_at..]
            .iter()
            .all(|r| !matches!(r.kind(), "dev.tasker.step.enqueued" | "dev.tasker.step.completed")),
        "no dispatch or completion after the cancellation"
    );
    system.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn illegal_actions_are_refused_and_change_nothing() {
    let env = TestEnv::new().await;
    let system = System::start(&env, vec![WorkerSpec::new("w1", &["ops"])]).await;
    system.register(&env, "namespace: ops\nname: fine\nversion: 1.0.0\nsteps: [{ name: fine, handler: noop }]\n").await;
    let task = system.wait_final(&system.submit("ops", "fine", json!({})).await.id).await;
    assert_eq!(task.status(), pb::TaskStatus::Complete);
    let step = task.steps[0].clone();

    let resolve = pb::ResolveStepRequest { step_id: step.id.clone(), ..Default::default() };
    let error = system.steps().resolve_step(resolve).await.unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition, "{error:?}");
    assert!(error.message().contains("complete"), "{}", error.message());
    let retry = pb::RetryStepRequest { step_id: step.id.clone(), ..Default::default() };
    assert_eq!(system.steps().retry_step(retry).await.unwrap_err().code(), Code::FailedPrecondition);
    let cancel = pb::CancelTaskRequest { task_id: task.id.clone(), ..Default::default() };
    let error = system.tasks().cancel_task(cancel).await.unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition);
    assert!(error.message().contains("cannot be cancelled"), "{}", error.message());
    let unknown = pb::CancelTaskRequest { task_id: uuid::Uuid::now_v7().to_string(), ..Default::default() };
    assert_eq!(system.tasks().cancel_task(unknown).await.unwrap_err().code(), Code::NotFound);
    let malformed = pb::GetStepRequest { step_id: "nope".into(), ..Default::default() };
    let error = system.steps().get_step(malformed).await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(error.message().starts_with("step_id"), "{}", error.message());

    let after = system.wait_final(&task.id).await;
    assert_eq!(after.transitions.len(), task.transitions.len());
    assert_eq!(after.steps[0].transitions.len(), step.transitions.len());
    assert_eq!(after.status(), pb::TaskStatus::Complete);
    system.stop().await;
    env.cleanup().await;
}
