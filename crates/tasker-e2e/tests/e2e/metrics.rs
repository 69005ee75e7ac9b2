//! `/metrics` after a known workload: the counters and histogram counts by namespace, task
//! and outcome that operators chart, scraped from each service's admin endpoint.

use std::time::Duration;

use serde_json::json;
use tasker_messaging::Command;
use tasker_proto::{
    messages::{Completed, StepReport, step_report::Outcome},
    v1 as pb,
};
use tasker_test_support::{System, TestEnv, WorkerSpec, http_get};

const TEMPLATES: [&str; 4] = [
    "namespace: metered\nname: quick\nversion: 1.0.0\nsteps:\n  - { name: a, handler: echo }\n  - { name: b, handler: echo, depends_on: [a] }\n",
    "namespace: metered\nname: flaky\nversion: 1.0.0\nsteps:\n  - { name: f, handler: fail, max_attempts: 2, config: { times: 1 } }\n",
    "namespace: metered\nname: broken\nversion: 1.0.0\nsteps:\n  - { name: x, handler: fail, config: { permanent: true } }\n",
    "namespace: metered\nname: waits\nversion: 1.0.0\nsteps:\n  - { name: w, handler: sleep, config: { ms: 3000 } }\n",
];

/// The value of the sample of `name` whose labels include every pair of `labels`.
fn sample(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, label_text) = match series.split_once('{') {
            Some((metric, rest)) => (metric, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let matches = metric == name && labels.iter().all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")));
        if matches { value.parse().ok() } else { None }
    })
}

fn expect(body: &str, name: &str, labels: &[(&str, &str)], value: f64) {
    assert_eq!(sample(body, name, labels), Some(value), "{name}{labels:?} in\n{body}");
}

#[tokio::test]
async fn metrics_count_a_known_workload_by_namespace_task_and_outcome() {
    let env = TestEnv::new().await;
    let system = System::start(&env, vec![WorkerSpec::new("metered-worker", &["metered"])]).await;
    for yaml in TEMPLATES {
        system.register(&env, yaml).await;
    }

    // a long step: in flight on its worker while it runs, then its task is cancelled
    let waiting = system.submit("metered", "waits", json!({})).await;
    system.wait_for(&waiting.id, |t| t.steps[0].status() == pb::StepStatus::InProgress).await;
    let worker = http_get(system.worker_admins[0], "/metrics").await;
    expect(&worker, "tasker_worker_steps_in_flight", &[], 1.0);
    system
        .tasks()
        .cancel_task(pb::CancelTaskRequest { task_id: waiting.id.clone(), reason: "metered".into() })
        .await
        .unwrap();

    let mut ids = Vec::new();
    for (name, n) in [("quick", 3), ("flaky", 1), ("broken", 2)] {
        for _ in 0..n {
            ids.push(system.submit("metered", name, json!({})).await.id);
        }
    }
    for id in &ids {
        system.wait_final(id).await;
    }
    // a report about a task nobody knows is dropped, and counted by why
    let broker = env.broker().await;
    let stray = StepReport {
        task_id: uuid::Uuid::now_v7().to_string(),
        step_id: uuid::Uuid::now_v7().to_string(),
        attempt: 1,
        worker_id: "stray".into(),
        outcome: Some(Outcome::Completed(Completed { results_json: "{}".into() })),
        ..Default::default()
    };
    broker.publisher().await.unwrap().send(&[Command::Report(stray)]).await.unwrap();

    let api = http_get(system.api_admin, "/metrics").await;
    let ns = ("namespace", "metered");
    for (task, n) in [("quick", 3.0), ("flaky", 1.0), ("broken", 2.0), ("waits", 1.0)] {
        expect(&api, "tasker_api_tasks_created_total", &[ns, ("task", task)], n);
    }
    expect(&api, "tasker_api_operator_actions_total", &[ns, ("task", "waits"), ("action", "cancel")], 1.0);
    expect(&api, "tasker_db_pool_max", &[], 8.0);
    assert!(sample(&api, "tasker_db_pool_connections", &[("state", "idle")]).is_some_and(|n| n >= 1.0));
    assert_eq!(sample(&api, "tasker_db_pool_waiting", &[]), Some(0.0));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let orchestrator = loop {
        let body = http_get(system.orchestrator_admin, "/metrics").await;
        if sample(&body, "tasker_orchestrator_reports_dropped_total", &[("reason", "unknown task")]).is_some() {
            break body;
        }
        assert!(tokio::time::Instant::now() < deadline, "the stray report was not counted:\n{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let o = |name: &str, task: &str, outcome: Option<&str>| {
        let mut labels = vec![ns, ("task", task)];
        labels.extend(outcome.map(|o| ("outcome", o)));
        sample(&orchestrator, name, &labels)
    };
    assert_eq!(o("tasker_orchestrator_tasks_finished_total", "quick", Some("complete")), Some(3.0));
    assert_eq!(o("tasker_orchestrator_tasks_finished_total", "flaky", Some("complete")), Some(1.0));
    assert_eq!(o("tasker_orchestrator_tasks_finished_total", "broken", Some("error")), Some(2.0));
    assert_eq!(o("tasker_orchestrator_task_duration_seconds_count", "quick", Some("complete")), Some(3.0));
    assert_eq!(o("tasker_orchestrator_task_duration_seconds_count", "broken", Some("error")), Some(2.0));
    assert_eq!(o("tasker_orchestrator_step_attempts_total", "quick", Some("complete")), Some(6.0));
    assert_eq!(o("tasker_orchestrator_step_attempts_total", "flaky", Some("retry")), Some(1.0));
    assert_eq!(o("tasker_orchestrator_step_attempts_total", "flaky", Some("complete")), Some(1.0));
    assert_eq!(o("tasker_orchestrator_step_attempts_total", "broken", Some("error")), Some(2.0));
    assert_eq!(o("tasker_orchestrator_step_run_seconds_count", "quick", Some("complete")), Some(6.0));
    assert_eq!(o("tasker_orchestrator_step_queue_wait_seconds_count", "quick", None), Some(6.0));
    assert_eq!(o("tasker_orchestrator_step_queue_wait_seconds_count", "waits", None), Some(1.0));
    assert_eq!(
        o("tasker_orchestrator_tasks_finished_total", "waits", Some("complete")),
        None,
        "cancelled, not finished"
    );
    expect(&orchestrator, "tasker_orchestrator_reports_dropped_total", &[("reason", "unknown task")], 1.0);
    // every hop (a batch that dispatched) is timed whole and by part, the parts adding up
    // to no more than the whole
    let hops = sample(&orchestrator, "tasker_orchestrator_hop_seconds_count", &[]).expect("hops counted");
    assert!(hops >= 1.0, "executions were dispatched: {hops} hops");
    let mut parts = 0.0;
    for phase in ["read", "apply", "write", "publish"] {
        let labels = [("phase", phase)];
        expect(&orchestrator, "tasker_orchestrator_hop_phase_seconds_count", &labels, hops);
        parts += sample(&orchestrator, "tasker_orchestrator_hop_phase_seconds_sum", &labels).expect("a part's sum");
    }
    let whole = sample(&orchestrator, "tasker_orchestrator_hop_seconds_sum", &[]).expect("the hops' sum");
    assert!(parts > 0.0 && parts <= whole * 1.0001, "parts {parts} s against the whole {whole} s");
    expect(&orchestrator, "tasker_broker_connected", &[], 1.0);

    let publisher = http_get(system.publisher_admin, "/metrics").await;
    assert!(sample(&publisher, "tasker_events_published_total", &[]).is_some_and(|n| n >= 30.0), "{publisher}");
    assert!(sample(&publisher, "tasker_events_relay_lag_seconds_count", &[]).is_some_and(|n| n >= 1.0));
    assert!(sample(&publisher, "tasker_events_outbox_depth", &[]).is_some());

    broker.close().await.unwrap();
    system.stop().await;
    env.cleanup().await;
}

/// task-api tells the orchestrator each small task as it created it, so a task's first
/// batch is decided from memory like the rest: every batch of a task run alone is one
/// round trip, and none found the task changed (the tests' debug builds also check each
/// such batch's task against the database before it goes on).
#[tokio::test]
async fn every_batch_of_a_created_task_is_decided_from_memory() {
    let env = TestEnv::new().await;
    let system = System::start(&env, vec![WorkerSpec::new("kept-worker", &["metered"])]).await;
    system.register(&env, TEMPLATES[0]).await;
    let task = system.submit("metered", "quick", json!({})).await;
    let done = system.wait_final(&task.id).await;
    assert_eq!(done.status(), pb::TaskStatus::Complete);
    // a start and a report for each of its two steps
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let body = loop {
        let body = http_get(system.orchestrator_admin, "/metrics").await;
        if sample(&body, "tasker_orchestrator_batches_total", &[]) == Some(3.0) {
            break body;
        }
        assert!(tokio::time::Instant::now() < deadline, "three batches were not counted:\n{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    expect(&body, "tasker_orchestrator_batches_from_kept_total", &[], 3.0);
    expect(&body, "tasker_orchestrator_kept_stale_total", &[], 0.0);
    system.stop().await;
    env.cleanup().await;
}
