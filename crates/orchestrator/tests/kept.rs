//! Batches decided from the tasks the orchestrator keeps in memory (one round trip), and
//! what happens when another writer changed a kept task meanwhile.

use std::{collections::HashMap, sync::Arc, time::Duration};

use orchestrator::{Created, Decided, Engine, Outcome, Work};
use rand::{RngExt, SeedableRng, rngs::StdRng};
use tasker_domain::{Backoff, Limits, StepState, TaskState, Template};
use tasker_proto::messages::{Completed, Failed, FailureKind, Started, StepReport, step_report};
use tasker_store::{Actor, Dispatch, Store, Workload};
use tasker_test_support::{FaultProxy, TestEnv};
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

/// A task's request as task-api sends it for a task it has just created.
async fn start(store: &Store, task_id: Uuid) -> (Uuid, Work) {
    let view = store.task(task_id, false).await.unwrap();
    let created = task_api::created(&view).expect("a small task is told as created");
    (task_id, Work::Start(Arc::new(Created::from_request(task_id, created).expect("a task as created"))))
}

/// A task started from its request as task-api created it is kept from its first batch:
/// every batch, the first too, is decided from memory in one round trip (and, in the
/// tests' debug builds, checked against the database before it goes on).
#[tokio::test]
async fn a_task_started_as_created_is_decided_from_memory_from_its_first_batch() {
    let env = TestEnv::new().await;
    let (store, engine, task_id) = setup(&env).await;
    let first = engine.apply(&[start(&store, task_id).await]).await.unwrap();
    assert_eq!((first.decided, dispatched(&first)), (Decided::FromKept, "a"));
    let second = engine.apply(&[completed(&first.dispatches[0])]).await.unwrap();
    assert_eq!((second.decided, dispatched(&second)), (Decided::FromKept, "b"));
    let third = engine.apply(&[completed(&second.dispatches[0])]).await.unwrap();
    let last = engine.apply(&[completed(&third.dispatches[0])]).await.unwrap();
    assert_eq!((third.decided, last.decided), (Decided::FromKept, Decided::FromKept));
    assert_eq!(statuses(&env, task_id).await, ("complete".into(), vec!["complete".into(); 3]));
    env.cleanup().await;
}

/// The fence names the task it found changed: only that one is kept no longer. The other
/// task of the batch, read again as the batch is decided from reads, goes on being decided
/// from memory.
#[tokio::test]
async fn only_the_changed_task_of_a_batch_is_kept_no_longer() {
    let env = TestEnv::new().await;
    let (store, engine, cancelled) = setup(&env).await;
    let template = store.template("kept", "chain", None).await.unwrap();
    let going_on = store.create_task(&tasker_test_support::new_task(&template)).await.unwrap().task_id;
    let first = engine.apply(&[start(&store, cancelled).await, start(&store, going_on).await]).await.unwrap();
    assert_eq!((first.decided, first.dispatches.len()), (Decided::FromKept, 2));
    let actor = Actor { who: "operator".into(), reason: "test".into() };
    store.cancel_task(cancelled, &actor).await.unwrap();
    let reports: Vec<(Uuid, Work)> = first.dispatches.iter().map(completed).collect();
    let second = engine.apply(&reports).await.unwrap();
    assert_eq!(second.decided, Decided::AgainFromReads);
    assert_eq!(dispatched(&second), "b", "only the task going on dispatches");
    let third = engine.apply(&[completed(&second.dispatches[0])]).await.unwrap();
    assert_eq!((third.decided, dispatched(&third)), (Decided::FromKept, "c"), "still kept");
    assert_eq!(statuses(&env, cancelled).await.0, "cancelled");
    env.cleanup().await;
}

/// A task changed between its creation and its first batch (an operator cancelled it) is
/// not started from what its request told: the fence finds it changed, and the batch,
/// decided again from the database, dispatches nothing. A request naming a task that does
/// not exist changes nothing either.
#[tokio::test]
async fn a_task_changed_before_its_first_batch_is_read_instead() {
    let env = TestEnv::new().await;
    let (store, engine, task_id) = setup(&env).await;
    let request = start(&store, task_id).await;
    let actor = Actor { who: "operator".into(), reason: "test".into() };
    store.cancel_task(task_id, &actor).await.unwrap();
    let first = engine.apply(&[request]).await.unwrap();
    assert_eq!(first.decided, Decided::AgainFromReads);
    assert!(first.dispatches.is_empty(), "{:?}", first.dispatches);
    assert_eq!(statuses(&env, task_id).await, ("cancelled".into(), vec!["cancelled".into(); 3]));

    let view = store.task(task_id, false).await.unwrap();
    let mut told = task_api::created(&view).unwrap();
    told.steps.iter_mut().for_each(|s| s.id = tasker_domain::new_id().to_string());
    let nobody = tasker_domain::new_id();
    let made_up = Created::from_request(nobody, told).unwrap();
    let outcome = engine.apply(&[(nobody, Work::Start(Arc::new(made_up)))]).await.unwrap();
    assert_eq!(outcome.decided, Decided::AgainFromReads);
    assert!(outcome.dispatches.is_empty(), "{:?}", outcome.dispatches);
    let db = env.database().await;
    for sql in ["SELECT count(*) FROM tasks WHERE id = $1", "SELECT count(*) FROM task_transitions WHERE task_id = $1"]
    {
        assert_eq!(db.query_one(sql, &[&nobody]).await.unwrap().get::<_, i64>(0), 0, "{sql}");
    }
    env.cleanup().await;
}

/// A request may come from anyone who may publish to the orchestrator's queue, so what it
/// tells of a task is checked against the task stored before anything is written from it:
/// a request that names a real task, unchanged since its creation, but tells it otherwise
/// (another namespace, handler, config, limit, a step left out, an edge moved, a value the
/// database cannot hold) is decided again from the database, and the task runs as it was
/// created.
#[tokio::test]
async fn a_task_told_otherwise_than_it_was_created_runs_as_created() {
    let env = TestEnv::new().await;
    let (store, engine, _) = setup(&env).await;
    let template = store.template("kept", "chain", None).await.unwrap();
    type Lie = fn(&mut tasker_proto::messages::CreatedTask);
    let lies: [(&str, Lie); 9] = [
        ("another namespace", |t| t.namespace = "elsewhere".into()),
        ("another handler", |t| t.steps[0].handler = "http".into()),
        ("another config", |t| t.steps[0].config_json = r#"{"url": "http://example.invalid"}"#.into()),
        // values the database cannot hold at all: refused by the check's statement itself
        ("a config that is not JSON", |t| t.steps[0].config_json = "{not json".into()),
        ("a NUL in a name", |t| t.steps[1].name = "b\0".into()),
        ("another limit", |t| t.steps[0].max_attempts = 9),
        ("a step left out", |t| {
            t.steps.pop();
        }),
        ("an edge moved", |t| t.steps[2].parents = vec![0]),
        ("another trace", |t| {
            t.task_trace_context.insert("traceparent".into(), format!("00-{:032x}-{:016x}-01", 7, 7));
        }),
    ];
    for (lie, tell) in lies {
        let task_id = store.create_task(&tasker_test_support::new_task(&template)).await.unwrap().task_id;
        let view = store.task(task_id, false).await.unwrap();
        let mut told = task_api::created(&view).unwrap();
        tell(&mut told);
        let created = Created::from_request(task_id, told).expect("a lie well formed");
        let first = engine.apply(&[(task_id, Work::Start(Arc::new(created)))]).await.unwrap();
        assert_eq!(first.decided, Decided::AgainFromReads, "{lie}");
        let dispatch = &first.dispatches[..];
        assert_eq!(dispatch.len(), 1, "{lie}: {dispatch:?}");
        let d = &dispatch[0];
        assert_eq!((d.namespace.as_str(), d.step_name.as_str(), d.handler.as_str()), ("kept", "a", "noop"), "{lie}");
        assert_eq!((d.config.as_str(), d.trace.traceparent.as_str()), ("{}", ""), "{lie}");
        let step = store.step(d.step_id, false).await.unwrap();
        assert_eq!(step.max_attempts, 3, "{lie}");
    }
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

/// What the test's stand-in broker holds: messages waiting for a batch, by the queue
/// (and so the kind of batch) they would arrive through.
#[derive(Default)]
struct Queues {
    waiting: Vec<(Uuid, Work)>,
    /// Every report sent, to deliver one again late (at-least-once).
    sent: Vec<(Uuid, Work)>,
}

impl Queues {
    /// Takes up to `max` messages of the kind of a random waiting one, leaving a copy of
    /// some behind to be delivered again.
    fn batch(&mut self, rng: &mut StdRng, max: usize, redeliver: f64) -> Vec<(Uuid, Work)> {
        let kind = |w: &Work| std::mem::discriminant(w);
        let first = kind(&self.waiting[rng.random_range(0..self.waiting.len())].1);
        let mut batch = Vec::new();
        while batch.len() < max {
            let of_kind: Vec<usize> = (0..self.waiting.len()).filter(|&i| kind(&self.waiting[i].1) == first).collect();
            let Some(&at) = of_kind.get(rng.random_range(0..of_kind.len().max(1))) else { break };
            let item = if rng.random_bool(redeliver) { self.waiting[at].clone() } else { self.waiting.swap_remove(at) };
            batch.push(item);
        }
        batch
    }

    /// A worker's reports on an execution: its outcome, sometimes after a `started` of its
    /// own (which may arrive after the outcome). Completed results name the attempt.
    fn run(&mut self, rng: &mut StdRng, dispatch: &Dispatch) {
        let report = |outcome| StepReport {
            task_id: dispatch.task_id.to_string(),
            step_id: dispatch.step_id.to_string(),
            attempt: dispatch.attempt,
            worker_id: "test".into(),
            started_at_unix_ms: chrono::Utc::now().timestamp_millis(),
            outcome: Some(outcome),
            ..Default::default()
        };
        if rng.random_bool(0.3) {
            self.send(dispatch.task_id, report(step_report::Outcome::Started(Started {})));
        }
        let roll = rng.random_range(0..100);
        let outcome = if roll < 75 {
            let results = format!(r#"{{"attempt": {}}}"#, dispatch.attempt);
            step_report::Outcome::Completed(Completed { results_json: results })
        } else {
            let kind = if roll < 95 { FailureKind::Retryable } else { FailureKind::Permanent };
            step_report::Outcome::Failed(Failed { message: "planned".into(), kind: kind as i32, retry_after_ms: None })
        };
        self.send(dispatch.task_id, report(outcome));
    }

    fn send(&mut self, task_id: Uuid, report: StepReport) {
        self.waiting.push((task_id, Work::Report(report.clone())));
        self.sent.push((task_id, Work::Report(report)));
    }
}

/// Each owner's (step's or task's) history as its rows' (from, to, sort key), in order.
async fn history(db: &tokio_postgres::Client, sql: &str) -> HashMap<Uuid, Vec<(Option<String>, String, i32)>> {
    let mut by_owner: HashMap<Uuid, Vec<(Option<String>, String, i32)>> = HashMap::new();
    for row in db.query(sql, &[]).await.unwrap() {
        by_owner.entry(row.get(0)).or_default().push((row.get(1), row.get(2), row.get(3)));
    }
    by_owner
}

/// What a read of the store answers, asked again while the database is unavailable (a cut
/// leaves dead connections in the pool, which the next use finds).
async fn answered<T, F: Future<Output = tasker_store::Result<T>>>(read: impl Fn() -> F) -> T {
    loop {
        match read().await {
            Ok(answer) => return answer,
            Err(e) if e.is_unavailable() => tokio::time::sleep(Duration::from_millis(5)).await,
            Err(e) => panic!("{e}"),
        }
    }
}

/// Sometimes (when `faults`), cuts the database's connections within the next 3 ms: in
/// the middle of what runs beside it, its commit and the commit's answer included.
fn cut(proxy: &FaultProxy, rng: &mut StdRng, faults: bool) -> impl Future<Output = ()> {
    let after = (faults && rng.random_bool(0.3)).then(|| Duration::from_micros(rng.random_range(0..3_000)));
    async move {
        if let Some(after) = after {
            tokio::time::sleep(after).await;
            proxy.cut();
        }
    }
}

/// The (task, step) of every step in `status`.
async fn steps_in(
    db: &tokio_postgres::Client,
    status: &str,
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    db.query("SELECT task_id, id FROM workflow_steps WHERE status = $1", &[&status]).await
}

/// Two replicas, running up to four batches at once between them, work through sixty
/// tasks while the stand-in broker delivers messages more than once, late and out of order,
/// workers fail attempts and report starts after outcomes, the sweeper republishes
/// enqueued steps and fails in-progress ones as overdue, and operators retry, resolve and
/// cancel. Whatever the interleaving, every task ends final and its history holds: each
/// transition legal and in order, the status the last transition's, a step completed at
/// most once and only by its current attempt, no child enqueued before its parents were
/// done, and an event for every transition, in order. No dispatch is lost: nothing but
/// the work itself moves the tasks to their end.
#[tokio::test]
async fn interleaved_replicas_duplicates_and_operators_keep_every_invariant() {
    interleave(false).await;
}

/// The same, with the database's connections cut at random moments, in the middle of
/// batches (a commit whose answer is lost included) and of operator actions: a batch that
/// fails is delivered again, and whenever the queues run dry, the sweeper's own queries
/// find whatever a lost answer left behind (a dispatch never published, a repair never
/// handed back).
#[tokio::test]
async fn interleaved_replicas_through_database_cuts_keep_every_invariant() {
    interleave(true).await;
}

async fn interleave(faults: bool) {
    const DIAMOND: &str = concat!(
        "namespace: kept\nname: diamond\nversion: 1.0.0\n",
        "defaults: { max_attempts: 3, timeout: 20ms }\nsteps:\n",
        "  - { name: a, handler: noop }\n",
        "  - { name: b, handler: noop, depends_on: [a] }\n",
        "  - { name: c, handler: noop, depends_on: [a] }\n",
        "  - { name: d, handler: noop, depends_on: [b, c] }\n",
        "  - { name: e, handler: noop, depends_on: [d] }\n",
    );
    const TASKS: usize = 60;
    let seed = std::env::var("TASKER_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("TASKER_TEST_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let env = TestEnv::new().await;
    let proxy = FaultProxy::for_url(&env.config.database.url).await;
    let url = if faults { proxy.url(&env.config.database.url) } else { env.config.database.url.clone() };
    let store = Store::connect(&url, 8, Workload::Keyed).await.unwrap();
    let template = Template::from_yaml(DIAMOND, &Limits::default()).unwrap();
    let record = store.register_template(&template).await.unwrap().record;
    let backoff =
        Backoff { base: Duration::from_millis(1), multiplier: 1.0, max: Duration::from_millis(1), jitter: 0.0 };
    let replicas = [
        Engine::new(store.clone(), backoff, Limits::default()),
        Engine::new(store.clone(), backoff, Limits::default()),
    ];
    let mut queues = Queues::default();
    for _ in 0..TASKS {
        let task_id = store.create_task(&tasker_test_support::new_task(&record)).await.unwrap().task_id;
        // half as task-api requests a task it created, half as a sweeper's or a replica's
        queues.waiting.push(if rng.random_bool(0.5) {
            start(&store, task_id).await
        } else {
            (task_id, Work::Evaluate)
        });
    }
    let db = env.database().await;
    let operator = Actor { who: "operator".into(), reason: "test".into() };
    let ways = [Decided::FromReads, Decided::FromKept, Decided::AgainFromReads];
    let mut decided = [0usize; 3];
    // batches a cut failed, and the sweeper's finds
    let (mut failed, mut swept) = (0, 0);
    let mut round = 0;
    loop {
        round += 1;
        assert!(round < 5_000, "still not settled after 5,000 rounds (seed {seed})");
        // faults for the first 400 rounds, then a drain
        let chaos = round <= 400;
        if queues.waiting.is_empty() {
            tokio::time::sleep(Duration::from_millis(2)).await;
            queues
                .waiting
                .extend(answered(|| store.due_retries(500)).await.into_iter().map(|(t, s)| (t, Work::Retry(s))));
            if faults {
                // nothing waits in the queues: the sweeper's finds, due at once, are what a
                // commit whose answer was lost left behind
                let now = Duration::ZERO;
                let tasks = answered(|| store.stalled_tasks(now, 500)).await;
                queues.waiting.extend(tasks.into_iter().map(|t| (t, Work::Evaluate)));
                let enqueued = answered(|| store.stale_enqueued_steps(now, 500)).await.into_iter();
                queues.waiting.extend(enqueued.map(|(t, step, _)| (t, Work::Republish { step, older_than: now })));
                swept += queues.waiting.iter().filter(|(_, w)| !matches!(w, Work::Retry(_))).count();
            }
            if queues.waiting.is_empty() {
                break;
            }
        }
        if chaos {
            if rng.random_bool(0.05) && !queues.sent.is_empty() {
                let late = queues.sent[rng.random_range(0..queues.sent.len())].clone();
                queues.waiting.push(late);
            }
            let pick = |rows: Vec<tokio_postgres::Row>, rng: &mut StdRng| {
                (!rows.is_empty()).then(|| {
                    let row = &rows[rng.random_range(0..rows.len())];
                    (row.get::<_, Uuid>(0), row.get::<_, Uuid>(1))
                })
            };
            if rng.random_bool(0.2)
                && let Some((task, step)) = pick(steps_in(&db, "enqueued").await.unwrap(), &mut rng)
            {
                queues.waiting.push((task, Work::Republish { step, older_than: Duration::ZERO }));
            }
            if rng.random_bool(0.05)
                && let Some((task, step)) = pick(steps_in(&db, "in_progress").await.unwrap(), &mut rng)
            {
                queues.waiting.push((task, Work::Overdue { step, grace: Duration::ZERO }));
            }
            if rng.random_bool(0.1)
                && let Some((task, step)) = pick(steps_in(&db, "error").await.unwrap(), &mut rng)
            {
                let retry = rng.random_bool(0.7);
                let repair = async {
                    if retry {
                        store.retry_step(step, &operator).await.map(drop)
                    } else {
                        store.resolve_step(step, r#"{"by": "hand"}"#, &operator).await.map(drop)
                    }
                };
                let (repaired, ()) = tokio::join!(repair, cut(&proxy, &mut rng, faults && chaos));
                // a refused repair (the task was cancelled around its failed step) wrote
                // nothing; one whose answer a cut lost may have been written, with no request
                // sent (the sweeper's)
                match repaired {
                    Ok(()) => queues.waiting.push((task, Work::Evaluate)),
                    Err(tasker_store::Error::FailedPrecondition(_)) => {}
                    Err(e) => assert!(faults && e.is_unavailable(), "repair failed (seed {seed}): {e}"),
                }
            }
            if rng.random_bool(0.01) {
                let open = db.query("SELECT id, id FROM tasks WHERE status IN ('pending', 'in_progress')", &[]);
                if let Some((task, _)) = pick(open.await.unwrap(), &mut rng)
                    && let Err(e) = store.cancel_task(task, &operator).await
                {
                    assert!(faults && e.is_unavailable(), "cancel failed (seed {seed}): {e}");
                }
            }
        }
        if queues.waiting.is_empty() {
            continue;
        }
        let redeliver = if chaos { 0.15 } else { 0.0 };
        let batches: Vec<(usize, Vec<(Uuid, Work)>)> = (0..rng.random_range(1..=4))
            .map_while(|_| {
                // mostly the first replica, whose kept tasks then mostly hold
                let (replica, size) = (usize::from(rng.random_bool(0.2)), rng.random_range(1..=4));
                (!queues.waiting.is_empty()).then(|| (replica, queues.batch(&mut rng, size, redeliver)))
            })
            .collect();
        let applied = futures::future::join_all(batches.iter().map(|(at, items)| replicas[*at].apply(items)));
        // a cut at a random moment of the batches (the first round trips, or the commits)
        let (outcomes, ()) = tokio::join!(applied, cut(&proxy, &mut rng, faults && chaos));
        for (outcome, (_, items)) in outcomes.into_iter().zip(&batches) {
            let outcome = match outcome {
                Ok(outcome) => outcome,
                Err(e) if faults && e.is_unavailable() => {
                    // held and tried again, as the pipeline does
                    failed += 1;
                    queues.waiting.extend(items.iter().cloned());
                    continue;
                }
                Err(e) => panic!("batch {items:?} failed (seed {seed}): {e}"),
            };
            decided[ways.iter().position(|w| *w == outcome.decided).unwrap()] += 1;
            for dispatch in &outcome.dispatches {
                queues.run(&mut rng, dispatch);
            }
        }
    }

    // every task final, its status the last transition's, each transition legal and in order
    let tasks =
        history(&db, "SELECT task_id, from_state, to_state, sort_key FROM task_transitions ORDER BY task_id, sort_key")
            .await;
    assert_eq!(tasks.len(), TASKS);
    for row in db.query("SELECT id, status FROM tasks", &[]).await.unwrap() {
        let (id, status): (Uuid, String) = (row.get(0), row.get(1));
        assert!(status.parse::<TaskState>().unwrap().is_final(), "task {id} left {status} (seed {seed})");
        let chain = &tasks[&id];
        assert_eq!(chain.last().unwrap().1, status, "task {id}: {chain:?} (seed {seed})");
        for (i, (from, to, key)) in chain.iter().enumerate() {
            assert_eq!(*key, i as i32 + 1, "task {id}: {chain:?}");
            let before = if i == 0 { None } else { Some(&chain[i - 1].1) };
            assert_eq!(from.as_ref(), before, "task {id}: {chain:?} (seed {seed})");
            if let Some(from) = from {
                from.parse::<TaskState>().unwrap().check(to.parse().unwrap()).unwrap();
            }
        }
    }
    let steps = history(
        &db,
        "SELECT workflow_step_id, from_state, to_state, sort_key FROM workflow_step_transitions \
         ORDER BY workflow_step_id, sort_key",
    )
    .await;
    let rows = db
        .query(
            "SELECT s.id, s.status, s.attempts, s.results::text, t.status, s.attempts_before_retry FROM workflow_steps s \
             JOIN tasks t ON t.id = s.task_id",
            &[],
        )
        .await
        .unwrap();
    for row in &rows {
        let (id, status, attempts, results, task): (Uuid, String, i32, Option<String>, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        let before_retry: i32 = row.get(5);
        let chain = steps.get(&id).cloned().unwrap_or_default();
        let mut state = "pending".to_owned();
        for (i, (from, to, key)) in chain.iter().enumerate() {
            assert_eq!(
                (*key, from.as_deref()),
                (i as i32 + 1, Some(state.as_str())),
                "step {id}: {chain:?} (seed {seed})"
            );
            state.parse::<StepState>().unwrap().check(to.parse().unwrap()).unwrap();
            state = to.clone();
        }
        assert_eq!(state, status, "step {id}: {chain:?} (seed {seed})");
        let enqueued = chain.iter().filter(|(_, to, _)| to == "enqueued").count();
        assert_eq!(enqueued as i32, attempts, "step {id}: {chain:?} (seed {seed})");
        assert!(chain.iter().filter(|(_, to, _)| to == "complete").count() <= 1, "step {id}: {chain:?}");
        assert!(attempts - before_retry <= 3, "step {id} made {attempts} attempts, {before_retry} before a retry");
        if status == "complete" {
            // completed by its current attempt, whose results it keeps
            assert_eq!(results, Some(format!(r#"{{"attempt": {attempts}}}"#)), "step {id} (seed {seed})");
        }
        let open = ["pending", "enqueued", "in_progress", "waiting_for_retry"].contains(&status.as_str());
        match task.as_str() {
            "complete" => assert!(["complete", "resolved_manually"].contains(&status.as_str()), "step {id}"),
            _ => assert!(!open || status == "pending" && task == "error", "step {id} {status} in a {task} task"),
        }
    }
    // no child enqueued before every parent was done
    let early: i64 = db
        .query_one(
            "SELECT count(*) FROM workflow_step_edges e \
             JOIN workflow_step_transitions ct ON ct.workflow_step_id = e.to_step_id AND ct.to_state = 'enqueued' \
             WHERE NOT EXISTS (SELECT 1 FROM workflow_step_transitions pt WHERE pt.workflow_step_id = e.from_step_id \
               AND pt.to_state IN ('complete', 'resolved_manually') AND pt.created_at <= ct.created_at)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(early, 0, "children enqueued before their parents were done (seed {seed})");
    // an event for every transition, and no other
    let unmatched: i64 = db
        .query_one(
            "WITH events AS (SELECT unnest(event_ids) AS id FROM outbox), \
             transitions AS (SELECT id FROM task_transitions UNION ALL SELECT id FROM workflow_step_transitions) \
             SELECT (SELECT count(*) FROM events) - (SELECT count(*) FROM transitions) \
               + (SELECT count(*) FROM transitions WHERE id NOT IN (SELECT id FROM events))",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(unmatched, 0, "events and transitions differ (seed {seed})");
    // each owner's events in the order of its transitions (the relay sends them in outbox
    // order)
    let disordered: i64 = db
        .query_one(
            "WITH events AS (SELECT o.id AS row, e.at, e.id FROM outbox o, unnest(o.event_ids) WITH ORDINALITY e(id, at)), \
             keyed AS (SELECT t.task_id AS owner, t.sort_key, e.row, e.at FROM task_transitions t JOIN events e USING (id) \
               UNION ALL SELECT t.workflow_step_id, t.sort_key, e.row, e.at \
               FROM workflow_step_transitions t JOIN events e USING (id)) \
             SELECT count(*) FROM (SELECT sort_key < lag(sort_key) OVER (PARTITION BY owner ORDER BY row, at) AS back \
               FROM keyed) k WHERE back",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(disordered, 0, "events out of their transitions' order (seed {seed})");
    // the interleavings reached each way of deciding a batch
    assert!(decided.iter().all(|&n| n > 0), "batches {ways:?}: {decided:?} (seed {seed})");
    assert_eq!(faults, failed > 0, "batches failed by cuts: {failed} (seed {seed})");
    eprintln!("{round} rounds; batches {ways:?}: {decided:?}; {failed} failed by cuts; {swept} swept");
    env.cleanup().await;
}
