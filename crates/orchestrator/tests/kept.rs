//! Batches decided from the tasks the orchestrator keeps in memory (one round trip), and
//! what happens when another writer changed a kept task meanwhile.

use std::time::Duration;

use orchestrator::{Decided, Engine, Outcome, Work};
use tasker_domain::{Backoff, Limits, Template};
use tasker_proto::messages::{Completed, StepReport, step_report};
use tasker_store::{Actor, Dispatch, Store, Workload};
use tasker_test_support::TestEnv;
use uuid::Uuid;

const CHAIN: &str = "namespace: kept\nname: chain\nversion: 1.0.0\nsteps:\n  - { name: a, handler: noop }\n  - { name: b, handler: noop, depends_on: [a] }\n  - { name: c, handler: noop, depends_on: [b] }\n";

/// A store, an engine on it and one task of `CHAIN`.
async fn setup(env: &TestEnv) -> (Store, Engine, Uuid) {
    let store = Store::connect(&env.config.database.url, 4, Workload::Keyed).await.unwrap();
    let template = Template::from_yaml(CHAIN, &Limits::default()).unwrap();
    let record = store.register_template(&template).await.unwrap().record;
    let new = tasker_test_support::new_task(&record);
    let task_id = store.create_task(&new).await.unwrap().task_id;
    (store.clone(), Engine::new(store, Backoff::default(), Limits::default()), task_id)
}

/// The worker's report that this execution completed.
fn completed(dispatch: &Dispatch) -> (Uuid, Work) {
    let report = StepReport {
        task_id: dispatch.task_id.to_string(),
        step_id: dispatch.step_id.to_string(),
        attempt: dispatch.attempt,
        worker_id: "test".into(),
        outcome: Some(step_report::Outcome::Completed(Completed { results_json: "{}".into() })),
        ..Default::default()
    };
    (dispatch.task_id, Work::Report(report))
}

/// The one execution a batch dispatched, by step name.
fn dispatched(outcome: &Outcome) -> &str {
    assert_eq!(outcome.dispatches.len(), 1, "{:?}", outcome.dispatches);
    &outcome.dispatches[0].step_name
}

async fn statuses(env: &TestEnv, task_id: Uuid) -> (String, Vec<String>) {
    let db = env.database().await;
    let task = db.query_one("SELECT status FROM tasks WHERE id = $1", &[&task_id]).await.unwrap().get(0);
    let steps = db
        .query("SELECT status FROM workflow_steps WHERE task_id = $1 ORDER BY name", &[&task_id])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    (task, steps)
}

/// A task's first batch reads it (and keeps it); its reports are then decided from what
/// was kept; once an operator has cancelled it, the next report finds it changed, is
/// decided again from the database, and is dropped: nothing moves a cancelled step.
#[tokio::test]
async fn a_kept_task_an_operator_changed_is_decided_again_from_the_database() {
    let env = TestEnv::new().await;
    let (store, engine, task_id) = setup(&env).await;
    let first = engine.apply(&[(task_id, Work::Evaluate)]).await.unwrap();
    assert_eq!((first.decided, dispatched(&first)), (Decided::FromReads, "a"));
    let second = engine.apply(&[completed(&first.dispatches[0])]).await.unwrap();
    assert_eq!((second.decided, dispatched(&second)), (Decided::FromKept, "b"));

    let actor = Actor { who: "operator".into(), reason: "test".into() };
    store.cancel_task(task_id, &actor).await.unwrap();
    let third = engine.apply(&[completed(&second.dispatches[0])]).await.unwrap();
    assert_eq!(third.decided, Decided::AgainFromReads);
    assert!(third.dispatches.is_empty(), "{:?}", third.dispatches);
    assert_eq!(
        statuses(&env, task_id).await,
        ("cancelled".into(), vec!["complete".into(), "cancelled".into(), "cancelled".into()])
    );
    env.cleanup().await;
}

/// Two replicas share the work: a report applied by one leaves the other's kept task
/// behind; the other's next batch on it finds that, reads the task again and goes on from
/// where the first left it. Sharing the task, it no longer keeps it.
#[tokio::test]
async fn a_kept_task_another_replica_moved_on_is_read_again() {
    let env = TestEnv::new().await;
    let (store, engine, task_id) = setup(&env).await;
    let replica = Engine::new(store, Backoff::default(), Limits::default());
    let first = engine.apply(&[(task_id, Work::Evaluate)]).await.unwrap();
    assert_eq!(dispatched(&first), "a");
    let by_replica = replica.apply(&[completed(&first.dispatches[0])]).await.unwrap();
    assert_eq!((by_replica.decided, dispatched(&by_replica)), (Decided::FromReads, "b"));

    let second = engine.apply(&[completed(&by_replica.dispatches[0])]).await.unwrap();
    assert_eq!((second.decided, dispatched(&second)), (Decided::AgainFromReads, "c"));
    let last = engine.apply(&[completed(&second.dispatches[0])]).await.unwrap();
    assert_eq!(last.decided, Decided::FromReads);
    assert!(last.dispatches.is_empty());
    assert_eq!(statuses(&env, task_id).await, ("complete".into(), vec!["complete".into(); 3]));
    env.cleanup().await;
}

/// Another replica's sweeper publishing an enqueued attempt again changes nothing a kept
/// task holds: the attempt's `enqueued_at` stays its enqueue (its queue wait counts from
/// it), so the replica keeping the task goes on deciding from it, in one round trip. The
/// sweeper's next look counts from the latest publication, not from the enqueue.
#[tokio::test]
async fn a_step_another_replica_republished_leaves_the_kept_task_as_it_was() {
    let env = TestEnv::new().await;
    let (store, engine, task_id) = setup(&env).await;
    let replica = Engine::new(store, Backoff::default(), Limits::default());
    let first = engine.apply(&[(task_id, Work::Evaluate)]).await.unwrap();
    let second = engine.apply(&[completed(&first.dispatches[0])]).await.unwrap();
    assert_eq!((second.decided, dispatched(&second)), (Decided::FromKept, "b"));
    let b = second.dispatches[0].step_id;
    let db = env.database().await;
    let enqueued_at = "SELECT enqueued_at, updated_at FROM workflow_steps WHERE id = $1";
    let before = db.query_one(enqueued_at, &[&b]).await.unwrap();

    tokio::time::sleep(Duration::from_secs(1)).await;
    let older_than = Duration::from_millis(900);
    let republished = replica.apply(&[(task_id, Work::Republish { step: b, older_than })]).await.unwrap();
    assert_eq!((dispatched(&republished), republished.dispatches[0].attempt), ("b", 1));
    let after = db.query_one(enqueued_at, &[&b]).await.unwrap();
    let at = |row: &tokio_postgres::Row, i| row.get::<_, chrono::DateTime<chrono::Utc>>(i);
    assert_eq!(at(&after, 0), at(&before, 0), "the attempt's enqueue is kept");
    assert!(at(&after, 1) > at(&before, 1), "the publication is recorded");
    // published just now: another sweep finds it not yet due, though enqueued long ago
    let again = replica.apply(&[(task_id, Work::Republish { step: b, older_than })]).await.unwrap();
    assert!(again.dispatches.is_empty(), "{:?}", again.dispatches);

    let third = engine.apply(&[completed(&second.dispatches[0])]).await.unwrap();
    assert_eq!((third.decided, dispatched(&third)), (Decided::FromKept, "c"));
    // the second run of b, reported too, is the same attempt's: dropped
    let duplicate = engine.apply(&[completed(&republished.dispatches[0])]).await.unwrap();
    assert!(duplicate.dispatches.is_empty(), "{:?}", duplicate.dispatches);
    engine.apply(&[completed(&third.dispatches[0])]).await.unwrap();
    assert_eq!(statuses(&env, task_id).await, ("complete".into(), vec!["complete".into(); 3]));
    env.cleanup().await;
}
