//! Availability under faults: the services reach Postgres and RabbitMQ through a fault
//! proxy, and the tests take the servers away (every connection cut, new ones refused)
//! and give them back, or have the broker itself close connections. Through public
//! surfaces only: gRPC, the admin endpoints, a real event subscriber.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::{Value, json};
use step_worker::{Registry, StepError, StepHandler, StepInput};
use tasker_proto::v1 as pb;
use tasker_runtime::Config;
use tasker_test_support::{FaultProxy, System, TestEnv, WorkerSpec, http_request, wait_status};
use tokio_util::sync::CancellationToken;

use crate::support::*;

const CHAIN: &str = "namespace: faults\nname: chain\nversion: 1.0.0\nsteps:\n  - { name: a, handler: noop }\n  - { name: b, handler: noop, depends_on: [a] }\n";

/// The status code of an admin endpoint.
async fn status(addr: std::net::SocketAddr, path: &str) -> u16 {
    http_request(addr, path).await.0
}

/// The test's configuration with the broker reached through `amqp`, and the sweeper's
/// pending-task repair pushed out of reach: a task that starts did so because its request
/// got through, not because the sweeper found it.
fn through_broker_proxy(env: &TestEnv, amqp: &FaultProxy) -> Config {
    let mut config = env.config.clone();
    config.amqp.url = amqp.url(&config.amqp.url);
    config.orchestrator.pending_task_timeout = Duration::from_secs(600);
    config
}

/// How a test takes a server away.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Every connection cut and new ones refused: the clients hear of it at once.
    Down,
    /// Nothing forwarded and nothing closed, as behind a partition or on a frozen host:
    /// only the clients' own timeouts tell (the database's statement timeout, the
    /// broker's heartbeat), here set short.
    Silent,
}

impl Fault {
    fn start(self, proxy: &FaultProxy) {
        match self {
            Fault::Down => proxy.down(),
            Fault::Silent => proxy.silence(),
        }
    }
}

/// The broker goes away and comes back: task-api reports not ready meanwhile, keeps the
/// requests of tasks created during the outage, and sends them once reconnected; every
/// service reconnects; steps are dispatched and events relayed again.
#[tokio::test]
async fn every_service_rides_out_a_broker_outage() {
    broker_fault(Fault::Down).await
}

/// The same when the broker goes silent: every service notices by the missing
/// heartbeats, and connects again once the broker answers.
#[tokio::test]
async fn every_service_notices_a_silent_broker_and_rides_it_out() {
    broker_fault(Fault::Silent).await
}

async fn broker_fault(fault: Fault) {
    let env = TestEnv::new().await;
    let amqp = FaultProxy::for_url(&env.config.amqp.url).await;
    let mut config = through_broker_proxy(&env, &amqp);
    config.amqp.heartbeat = Duration::from_secs(1);
    let system = System::start_with(&env, config, vec![WorkerSpec::new("w1", &["faults"])]).await;
    system.register(&env, CHAIN).await;
    let before = system.wait_final(&system.submit("faults", "chain", json!({})).await.id).await;
    assert_eq!(before.status(), pb::TaskStatus::Complete);
    let (subscriber, mut events) = env.subscribe(&["faults.#"]).await;

    fault.start(&amqp);
    wait_status(system.api_admin, "/health/ready", 503).await;
    wait_status(system.orchestrator_admin, "/health/ready", 503).await;
    let during = system.submit("faults", "chain", json!({ "created": "during the outage" })).await;
    assert_eq!(during.status(), pb::TaskStatus::Pending, "created and committed while the broker is away");
    tokio::time::sleep(Duration::from_secs(2)).await;
    amqp.heal();

    let done = system.wait_final(&during.id).await;
    assert_eq!(done.status(), pb::TaskStatus::Complete, "its request was sent once the broker was back");
    let received = collect_until(&mut events, |got| {
        got.iter().any(|r| r.task_id() == during.id && r.kind() == "dev.tasker.task.completed")
    })
    .await;
    let kinds: Vec<&str> = received.iter().filter(|r| r.task_id() == during.id).map(|r| r.kind()).collect();
    assert_eq!(kinds.first(), Some(&"dev.tasker.task.created"), "from its creation on: {kinds:?}");
    // every transition of the task, its steps' included, was announced
    let mut transitions: Vec<&str> = done.transitions.iter().map(|t| t.id.as_str()).collect();
    transitions.extend(done.steps.iter().flat_map(|s| s.transitions.iter().map(|t| t.id.as_str())));
    transitions.sort_unstable();
    let mut announced: Vec<&str> =
        received.iter().filter(|r| r.task_id() == during.id).filter_map(|r| r.event["id"].as_str()).collect();
    announced.sort_unstable();
    announced.dedup();
    assert_eq!(announced, transitions, "every event of the task relayed");
    for admin in [system.api_admin, system.orchestrator_admin, system.publisher_admin] {
        wait_status(admin, "/health/ready", 200).await;
        assert!(metric(admin, "tasker_broker_reconnects_total").await >= 1.0);
        assert!(metric(admin, "tasker_broker_disconnected_seconds_total").await >= 1.0);
    }
    subscriber.close().await.unwrap();
    system.stop().await;
    env.cleanup().await;
}

/// The connections' ids at the broker whose client ports are these.
fn broker_connections(ports: &[u16]) -> Option<Vec<String>> {
    let output = std::process::Command::new("rabbitmqctl")
        .args(["list_connections", "--quiet", "--no-table-headers", "pid", "peer_port"])
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let listed = String::from_utf8_lossy(&output.stdout).into_owned();
    Some(
        listed
            .lines()
            .filter_map(|line| {
                let (pid, port) = line.trim().rsplit_once(char::is_whitespace)?;
                ports.contains(&port.trim().parse().ok()?).then(|| pid.trim().to_owned())
            })
            .collect(),
    )
}

/// The broker itself closes every connection of the services (`rabbitmqctl
/// close_connection`, as an operator or a broker shutdown does): each service notices,
/// reconnects, and work goes on.
#[tokio::test]
async fn services_reconnect_after_the_broker_closes_their_connections() {
    let env = TestEnv::new().await;
    let amqp = FaultProxy::for_url(&env.config.amqp.url).await;
    let config = through_broker_proxy(&env, &amqp);
    let system = System::start_with(&env, config, vec![WorkerSpec::new("w1", &["faults"])]).await;
    system.register(&env, CHAIN).await;
    assert_eq!(
        system.wait_final(&system.submit("faults", "chain", json!({})).await.id).await.status(),
        pb::TaskStatus::Complete
    );
    let Some(connections) = broker_connections(&amqp.upstream_ports()) else {
        eprintln!("rabbitmqctl is not usable here: the broker-side close is covered by the proxy test only");
        system.stop().await;
        env.cleanup().await;
        return;
    };
    assert!(connections.len() >= 4, "task-api, orchestrator, event-publisher and the worker: {connections:?}");
    for pid in &connections {
        let closed = std::process::Command::new("rabbitmqctl")
            .args(["close_connection", pid, "closed by the fault test"])
            .output()
            .expect("rabbitmqctl");
        assert!(closed.status.success(), "{}", String::from_utf8_lossy(&closed.stderr));
    }
    for admin in [system.api_admin, system.orchestrator_admin, system.publisher_admin] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while metric(admin, "tasker_broker_reconnects_total").await < 1.0 {
            assert!(tokio::time::Instant::now() < deadline, "{admin} never reconnected");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let after = system.wait_final(&system.submit("faults", "chain", json!({})).await.id).await;
    assert_eq!(after.status(), pb::TaskStatus::Complete);
    system.stop().await;
    env.cleanup().await;
}

/// Each service's configuration: `env`'s, `service` reaching the broker through `proxy`.
fn broker_through<'a>(env: &'a TestEnv, proxy: &'a FaultProxy, service: &'static str) -> impl Fn(&str) -> Config + 'a {
    move |name| {
        let mut config = env.config.clone();
        if name == service {
            config.amqp.url = proxy.url(&config.amqp.url);
        }
        config
    }
}

/// Sleeps `config.ms`, counting its calls per step.
#[derive(Clone, Default)]
struct Counted(Arc<Mutex<HashMap<String, u32>>>);

#[async_trait::async_trait]
impl StepHandler for Counted {
    async fn call(&self, input: StepInput) -> Result<Value, StepError> {
        *self.0.lock().unwrap().entry(input.step_id.to_string()).or_default() += 1;
        let ms = input.config["ms"].as_u64().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(json!({ "slept_ms": ms }))
    }
}

/// A system with each service configured by `config_for` and one worker counting its
/// handler's runs, and the template `faults/long`: a 3 s step, then another.
async fn with_a_long_step(env: &TestEnv, config_for: impl Fn(&str) -> Config) -> (System, Counted) {
    let counted = Counted::default();
    let mut registry = Registry::with_builtins();
    registry.register("counted", counted.clone());
    let worker = WorkerSpec::new("w1", &["faults"]).registry(registry);
    let system = System::start_each(env, config_for, vec![worker]).await;
    system
        .register(
            env,
            "namespace: faults\nname: long\nversion: 1.0.0\ndefaults: { timeout: 60s }\nsteps:\n  \
             - { name: slow, handler: counted, config: { ms: 3000 } }\n  \
             - { name: after, handler: counted, depends_on: [slow] }\n",
        )
        .await;
    (system, counted)
}

/// A step running when its worker's broker connection is lost goes on running: the
/// worker connects again at once (other work goes on meanwhile) and answers the
/// execution's redelivery with the outcome of the run under way, so the handler runs once
/// and the step keeps its one attempt, however long it runs past `worker.drain_timeout`.
#[tokio::test]
async fn a_step_running_through_its_workers_lost_connection_runs_once() {
    let env = TestEnv::new().await;
    let amqp = FaultProxy::for_url(&env.config.amqp.url).await;
    let (system, counted) = with_a_long_step(&env, |service| {
        let mut config = env.config.clone();
        if service == "step-worker" {
            config.amqp.url = amqp.url(&config.amqp.url);
            // a shutdown would give up on the running step after 1 s; a lost
            // connection must not
            config.worker.drain_timeout = Duration::from_secs(1);
        }
        config
    })
    .await;
    system.register(&env, CHAIN).await;
    let long = system.submit("faults", "long", json!({})).await;
    let running = system
        .wait_for(&long.id, |t| t.steps.iter().any(|s| s.name == "slow" && s.status() == pb::StepStatus::InProgress))
        .await;
    let worker_admin = system.worker_admins[0];
    amqp.cut();

    // back at once, and taking other work while the slow step still runs
    let quick = system.submit("faults", "chain", json!({})).await;
    let quick = system.wait_final(&quick.id).await;
    assert_eq!(quick.status(), pb::TaskStatus::Complete, "{quick:#?}");
    assert_eq!(status(worker_admin, "/health/ready").await, 200);
    let request = pb::GetTaskRequest { task_id: long.id.clone(), ..Default::default() };
    let meanwhile = system.tasks().get_task(request).await.unwrap().into_inner();
    let slow = meanwhile.steps.iter().find(|s| s.name == "slow").unwrap();
    assert_eq!(slow.status(), pb::StepStatus::InProgress, "the other task was done while the slow step ran on");
    assert!(metric(worker_admin, "tasker_broker_reconnects_total").await >= 1.0);

    let long = system.wait_final(&long.id).await;
    assert_eq!(long.status(), pb::TaskStatus::Complete, "{long:#?}");
    let steps = steps_by_name(&long);
    assert_eq!(steps["slow"].attempts, 1, "the lost connection cost no attempt");
    let slow_id = &running.steps.iter().find(|s| s.name == "slow").unwrap().id;
    assert_eq!(counted.0.lock().unwrap()[slow_id], 1, "the slow step's handler ran once");
    let answered = metric(worker_admin, "tasker_worker_deliveries_answered_total").await;
    assert_eq!(answered, 1.0, "the redelivery was answered with the run's report");
    system.stop().await;
    env.cleanup().await;
}

/// The broker blocks every connection for a resource alarm (its disk or memory past the
/// limit: `connection.blocked`, nothing read but heartbeats) for longer than a confirm is
/// awaited (30 s). The services wait for it to clear instead of taking it for a broker that
/// does not answer and sending again: readiness says why and liveness holds past
/// `health.live_timeout`; a task created meanwhile is answered; a step running when it
/// started and one the sweeper dispatched meanwhile go out once. Once it clears, every
/// handler has run once, on its first attempt, on either of two workers, and no service
/// connected again.
#[tokio::test]
async fn a_broker_blocking_its_connections_is_waited_out_without_sending_twice() {
    let env = TestEnv::new().await;
    let amqp = FaultProxy::for_broker(&env.config.amqp.url).await;
    let mut config = through_broker_proxy(&env, &amqp);
    config.health.live_timeout = Duration::from_secs(2);
    // the task created during the block is started by the sweeper, whose executions
    // then wait on the block too
    config.orchestrator.pending_task_timeout = Duration::from_secs(2);
    config.orchestrator.sweep_interval = Duration::from_secs(1);
    // that execution is committed 30 s before it can go out: the tests' 5 s would have
    // the sweeper take it for lost as soon as its guard after the block ends (1.5 s here,
    // 15 s by default), should a loaded machine keep its start unreported that long
    config.orchestrator.enqueued_step_timeout = Duration::from_secs(60);
    let counted = Counted::default();
    let workers = ["w1", "w2"].map(|id| {
        let mut registry = Registry::with_builtins();
        registry.register("counted", counted.clone());
        WorkerSpec::new(id, &["faults"]).registry(registry)
    });
    let system = System::start_with(&env, config, workers.into()).await;
    system
        .register(
            &env,
            "namespace: faults\nname: blocked\nversion: 1.0.0\ndefaults: { timeout: 120s }\nsteps:\n  \
             - { name: first, handler: counted, config: { ms: 2000 } }\n  \
             - { name: then, handler: counted, depends_on: [first] }\n",
        )
        .await;
    let before = system.submit("faults", "blocked", json!({})).await;
    system
        .wait_for(&before.id, |t| t.steps.iter().any(|s| s.name == "first" && s.status() == pb::StepStatus::InProgress))
        .await;
    let admins = [system.api_admin, system.orchestrator_admin, system.publisher_admin, system.worker_admins[0]];

    amqp.block("low on disk");
    for admin in admins {
        wait_status(admin, "/health/ready", 503).await;
        let (_, body) = http_request(admin, "/health/ready").await;
        assert!(body.contains("broker: blocked by the broker: low on disk"), "{admin}: {body}");
        assert_eq!(metric(admin, "tasker_broker_blocked").await, 1.0, "{admin}");
    }
    let during = system.submit("faults", "blocked", json!({ "created": "during the block" })).await;
    assert_eq!(during.status(), pb::TaskStatus::Pending, "answered once committed");
    // past the confirm timeout (30 s), and liveness never failing for it
    let until = tokio::time::Instant::now() + Duration::from_secs(35);
    while tokio::time::Instant::now() < until {
        for admin in admins {
            assert_eq!(status(admin, "/health/live").await, 200, "{admin}: a restart cannot clear the alarm");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    amqp.unblock();

    for task in [&before, &during] {
        let done = system.wait_final(&task.id).await;
        assert_eq!(done.status(), pb::TaskStatus::Complete, "{done:#?}");
        for step in &done.steps {
            assert_eq!(step.attempts, 1, "{}: the block cost no attempt", step.name);
            assert_eq!(counted.0.lock().unwrap()[&step.id], 1, "{}: its handler ran once", step.name);
        }
    }
    for admin in admins.into_iter().chain([system.worker_admins[1]]) {
        wait_status(admin, "/health/ready", 200).await;
        assert_eq!(metric(admin, "tasker_broker_blocked").await, 0.0, "{admin}");
        assert_eq!(metric(admin, "tasker_broker_reconnects_total").await, 0.0, "{admin}: no reconnection");
    }
    assert_eq!(
        metric_sum(system.orchestrator_admin, "tasker_orchestrator_reports_dropped_total").await,
        0.0,
        "no report sent twice"
    );
    system.stop().await;
    env.cleanup().await;
}

/// The database refuses writes for a while, as a standby does when a failover leaves the
/// services' sessions on a node that is no longer the primary (here: the database set
/// `default_transaction_read_only` and every session opened again through the proxy).
/// Readiness says so, CreateTask is `UNAVAILABLE` and writes nothing, and the report of
/// the step that ends meanwhile is held, not dead-lettered. Once writes are allowed again,
/// the services leave their read-only sessions behind on their own (nothing cuts them this
/// time) and the task completes with its one attempt and one run.
#[tokio::test]
async fn a_database_refusing_writes_for_a_while_costs_no_attempt() {
    let env = TestEnv::new().await;
    let db = FaultProxy::for_url(&env.config.database.url).await;
    let (system, counted) = with_a_long_step(&env, |_| {
        let mut config = env.config.clone();
        config.database.url = db.url(&config.database.url);
        config
    })
    .await;
    let name = env.config.database.url.rsplit('/').next().unwrap().split('?').next().unwrap().to_owned();
    let admin = env.database().await;
    let long = system.submit("faults", "long", json!({})).await;
    system.wait_for(&long.id, |t| t.steps[0].status() == pb::StepStatus::InProgress).await;

    admin.batch_execute(&format!("ALTER DATABASE \"{name}\" SET default_transaction_read_only = on")).await.unwrap();
    db.cut();
    for service in [system.api_admin, system.orchestrator_admin, system.publisher_admin] {
        wait_status(service, "/health/ready", 503).await;
        let (_, body) = http_request(service, "/health/ready").await;
        assert!(body.contains("database: read-only"), "{service}: {body}");
    }
    let request = pb::CreateTaskRequest { namespace: "faults".into(), name: "long".into(), ..Default::default() };
    let refused = system.tasks().create_task(request).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    let listed = system.tasks().list_tasks(pb::ListTasksRequest::default()).await.unwrap().into_inner();
    assert_eq!(listed.tasks.len(), 1, "nothing written");
    // the slow step (3 s) ends while writes are refused: its report waits
    let ran = |counted: &Counted| counted.0.lock().unwrap().values().sum::<u32>();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while ran(&counted) < 1 {
        assert!(tokio::time::Instant::now() < deadline, "the slow step never ran");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(4)).await;

    admin.batch_execute(&format!("ALTER DATABASE \"{name}\" RESET default_transaction_read_only")).await.unwrap();
    let done = system.wait_final(&long.id).await;
    assert_eq!(done.status(), pb::TaskStatus::Complete, "{done:#?}");
    for step in &done.steps {
        assert_eq!(step.attempts, 1, "{}: refused writes cost no attempt", step.name);
        assert_eq!(counted.0.lock().unwrap()[&step.id], 1, "{}: its handler ran once", step.name);
    }
    assert_eq!(metric_sum(system.orchestrator_admin, "tasker_orchestrator_dead_lettered_total").await, 0.0);
    for service in [system.api_admin, system.orchestrator_admin, system.publisher_admin] {
        wait_status(service, "/health/ready", 200).await;
    }
    let again = system.submit("faults", "long", json!({})).await;
    assert_eq!(again.status(), pb::TaskStatus::Pending, "created again");
    system.stop().await;
    env.cleanup().await;
}

/// Sleeps `config.ms`, keeping the most calls it saw running at once.
#[derive(Clone, Default)]
struct AtOnce {
    running: Arc<Mutex<(u32, u32)>>,
}

#[async_trait::async_trait]
impl StepHandler for AtOnce {
    async fn call(&self, input: StepInput) -> Result<Value, StepError> {
        {
            let mut guard = self.running.lock().unwrap();
            guard.0 += 1;
            guard.1 = guard.1.max(guard.0);
        }
        tokio::time::sleep(Duration::from_millis(input.config["ms"].as_u64().unwrap_or(0))).await;
        self.running.lock().unwrap().0 -= 1;
        Ok(json!({}))
    }
}

/// `worker.concurrency` bounds the steps a worker runs at once, those still running from
/// a connection it lost included. While the worker was away, the execution of the step it
/// was running went elsewhere (here: purged from the queue, as another worker would have
/// taken it); back, the worker is sent new work at once, and that waits for the old run
/// to end before its handler starts.
#[tokio::test]
async fn concurrency_counts_the_steps_still_running_from_a_lost_connection() {
    let env = TestEnv::new().await;
    let amqp = FaultProxy::for_url(&env.config.amqp.url).await;
    let at_once = AtOnce::default();
    let mut registry = Registry::with_builtins();
    registry.register("at_once", at_once.clone());
    let worker = WorkerSpec::new("w1", &["faults"]).registry(registry).concurrency(1);
    let system = System::start_each(&env, broker_through(&env, &amqp, "step-worker"), vec![worker]).await;
    let one_step = |name: &str, ms: u64| {
        format!(
            "namespace: faults\nname: {name}\nversion: 1.0.0\ndefaults: {{ timeout: 60s }}\nsteps:\n  \
             - {{ name: only, handler: at_once, config: {{ ms: {ms} }} }}\n"
        )
    };
    system.register(&env, &one_step("slow", 4000)).await;
    system.register(&env, &one_step("quick", 50)).await;
    let slow = system.submit("faults", "slow", json!({})).await;
    system.wait_for(&slow.id, |t| t.steps[0].status() == pb::StepStatus::InProgress).await;

    amqp.down();
    let broker = env.broker().await;
    let queue = broker.topology().steps_queue("faults");
    // the broker gives the lost connection's execution back to the queue
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while broker.queue_state(&queue).await.unwrap().is_none_or(|q| q.ready == 0) {
        assert!(tokio::time::Instant::now() < deadline, "the execution never went back to its queue");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    broker.purge(&queue).await.unwrap();
    broker.close().await.unwrap();
    amqp.heal();
    wait_status(system.worker_admins[0], "/health/ready", 200).await;

    let quick = system.submit("faults", "quick", json!({})).await;
    let quick = system.wait_final(&quick.id).await;
    assert_eq!(quick.status(), pb::TaskStatus::Complete, "{quick:#?}");
    assert_eq!(at_once.running.lock().unwrap().1, 1, "one step at a time, as configured");
    let slow = system.tasks().get_task(pb::GetTaskRequest { task_id: slow.id, ..Default::default() }).await;
    let slow = slow.unwrap().into_inner();
    assert!(
        ts(&quick.steps[0].started_at) >= ts(&slow.steps[0].started_at) + chrono::Duration::milliseconds(3900),
        "the new step started once the old run had ended: {quick:#?} {slow:#?}"
    );
    system.stop().await;
    env.cleanup().await;
}

/// A step that runs long without reporting its start (`worker.started_report_after`
/// longer than its run) stays `enqueued`, so the sweeper publishes its execution again,
/// with the same attempt, every `enqueued_step_timeout`. The copies reach the worker
/// running it, which answers each with the outcome of that one run: the handler runs once.
#[tokio::test]
async fn copies_of_a_running_steps_execution_wait_for_its_one_run() {
    let env = TestEnv::new().await;
    let (system, counted) = with_a_long_step(&env, |service| {
        let mut config = env.config.clone();
        config.orchestrator.enqueued_step_timeout = Duration::from_millis(500);
        config.orchestrator.sweep_interval = Duration::from_millis(250);
        if service == "step-worker" {
            config.worker.started_report_after = Duration::from_secs(60);
        }
        config
    })
    .await;
    let task = system.submit("faults", "long", json!({})).await;
    let task = system.wait_final(&task.id).await;
    assert_eq!(task.status(), pb::TaskStatus::Complete, "{task:#?}");
    let steps = steps_by_name(&task);
    assert_eq!(steps["slow"].attempts, 1);
    assert_eq!(counted.0.lock().unwrap()[&steps["slow"].id], 1, "the handler ran once for all the copies");
    // each copy was answered with the run's report, applied once and the rest dropped
    let dropped = metric_sum(system.orchestrator_admin, "tasker_orchestrator_reports_dropped_total").await;
    assert!(dropped >= 2.0, "copies sent while the step ran were answered: {dropped} reports dropped");
    let answered = metric(system.worker_admins[0], "tasker_worker_deliveries_answered_total").await;
    assert!(answered >= 2.0, "the worker counts the copies it answered: {answered}");
    // every copy was answered and acked: nothing waits in the step queue or unacked
    let broker = env.broker().await;
    let queue = broker.queue_state(&broker.topology().steps_queue("faults")).await.unwrap().unwrap();
    assert_eq!(queue.ready, 0, "no copy left waiting");
    broker.close().await.unwrap();
    system.stop().await;
    env.cleanup().await;
}

/// Postgres goes away under load and comes back: the orchestrator holds the reports it
/// has (unacked) and applies them once the database returns. No message is dead-lettered,
/// no attempt is spent on the outage and no handler runs twice.
#[tokio::test]
async fn a_database_outage_under_load_costs_no_attempt_and_no_rerun() {
    database_fault_under_load(Fault::Down).await
}

/// The same when the database goes silent: the statements waiting on it fail once the
/// statement timeout and its grace have passed, readiness says so without hanging, and
/// the held work is applied once the database answers again.
#[tokio::test]
async fn a_silent_database_under_load_is_noticed_and_costs_no_attempt() {
    database_fault_under_load(Fault::Silent).await
}

async fn database_fault_under_load(fault: Fault) {
    let env = TestEnv::new().await;
    let db = FaultProxy::for_url(&env.config.database.url).await;
    let mut config = env.config.clone();
    config.database.url = db.url(&config.database.url);
    config.database.statement_timeout = Duration::from_secs(1);
    // the sweeper must not be what finishes the work
    config.orchestrator.enqueued_step_timeout = Duration::from_secs(600);
    let counted = Counted::default();
    let mut registry = Registry::with_builtins();
    registry.register("counted", counted.clone());
    let worker = WorkerSpec::new("w1", &["faults"]).registry(registry).concurrency(16);
    let system = System::start_with(&env, config, vec![worker]).await;
    system
        .register(
            &env,
            r#"
namespace: faults
name: fan
version: 1.0.0
defaults: { max_attempts: 3, timeout: 60s }
steps:
  - { name: a, handler: counted, config: { ms: 300 } }
  - { name: b, handler: counted, config: { ms: 300 } }
  - { name: c, handler: counted, config: { ms: 600 } }
  - { name: d, handler: counted, depends_on: [a, b, c], config: { ms: 100 } }
"#,
        )
        .await;
    let mut tasks = Vec::new();
    for i in 0..12 {
        tasks.push(system.submit("faults", "fan", json!({ "i": i })).await.id);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    fault.start(&db);
    // the orchestrator says it is holding work (its admin endpoint needs no database): a
    // batch waiting on a silent database gave up once the statement timeout (1 s) and
    // its grace (2 s) had passed, well before the pool's own 10 s timeouts would have
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    while metric(system.orchestrator_admin, "tasker_orchestrator_consumers_paused").await < 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "no batch was held through the {fault:?} database");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // readiness says so, without hanging on the silence, and liveness not yet
    for admin in [system.api_admin, system.orchestrator_admin, system.publisher_admin] {
        wait_status(admin, "/health/ready", 503).await;
        assert_eq!(status(admin, "/health/live").await, 200, "down, but not for long yet");
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    db.heal();

    for id in &tasks {
        let task = system.wait_final(id).await;
        assert_eq!(task.status(), pb::TaskStatus::Complete, "{task:#?}");
        for step in &task.steps {
            assert_eq!(step.attempts, 1, "{}: the outage spent no attempt", step.name);
        }
    }
    assert_eq!(metric(system.orchestrator_admin, "tasker_orchestrator_consumers_paused").await, 0.0);
    let calls = counted.0.lock().unwrap().clone();
    assert_eq!(calls.len(), tasks.len() * 4, "every step ran");
    assert!(calls.values().all(|&n| n == 1), "no handler ran twice: {calls:?}");
    let broker = env.broker().await;
    let dead = broker.queue_state(&broker.topology().dead_letter_queue()).await.unwrap();
    assert_eq!(dead.map(|q| q.ready), Some(0), "nothing dead-lettered");
    broker.close().await.unwrap();
    system.stop().await;
    env.cleanup().await;
}

/// An event-publisher replica whose broker connection breaks gives the relay up at once
/// and reconnects: the healthy replica relays meanwhile, and the broken one relays again
/// once the broker is back (here, alone).
#[tokio::test]
async fn a_broken_relay_replica_steps_aside_and_recovers() {
    let env = TestEnv::new().await;
    let mut system = System::start(&env, vec![WorkerSpec::new("w1", &["faults"])]).await;
    system.register(&env, CHAIN).await;
    let amqp = FaultProxy::for_url(&env.config.amqp.url).await;
    let mut config = env.config.clone();
    config.amqp.url = amqp.url(&config.amqp.url);
    let replica = event_publisher::EventPublisher::bind(config).await.unwrap();
    let replica_admin = replica.admin_addr();
    let stop = CancellationToken::new();
    let replica = tokio::spawn(replica.run(stop.clone()));
    wait_status(replica_admin, "/health/ready", 200).await;
    let (subscriber, mut events) = env.subscribe(&["faults.#"]).await;

    amqp.down();
    let during = system.submit("faults", "chain", json!({})).await;
    collect_until(&mut events, |got| {
        got.iter().any(|r| r.task_id() == during.id && r.kind() == "dev.tasker.task.completed")
    })
    .await;
    amqp.heal();
    wait_status(replica_admin, "/health/ready", 200).await;
    assert!(metric(replica_admin, "tasker_broker_reconnects_total").await >= 1.0);

    // the healthy replica stops: the recovered one must relay alone
    system.stop_service("event-publisher").await;
    let after = system.submit("faults", "chain", json!({})).await;
    let received = collect_until(&mut events, |got| {
        got.iter().any(|r| r.task_id() == after.id && r.kind() == "dev.tasker.task.completed")
    })
    .await;
    assert_eq!(received.iter().filter(|r| r.task_id() == after.id).count(), 9, "every event of the task");
    stop.cancel();
    replica.await.unwrap().unwrap();
    subscriber.close().await.unwrap();
    system.stop().await;
    env.cleanup().await;
}

/// task-api losing its broker ends the WatchTask streams it serves with UNAVAILABLE (the
/// subscription they shared went with the connection), and the subscription is not left
/// behind; once task-api is connected again, a watch opened anew replays what the first
/// missed and follows the task to its end.
#[tokio::test]
async fn watches_end_unavailable_when_task_api_loses_the_broker_and_can_be_opened_again() {
    let env = TestEnv::new().await;
    let amqp = FaultProxy::for_url(&env.config.amqp.url).await;
    let system =
        System::start_each(&env, broker_through(&env, &amqp, "task-api"), vec![WorkerSpec::new("w1", &["faults"])])
            .await;
    system
        .register(
            &env,
            "namespace: faults\nname: napping\nversion: 1.0.0\nsteps:\n  - { name: nap, handler: sleep, config: { ms: 1500 } }\n  - { name: after, handler: noop, depends_on: [nap] }\n",
        )
        .await;
    let task = system.submit("faults", "napping", json!({})).await;
    let request = || pb::WatchTaskRequest { task_id: task.id.clone() };
    let mut stream = system.tasks().watch_task(request()).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().expect("the task's first event");
    assert_eq!(first.r#type, "dev.tasker.task.created");
    assert_eq!(metric(system.api_admin, "tasker_api_watch_subscriptions").await, 1.0);

    amqp.cut();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended without saying why"),
                Err(status) => break status,
            }
        }
    })
    .await
    .expect("the stream ends once the broker connection is lost");
    assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended:?}");
    assert_eq!(metric(system.api_admin, "tasker_api_watch_subscriptions").await, 0.0, "nothing left behind");

    wait_status(system.api_admin, "/health/ready", 200).await;
    let mut again = system.tasks().watch_task(request()).await.unwrap().into_inner();
    let mut kinds = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(event) = again.message().await.unwrap() {
            kinds.push(event.r#type);
        }
    });
    read.await.expect("the new stream follows the task to its end");
    assert_eq!(kinds.first().map(String::as_str), Some("dev.tasker.task.created"), "the history replayed");
    assert_eq!(kinds.last().map(String::as_str), Some("dev.tasker.task.completed"), "{kinds:?}");
    system.stop().await;
    env.cleanup().await;
}

/// A broker slower to confirm than the database's statement timeout: the relay's claim
/// waits for the confirms (up to the relay's own bound) instead of being ended by the
/// server as idle, so every event is relayed once and the outbox drains, rather than the
/// same rows being published again each time the claim was ended under them.
#[tokio::test]
async fn a_broker_slower_to_confirm_than_the_statement_timeout_gets_each_event_once() {
    let env = TestEnv::new().await;
    let amqp = FaultProxy::for_url(&env.config.amqp.url).await;
    let system = System::start_each(
        &env,
        |service| {
            let mut config = env.config.clone();
            if service == "event-publisher" {
                config.amqp.url = amqp.url(&config.amqp.url);
                config.database.statement_timeout = Duration::from_millis(500);
            }
            config
        },
        vec![WorkerSpec::new("w1", &["faults"])],
    )
    .await;
    system.register(&env, CHAIN).await;
    let (subscriber, mut events) = env.subscribe(&["faults.#"]).await;
    // each chunk either way waits 400 ms: a batch's confirms come 0.8 s or more after it
    // was claimed, well past the 0.5 s a session may stay idle in a transaction
    amqp.latency(Duration::from_millis(400));
    let task = system.submit("faults", "chain", json!({})).await;
    let received = collect_until(&mut events, |got| {
        got.iter().any(|r| r.task_id() == task.id && r.kind() == "dev.tasker.task.completed")
    })
    .await;
    let db = env.database().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left: i64 = db.query_one("SELECT count(*) FROM outbox", &[]).await.unwrap().get(0);
        if left == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{left} outbox rows never deleted: the claims were ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // what came in the meantime, once more
    let mut all = received;
    all.extend(collect_until(&mut events, |_| true).await);
    let mut ids: Vec<&str> = all.iter().map(|r| r.event["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 9, "every event of the task, once: {:?}", all.iter().map(|r| r.kind()).collect::<Vec<_>>());
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 9, "no event relayed twice");
    amqp.heal();
    drop(db);
    subscriber.close().await.unwrap();
    system.stop().await;
    env.cleanup().await;
}

/// The system, with the sweeper's pending-task repair out of reach (a task that starts
/// was requested), and the chain registered.
async fn system_without_pending_repair(env: &TestEnv) -> System {
    let mut config = env.config.clone();
    config.orchestrator.pending_task_timeout = Duration::from_secs(600);
    let system = System::start_with(env, config, vec![WorkerSpec::new("w1", &["faults"])]).await;
    system.register(env, CHAIN).await;
    system
}

/// A second task-api, reaching the broker through `amqp`: its client, its admin address,
/// what stops it, and its run (which panics if the task-api failed).
async fn second_task_api(
    env: &TestEnv,
    amqp: &FaultProxy,
) -> (
    pb::task_service_client::TaskServiceClient<tonic::transport::Channel>,
    std::net::SocketAddr,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let mut config = env.config.clone();
    config.amqp.url = amqp.url(&env.config.amqp.url);
    let api = task_api::TaskApi::bind(config).await.unwrap();
    let (addr, admin) = (api.grpc_addr(), api.admin_addr());
    let stop = CancellationToken::new();
    let running = tokio::spawn({
        let stop = stop.clone();
        async move { api.run(stop).await.expect("the second task-api ran") }
    });
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap();
    (pb::task_service_client::TaskServiceClient::new(channel.connect_lazy()), admin, stop, running)
}

/// A retried CreateTask answered "deduplicated" for a task still pending sends its
/// request again: the first one was lost with the process that created the task.
#[tokio::test]
async fn a_deduplicated_create_of_a_pending_task_requests_it_again() {
    let env = TestEnv::new().await;
    let amqp = FaultProxy::for_url(&env.config.amqp.url).await;
    let system = system_without_pending_repair(&env).await;

    // a second task-api whose broker is away: it commits the task, cannot send the
    // request, and is then stopped, losing the request it kept
    amqp.down();
    let (mut client, _, stop, running) = second_task_api(&env, &amqp).await;
    let request = pb::CreateTaskRequest {
        namespace: "faults".into(),
        name: "chain".into(),
        idempotency_key: "order-42".into(),
        ..Default::default()
    };
    let mut first = None;
    for _ in 0..100 {
        match client.create_task(request.clone()).await {
            Ok(created) => {
                first = Some(created.into_inner());
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let first = first.expect("the second task-api answers").task.unwrap();
    stop.cancel();
    running.await.unwrap();
    assert_eq!(first.status(), pb::TaskStatus::Pending);

    // the client retries against a healthy task-api
    let again = system.tasks().create_task(request).await.unwrap().into_inner();
    assert!(again.deduplicated);
    assert_eq!(again.task.unwrap().id, first.id);
    let done = system.wait_final(&first.id).await;
    assert_eq!(done.status(), pb::TaskStatus::Complete, "requested again, not left to the sweeper");
    system.stop().await;
    env.cleanup().await;
}

/// task-api answers CreateTask once the task is committed, without waiting for the
/// broker to confirm its request. Stopped right after answering twenty creates, while its
/// slow broker's confirms are still on their way, it loses none of those requests: every
/// task it answered starts (the sweeper's re-request is out of reach here).
#[tokio::test]
async fn a_task_api_stopped_right_after_answering_still_starts_every_task() {
    let env = TestEnv::new().await;
    let amqp = FaultProxy::for_url(&env.config.amqp.url).await;
    let system = system_without_pending_repair(&env).await;

    let (client, admin, stop, running) = second_task_api(&env, &amqp).await;
    wait_status(admin, "/health/ready", 200).await;
    amqp.latency(Duration::from_millis(300));
    let creates = (0..20).map(|i| {
        let mut client = client.clone();
        let request = pb::CreateTaskRequest {
            namespace: "faults".into(),
            name: "chain".into(),
            context_json: json!({ "n": i }).to_string(),
            ..Default::default()
        };
        async move { client.create_task(request).await.expect("created").into_inner().task.unwrap().id }
    });
    let ids = futures::future::join_all(creates).await;
    stop.cancel();
    running.await.unwrap();

    for id in &ids {
        let done = system.wait_final(id).await;
        assert_eq!(done.status(), pb::TaskStatus::Complete, "task {id} started by its request, not the sweeper");
    }
    system.stop().await;
    env.cleanup().await;
}

/// Liveness means "restart me": it fails only once a dependency has been down longer than
/// `health.live_timeout`, and recovers with it; readiness fails at once.
#[tokio::test]
async fn liveness_fails_only_after_the_database_is_down_too_long() {
    let env = TestEnv::new().await;
    let db = FaultProxy::for_url(&env.config.database.url).await;
    let mut config = env.config.clone();
    config.database.url = db.url(&config.database.url);
    config.health.live_timeout = Duration::from_secs(2);
    let system = System::start_with(&env, config, vec![]).await;
    let admin = system.orchestrator_admin;
    wait_status(admin, "/health/ready", 200).await;
    assert_eq!(status(admin, "/health/live").await, 200);
    db.down();
    wait_status(admin, "/health/ready", 503).await;
    assert_eq!(status(admin, "/health/live").await, 200, "down, but not for long yet");
    wait_status(admin, "/health/live", 503).await;
    db.heal();
    wait_status(admin, "/health/live", 200).await;
    wait_status(admin, "/health/ready", 200).await;
    system.stop().await;
    env.cleanup().await;
}

/// A service started while its database is out of reach waits for it instead of exiting:
/// its admin endpoint answers from the start (ready 503 naming the database, live 200),
/// task-api answers calls UNAVAILABLE, a stop while it waits is clean, and once the
/// database is back each migrates, connects and serves, and a task runs through.
#[tokio::test]
async fn services_started_without_their_database_wait_for_it() {
    let env = TestEnv::new().await;
    let db = FaultProxy::for_url(&env.config.database.url).await;
    let mut config = env.config.clone();
    config.database.url = db.url(&config.database.url);
    config.database.migrate = true;
    db.down();
    let waits_for_the_database = async |system: &System| {
        for admin in [system.api_admin, system.orchestrator_admin, system.publisher_admin] {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                let (code, body) = http_request(admin, "/health/ready").await;
                if body.contains("database: migrating the database: database unreachable") {
                    assert_eq!(code, 503, "{body}");
                    break;
                }
                assert!(tokio::time::Instant::now() < deadline, "{admin} does not say it waits: {code} {body}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(status(admin, "/health/live").await, 200);
        }
    };

    let stopped_waiting = System::start_unready(&env, config.clone(), vec![]).await;
    waits_for_the_database(&stopped_waiting).await;
    stopped_waiting.stop().await;

    let system = System::start_unready(&env, config, vec![WorkerSpec::new("w1", &["faults"])]).await;
    waits_for_the_database(&system).await;
    // task-api answers every call meanwhile: UNAVAILABLE, and not serving to gRPC health
    let request = pb::CreateTaskRequest { namespace: "faults".into(), name: "chain".into(), ..Default::default() };
    let mut tasks = system.tasks();
    let refused = tokio::time::timeout(Duration::from_secs(5), tasks.create_task(request))
        .await
        .expect("answered, not left waiting")
        .expect_err("no database yet");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("database is out of reach"), "{refused:?}");
    let mut health = tonic_health::pb::health_client::HealthClient::new(system.channel());
    let check = tonic_health::pb::HealthCheckRequest { service: String::new() };
    let serving = health.check(check.clone()).await.unwrap().into_inner().status();
    assert_eq!(serving, tonic_health::pb::health_check_response::ServingStatus::NotServing);
    // a health watch left open on the waiting server does not hold task-api's start
    let mut watching = health.watch(check.clone()).await.unwrap().into_inner();
    let first = watching.message().await.unwrap().expect("the status as it is").status();
    assert_eq!(first, tonic_health::pb::health_check_response::ServingStatus::NotServing);
    db.heal();
    system.wait_ready().await;
    let serving = health.check(check).await.unwrap().into_inner().status();
    assert_eq!(serving, tonic_health::pb::health_check_response::ServingStatus::Serving);
    let heard = tokio::time::timeout(Duration::from_secs(5), watching.message()).await;
    let heard = heard.expect("the watch hears the change").unwrap().expect("a status").status();
    assert_eq!(heard, tonic_health::pb::health_check_response::ServingStatus::Serving);
    drop(watching);
    system.register(&env, CHAIN).await;
    let task = system.submit("faults", "chain", json!({})).await;
    assert_eq!(system.wait_final(&task.id).await.status(), pb::TaskStatus::Complete);
    system.stop().await;
    env.cleanup().await;
}

/// A queue deleted under its consumers (by an operator, or a classic queue lost with its
/// node) comes back: the broker cancels the consumers, each service takes that as a lost
/// connection, connects again and declares its queues, and work goes on through them.
#[tokio::test]
async fn queues_deleted_under_their_consumers_are_declared_again() {
    let env = TestEnv::new().await;
    let system = System::start(&env, vec![WorkerSpec::new("w1", &["faults"])]).await;
    system.register(&env, CHAIN).await;
    let before = system.submit("faults", "chain", json!({})).await;
    assert_eq!(system.wait_final(&before.id).await.status(), pb::TaskStatus::Complete);

    let broker = env.broker().await;
    let topology = broker.topology().clone();
    let queues = [topology.tasks_queue(), topology.results_queue(), topology.steps_queue("faults")];
    let connection =
        lapin::Connection::connect(&env.config.amqp.url, lapin::ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    for queue in &queues {
        channel.queue_delete(queue.as_str().into(), Default::default()).await.unwrap();
    }
    let _ = connection.close(200, "deleted".into()).await;
    // each is declared again and consumed
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    for queue in &queues {
        while broker.consumer_count(queue).await.unwrap() == 0 {
            assert!(tokio::time::Instant::now() < deadline, "{queue} was not declared and consumed again");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let after = system.submit("faults", "chain", json!({})).await;
    assert_eq!(system.wait_final(&after.id).await.status(), pb::TaskStatus::Complete);
    broker.close().await.unwrap();
    system.stop().await;
    env.cleanup().await;
}
