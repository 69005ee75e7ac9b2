//! tasker-chaos: a bounded soak under crashes and outages (`scripts/chaos.sh`).
//!
//! The four services run as separate release processes (two task-apis, two orchestrators,
//! two event-publishers, two workers), reaching Postgres and RabbitMQ through fault
//! proxies. Clients submit a mixed workload with idempotency keys, retrying every failed
//! call with the same key (and sometimes a call that succeeded). Meanwhile faults are
//! injected one after another at random: SIGKILL of a process of each kind, an outage of
//! the broker and one of the database (connections cut and refused), and a silence of each
//! (connections left open, nothing answered), and a process killed and started again while
//! the database is down (it must wait for it). After each, a probe task measures the
//! recovery (from the fault's end to the probe's `task.completed`). At the end, from
//! Postgres and from a real event subscriber: every task terminal and complete, one task
//! per key, one completion per step, every transition's event received and in order per
//! task and step, the outbox empty, the dead-letter queue empty. Exits 1 if anything fails.

mod cluster;
mod events;

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use clap::Parser;
use cluster::{Cluster, Kind};
use tasker_proto::v1::{
    self as pb, task_service_client::TaskServiceClient, template_service_client::TemplateServiceClient,
};
use tasker_test_support::TestEnv;
use tonic::transport::Channel;

#[derive(Debug, Parser)]
struct Args {
    /// Where the release binaries are.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// How long faults are injected, in seconds (the run then drains and checks).
    #[arg(long, default_value_t = 90)]
    seconds: u64,
    /// Concurrent clients submitting the workload.
    #[arg(long, default_value_t = 4)]
    clients: usize,
}

const NAMESPACE: &str = "chaos";
const TEMPLATES: [&str; 4] = [
    // in a namespace of its own, so that its step does not queue behind the workload's
    "namespace: probe\nname: probe\nversion: 1.0.0\nsteps:\n  - { name: p, handler: noop }\n",
    "namespace: chaos\nname: linear\nversion: 1.0.0\ndefaults: { max_attempts: 5, timeout: 30s }\nsteps:\n  - { name: a, handler: noop }\n  - { name: b, handler: fail, depends_on: [a], config: { times: 1 } }\n  - { name: c, handler: echo, depends_on: [b] }\n",
    "namespace: chaos\nname: diamond\nversion: 1.0.0\ndefaults: { max_attempts: 5, timeout: 30s }\nsteps:\n  - { name: a, handler: noop }\n  - { name: b, handler: sleep, depends_on: [a], config: { ms: 100 } }\n  - { name: c, handler: sleep, depends_on: [a], config: { ms: 300 } }\n  - { name: d, handler: echo, depends_on: [b, c] }\n",
    "namespace: chaos\nname: slow\nversion: 1.0.0\ndefaults: { max_attempts: 5, timeout: 30s }\nsteps:\n  - { name: s, handler: sleep, config: { ms: 1500 } }\n",
];

/// The task-apis, tried in turn.
#[derive(Clone)]
struct Clients(Vec<TaskServiceClient<Channel>>);

/// What the clients did, for the report.
#[derive(Default)]
struct Submitted {
    /// Task id by idempotency key.
    by_key: Mutex<HashMap<String, String>>,
    /// Different task ids answered for one key (must be 0).
    key_conflicts: AtomicUsize,
    /// Calls that failed and were retried with the same key.
    retries: AtomicUsize,
    /// Answers marked `deduplicated`.
    deduplicated: AtomicUsize,
}

impl Clients {
    /// Creates a task, retrying with the same key (on the next task-api) until it is
    /// accepted; half of the time sends the same request once more, as a client that did
    /// not see the first answer would.
    async fn create(&self, name: &str, key: String, submitted: &Submitted) -> anyhow::Result<String> {
        let request = pb::CreateTaskRequest {
            namespace: if name == "probe" { "probe".into() } else { NAMESPACE.into() },
            name: name.into(),
            context_json: format!(r#"{{"key": "{key}"}}"#),
            idempotency_key: key.clone(),
            ..Default::default()
        };
        let deadline = Instant::now() + Duration::from_secs(180);
        let mut sends = if rand::random_bool(0.5) { 2 } else { 1 };
        let mut turn = rand::random_range(0..self.0.len());
        let mut id = None;
        while sends > 0 {
            turn += 1;
            let mut client = self.0[turn % self.0.len()].clone();
            match client.create_task(request.clone()).await {
                Ok(answer) => {
                    let answer = answer.into_inner();
                    if answer.deduplicated {
                        submitted.deduplicated.fetch_add(1, Ordering::Relaxed);
                    }
                    let task_id = answer.task.map(|t| t.id).unwrap_or_default();
                    if id.as_ref().is_some_and(|first| first != &task_id) {
                        submitted.key_conflicts.fetch_add(1, Ordering::Relaxed);
                    }
                    id = Some(task_id);
                    sends -= 1;
                }
                Err(status) => {
                    anyhow::ensure!(Instant::now() < deadline, "CreateTask kept failing for {key}: {status:?}");
                    submitted.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        let id = id.expect("an answer");
        submitted.by_key.lock().expect("submitted lock").insert(key, id.clone());
        Ok(id)
    }
}

async fn connect(port: u16) -> Channel {
    Channel::from_shared(format!("http://127.0.0.1:{port}")).expect("endpoint").connect_lazy()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let env = TestEnv::new().await;
    println!("chaos: database {}, prefix {}", env.config.database.url, env.config.amqp.prefix);
    env.uses_namespace(NAMESPACE);
    env.uses_namespace("probe");
    let mut cluster = Cluster::start(args.bin_dir.clone(), &env, 2, 2, &format!("{NAMESPACE}, probe")).await;
    let clients = Clients(vec![
        TaskServiceClient::new(connect(cluster.api_ports[0]).await),
        TaskServiceClient::new(connect(cluster.api_ports[1]).await),
    ]);
    let mut templates = TemplateServiceClient::new(connect(cluster.api_ports[0]).await);
    for yaml in TEMPLATES {
        templates.register_template(pb::RegisterTemplateRequest { yaml: yaml.into() }).await?;
    }
    let subscriber = env.broker().await;
    let seen = events::record(subscriber.subscribe_events(&["#"]).await?);

    // the workload: each client submits tasks until the faults are over
    let submitted = Arc::new(Submitted::default());
    let injecting = Arc::new(AtomicBool::new(true));
    let counter = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for _ in 0..args.clients {
        let (clients, submitted, injecting, counter) =
            (clients.clone(), submitted.clone(), injecting.clone(), counter.clone());
        load.push(tokio::spawn(async move {
            while injecting.load(Ordering::Relaxed) {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let name = ["linear", "diamond", "slow"][n % 3];
                clients.create(name, format!("order-{n}"), &submitted).await?;
                tokio::time::sleep(Duration::from_millis(rand::random_range(20..120))).await;
            }
            anyhow::Ok(())
        }));
    }

    // the faults, one after another, each followed by a probe of the recovery
    let mut recovery: BTreeMap<&'static str, Vec<Duration>> = BTreeMap::new();
    let until = Instant::now() + Duration::from_secs(args.seconds);
    let mut probes = 0;
    let mut round: Vec<usize> = Vec::new();
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(rand::random_range(1000..3000))).await;
        // every kind of fault once per round, in a random order
        if round.is_empty() {
            round = (0..11).collect();
            for i in (1..round.len()).rev() {
                round.swap(i, rand::random_range(0..=i));
            }
        }
        let fault = round.pop().expect("a fault");
        let kind = match fault {
            0..4 => {
                let kind = Kind::ALL[fault];
                cluster.crash(kind, &env).await;
                match kind {
                    Kind::TaskApi => "kill task-api",
                    Kind::Orchestrator => "kill orchestrator",
                    Kind::Worker => "kill step-worker",
                    Kind::EventPublisher => "kill event-publisher",
                }
            }
            8 => {
                // a replica started again while the database is down waits for it
                let kind = [Kind::TaskApi, Kind::Orchestrator, Kind::EventPublisher][rand::random_range(0..3)];
                cluster.crash_without_database(kind, &env).await;
                tokio::time::sleep(Duration::from_secs(rand::random_range(2..5))).await;
                cluster.database.heal();
                "restart without the database"
            }
            9 => {
                // a resource alarm of the broker: every connection blocked, then unblocked
                cluster.broker.block("low on disk");
                tokio::time::sleep(Duration::from_secs(rand::random_range(2..6))).await;
                cluster.broker.unblock();
                "broker alarm"
            }
            10 => {
                // the database refuses writes, as a standby after a failover does: every
                // session opened again is read-only, until the setting is reset (the
                // services leave those sessions behind themselves)
                let admin = env.database().await;
                let name = env.config.database.url.rsplit('/').next().unwrap_or_default().to_owned();
                let set = format!("ALTER DATABASE \"{name}\" SET default_transaction_read_only = on");
                admin.batch_execute(&set).await?;
                cluster.database.cut();
                tokio::time::sleep(Duration::from_secs(rand::random_range(2..6))).await;
                admin.batch_execute(&format!("ALTER DATABASE \"{name}\" RESET default_transaction_read_only")).await?;
                "database read-only"
            }
            _ => {
                // the broker or the database, taken away or gone silent
                let (proxy, kind) = match fault {
                    4 => (&cluster.broker, "broker outage"),
                    5 => (&cluster.database, "database outage"),
                    6 => (&cluster.broker, "broker silence"),
                    _ => (&cluster.database, "database silence"),
                };
                if fault < 6 {
                    proxy.down();
                } else {
                    proxy.silence();
                }
                tokio::time::sleep(Duration::from_secs(rand::random_range(2..6))).await;
                proxy.heal();
                kind
            }
        };
        let ended = Instant::now();
        probes += 1;
        let probe = clients.create("probe", format!("probe-{probes}"), &submitted).await?;
        loop {
            if let Some(done) = seen.lock().expect("seen lock").completed.get(&probe) {
                recovery.entry(kind).or_default().push(done.duration_since(ended));
                break;
            }
            anyhow::ensure!(ended.elapsed() < Duration::from_secs(120), "no recovery from {kind} within 120 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        println!("chaos: {kind}: recovered in {:.2} s", recovery[kind].last().expect("recorded").as_secs_f64());
    }
    injecting.store(false, Ordering::Relaxed);
    for client in load {
        client.await??;
    }

    let report = check(&env, &seen, &submitted).await?;
    let problems = cluster.stop().await;
    subscriber.close().await?;
    print_report(&report, &recovery, &submitted, &seen);
    let mut failures = report.failures;
    failures.extend(problems);
    if failures.is_empty() {
        println!("chaos: every check passed");
        env.cleanup().await;
        Ok(())
    } else {
        for failure in &failures {
            println!("chaos: FAILED: {failure}");
        }
        println!("chaos: the database is kept for a look: {}", env.config.database.url);
        std::mem::forget(env);
        std::process::exit(1);
    }
}

struct Report {
    tasks: usize,
    statuses: Vec<(String, i64)>,
    transitions: usize,
    missing_events: usize,
    out_of_order: usize,
    dead_letters: u32,
    failures: Vec<String>,
}

/// Waits for the work to drain, then checks what must hold.
async fn check(env: &TestEnv, seen: &events::Shared, submitted: &Submitted) -> anyhow::Result<Report> {
    let store = tasker_store::Store::connect(&env.config.database.url, 2, tasker_store::Workload::General).await?;
    let expected = submitted.by_key.lock().expect("submitted lock").len();
    let deadline = Instant::now() + Duration::from_secs(180);
    let audit = loop {
        let audit = store.audit().await?;
        let terminal: i64 = audit
            .tasks_by_status
            .iter()
            .filter(|(s, _)| matches!(s.as_str(), "complete" | "error" | "cancelled"))
            .map(|(_, n)| n)
            .sum();
        if (terminal as usize >= expected && audit.outbox == 0) || Instant::now() > deadline {
            break audit;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    // late deliveries of the last events
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut failures = Vec::new();
    let tasks: i64 = audit.tasks_by_status.iter().map(|(_, n)| n).sum();
    let complete = audit.tasks_by_status.iter().find(|(s, _)| s == "complete").map_or(0, |(_, n)| *n);
    if tasks as usize != expected || complete != tasks {
        failures.push(format!("{expected} keys submitted; tasks by status {:?}", audit.tasks_by_status));
    }
    if audit.keys_on_several_tasks > 0 || submitted.key_conflicts.load(Ordering::Relaxed) > 0 {
        failures.push(format!("{} keys on several tasks", audit.keys_on_several_tasks));
    }
    if audit.steps_completed_twice > 0 {
        failures.push(format!("{} steps completed twice", audit.steps_completed_twice));
    }
    if audit.unfinished_steps_of_complete_tasks > 0 {
        failures.push(format!("{} unfinished steps in complete tasks", audit.unfinished_steps_of_complete_tasks));
    }
    if audit.outbox > 0 {
        failures.push(format!("{} events left in the outbox", audit.outbox));
    }
    let transitions = store.audited_transitions().await?;
    let (missing, out_of_order) = {
        let seen = seen.lock().expect("seen lock");
        let missing = transitions.iter().filter(|t| !seen.first.contains_key(&t.id)).count();
        let mut by_owner: HashMap<uuid::Uuid, Vec<(i32, usize)>> = HashMap::new();
        for t in &transitions {
            if let Some(&at) = seen.first.get(&t.id) {
                by_owner.entry(t.owner).or_default().push((t.sort_key, at));
            }
        }
        let out_of_order = by_owner
            .values_mut()
            .map(|arrivals| {
                arrivals.sort_unstable();
                arrivals.windows(2).filter(|w| w[0].1 > w[1].1).count()
            })
            .sum::<usize>();
        (missing, out_of_order)
    };
    if missing > 0 {
        failures.push(format!("{missing} transitions whose event never arrived"));
    }
    if out_of_order > 0 {
        failures.push(format!("{out_of_order} events arrived before an earlier one of the same task or step"));
    }
    let broker = env.broker().await;
    let dead_letters = broker.queue_state(&broker.topology().dead_letter_queue()).await?.map_or(0, |q| q.ready);
    broker.close().await?;
    if dead_letters > 0 {
        failures.push(format!("{dead_letters} messages in the dead-letter queue"));
    }
    Ok(Report {
        tasks: tasks as usize,
        statuses: audit.tasks_by_status,
        transitions: transitions.len(),
        missing_events: missing,
        out_of_order,
        dead_letters,
        failures,
    })
}

fn print_report(
    report: &Report,
    recovery: &BTreeMap<&'static str, Vec<Duration>>,
    submitted: &Submitted,
    seen: &events::Shared,
) {
    let seen = seen.lock().expect("seen lock");
    let faults: usize = recovery.values().map(Vec::len).sum();
    println!();
    println!("| figure | value |");
    println!("|---|---|");
    println!("| faults injected | {faults} |");
    println!("| tasks (keys) | {} ({}) |", report.tasks, submitted.by_key.lock().expect("submitted lock").len());
    println!("| tasks by status | {:?} |", report.statuses);
    println!("| client calls retried | {} |", submitted.retries.load(Ordering::Relaxed));
    println!("| creates answered deduplicated | {} |", submitted.deduplicated.load(Ordering::Relaxed));
    println!(
        "| transitions / events received / duplicate deliveries | {} / {} / {} |",
        report.transitions,
        seen.first.len(),
        seen.duplicates
    );
    println!("| missing events | {} |", report.missing_events);
    println!("| events out of order | {} |", report.out_of_order);
    println!("| dead letters | {} |", report.dead_letters);
    println!();
    println!("| fault | count | recovery min | median | max |");
    println!("|---|---|---|---|---|");
    for (kind, times) in recovery {
        let mut sorted = times.clone();
        sorted.sort_unstable();
        let s = |d: Duration| format!("{:.2} s", d.as_secs_f64());
        println!(
            "| {kind} | {} | {} | {} | {} |",
            sorted.len(),
            s(sorted[0]),
            s(sorted[sorted.len() / 2]),
            s(sorted[sorted.len() - 1])
        );
    }
}
