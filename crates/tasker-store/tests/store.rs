//! The store against a real Postgres: transitions, their audit rows and events.

use serde_json::json;
use tasker_domain::{Limits, StepState, TaskState, Template};
use tasker_store::{NewTask, Standing, StepChange, Store};
use tasker_test_support::TestEnv;

/// How long a claim of the outbox may wait, idle, for the broker (the relay's own bound).
const HOLD: std::time::Duration = std::time::Duration::from_secs(35);

const TEMPLATE: &str = r#"
namespace: store
name: chain
version: 1.0.0
steps:
  - { name: a, handler: noop }
  - { name: b, handler: noop, depends_on: [a], max_attempts: 2 }
  - { name: c, handler: noop, depends_on: [b] }
"#;

async fn setup(env: &TestEnv) -> (Store, uuid::Uuid) {
    setup_with(env, TEMPLATE).await
}

/// A store and one task of this template.
async fn setup_with(env: &TestEnv, yaml: &str) -> (Store, uuid::Uuid) {
    let store = Store::connect(&env.config.database.url, 4, tasker_store::Workload::General).await.unwrap();
    let template = Template::from_yaml(yaml, &Limits::default()).unwrap();
    let record = store.register_template(&template).await.unwrap().record;
    let new = NewTask { context: r#"{"n": 12345678901234567890.123456789}"#, ..new_task(&record, false) };
    let task = store.create_task(&new).await.unwrap().task_id;
    (store, task)
}

/// Walks the chain: a completes, b fails once and retries, then everything completes.
async fn run_chain(store: &Store, task_id: uuid::Uuid) {
    let mut tx = store.begin().await.unwrap();
    let mut task = tx.lock_tasks(&[task_id]).await.unwrap().remove(&task_id).unwrap();
    tx.transition_task(&mut task, TaskState::InProgress, json!({})).unwrap();
    let subject = task.subject();
    let mut ready = tx.ready_steps(&[task_id]).await.unwrap();
    assert_eq!(ready.len(), 1);
    let mut a = ready.remove(0);
    for to in [StepState::Enqueued, StepState::InProgress] {
        tx.transition_step(&subject, &mut a, to, json!({}), StepChange::default()).unwrap();
    }
    let change = StepChange { results: Some(r#"{"x": 1}"#.into()), ..Default::default() };
    tx.transition_step(&subject, &mut a, StepState::Complete, json!({}), change).unwrap();
    let mut children = tx.release_children(&[a.id]).await.unwrap();
    assert_eq!(children.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["b"]);
    let mut b = children.remove(0);
    for to in [StepState::Enqueued, StepState::InProgress, StepState::WaitingForRetry, StepState::Enqueued] {
        tx.transition_step(&subject, &mut b, to, json!({}), StepChange::default()).unwrap();
    }
    tx.commit().await.unwrap();

    let mut tx = store.begin().await.unwrap();
    let mut task = tx.lock_tasks(&[task_id]).await.unwrap().remove(&task_id).unwrap();
    let subject = task.subject();
    let mut b = tx.steps(&[b.id]).await.unwrap().remove(0);
    assert_eq!((b.status, b.attempts), (StepState::Enqueued, 2));
    for to in [StepState::InProgress, StepState::Complete] {
        tx.transition_step(&subject, &mut b, to, json!({}), StepChange::default()).unwrap();
    }
    let mut c = tx.release_children(&[b.id]).await.unwrap().remove(0);
    for to in [StepState::Enqueued, StepState::InProgress, StepState::Complete] {
        tx.transition_step(&subject, &mut c, to, json!({}), StepChange::default()).unwrap();
    }
    assert!(!tx.progress(&[task_id]).await.unwrap().contains_key(&task_id), "no unfinished step");
    tx.transition_task(&mut task, TaskState::Complete, json!({})).unwrap();
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn every_transition_is_recorded_once_with_its_event() {
    let env = TestEnv::new().await;
    let (store, task_id) = setup(&env).await;
    let db = env.database().await;
    // the history is append-only: a row once written is never changed
    db.batch_execute(
        "CREATE FUNCTION refuse_update() RETURNS trigger LANGUAGE plpgsql AS \
           $$ BEGIN RAISE EXCEPTION '% rows are never updated', TG_TABLE_NAME; END $$; \
         CREATE TRIGGER append_only BEFORE UPDATE ON task_transitions \
           FOR EACH ROW EXECUTE FUNCTION refuse_update(); \
         CREATE TRIGGER append_only BEFORE UPDATE ON workflow_step_transitions \
           FOR EACH ROW EXECUTE FUNCTION refuse_update();",
    )
    .await
    .unwrap();
    run_chain(&store, task_id).await;

    // each owner: sort keys 1..n, the last one the owner's `last_sort_key`, its state the
    // owner's status
    for (table, owner, status_table) in
        [("task_transitions", "task_id", "tasks"), ("workflow_step_transitions", "workflow_step_id", "workflow_steps")]
    {
        let rows = db
            .query(
                &format!(
                    "SELECT o.id, o.status, array_agg(t.sort_key ORDER BY t.sort_key), o.last_sort_key, \
                       (SELECT to_state FROM {table} x WHERE x.{owner} = o.id AND x.sort_key = o.last_sort_key) \
                     FROM {status_table} o JOIN {table} t ON t.{owner} = o.id GROUP BY o.id, o.status"
                ),
                &[],
            )
            .await
            .unwrap();
        assert!(!rows.is_empty(), "{table} has rows");
        for row in rows {
            let keys: Vec<i32> = row.get(2);
            assert_eq!(keys, (1..=keys.len() as i32).collect::<Vec<_>>(), "{table}: contiguous sort keys");
            assert_eq!(row.get::<_, i32>(3), keys.len() as i32, "{table}: the owner keeps its last sort key");
            assert_eq!(
                Some(row.get::<_, String>(1)),
                row.get::<_, Option<String>>(4),
                "{table}: status matches the last transition"
            );
        }
    }
    let steps: Vec<(String, String, i32)> = db
        .query("SELECT name, status, attempts FROM workflow_steps ORDER BY dependency_level", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        steps,
        [("a".into(), "complete".into(), 1), ("b".into(), "complete".into(), 2), ("c".into(), "complete".into(), 1)]
    );
    // every transition has exactly one event, with the transition's id
    let orphans: i64 = db
        .query_one(
            "SELECT count(*) FROM (SELECT id FROM task_transitions UNION ALL SELECT id FROM workflow_step_transitions) t \
             WHERE (SELECT count(*) FROM outbox o, unnest(o.event_ids) e WHERE e = t.id) <> 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(orphans, 0);
    let transitions: i64 = db
        .query_one(
            "SELECT (SELECT count(*) FROM task_transitions) + (SELECT count(*) FROM workflow_step_transitions)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let events: i64 = db.query_one("SELECT sum(cardinality(event_ids))::int8 FROM outbox", &[]).await.unwrap().get(0);
    assert_eq!(transitions, events);
    // the context keeps its precision
    let context: String = db.query_one("SELECT context::text FROM tasks", &[]).await.unwrap().get(0);
    assert!(context.contains("12345678901234567890.123456789"), "{context}");
    drop(db);
    env.cleanup().await;
}

/// The relay claims whole outbox rows (a transaction's events, as a rule), oldest first, and
/// every event comes out once, each owner's in the order of its transitions.
#[tokio::test]
async fn the_relay_claims_every_event_once_in_the_order_made() {
    let env = TestEnv::new().await;
    let (store, task_id) = setup(&env).await;
    run_chain(&store, task_id).await;
    let db = env.database().await;

    // the oldest row is the create's, with its one event
    let first = store.claim_outbox(1, HOLD).await.unwrap().expect("no other relay holds the lock");
    assert_eq!(first.claimed(), 1);
    let keys: Vec<&str> = first.events.iter().map(|r| r.routing_key.as_str()).collect();
    assert_eq!(keys, ["store.chain.task.created"]);
    let created = first.events[0].event_id;
    first.release().await.unwrap();

    let all = store.claim_outbox(1_000, HOLD).await.unwrap().expect("no other relay holds the lock");
    let rows: i64 = db.query_one("SELECT count(*) FROM outbox", &[]).await.unwrap().get(0);
    assert_eq!(all.claimed() as i64, rows);
    assert!(all.events.len() > all.claimed(), "rows hold several events: {} in {}", all.events.len(), all.claimed());
    assert_eq!(all.events[0].event_id, created, "released, then claimed again first");
    // each transition's event once, and each owner's events in its sort-key order
    let transitions = db
        .query(
            "SELECT id, task_id, sort_key FROM task_transitions \
             UNION ALL SELECT id, workflow_step_id, sort_key FROM workflow_step_transitions",
            &[],
        )
        .await
        .unwrap();
    let by_id: std::collections::HashMap<uuid::Uuid, (uuid::Uuid, i32)> =
        transitions.iter().map(|r| (r.get(0), (r.get(1), r.get(2)))).collect();
    assert_eq!(all.events.len(), by_id.len());
    let mut last: std::collections::HashMap<uuid::Uuid, i32> = Default::default();
    for event in &all.events {
        let (owner, sort_key) = by_id[&event.event_id];
        let payload: serde_json::Value = serde_json::from_str(&event.payload).unwrap();
        assert_eq!(payload["id"], event.event_id.to_string());
        assert_eq!(payload["routingkey"], event.routing_key);
        let previous = last.insert(owner, sort_key).unwrap_or(0);
        assert_eq!(sort_key, previous + 1, "{owner}: events in transition order");
    }
    all.complete().await.unwrap();
    assert_eq!(store.outbox_depth().await.unwrap(), 0);
    let left: i64 = db.query_one("SELECT count(*) FROM outbox", &[]).await.unwrap().get(0);
    assert_eq!(left, 0);
    drop(db);
    env.cleanup().await;
}

/// A claim waits for the broker's confirms as long as the relay asks, past the statement
/// timeout that ends every other session idle in a transaction: ended under the relay, it
/// would give its rows back undeleted, to be published again for as long as confirms
/// stayed that slow.
#[tokio::test]
async fn a_claim_of_the_outbox_outlasts_the_statement_timeout_for_the_broker() {
    let env = TestEnv::new().await;
    let (_, task_id) = setup(&env).await;
    let timeout = std::time::Duration::from_millis(500);
    let store = Store::connect_with(&env.config.database.url, 2, tasker_store::Workload::Keyed, timeout).await.unwrap();
    let db = env.database().await;

    // another transaction left idle that long is ended by the server
    let mut tx = store.begin().await.unwrap();
    tx.lock_tasks(&[task_id]).await.unwrap();
    tokio::time::sleep(timeout * 3).await;
    assert!(tx.commit().await.is_err(), "an idle transaction outlived the statement timeout");

    // the claim, asked to wait for the broker for 5 s, is still there after 1.5 s
    let batch = store.claim_outbox(100, std::time::Duration::from_secs(5)).await.unwrap().expect("the relay lock");
    assert!(batch.claimed() > 0);
    tokio::time::sleep(timeout * 3).await;
    batch.complete().await.expect("the claim outlived the statement timeout");
    let left: i64 = db.query_one("SELECT count(*) FROM outbox", &[]).await.unwrap().get(0);
    assert_eq!(left, 0, "the relayed rows were deleted");

    // and held no longer than asked: a claim left idle past its hold is ended too (a
    // second task gives it rows to claim)
    setup(&env).await;
    let batch = store.claim_outbox(100, timeout).await.unwrap().expect("the relay lock");
    tokio::time::sleep(timeout * 3).await;
    assert!(batch.complete().await.is_err(), "a claim outlived its hold");
    drop(db);
    env.cleanup().await;
}

#[tokio::test]
async fn illegal_transitions_are_refused_and_nothing_is_written() {
    let env = TestEnv::new().await;
    let (store, task_id) = setup(&env).await;
    let mut tx = store.begin().await.unwrap();
    let mut task = tx.lock_tasks(&[task_id]).await.unwrap().remove(&task_id).unwrap();
    let mut a = tx.ready_steps(&[task_id]).await.unwrap().remove(0);
    let error = tx.transition_step(&task.subject(), &mut a, StepState::Complete, json!({}), StepChange::default());
    assert_eq!(error.unwrap_err().to_string(), "illegal step transition from pending to complete");
    assert!(tx.transition_task(&mut task, TaskState::Complete, json!({})).is_err());
    tx.commit().await.unwrap();

    let db = env.database().await;
    let step_rows: i64 = db.query_one("SELECT count(*) FROM workflow_step_transitions", &[]).await.unwrap().get(0);
    let task_status: String = db.query_one("SELECT status FROM tasks", &[]).await.unwrap().get(0);
    let statuses: Vec<String> =
        db.query("SELECT DISTINCT status FROM workflow_steps", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!((step_rows, task_status.as_str(), statuses), (0, "pending", vec!["pending".to_owned()]));
    drop(db);
    env.cleanup().await;
}

/// A task read in whole (its steps and edges) is fenced by its sort keys: a transaction
/// fenced with the keys as read commits; once anyone has moved a step, the same fence
/// aborts it, nothing it sent is written, and the store goes on serving.
#[tokio::test]
async fn a_task_read_in_whole_is_fenced_by_its_sort_keys() {
    let env = TestEnv::new().await;
    let (store, task_id) = setup(&env).await;
    let mut tx = store.begin().await.unwrap();
    let mut loaded = tx.load_batch(&[task_id], &[], &[], &[], (&[task_id], 3)).await.unwrap();
    let head = loaded.tasks.remove(&task_id).unwrap();
    let whole = loaded.whole.remove(&task_id).expect("three steps, no more than asked for");
    let id_of = |name: &str| whole.steps.values().find(|s| s.name == name).unwrap().id;
    let (a, b, c) = (id_of("a"), id_of("b"), id_of("c"));
    assert_eq!((whole.steps.len(), whole.children.len()), (3, 2));
    assert_eq!((&whole.children[&a], &whole.children[&b]), (&vec![b], &vec![c]));
    let keys = |whole: &tasker_store::WholeTask| whole.steps.values().map(|s| i64::from(s.sort_key())).sum::<i64>();
    let too_big = tx.load_batch(&[task_id], &[], &[], &[], (&[task_id], 2)).await.unwrap();
    assert!(too_big.whole.is_empty(), "a task with more steps than asked for is not read in whole");
    tx.commit().await.unwrap();

    // unchanged: the fence passes and the transaction's writes commit
    let mut tx = store.begin().await.unwrap();
    tx.fence([(&head, keys(&whole))], []);
    let mut started = head.clone();
    tx.transition_task(&mut started, TaskState::InProgress, json!({})).unwrap();
    tx.commit().await.unwrap();

    // kept as it was before that commit: the fence finds the task changed
    let mut tx = store.begin().await.unwrap();
    tx.fence([(&head, keys(&whole))], []);
    let mut again = head.clone();
    tx.transition_task(&mut again, TaskState::InProgress, json!({})).unwrap();
    let error = tx.commit().await.unwrap_err();
    assert!(error.is_stale_kept(), "{error}");

    // a step moved by another writer changes only the steps' keys: found too
    let mut tx = store.begin().await.unwrap();
    let task = tx.lock_tasks(&[task_id]).await.unwrap().remove(&task_id).unwrap();
    let mut moved = tx.steps(&[a]).await.unwrap().remove(0);
    tx.transition_step(&task.subject(), &mut moved, StepState::Enqueued, json!({}), StepChange::default()).unwrap();
    tx.commit().await.unwrap();
    let mut tx = store.begin().await.unwrap();
    tx.fence([(&started, keys(&whole))], []);
    let mut cancelled = whole.steps[&c].clone();
    tx.transition_step(&started.subject(), &mut cancelled, StepState::Cancelled, json!({}), StepChange::default())
        .unwrap();
    let error = tx.progress(&[task_id]).await.unwrap_err();
    assert!(error.is_stale_kept(), "{error}");
    drop(tx);

    let db = env.database().await;
    let tasks: Vec<String> = db
        .query("SELECT to_state FROM task_transitions WHERE task_id = $1 ORDER BY sort_key", &[&task_id])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let steps: Vec<String> = db
        .query("SELECT status FROM workflow_steps WHERE id = ANY($1) ORDER BY name", &[&vec![a, b, c]])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(tasks, ["pending", "in_progress"], "the stale transactions wrote nothing");
    assert_eq!(steps, ["enqueued", "pending", "pending"]);
    drop(db);
    env.cleanup().await;
}

/// A writer that waited for a task's lock sees what the holder committed: its transition
/// follows the holder's (the next sort key), it does not collide with it.
#[tokio::test]
async fn a_writer_that_waited_for_the_lock_continues_the_history() {
    let env = TestEnv::new().await;
    let (store, task_id) = setup(&env).await;

    let mut first = store.begin().await.unwrap();
    let mut task = first.lock_task(task_id).await.unwrap();
    first.transition_task(&mut task, TaskState::InProgress, json!({})).unwrap();

    let waiting = tokio::spawn({
        let store = store.clone();
        async move {
            let mut second = store.begin().await.unwrap();
            let mut task = second.lock_task(task_id).await.unwrap();
            assert_eq!(task.status, TaskState::InProgress, "the waiter sees the committed status");
            second.transition_task(&mut task, TaskState::Cancelled, json!({})).unwrap();
            second.commit().await
        }
    });
    // commit only once the second transaction is waiting for the lock
    let db = env.database().await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let waiting_on_locks: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting_on_locks == 1 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the second writer never waited for the lock");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(!waiting.is_finished());
    first.commit().await.unwrap();
    waiting.await.unwrap().unwrap();

    let rows = db
        .query(
            "SELECT to_state, sort_key, sort_key = (SELECT last_sort_key FROM tasks WHERE id = $1) \
             FROM task_transitions WHERE task_id = $1 ORDER BY sort_key",
            &[&task_id],
        )
        .await
        .unwrap();
    let history: Vec<(String, i32, bool)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(
        history,
        [("pending".into(), 1, false), ("in_progress".into(), 2, false), ("cancelled".into(), 3, true)]
    );
    drop(db);
    env.cleanup().await;
}

/// How a batch reads a task's other steps stand does not stop at its first pass over a
/// big task's unfinished steps: a live step behind forty that are not is still found, and
/// without it the task is seen to be stuck.
#[tokio::test]
async fn a_big_tasks_standing_looks_past_its_first_steps() {
    let env = TestEnv::new().await;
    let mut yaml = String::from(
        "namespace: store\nname: wide\nversion: 1.0.0\nsteps:\n  - { name: root, handler: noop }\n  - { name: other, handler: noop }\n",
    );
    for i in 0..40 {
        yaml.push_str(&format!("  - {{ name: x{i}, handler: noop, depends_on: [root] }}\n"));
    }
    let (store, task_id) = setup_with(&env, &yaml).await;

    // root fails for good, `other` waits for a retry, the forty wait on root: the task's
    // unfinished steps, by status, are `error`, forty `pending`, then `waiting_for_retry`
    let mut tx = store.begin().await.unwrap();
    let mut task = tx.lock_task(task_id).await.unwrap();
    tx.transition_task(&mut task, TaskState::InProgress, json!({})).unwrap();
    let subject = task.subject();
    let ready = tx.ready_steps(&[task_id]).await.unwrap();
    assert_eq!(ready.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["root", "other"]);
    let (mut root, mut other) = (ready[0].clone(), ready[1].clone());
    for to in [StepState::Enqueued, StepState::InProgress, StepState::Error] {
        tx.transition_step(&subject, &mut root, to, json!({}), StepChange::default()).unwrap();
    }
    for to in [StepState::Enqueued, StepState::InProgress, StepState::WaitingForRetry] {
        tx.transition_step(&subject, &mut other, to, json!({}), StepChange::default()).unwrap();
    }
    tx.commit().await.unwrap();

    let mut tx = store.begin().await.unwrap();
    let all = tx.load_batch(&[task_id], &[], &[], &[], (&[], 0)).await.unwrap().standing[&task_id];
    assert_eq!(all, Standing { unfinished: true, live: true }, "the step waiting for its retry is live");
    let rest = tx.load_batch(&[task_id], &[other.id], &[], &[], (&[], 0)).await.unwrap().standing[&task_id];
    assert_eq!(rest, Standing { unfinished: true, live: false }, "without it nothing can run");
    let progress = tx.progress(&[task_id]).await.unwrap()[&task_id];
    assert_eq!((progress.unfinished, progress.active, progress.ready), (42, 1, 0));
    tx.rollback().await.unwrap();
    env.cleanup().await;
}

/// GetTask's read: a task with its own steps, its edges by name (parents by dependency
/// level and name, then children by name), and its history only; a task that does not
/// exist is not found.
#[tokio::test]
async fn a_task_reads_back_with_its_own_steps_edges_and_history() {
    let env = TestEnv::new().await;
    let diamond = "namespace: store\nname: diamond\nversion: 1.0.0\nsteps:\n  - { name: z, handler: noop }\n  \
        - { name: y, handler: noop, depends_on: [z] }\n  - { name: x, handler: noop, depends_on: [z] }\n  \
        - { name: w, handler: noop, depends_on: [y, x] }\n";
    let (store, first) = setup_with(&env, diamond).await;
    let (_, second) = setup_with(&env, diamond).await;
    let (_, chain) = setup(&env).await;
    run_chain(&store, chain).await;

    for id in [first, second] {
        let view = store.task(id, false).await.unwrap();
        assert_eq!(view.task.id, id);
        let mut steps: Vec<&str> = view.steps.iter().map(|s| s.name.as_str()).collect();
        steps.sort_unstable();
        assert_eq!(steps, ["w", "x", "y", "z"]);
        assert!(view.steps.iter().all(|s| s.task_id == id), "only the task's own steps");
        let edges: Vec<(&str, &str)> = view.edges.iter().map(|e| (e.from_step.as_str(), e.to_step.as_str())).collect();
        assert_eq!(edges, [("z", "x"), ("z", "y"), ("x", "w"), ("y", "w")]);
        assert!(view.transitions.is_empty(), "not asked for");
    }

    let view = store.task(chain, true).await.unwrap();
    let edges: Vec<(&str, &str)> = view.edges.iter().map(|e| (e.from_step.as_str(), e.to_step.as_str())).collect();
    assert_eq!(edges, [("a", "b"), ("b", "c")]);
    let task_path: Vec<&str> = view.transitions.iter().map(|t| t.to_state.as_str()).collect();
    assert_eq!(task_path, ["pending", "in_progress", "complete"]);
    let paths: Vec<(&str, Vec<&str>)> = view
        .steps
        .iter()
        .map(|s| (s.name.as_str(), s.transitions.iter().map(|t| t.to_state.as_str()).collect()))
        .collect();
    assert_eq!(paths[0], ("a", vec!["enqueued", "in_progress", "complete"]));
    let b = vec!["enqueued", "in_progress", "waiting_for_retry", "enqueued", "in_progress", "complete"];
    assert_eq!(paths[1], ("b", b));
    assert_eq!(paths[2], ("c", vec!["enqueued", "in_progress", "complete"]));

    let missing = store.task(tasker_domain::new_id(), true).await.unwrap_err();
    assert!(matches!(missing, tasker_store::Error::NotFound(_)), "{missing:?}");
    env.cleanup().await;
}

/// GetTask's and GetStep's reads see one instant: a change committed while they are under
/// way shows in none of their statements (each statement on its own would see what had
/// committed when it ran: a history ending in a transition the status does not have). The
/// history is held back by a lock while the change commits, so the interleaving is certain.
#[tokio::test]
async fn a_task_and_a_step_read_back_as_of_one_instant() {
    let env = TestEnv::new().await;
    let (_, task_id) = setup(&env).await;
    // one connection, so that every statement is already prepared when the lock is taken
    let store = Store::connect(&env.config.database.url, 1, tasker_store::Workload::General).await.unwrap();
    let before = store.task(task_id, true).await.unwrap();
    assert_eq!(before.task.status, TaskState::Pending);
    let step_id = before.steps[0].id;
    store.step(step_id, true).await.unwrap();

    // the task: its transitions held back while it goes in_progress
    let read = {
        let store = store.clone();
        async move { store.task(task_id, true).await.unwrap() }
    };
    let view = read_across_a_commit(
        &env,
        "task_transitions",
        task_id,
        &[
            "INSERT INTO task_transitions (id, task_id, from_state, to_state, sort_key, metadata) \
             SELECT gen_random_uuid(), id, 'pending', 'in_progress', last_sort_key + 1, '{}' FROM tasks WHERE id = $1",
            "UPDATE tasks SET status = 'in_progress', last_sort_key = last_sort_key + 1 WHERE id = $1",
        ],
        read,
    )
    .await;
    let path: Vec<&str> = view.transitions.iter().map(|t| t.to_state.as_str()).collect();
    assert_eq!((view.task.status, path), (TaskState::Pending, vec!["pending"]), "as of the read's start");
    let now = store.task(task_id, true).await.unwrap();
    assert_eq!(now.task.status, TaskState::InProgress);
    assert_eq!(now.transitions.last().unwrap().to_state, "in_progress");

    // a step: its transitions held back while it is enqueued
    let read = {
        let store = store.clone();
        async move { store.step(step_id, true).await.unwrap() }
    };
    let step = read_across_a_commit(
        &env,
        "workflow_step_transitions",
        step_id,
        &[
            "INSERT INTO workflow_step_transitions \
             (id, workflow_step_id, task_id, from_state, to_state, sort_key, metadata) \
             SELECT gen_random_uuid(), id, task_id, 'pending', 'enqueued', last_sort_key + 1, '{}' \
             FROM workflow_steps WHERE id = $1",
            "UPDATE workflow_steps SET status = 'enqueued', attempts = 1, last_sort_key = last_sort_key + 1 WHERE id = $1",
        ],
        read,
    )
    .await;
    assert_eq!((step.status, step.transitions.len()), (StepState::Pending, 0), "as of the read's start");
    let now = store.step(step_id, true).await.unwrap();
    assert_eq!((now.status, now.transitions.len()), (StepState::Enqueued, 1));
    env.cleanup().await;
}

/// Runs `read` while `table` is locked, and once the read waits for the lock commits
/// `changes` (statements of `id`, as `$1`) in the locking transaction: what the read
/// returns was read across that commit.
async fn read_across_a_commit<T: Send + 'static>(
    env: &TestEnv,
    table: &str,
    id: uuid::Uuid,
    changes: &[&str],
    read: impl Future<Output = T> + Send + 'static,
) -> T {
    let mut db = env.database().await;
    let lock = db.transaction().await.unwrap();
    lock.batch_execute(&format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")).await.unwrap();
    let reading = tokio::spawn(read);
    wait_for_a_lock_wait(env).await;
    for change in changes {
        lock.execute(*change, &[&id]).await.unwrap();
    }
    lock.commit().await.unwrap();
    reading.await.unwrap()
}

/// Waits until a statement of the test's database waits for a lock.
async fn wait_for_a_lock_wait(env: &TestEnv) {
    let db = env.database().await;
    for _ in 0..200 {
        let row = db
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap();
        if row.get::<_, i64>(0) > 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("no statement waited for the lock");
}

/// While a deployment rolls, a replica of the previous version (which kept `most_recent`,
/// turning it off on the previous row) may write a task's history beside this version: its
/// statements still run on this schema, and the history reads back whole either way.
#[tokio::test]
async fn the_previous_versions_history_writes_still_run_beside_this_one() {
    let env = TestEnv::new().await;
    let (store, task_id) = setup(&env).await;
    let mut db = env.database().await;
    // the previous version starting the task: its flip and its insert, as it sent them
    let tx = db.transaction().await.unwrap();
    tx.execute("SELECT id FROM tasks WHERE id = $1 FOR UPDATE", &[&task_id]).await.unwrap();
    tx.execute(
        "UPDATE task_transitions SET most_recent = false WHERE task_id = ANY($1) AND most_recent",
        &[&vec![task_id]],
    )
    .await
    .unwrap();
    tx.execute(
        "INSERT INTO task_transitions (id, task_id, from_state, to_state, sort_key, most_recent, metadata, created_at) \
         VALUES ($1, $2, 'pending', 'in_progress', 2, true, '{}', now())",
        &[&tasker_domain::new_id(), &task_id],
    )
    .await
    .unwrap();
    tx.execute(
        "UPDATE tasks SET status = 'in_progress', started_at = now(), last_sort_key = 2 WHERE id = $1",
        &[&task_id],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();

    // this version goes on from there
    store.cancel_task(task_id, &tasker_store::Actor::default()).await.unwrap();
    let view = store.task(task_id, true).await.unwrap();
    let history: Vec<(&str, i32)> = view.transitions.iter().map(|t| (t.to_state.as_str(), t.sort_key)).collect();
    assert_eq!(history, [("pending", 1), ("in_progress", 2), ("cancelled", 3)]);
    assert_eq!(view.task.status, TaskState::Cancelled);
    drop(db);
    env.cleanup().await;
}

/// Contexts and results of hundreds of KB (Postgres compresses what passes about 2 KB,
/// with LZ4 where the server has it) come back exactly as written.
#[tokio::test]
async fn large_contexts_and_results_come_back_whole_compressed_with_lz4() {
    let env = TestEnv::new().await;
    let store = Store::connect(&env.config.database.url, 2, tasker_store::Workload::General).await.unwrap();
    let template = Template::from_yaml(TEMPLATE, &Limits::default()).unwrap();
    let record = store.register_template(&template).await.unwrap().record;
    let items = |n: usize, label: &str| -> serde_json::Value {
        let items: Vec<serde_json::Value> =
            (0..n).map(|i| json!({ "id": i, "sku": format!("{label}-{}", i * 7919 % 10007), "qty": i % 9 })).collect();
        json!({ "items": items })
    };
    let context = items(6000, "ctx");
    let context_text = context.to_string();
    assert!(context_text.len() > 200_000, "{}", context_text.len());
    let new = NewTask { context: &context_text, ..new_task(&record, false) };
    let task_id = store.create_task(&new).await.unwrap().task_id;

    let results = items(6000, "res");
    let mut tx = store.begin().await.unwrap();
    let mut task = tx.lock_tasks(&[task_id]).await.unwrap().remove(&task_id).unwrap();
    tx.transition_task(&mut task, TaskState::InProgress, json!({})).unwrap();
    let mut a = tx.ready_steps(&[task_id]).await.unwrap().remove(0);
    for to in [StepState::Enqueued, StepState::InProgress] {
        tx.transition_step(&task.subject(), &mut a, to, json!({}), StepChange::default()).unwrap();
    }
    let change = StepChange { results: Some(results.to_string()), ..Default::default() };
    tx.transition_step(&task.subject(), &mut a, StepState::Complete, json!({}), change).unwrap();
    tx.commit().await.unwrap();

    let view = store.task(task_id, false).await.unwrap();
    let parsed = |text: &str| serde_json::from_str::<serde_json::Value>(text).unwrap();
    assert_eq!(parsed(&view.task.context), context);
    let stored = view.steps.iter().find(|s| s.name == "a").and_then(|s| s.results.as_deref()).unwrap();
    assert_eq!(parsed(stored), results);

    let db = env.database().await;
    let lz4 = db.batch_execute("SET default_toast_compression = lz4").await.is_ok();
    let methods: Vec<Option<String>> = db
        .query(
            "SELECT pg_column_compression(context) FROM tasks WHERE id = $1 \
             UNION ALL SELECT pg_column_compression(results) FROM workflow_steps WHERE task_id = $1 AND name = 'a'",
            &[&task_id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let expected = if lz4 { "lz4" } else { "pglz" };
    assert_eq!(methods, [Some(expected.to_string()), Some(expected.to_string())], "LZ4 support: {lz4}");
    drop(db);
    env.cleanup().await;
}

/// A replica of the previous build starts against a database a newer build has migrated
/// (a rolling deployment's old replica restarting, or a rollback): the newer build's
/// migration is left alone, this build finds nothing of its own pending, and works.
#[tokio::test]
async fn a_build_starts_against_a_database_a_newer_build_migrated() {
    let env = TestEnv::new().await;
    let db = env.database().await;
    db.execute(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (99991231000000, 'a newer build''s migration', true, '\\x00', 0)",
        &[],
    )
    .await
    .unwrap();
    tasker_store::migrate(&env.config.database.url).await.expect("this build migrates beside a newer one's migration");
    let (store, task_id) = setup(&env).await;
    assert_eq!(tasker_store::pending_migrations(&store).await.unwrap(), Vec::<i64>::new());
    store.cancel_task(task_id, &tasker_store::Actor::default()).await.unwrap();
    assert_eq!(store.task(task_id, false).await.unwrap().task.status, TaskState::Cancelled);
    drop(db);
    env.cleanup().await;
}

/// A database URL may name several hosts, as libpq's do (the default names the local
/// server's Unix socket, then 127.0.0.1): the migrator and the pool each try them in turn
/// and use the first that answers; when none does, both say so.
#[tokio::test]
async fn a_url_naming_several_hosts_reaches_the_first_that_answers() {
    let env = TestEnv::new().await;
    let url = &env.config.database.url;
    let (scheme, rest) = url.split_once("://").unwrap();
    let hosts_at = rest[..rest.find('/').unwrap_or(rest.len())].rfind('@').map_or(0, |i| i + 1);
    // a socket directory with no server in it, then the test's own host
    let url = format!("{scheme}://{}%2Fnonexistent-tasker-socket-dir,{}", &rest[..hosts_at], &rest[hosts_at..]);
    tasker_store::migrate(&url).await.expect("the migrator gets past the missing socket");
    let store = Store::connect(&url, 2, tasker_store::Workload::General).await.expect("so does the pool");
    let template = Template::from_yaml(TEMPLATE, &Limits::default()).unwrap();
    store.register_template(&template).await.expect("and it works");

    let nowhere = format!("{scheme}://postgres@%2Fnonexistent-tasker-socket-dir,127.0.0.1:1/db");
    assert!(tasker_store::migrate(&nowhere).await.is_err(), "no host answers: the migrator fails");
    assert!(Store::connect(&nowhere, 1, tasker_store::Workload::General).await.is_err(), "and so does the pool");
    env.cleanup().await;
}

/// CreateTask's answer lists the steps and edges in the order GetTask reads them back
/// (edges were in the template's order: by child, then as its `depends_on` lists them).
#[tokio::test]
async fn a_created_task_is_answered_as_it_reads_back() {
    let env = TestEnv::new().await;
    let store = Store::connect(&env.config.database.url, 2, tasker_store::Workload::General).await.unwrap();
    let yaml = "namespace: store\nname: mixed\nversion: 1.0.0\nsteps:\n  - { name: m, handler: noop }\n  \
        - { name: k, handler: noop, depends_on: [m, b] }\n  - { name: b, handler: noop }\n  \
        - { name: a, handler: noop, depends_on: [m] }\n";
    let record = store.register_template(&Template::from_yaml(yaml, &Limits::default()).unwrap()).await.unwrap().record;
    let created = store.create_task(&new_task(&record, false)).await.unwrap();
    let answered = created.view.expect("a new task's view");
    let read = store.task(created.task_id, false).await.unwrap();
    let names = |v: &tasker_store::TaskView| v.steps.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
    let edges = |v: &tasker_store::TaskView| {
        v.edges.iter().map(|e| (e.from_step.clone(), e.to_step.clone())).collect::<Vec<_>>()
    };
    // the registered template lists its steps in topological order (m, b, a, k)
    let registered: Vec<&str> = record.template.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(registered, ["m", "b", "a", "k"]);
    assert_eq!(names(&read), registered, "by level, then as the registered template lists them");
    assert_eq!(names(&answered), names(&read));
    let expected = [("b", "k"), ("m", "a"), ("m", "k")].map(|(f, t)| (f.to_owned(), t.to_owned()));
    assert_eq!(edges(&read), expected);
    assert_eq!(edges(&answered), edges(&read));
    let ids = |v: &tasker_store::TaskView| v.steps.iter().map(|s| s.id).collect::<Vec<_>>();
    assert_eq!(ids(&answered), ids(&read));
    env.cleanup().await;
}

/// A task created from what was its name's latest template is not written once a newer
/// version exists: `Superseded`, and nothing of it in any table. A version asked for by
/// number is still used.
#[tokio::test]
async fn a_task_from_a_superseded_latest_template_is_not_written() {
    let env = TestEnv::new().await;
    let store = Store::connect(&env.config.database.url, 2, tasker_store::Workload::General).await.unwrap();
    let v1 = "namespace: store\nname: versioned\nversion: 1.0.0\nsteps:\n  - { name: a, handler: noop }\n";
    store.register_template(&Template::from_yaml(v1, &Limits::default()).unwrap()).await.unwrap();
    let latest = store.template("store", "versioned", None).await.unwrap();
    assert!(store.create_task(&new_task(&latest, true)).await.unwrap().view.is_some(), "still the latest");
    let v2 = v1.replace("1.0.0", "1.1.0").replace("name: a,", "name: b,");
    store.register_template(&Template::from_yaml(&v2, &Limits::default()).unwrap()).await.unwrap();
    let counts = || async {
        let client = env.database().await;
        let mut counts = Vec::new();
        for table in ["tasks", "workflow_steps", "task_transitions", "outbox"] {
            counts
                .push(client.query_one(&format!("SELECT count(*) FROM {table}"), &[]).await.unwrap().get::<_, i64>(0));
        }
        counts
    };
    let before = counts().await;
    let refused = store.create_task(&new_task(&latest, true)).await.unwrap_err();
    assert!(matches!(&refused, tasker_store::Error::Superseded(m) if m.contains("store/versioned")), "{refused:?}");
    assert_eq!(counts().await, before, "nothing written");
    // by number, 1.0.0 is still what it was
    let view = store.create_task(&new_task(&latest, false)).await.unwrap().view.unwrap();
    assert_eq!((view.task.version.as_str(), view.steps[0].name.as_str()), ("1.0.0", "a"));
    let latest = store.template("store", "versioned", None).await.unwrap();
    let view = store.create_task(&new_task(&latest, true)).await.unwrap().view.unwrap();
    assert_eq!((view.task.version.as_str(), view.steps[0].name.as_str()), ("1.1.0", "b"));
    env.cleanup().await;
}

/// The sweeper's stalled tasks wait for an evaluation whose request may have been lost:
/// a pending task, and a task in progress with nothing running or scheduled (an operator's
/// repair). A task with a step enqueued and a failed task do not.
#[tokio::test]
async fn a_repaired_step_never_dispatched_stalls_its_task() {
    let env = TestEnv::new().await;
    let (store, task_id) = setup(&env).await;
    let now = std::time::Duration::ZERO;
    let stalled = || async { store.stalled_tasks(now, 10).await.unwrap() };
    assert_eq!(stalled().await, [task_id], "a pending task");

    // started, its first step enqueued, then failed for good: the task fails
    let mut tx = store.begin().await.unwrap();
    let mut task = tx.lock_tasks(&[task_id]).await.unwrap().remove(&task_id).unwrap();
    tx.transition_task(&mut task, TaskState::InProgress, json!({})).unwrap();
    let mut a = tx.ready_steps(&[task_id]).await.unwrap().remove(0);
    tx.transition_step(&task.subject(), &mut a, StepState::Enqueued, json!({}), StepChange::default()).unwrap();
    tx.commit().await.unwrap();
    assert!(stalled().await.is_empty(), "its step is enqueued");
    let mut tx = store.begin().await.unwrap();
    let mut task = tx.lock_tasks(&[task_id]).await.unwrap().remove(&task_id).unwrap();
    for to in [StepState::InProgress, StepState::Error] {
        tx.transition_step(&task.subject(), &mut a, to, json!({}), StepChange::default()).unwrap();
    }
    tx.transition_task(&mut task, TaskState::Error, json!({})).unwrap();
    tx.commit().await.unwrap();
    assert!(stalled().await.is_empty(), "a failed task waits for an operator");

    // an operator retries the step; the request that would hand the task back is lost
    let operator = tasker_store::Actor { who: "operator".into(), reason: "test".into() };
    store.retry_step(a.id, &operator).await.unwrap();
    assert_eq!(stalled().await, [task_id], "resumed, nothing dispatched");
    assert!(store.stalled_tasks(std::time::Duration::from_secs(3600), 10).await.unwrap().is_empty(), "not yet");
    env.cleanup().await;
}

fn new_task(template: &tasker_store::TemplateRecord, as_latest: bool) -> NewTask<'_> {
    NewTask { as_latest, ..tasker_test_support::new_task(template) }
}
