//! The analytics API against a known mix: quick, slow, retried, failing and cancelled
//! tasks, every figure checked against what the mix must give.

use std::time::Duration;

use serde_json::json;
use tasker_proto::v1::{self as pb, analytics_service_client::AnalyticsServiceClient};
use tasker_test_support::{System, TestEnv, WorkerSpec};
use tonic::transport::Channel;

const TEMPLATES: [&str; 5] = [
    "namespace: stats\nname: quick\nversion: 1.0.0\nsteps:\n  - { name: a, handler: echo }\n  - { name: b, handler: echo, depends_on: [a] }\n",
    "namespace: stats\nname: slow\nversion: 1.0.0\nsteps:\n  - { name: s, handler: sleep, config: { ms: 1500 } }\n",
    "namespace: stats\nname: flaky\nversion: 1.0.0\nsteps:\n  - { name: f, handler: fail, max_attempts: 3, config: { times: 2 } }\n  - { name: g, handler: echo, depends_on: [f] }\n",
    "namespace: stats\nname: broken\nversion: 1.0.0\nsteps:\n  - { name: x, handler: fail, config: { permanent: true, message: card declined } }\n",
    "namespace: stats\nname: waits\nversion: 1.0.0\nsteps:\n  - { name: w, handler: sleep, config: { ms: 30000 } }\n",
];

fn client(system: &System) -> AnalyticsServiceClient<Channel> {
    AnalyticsServiceClient::new(system.channel())
}

fn find<'a>(performance: &'a pb::Performance, task: &str) -> &'a pb::PerformanceFigures {
    performance.by_task.iter().find(|f| f.task_name == task).unwrap_or_else(|| panic!("no figures for {task}"))
}

#[tokio::test]
async fn figures_match_a_known_mix_of_fast_slow_retried_failing_and_cancelled_tasks() {
    let env = TestEnv::new().await;
    let system = System::start(&env, vec![WorkerSpec::new("stats-worker", &["stats", "stats_other"])]).await;
    for yaml in TEMPLATES {
        system.register(&env, yaml).await;
    }
    system.register(&env, &TEMPLATES[0].replace("namespace: stats\n", "namespace: stats_other\n")).await;
    let mut analytics = client(&system);

    // a task that waits, seen as the oldest unfinished one, then cancelled
    let waiting = system.submit("stats", "waits", json!({})).await;
    system.wait_for(&waiting.id, |t| t.steps[0].status() == pb::StepStatus::InProgress).await;
    let health =
        analytics.get_system_health(pb::SystemHealthRequest { namespace: "stats".into() }).await.unwrap().into_inner();
    let oldest = health.oldest_unfinished_task.expect("an unfinished task");
    assert_eq!((oldest.task_id.as_str(), oldest.task_name.as_str()), (waiting.id.as_str(), "waits"));
    assert_eq!(oldest.status(), pb::TaskStatus::InProgress);
    assert!(oldest.age_seconds > 0.0);
    assert_eq!(health.steps_by_state.get("in_progress"), Some(&1));
    let mut tasks = system.tasks();
    tasks.cancel_task(pb::CancelTaskRequest { task_id: waiting.id.clone(), reason: "stats".into() }).await.unwrap();

    let mut ids = Vec::new();
    for (name, n) in [("quick", 4), ("slow", 2), ("flaky", 2), ("broken", 3)] {
        for i in 0..n {
            ids.push(system.submit("stats", name, json!({ "i": i })).await.id);
        }
    }
    ids.push(system.submit("stats_other", "quick", json!({})).await.id);
    for id in &ids {
        system.wait_final(id).await;
    }

    let performance = analytics
        .get_performance(pb::PerformanceRequest { window_seconds: 0, namespace: "stats".into() })
        .await
        .unwrap()
        .into_inner();
    let window = |p: &pb::Performance| p.window_end.unwrap().seconds - p.window_start.unwrap().seconds;
    assert_eq!(window(&performance), 3600, "the default window is an hour");
    let overall = performance.overall.as_ref().expect("overall figures");
    assert_eq!(overall.namespace, "");
    // 12 tasks: 8 complete (4 quick, 2 slow, 2 flaky), 3 error (broken), 1 cancelled
    assert_eq!(
        (overall.tasks_created, overall.tasks_completed, overall.tasks_failed, overall.tasks_cancelled),
        (12, 8, 3, 1)
    );
    assert!((overall.completion_rate - 8.0 / 12.0).abs() < 1e-9, "{}", overall.completion_rate);
    assert!((overall.error_rate - 3.0 / 12.0).abs() < 1e-9, "{}", overall.error_rate);
    assert!((overall.tasks_finished_per_minute - 12.0 / 60.0).abs() < 1e-6, "{}", overall.tasks_finished_per_minute);
    // attempts: quick 8, slow 2, flaky 3 + 3 of f (4 failed, retried) and 2 of g, broken 3
    // failed; the cancelled attempt did not end by running
    assert_eq!((overall.step_attempts, overall.step_attempts_failed), (21, 7));
    let task_durations = overall.task_duration_ms.unwrap();
    assert_eq!(task_durations.count, 11, "complete and error tasks have a duration");
    let by_name: Vec<&str> = performance.by_task.iter().map(|f| f.task_name.as_str()).collect();
    assert_eq!(by_name, ["broken", "flaky", "quick", "slow", "waits"], "by namespace, then name");
    let quick = find(&performance, "quick");
    assert_eq!(
        (quick.tasks_created, quick.tasks_completed, quick.step_attempts, quick.step_attempts_failed),
        (4, 4, 8, 0)
    );
    assert_eq!(quick.completion_rate, 1.0);
    let slow = find(&performance, "slow");
    let slow_steps = slow.step_duration_ms.unwrap();
    assert_eq!(slow_steps.count, 2);
    assert!(slow_steps.p50 >= 1500.0 && slow_steps.p99 >= slow_steps.p50, "{slow_steps:?}");
    assert!(slow.task_duration_ms.unwrap().p50 >= 1500.0);
    let flaky = find(&performance, "flaky");
    assert_eq!((flaky.tasks_completed, flaky.step_attempts, flaky.step_attempts_failed), (2, 8, 4));
    let broken = find(&performance, "broken");
    assert_eq!((broken.tasks_failed, broken.error_rate, broken.step_attempts_failed), (3, 1.0, 3));
    let waits = find(&performance, "waits");
    assert_eq!((waits.tasks_created, waits.tasks_cancelled, waits.step_attempts), (1, 1, 0));
    assert!(waits.task_duration_ms.unwrap().count == 0, "a cancelled task has no duration");

    // every namespace: the other namespace's task counts too
    let everything =
        analytics.get_performance(pb::PerformanceRequest::default()).await.unwrap().into_inner().overall.unwrap();
    assert_eq!((everything.tasks_created, everything.step_attempts), (13, 23));

    let bottlenecks = analytics
        .get_bottlenecks(pb::BottlenecksRequest { window_seconds: 0, namespace: "stats".into(), limit: 3 })
        .await
        .unwrap()
        .into_inner();
    let step_key = |s: &pb::StepFigures| format!("{}/{}/{}", s.namespace, s.task_name, s.step_name);
    assert_eq!(bottlenecks.slowest_steps.len(), 3, "the limit holds");
    assert_eq!(step_key(&bottlenecks.slowest_steps[0]), "stats/slow/s");
    assert!(bottlenecks.slowest_steps[0].duration_ms.unwrap().p95 >= 1500.0);
    assert_eq!(bottlenecks.slowest_tasks[0].task_name, "slow");
    let retried: Vec<(String, u64, u64)> =
        bottlenecks.most_retried_steps.iter().map(|s| (step_key(s), s.retries, s.failures)).collect();
    assert_eq!(retried, [("stats/flaky/f".to_owned(), 4, 0)], "only f was retried");
    let errors: Vec<(&str, u64)> = bottlenecks.top_errors.iter().map(|e| (e.message.as_str(), e.count)).collect();
    assert_eq!(errors[0], ("card declined", 3));
    assert_eq!(bottlenecks.top_errors[0].step_name, "x");
    assert!(
        errors.contains(&("planned failure of attempt 1", 2)) && errors.contains(&("planned failure of attempt 2", 2))
    );

    let health =
        analytics.get_system_health(pb::SystemHealthRequest { namespace: "stats".into() }).await.unwrap().into_inner();
    let tasks_by_state: Vec<(&str, u64)> = {
        let mut v: Vec<_> = health.tasks_by_state.iter().map(|(k, n)| (k.as_str(), *n)).collect();
        v.sort();
        v
    };
    assert_eq!(tasks_by_state, [("cancelled", 1), ("complete", 8), ("error", 3)]);
    assert_eq!(health.steps_by_state.get("complete"), Some(&14));
    assert_eq!(health.steps_by_state.get("error"), Some(&3));
    assert_eq!(health.steps_by_state.get("cancelled"), Some(&1));
    assert!(health.oldest_unfinished_task.is_none());
    assert_eq!((health.retry_backlog, health.retries_due), (0, 0));

    // a window that ends now and starts after all of it holds nothing
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let recent = analytics
        .get_performance(pb::PerformanceRequest { window_seconds: 1, namespace: "stats".into() })
        .await
        .unwrap()
        .into_inner();
    let nothing = recent.overall.unwrap();
    assert_eq!((nothing.tasks_created, nothing.step_attempts, nothing.tasks_completed), (0, 0, 0));
    assert!(recent.by_task.is_empty());

    // bad input names its field
    let too_long = analytics
        .get_performance(pb::PerformanceRequest { window_seconds: 31 * 24 * 3600, namespace: String::new() })
        .await
        .unwrap_err();
    assert_eq!(too_long.code(), tonic::Code::InvalidArgument);
    assert!(too_long.message().starts_with("window_seconds"), "{}", too_long.message());
    let limit = analytics
        .get_bottlenecks(pb::BottlenecksRequest { window_seconds: 60, namespace: String::new(), limit: 1000 })
        .await
        .unwrap_err();
    assert!(limit.message().starts_with("limit"), "{}", limit.message());

    system.stop().await;
    env.cleanup().await;
}
