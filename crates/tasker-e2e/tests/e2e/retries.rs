//! Scenarios 5–10: retries with backoff, exhausted attempts, permanent failures,
//! `retry_after`, single attempts, timeouts (worker-side and orchestrator-side).

use std::time::Duration;

use serde_json::{Value, json};
use tasker_messaging::Command;
use tasker_proto::{
    messages::{Completed, Started, StepExecution, StepReport, step_report::Outcome},
    v1 as pb,
};
use tasker_test_support::{System, TestEnv, WorkerSpec};

use crate::support::*;

async fn start(env: &TestEnv) -> System {
    System::start(env, vec![WorkerSpec::new("w1", &["retries"])]).await
}

fn error_of(step: &pb::Step) -> Value {
    serde_json::from_str(&step.last_error_json).expect("last_error is JSON")
}

/// Each `waiting_for_retry` transition with its recorded delay, and the time until the
/// next attempt was dispatched.
fn waits(step: &pb::Step) -> Vec<(u64, chrono::Duration)> {
    let t = &step.transitions;
    t.iter()
        .enumerate()
        .filter(|(_, tr)| tr.to_state == "waiting_for_retry")
        .map(|(i, tr)| {
            let delay = metadata(tr)["retry_in_ms"].as_u64().expect("retry_in_ms recorded");
            let next = &t[i + 1];
            assert_eq!(next.to_state, "enqueued");
            (delay, ts(&next.created_at) - ts(&tr.created_at))
        })
        .collect()
}

#[tokio::test]
async fn retried_step_follows_the_backoff_and_then_its_children_run() {
    let env = TestEnv::new().await;
    let system = start(&env).await;
    system
        .register(
            &env,
            r#"
namespace: retries
name: flaky
version: 1.0.0
steps:
  - { name: flaky, handler: fail, max_attempts: 3, config: { times: 2 } }
  - { name: after, handler: echo, depends_on: [flaky] }
"#,
        )
        .await;
    let task = system.wait_final(&system.submit("retries", "flaky", json!({})).await.id).await;
    assert_eq!(task.status(), pb::TaskStatus::Complete);
    let steps = steps_by_name(&task);
    let flaky = steps["flaky"];
    assert_eq!(flaky.attempts, 3);
    assert_eq!(
        path(flaky),
        [
            "pending",
            "enqueued",
            "in_progress",
            "waiting_for_retry",
            "enqueued",
            "in_progress",
            "waiting_for_retry",
            "enqueued",
            "in_progress",
            "complete"
        ]
    );
    // backoff: base 100 ms, multiplier 2, ±10 %: about 100 ms then about 200 ms, and the next
    // attempt never went out before its delay
    let waits = waits(flaky);
    assert_eq!(waits.len(), 2);
    for ((delay, waited), nominal) in waits.iter().zip([100.0, 200.0]) {
        let d = *delay as f64;
        assert!((nominal * 0.9 - 1.0..=nominal * 1.1 + 1.0).contains(&d), "delay {d} vs {nominal}");
        assert!(waited.num_milliseconds() as f64 >= d - 1.0, "dispatched after {waited} < {d} ms");
    }
    let after: Value = serde_json::from_str(&steps["after"].results_json).unwrap();
    assert_eq!(after["parents"]["flaky"]["attempt"], 3, "the child saw the successful attempt's results");
    assert!(ts(&steps["after"].started_at) > ts(&flaky.completed_at));
    system.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn exhausted_attempts_fail_the_step_and_stop_its_descendants_only() {
    let env = TestEnv::new().await;
    let system = start(&env).await;
    system
        .register(
            &env,
            r#"
namespace: retries
name: hopeless
version: 1.0.0
steps:
  - { name: root, handler: noop }
  - { name: hopeless, handler: fail, depends_on: [root], max_attempts: 3 }
  - { name: child, handler: noop, depends_on: [hopeless] }
  - { name: grandchild, handler: noop, depends_on: [child] }
  - { name: other, handler: sleep, depends_on: [root], config: { ms: 200 } }
"#,
        )
        .await;
    let task = system.wait_final(&system.submit("retries", "hopeless", json!({})).await.id).await;
    assert_eq!(task.status(), pb::TaskStatus::Error);
    let steps = steps_by_name(&task);
    assert_eq!(steps["hopeless"].status(), pb::StepStatus::Error);
    assert_eq!(steps["hopeless"].attempts, 3);
    assert_eq!(error_of(steps["hopeless"])["kind"], "retryable");
    for name in ["child", "grandchild"] {
        assert_eq!(steps[name].status(), pb::StepStatus::Pending, "{name}");
        assert_eq!(steps[name].attempts, 0, "{name} never ran");
    }
    assert_eq!(steps["other"].status(), pb::StepStatus::Complete);
    let last = ts(&steps["other"].completed_at).max(ts(&steps["hopeless"].completed_at));
    assert!(ts(&task.completed_at) >= last, "the task failed once nothing more could run");
    system.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn permanent_failures_and_single_attempts() {
    let env = TestEnv::new().await;
    let system = start(&env).await;
    system
        .register(
            &env,
            r#"
namespace: retries
name: once
version: 1.0.0
steps:
  - { name: permanent, handler: fail, max_attempts: 5, config: { permanent: true } }
  - { name: not_retryable, handler: fail, retryable: false, max_attempts: 5 }
  - { name: single_ok, handler: noop, max_attempts: 1, retryable: false }
  - { name: single_fail, handler: fail, max_attempts: 1 }
"#,
        )
        .await;
    let task = system.wait_final(&system.submit("retries", "once", json!({})).await.id).await;
    assert_eq!(task.status(), pb::TaskStatus::Error);
    let steps = steps_by_name(&task);
    for name in ["permanent", "not_retryable", "single_fail"] {
        assert_eq!(steps[name].status(), pb::StepStatus::Error, "{name}");
        assert_eq!(steps[name].attempts, 1, "{name}: no retry");
        assert_eq!(path(steps[name]), ["pending", "enqueued", "in_progress", "error"], "{name}");
    }
    assert_eq!(error_of(steps["permanent"])["kind"], "permanent");
    // the first attempt always runs, whatever `retryable` and `max_attempts` say
    assert_eq!(steps["single_ok"].status(), pb::StepStatus::Complete);
    assert_eq!(steps["single_ok"].attempts, 1);
    system.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn retry_after_overrides_the_backoff_capped_at_the_maximum() {
    let env = TestEnv::new().await;
    let system = start(&env).await;
    system
        .register(
            &env,
            r#"
namespace: retries
name: throttled
version: 1.0.0
steps:
  - { name: asks_700ms, handler: fail, max_attempts: 2, config: { times: 1, retry_after_ms: 700 } }
  - { name: asks_too_long, handler: fail, max_attempts: 2, config: { times: 1, retry_after_ms: 60000 } }
"#,
        )
        .await;
    let task = system.wait_final(&system.submit("retries", "throttled", json!({})).await.id).await;
    assert_eq!(task.status(), pb::TaskStatus::Complete);
    let steps = steps_by_name(&task);
    let asked = waits(steps["asks_700ms"]);
    assert_eq!(asked[0].0, 700, "the handler's delay, not the 100 ms backoff");
    assert!(asked[0].1.num_milliseconds() >= 699);
    let capped = waits(steps["asks_too_long"]);
    assert_eq!(capped[0].0, 2_000, "capped at the configured maximum (2 s in tests)");
    system.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_step_past_its_timeout_fails_as_timed_out_and_is_retried() {
    let env = TestEnv::new().await;
    let system = start(&env).await;
    system
        .register(
            &env,
            r#"
namespace: retries
name: slow
version: 1.0.0
steps:
  - { name: slow, handler: sleep, timeout: 200ms, max_attempts: 2, config: { ms: 5000 } }
"#,
        )
        .await;
    let task = system.wait_final(&system.submit("retries", "slow", json!({})).await.id).await;
    assert_eq!(task.status(), pb::TaskStatus::Error);
    let slow = &task.steps[0];
    assert_eq!(slow.attempts, 2, "the timeout follows the retry policy");
    assert_eq!(error_of(slow)["kind"], "timed_out");
    let failures: Vec<Value> = slow
        .transitions
        .iter()
        .filter(|t| matches!(t.to_state.as_str(), "waiting_for_retry" | "error"))
        .map(|t| metadata(t)["error"]["kind"].clone())
        .collect();
    assert_eq!(failures, [json!("timed_out"), json!("timed_out")]);
    system.stop().await;
    env.cleanup().await;
}

/// A worker that takes an attempt, says it started, and vanishes: the orchestrator fails the
/// attempt after timeout + grace, retries it on a real worker, and drops the old attempt's
/// late report.
#[tokio::test]
async fn a_vanished_worker_is_timed_out_by_the_orchestrator() {
    let env = TestEnv::new().await;
    env.uses_namespace("retries");
    let system = System::start(&env, vec![]).await;
    system
        .register(
            &env,
            r#"
namespace: retries
name: abandoned
version: 1.0.0
steps:
  - { name: abandoned, handler: echo, timeout: 300ms, max_attempts: 2 }
"#,
        )
        .await;
    let broker = env.broker().await;
    broker.declare_steps("retries").await.unwrap();
    let mut rogue = broker.consume::<StepExecution>(&broker.topology().steps_queue("retries"), 1).await.unwrap();
    let publisher = broker.publisher().await.unwrap();
    let task = system.submit("retries", "abandoned", json!({})).await;

    let taken = tokio::time::timeout(Duration::from_secs(30), rogue.next()).await.unwrap().unwrap();
    let exec = taken.message.clone().expect("an execution");
    assert_eq!(exec.attempt, 1);
    let report = |outcome| StepReport {
        task_id: exec.task_id.clone(),
        step_id: exec.step_id.clone(),
        attempt: 1,
        worker_id: "rogue".into(),
        outcome: Some(outcome),
        started_at_unix_ms: 0,
        trace_context: Default::default(),
    };
    publisher.send(&[Command::Report(report(Outcome::Started(Started {})))]).await.unwrap();
    taken.ack.ack().await.unwrap();
    drop(rogue);

    // the sweeper gives the attempt up and schedules attempt 2; a real worker takes it
    system.wait_for(&task.id, |t| t.steps[0].attempts == 2).await;
    let mut system = system;
    system.add_worker(&env, WorkerSpec::new("w1", &["retries"])).await;
    let done = system.wait_final(&task.id).await;
    assert_eq!(done.status(), pb::TaskStatus::Complete);
    let step = &done.steps[0];
    let timed_out = step.transitions.iter().find(|t| t.to_state == "waiting_for_retry").unwrap();
    assert_eq!(metadata(timed_out)["error"]["kind"], "timed_out");
    assert_eq!(metadata(timed_out)["attempt"], 1);

    // the vanished worker's late result for attempt 1 is dropped
    let late = report(Outcome::Completed(Completed { results_json: r#"{"late": true}"#.into() }));
    publisher.send(&[Command::Report(late)]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = system.wait_final(&task.id).await;
    assert_eq!(after.steps[0].results_json, step.results_json);
    assert_eq!(after.steps[0].transitions.len(), step.transitions.len());
    broker.close().await.unwrap();
    system.stop().await;
    env.cleanup().await;
}

/// An execution carries the task's context and its parents' results; one larger than
/// `limits.max_execution_bytes` is never published (past the broker's largest message it
/// would close the orchestrator's channel at every try): its attempt fails for good, and
/// the orchestrator keeps its connection.
#[tokio::test]
async fn an_execution_over_the_size_limit_fails_its_step_and_is_never_sent() {
    let mut env = TestEnv::new().await;
    env.config.limits.max_execution_bytes = 64 * 1024;
    let system = start(&env).await;
    system
        .register(
            &env,
            r#"
namespace: retries
name: fan_in
version: 1.0.0
steps:
  - { name: left, handler: echo }
  - { name: right, handler: echo }
  - { name: join, handler: echo, depends_on: [left, right] }
"#,
        )
        .await;
    // each parent echoes the 30 KB context: the join's execution carries about 90 KB
    let task = system.submit("retries", "fan_in", json!({ "blob": "x".repeat(30_000) })).await;
    let task = system.wait_final(&task.id).await;
    assert_eq!(task.status(), pb::TaskStatus::Error);
    let steps = steps_by_name(&task);
    assert_eq!(steps["left"].status(), pb::StepStatus::Complete);
    assert_eq!(steps["right"].status(), pb::StepStatus::Complete);
    let join = &steps["join"];
    assert_eq!((join.status(), join.attempts), (pb::StepStatus::Error, 1));
    let error = error_of(join);
    assert_eq!(error["kind"], "permanent");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.starts_with("execution refused: ") && message.contains("more than limits.max_execution_bytes (65536)"),
        "{message}"
    );
    let failed = join.transitions.iter().find(|t| t.to_state == "error").expect("failed");
    assert_eq!(serde_json::from_str::<Value>(&failed.metadata_json).unwrap()["worker"], "orchestrator");
    let metrics = tasker_test_support::http_get(system.orchestrator_admin, "/metrics").await;
    assert!(metrics.contains("tasker_broker_reconnects_total 0"), "{metrics}");
    system.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn results_over_the_size_limit_fail_the_step_permanently() {
    let mut env = TestEnv::new().await;
    env.config.limits.max_results_bytes = 64;
    let system = start(&env).await;
    system
        .register(
            &env,
            r#"
namespace: retries
name: chatty
version: 1.0.0
steps:
  - { name: chatty, handler: noop, config: { result: { text: "far more than sixty-four bytes of results, which the limit refuses" } } }
"#,
        )
        .await;
    let task = system.wait_final(&system.submit("retries", "chatty", json!({})).await.id).await;
    assert_eq!(task.status(), pb::TaskStatus::Error);
    let step = &task.steps[0];
    assert_eq!(step.attempts, 1);
    let error = error_of(step);
    assert_eq!(error["kind"], "permanent");
    assert!(error["message"].as_str().unwrap().contains("limit of 64"), "{error}");
    assert!(step.results_json.is_empty(), "nothing stored");
    system.stop().await;
    env.cleanup().await;
}
