//! The sweeper repairs the gaps a crash leaves between a commit and its publish.

use serde_json::json;
use tasker_proto::v1 as pb;
use tasker_store::Store;
use tasker_test_support::{System, TestEnv, WorkerSpec};

const CHAIN: &str = "namespace: recovery\nname: chain\nversion: 1.0.0\nsteps:\n  - { name: a, handler: noop }\n  - { name: b, handler: noop, depends_on: [a] }\n";

/// A task committed without its request published (task-api crashed in between) is picked
/// up once it has been pending for `pending_task_timeout`.
#[tokio::test]
async fn a_task_whose_request_was_lost_still_runs() {
    let env = TestEnv::new().await;
    let system = System::start(&env, vec![WorkerSpec::new("w1", &["recovery"])]).await;
    system.register(&env, CHAIN).await;
    let store = Store::connect(&env.config.database.url, 2, tasker_store::Workload::General).await.unwrap();
    let record = store.template("recovery", "chain", None).await.unwrap();
    let new = tasker_test_support::new_task(&record);
    let task_id = store.create_task(&new).await.unwrap().task_id;
    let done = system.wait_final(&task_id.to_string()).await;
    assert_eq!(done.status(), pb::TaskStatus::Complete);
    assert!(done.steps.iter().all(|s| s.attempts == 1));
    system.stop().await;
    env.cleanup().await;
}

/// An operator's retry or resolve that committed while the request handing the task back
/// to the orchestrator was lost (task-api killed, or the commit's answer lost with its
/// connection) leaves a task in progress with nothing running: the sweeper evaluates it
/// again once it has been so for `pending_task_timeout`, whatever the repair left: a step
/// ready to run, every step done, or a step still failed that nothing can get past.
#[tokio::test]
async fn a_repair_whose_request_was_lost_still_runs() {
    const PAIR: &str = "namespace: recovery\nname: pair\nversion: 1.0.0\nsteps:\n  - { name: a, handler: fail, config: { times: 1, permanent: true } }\n  - { name: b, handler: fail, config: { times: 1, permanent: true } }\n  - { name: c, handler: noop, depends_on: [a, b] }\n";
    const LAST: &str = "namespace: recovery\nname: last\nversion: 1.0.0\nsteps:\n  - { name: a, handler: noop }\n  - { name: b, handler: fail, config: { times: 1, permanent: true }, depends_on: [a] }\n";
    let env = TestEnv::new().await;
    let system = System::start(&env, vec![WorkerSpec::new("w1", &["recovery"])]).await;
    system.register(&env, PAIR).await;
    system.register(&env, LAST).await;
    let mut failed = Vec::new();
    for name in ["pair", "pair", "last"] {
        let task = system.submit("recovery", name, json!({})).await;
        let task = system.wait_final(&task.id).await;
        assert_eq!(task.status(), pb::TaskStatus::Error);
        failed.push(task);
    }
    let step = |task: &pb::Task, name: &str| {
        task.steps.iter().find(|s| s.name == name).map(|s| s.id.parse::<uuid::Uuid>().unwrap()).unwrap()
    };
    let statuses = |task: &pb::Task| task.steps.iter().map(|s| s.status()).collect::<Vec<_>>();
    use pb::StepStatus::{Complete, Error, ResolvedManually};

    // the repairs are written straight to the store: no request reaches the orchestrator
    let store = Store::connect(&env.config.database.url, 2, tasker_store::Workload::General).await.unwrap();
    let operator = tasker_store::Actor { who: "operator".into(), reason: "request lost".into() };
    // a step made ready: retried and resolved, the child of both runs
    store.retry_step(step(&failed[0], "a"), &operator).await.unwrap();
    store.resolve_step(step(&failed[0], "b"), "{}", &operator).await.unwrap();
    // one of two failed parents resolved: nothing can run, the task fails again
    store.resolve_step(step(&failed[1], "a"), "{}", &operator).await.unwrap();
    // the last step resolved: every step done, the task completes
    store.resolve_step(step(&failed[2], "b"), "{}", &operator).await.unwrap();

    let ready = system.wait_final(&failed[0].id).await;
    assert_eq!(
        (ready.status(), statuses(&ready)),
        (pb::TaskStatus::Complete, vec![Complete, ResolvedManually, Complete])
    );
    assert_eq!(ready.steps[0].attempts, 2);
    let stuck = system.wait_final(&failed[1].id).await;
    assert_eq!(
        (stuck.status(), statuses(&stuck)),
        (pb::TaskStatus::Error, vec![ResolvedManually, Error, pb::StepStatus::Pending])
    );
    let db = env.database().await;
    let history: Vec<String> = db
        .query("SELECT to_state FROM task_transitions WHERE task_id = $1::text::uuid ORDER BY sort_key", &[&stuck.id])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(history, ["pending", "in_progress", "error", "in_progress", "error"], "resumed, then failed again");
    let done = system.wait_final(&failed[2].id).await;
    assert_eq!((done.status(), statuses(&done)), (pb::TaskStatus::Complete, vec![Complete, ResolvedManually]));
    system.stop().await;
    env.cleanup().await;
}

/// A step execution lost after its commit (here: purged from its queue) is published again,
/// with the same attempt, once it has been enqueued for `enqueued_step_timeout`.
#[tokio::test]
async fn a_lost_step_execution_is_published_again() {
    let env = TestEnv::new().await;
    let mut system = System::start(&env, vec![]).await;
    system.register(&env, CHAIN).await;
    let mut broker = env.broker().await;
    let task = system.submit("recovery", "chain", json!({})).await;
    system.wait_for(&task.id, |t| t.steps[0].status() == pb::StepStatus::Enqueued).await;
    let queue = broker.topology().steps_queue("recovery");
    let mut purged = 0;
    // the queue exists once the dispatcher declared it, just before publishing; declaring
    // a quorum queue can take a while on a loaded broker (nothing republishes meanwhile:
    // the namespace has no worker)
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while purged == 0 && tokio::time::Instant::now() < deadline {
        match broker.purge(&queue).await {
            Ok(count) => purged += count,
            // a purge that meets the quorum queue declared but not yet started crashes the
            // broker's channel, and RabbitMQ closes the connection with it (its log:
            // `{case_clause,{error,noproc}}`): connect again
            Err(_) if !broker.is_connected() => broker = env.broker().await,
            Err(_) => {}
        }
        if purged == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    assert_eq!(purged, 1, "the execution was lost");
    system.add_worker(&env, WorkerSpec::new("w1", &["recovery"])).await;
    let done = system.wait_final(&task.id).await;
    assert_eq!(done.status(), pb::TaskStatus::Complete);
    assert_eq!(done.steps[0].attempts, 1, "the same attempt, published again");
    broker.close().await.unwrap();
    system.stop().await;
    env.cleanup().await;
}

/// A step waiting in the queue of a namespace no worker serves is not published again
/// (copies would pile up, one per sweep); once a worker comes, it runs the one execution.
#[tokio::test]
async fn an_unserved_namespace_is_not_flooded_with_copies() {
    let env = TestEnv::new().await;
    let mut system = System::start(&env, vec![]).await;
    system.register(&env, CHAIN).await;
    let broker = env.broker().await;
    let task = system.submit("recovery", "chain", json!({})).await;
    system.wait_for(&task.id, |t| t.steps[0].status() == pb::StepStatus::Enqueued).await;
    // well past enqueued_step_timeout (2 s in tests), several sweeps (every 0.5 s)
    tokio::time::sleep(env.config.orchestrator.enqueued_step_timeout * 2 + std::time::Duration::from_secs(1)).await;
    let queue = broker.topology().steps_queue("recovery");
    let state = broker.queue_state(&queue).await.unwrap().expect("the namespace's queue");
    assert_eq!((state.ready, state.consumers), (1, 0), "one execution waiting, no copies");

    system.add_worker(&env, WorkerSpec::new("w1", &["recovery"])).await;
    let done = system.wait_final(&task.id).await;
    assert_eq!(done.status(), pb::TaskStatus::Complete);
    assert_eq!(done.steps[0].attempts, 1);
    broker.close().await.unwrap();
    system.stop().await;
    env.cleanup().await;
}

/// Messages the orchestrator cannot use (ids that are not ids) are refused to the
/// dead-letter queue, not retried forever, and work goes on.
#[tokio::test]
async fn unusable_messages_are_dead_lettered_and_work_goes_on() {
    use tasker_messaging::Command;
    use tasker_proto::messages::{Completed, StepReport, TaskRequest, step_report::Outcome};

    let env = TestEnv::new().await;
    let system = System::start(&env, vec![WorkerSpec::new("w1", &["recovery"])]).await;
    system.register(&env, CHAIN).await;
    let broker = env.broker().await;
    let publisher = broker.publisher().await.unwrap();
    let report = StepReport {
        task_id: "not-a-task".into(),
        step_id: "not-a-step".into(),
        attempt: 1,
        worker_id: "poison".into(),
        outcome: Some(Outcome::Completed(Completed { results_json: "{}".into() })),
        started_at_unix_ms: 0,
        trace_context: Default::default(),
    };
    let request = TaskRequest { task_id: "not-a-task".into(), ..Default::default() };
    publisher.send(&[Command::Report(report), Command::Task(request)]).await.unwrap();

    let dead = broker.topology().dead_letter_queue();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let state = broker.queue_state(&dead).await.unwrap().expect("the dead-letter queue");
        if state.ready == 2 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "dead-lettered: {state:?}, expected 2");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let task = system.submit("recovery", "chain", json!({})).await;
    assert_eq!(system.wait_final(&task.id).await.status(), pb::TaskStatus::Complete);
    // counted by reason, and the queue's depth read by the sweeper
    let metrics = tasker_test_support::http_get(system.orchestrator_admin, "/metrics").await;
    assert!(metrics.contains(r#"tasker_orchestrator_dead_lettered_total{reason="undecodable"} 2"#), "{metrics}");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while !tasker_test_support::http_get(system.orchestrator_admin, "/metrics")
        .await
        .contains("tasker_orchestrator_dead_letter_queue_depth 2")
    {
        assert!(tokio::time::Instant::now() < deadline, "the sweeper reports the dead-letter queue's depth");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    broker.close().await.unwrap();
    system.stop().await;
    env.cleanup().await;
}

/// A SIGTERM is a normal stop: the process exits 0 and logs no error, also with a worker
/// attached and work done.
#[tokio::test]
async fn a_clean_stop_logs_no_error() {
    let env = TestEnv::new().await;
    let system = System::start(&env, vec![WorkerSpec::new("w1", &["recovery"])]).await;
    system.register(&env, CHAIN).await;
    for _ in 0..4 {
        let binary = env!("CARGO_BIN_EXE_orchestrator");
        let orchestrator = tasker_test_support::Service::start(binary, &env, &[], "orchestrator running").await;
        let task = system.submit("recovery", "chain", json!({})).await;
        assert_eq!(system.wait_final(&task.id).await.status(), pb::TaskStatus::Complete);
        orchestrator.stop_cleanly().await;
    }
    system.stop().await;
    env.cleanup().await;
}

/// The orchestrator's input queues are classic, which keep no delivery count: Tasker's
/// consumer keeps it. A message retried each time it arrives is delivered the limit plus
/// one times, then dead-lettered; one returned by channels that closed before settling it
/// (outages, restarts) is not counted, and still arrives past the limit.
#[tokio::test]
async fn a_message_retried_on_a_classic_queue_is_dead_lettered_past_the_limit_but_not_for_outages() {
    use tasker_messaging::{Command, QueueType};
    use tasker_proto::messages::TaskRequest;

    let mut env = TestEnv::new().await;
    env.config.amqp.delivery_limit = 3;
    let broker = env.broker().await;
    let topology = broker.topology().clone();
    let (tasks, dead) = (topology.tasks_queue(), topology.dead_letter_queue());
    assert_eq!(topology.queue_type(&tasks), QueueType::Classic, "the default for the orchestrator's queues");
    broker.declare_orchestrator().await.unwrap();
    let publisher = broker.publisher().await.unwrap();
    let requests = ["retried", "abandoned"].map(|id| TaskRequest { task_id: id.into(), ..Default::default() });
    publisher.send(&[Command::Task(requests[0].clone())]).await.unwrap();

    // retried each time it arrives
    let mut consumer = broker.consume::<TaskRequest>(&tasks, 1).await.unwrap();
    for delivery in 1..=4 {
        let incoming = consumer.next().await.unwrap();
        assert_eq!(incoming.message.as_ref().map(|r| r.task_id.as_str()), Some("retried"), "delivery {delivery}");
        incoming.ack.retry().await.unwrap();
    }
    wait_depth(&broker, &dead, 1).await;
    assert_eq!(broker.queue_state(&tasks).await.unwrap().unwrap().ready, 0, "the fifth delivery never happens");
    consumer.close().await;

    // taken and never settled: each consumer's channel closes with it in hand
    publisher.send(&[Command::Task(requests[1].clone())]).await.unwrap();
    for delivery in 1..=6 {
        let mut consumer = broker.consume::<TaskRequest>(&tasks, 1).await.unwrap();
        let incoming = consumer.next().await.unwrap();
        assert_eq!(incoming.message.as_ref().map(|r| r.task_id.as_str()), Some("abandoned"), "delivery {delivery}");
        assert_eq!(incoming.redelivered, delivery > 1);
        if delivery == 6 {
            incoming.ack.ack().await.unwrap();
        }
        consumer.close().await;
    }
    assert_eq!(broker.queue_state(&dead).await.unwrap().unwrap().ready, 1, "only the retried one");
    publisher.close().await;
    broker.close().await.unwrap();
    env.cleanup().await;
}

/// Queues an earlier version declared as quorum queues keep working: the orchestrator
/// (and task-api) use them as they are, and work flows.
#[tokio::test]
async fn orchestrator_queues_declared_as_quorum_by_an_earlier_version_are_used_as_they_are() {
    let mut env = TestEnv::new().await;
    env.config.amqp.orchestrator_queue_type = "quorum".into();
    let old = env.broker().await;
    let tasks = old.topology().tasks_queue();
    assert_eq!(old.topology().queue_type(&tasks), tasker_messaging::QueueType::Quorum, "the earlier declaration");
    old.declare_orchestrator().await.unwrap();
    old.close().await.unwrap();
    env.config.amqp.orchestrator_queue_type = "classic".into();
    let system = System::start(&env, vec![WorkerSpec::new("w1", &["recovery"])]).await;
    system.register(&env, CHAIN).await;
    let task = system.submit("recovery", "chain", json!({})).await;
    assert_eq!(system.wait_final(&task.id).await.status(), pb::TaskStatus::Complete);
    system.stop().await;
    env.cleanup().await;
}

async fn wait_depth(broker: &tasker_messaging::Broker, queue: &str, depth: u32) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let state = broker.queue_state(queue).await.unwrap().expect("the queue exists");
        if state.ready == depth {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{queue}: {state:?}, expected {depth} ready");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
