//! Retention: finished tasks older than `orchestrator.retention` go, with their steps and
//! history; unfinished ones stay, however old.

use std::time::Duration;

use serde_json::json;
use tasker_proto::v1 as pb;
use tasker_test_support::{System, TestEnv, WorkerSpec, http_get};

#[tokio::test]
async fn finished_tasks_past_retention_are_deleted_with_their_history() {
    let env = TestEnv::new().await;
    let mut config = env.config.clone();
    config.orchestrator.retention = Some(Duration::from_secs(2));
    let system = System::start_with(&env, config, vec![WorkerSpec::new("keeper", &["kept"])]).await;
    system.register(&env, "namespace: kept\nname: quick\nversion: 1.0.0\nsteps:\n  - { name: a, handler: echo }\n  - { name: b, handler: echo, depends_on: [a] }\n").await;
    system.register(&env, "namespace: kept\nname: slow\nversion: 1.0.0\nsteps:\n  - { name: s, handler: sleep, config: { ms: 6000 } }\n").await;

    let slow = system.submit("kept", "slow", json!({})).await;
    let quick = system.submit("kept", "quick", json!({})).await;
    assert_eq!(system.wait_final(&quick.id).await.status(), pb::TaskStatus::Complete);
    // just finished: still there
    let mut tasks = system.tasks();
    let get = |id: &str| pb::GetTaskRequest { task_id: id.to_owned(), include_transitions: false };
    assert!(tasks.get_task(get(&quick.id)).await.is_ok());

    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match tasks.get_task(get(&quick.id)).await {
            Err(status) if status.code() == tonic::Code::NotFound => break,
            _ => {
                assert!(tokio::time::Instant::now() < deadline, "the finished task was never deleted");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    // its steps, edges and history went with it; the running task is untouched
    let db = env.database().await;
    let id: uuid::Uuid = quick.id.parse().unwrap();
    for table in ["workflow_steps", "workflow_step_edges", "task_transitions", "workflow_step_transitions"] {
        let left: i64 =
            db.query_one(&format!("SELECT count(*) FROM {table} WHERE task_id = $1"), &[&id]).await.unwrap().get(0);
        assert_eq!(left, 0, "{table}");
    }
    let running = tasks.get_task(get(&slow.id)).await.expect("an unfinished task is kept").into_inner();
    assert_eq!(running.status(), pb::TaskStatus::InProgress);
    let metrics = http_get(system.orchestrator_admin, "/metrics").await;
    assert!(
        metrics.lines().any(|l| l.starts_with("tasker_orchestrator_tasks_retired_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );

    system.stop().await;
    env.cleanup().await;
}
