//! The walking skeleton: a diamond through all four services, and a permanent failure.

use serde_json::json;
use tasker_proto::v1 as pb;
use tasker_test_support::{System, TestEnv, WorkerSpec};

use crate::support::*;

const DIAMOND: &str = r#"
namespace: shapes
name: diamond
version: 1.0.0
steps:
  - { name: start, handler: echo }
  - { name: b1, handler: sleep, depends_on: [start], config: { ms: 300 } }
  - { name: b2, handler: sleep, depends_on: [start], config: { ms: 300 } }
  - { name: c1, handler: echo, depends_on: [b1] }
  - { name: c2, handler: echo, depends_on: [b2] }
  - { name: merge, handler: echo, depends_on: [c1, c2] }
  - { name: end, handler: echo, depends_on: [merge] }
"#;

#[tokio::test]
async fn diamond_completes_in_dependency_order_with_matching_events() {
    let env = TestEnv::new().await;
    let system = System::start(&env, vec![WorkerSpec::new("w1", &["shapes"])]).await;
    system.register(&env, DIAMOND).await;
    let patterns = ["#.task.completed", "*.*.step.*"];
    let (_broker, mut events) = env.subscribe(&patterns).await;

    let created = system.submit("shapes", "diamond", json!({ "order_id": 42 })).await;
    assert_eq!(created.status(), pb::TaskStatus::Pending);
    assert_eq!(created.steps.len(), 7);
    let task = system.wait_final(&created.id).await;
    let received = collect_until(&mut events, |r| r.iter().any(|e| e.kind() == "dev.tasker.task.completed")).await;

    // the task and every step complete, once each, along the legal path
    assert_eq!(task.status(), pb::TaskStatus::Complete);
    for step in &task.steps {
        assert_eq!(step.status(), pb::StepStatus::Complete, "{}", step.name);
        assert_eq!(step.attempts, 1, "{}", step.name);
        assert_eq!(path(step), ["pending", "enqueued", "in_progress", "complete"], "{}", step.name);
    }
    assert_parents_first(&task);
    let steps = steps_by_name(&task);
    // independent branches overlapped
    let (b1, b2) = (steps["b1"], steps["b2"]);
    assert!(ts(&b1.started_at) < ts(&b2.completed_at) && ts(&b2.started_at) < ts(&b1.completed_at));
    // each handler saw its parents' results by name, and the context
    let merge: serde_json::Value = serde_json::from_str(&steps["merge"].results_json).unwrap();
    assert_eq!(merge["context"]["order_id"], 42);
    assert_eq!(merge["parents"]["c1"]["parents"]["b1"]["slept_ms"], 300);
    assert!(merge["parents"]["c2"].is_object());

    // exactly the matching events, valid CloudEvents, one per step transition
    for r in &received {
        assert_cloud_event(r);
        assert_eq!(r.task_id(), task.id);
        assert!(patterns.iter().any(|p| topic_matches(p, &r.routing_key)), "unexpected {}", r.routing_key);
    }
    let task_events: Vec<_> = received.iter().filter(|r| r.kind().starts_with("dev.tasker.task.")).collect();
    assert_eq!(task_events.len(), 1, "only task.completed matches: {task_events:?}");
    let step_transitions: usize = task.steps.iter().map(|s| s.transitions.len()).sum();
    assert_eq!(received.len() - 1, step_transitions, "one event per step transition");
    assert_eq!(received.last().unwrap().kind(), "dev.tasker.task.completed");
    // per step, events arrive in transition order
    for step in &task.steps {
        let seen: Vec<(String, String)> =
            received.iter().filter(|r| r.step_name() == Some(step.name.as_str())).map(Received::transition).collect();
        let recorded: Vec<(String, String)> =
            step.transitions.iter().map(|t| (t.from_state.clone(), t.to_state.clone())).collect();
        assert_eq!(seen, recorded, "{}", step.name);
    }
    // and no step started (by the events) before its parents completed
    let position = |step: &str, kind: &str| {
        received.iter().position(|r| r.step_name() == Some(step) && r.kind() == kind).expect("event received")
    };
    for edge in &task.edges {
        assert!(
            position(&edge.to_step, "dev.tasker.step.started") > position(&edge.from_step, "dev.tasker.step.completed"),
            "{} -> {}",
            edge.from_step,
            edge.to_step
        );
    }
    system.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn permanent_failure_stops_its_descendants_but_not_other_branches() {
    let env = TestEnv::new().await;
    let system = System::start(&env, vec![WorkerSpec::new("w1", &["shapes"])]).await;
    system
        .register(
            &env,
            r#"
namespace: shapes
name: branchy
version: 1.0.0
steps:
  - { name: root, handler: noop }
  - { name: doomed, handler: fail, depends_on: [root], config: { permanent: true, message: card declined } }
  - { name: never, handler: noop, depends_on: [doomed] }
  - { name: side, handler: sleep, depends_on: [root], config: { ms: 400 } }
  - { name: side_after, handler: noop, depends_on: [side] }
"#,
        )
        .await;
    let created = system.submit("shapes", "branchy", json!({})).await;
    let task = system.wait_final(&created.id).await;

    assert_eq!(task.status(), pb::TaskStatus::Error);
    let steps = steps_by_name(&task);
    let doomed = steps["doomed"];
    assert_eq!(doomed.status(), pb::StepStatus::Error);
    assert_eq!(doomed.attempts, 1);
    let error: serde_json::Value = serde_json::from_str(&doomed.last_error_json).unwrap();
    assert_eq!(error["kind"], "permanent");
    assert_eq!(error["message"], "card declined");
    let never = steps["never"];
    assert_eq!(never.status(), pb::StepStatus::Pending);
    assert_eq!(never.attempts, 0);
    assert!(never.transitions.is_empty());
    for name in ["root", "side", "side_after"] {
        assert_eq!(steps[name].status(), pb::StepStatus::Complete, "{name}");
    }
    // the task failed only once nothing more could run
    assert!(ts(&task.completed_at) >= ts(&steps["side_after"].completed_at));
    let failed = task.transitions.last().unwrap();
    assert_eq!((failed.from_state.as_str(), failed.to_state.as_str()), ("in_progress", "error"));
    // it says what it left unfinished: `doomed` (failed) and `never` (waiting on it)
    assert_eq!(metadata(failed)["unfinished_steps"], 2);
    system.stop().await;
    env.cleanup().await;
}
