//! The services as separate release processes, reaching Postgres and RabbitMQ through
//! fault proxies: killed with SIGKILL and started again, or cut off from a server.

use std::{path::PathBuf, time::Duration};

use tasker_test_support::{FaultProxy, Service, TestEnv};

/// The kinds of process a soak runs, each several times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    TaskApi,
    Orchestrator,
    Worker,
    EventPublisher,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::TaskApi, Kind::Orchestrator, Kind::Worker, Kind::EventPublisher];

    fn binary(self) -> &'static str {
        match self {
            Kind::TaskApi => "task-api",
            Kind::Orchestrator => "orchestrator",
            Kind::Worker => "step-worker",
            Kind::EventPublisher => "event-publisher",
        }
    }

    /// What the service logs once it is up.
    fn ready(self) -> &'static str {
        match self {
            Kind::TaskApi => "task-api serving",
            Kind::Orchestrator => "starting",
            Kind::Worker => "step worker starting",
            Kind::EventPublisher => "starting",
        }
    }
}

struct Member {
    kind: Kind,
    extra: Vec<(String, String)>,
    process: Option<Service>,
}

pub struct Cluster {
    bin_dir: PathBuf,
    pub database: FaultProxy,
    pub broker: FaultProxy,
    base: Vec<(String, String)>,
    members: Vec<Member>,
    /// The gRPC port of each task-api.
    pub api_ports: Vec<u16>,
}

/// `count` ports for the task-apis, free when the cluster starts and below the kernel's
/// ephemeral range (32768–60999 by default on Linux), so that no outgoing connection takes
/// one while a killed task-api is down: each is started again on the same port.
fn free_api_ports(count: usize) -> Vec<u16> {
    let ports: Vec<u16> =
        (20261..32768).filter(|&port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()).take(count).collect();
    assert_eq!(ports.len(), count, "no free ports for the task-apis below 32768");
    ports
}

impl Cluster {
    /// Starts `apis` task-apis, two orchestrators, two event-publishers and `workers`
    /// workers serving `namespace`, every one through the proxies.
    pub async fn start(bin_dir: PathBuf, env: &TestEnv, apis: usize, workers: usize, namespace: &str) -> Cluster {
        let database = FaultProxy::for_url(&env.config.database.url).await;
        let broker = FaultProxy::for_broker(&env.config.amqp.url).await;
        let base = vec![
            ("TASKER_DATABASE__URL".to_owned(), database.url(&env.config.database.url)),
            ("TASKER_AMQP__URL".to_owned(), broker.url(&env.config.amqp.url)),
            ("TASKER_DATABASE__POOL_SIZE".to_owned(), "6".to_owned()),
            ("TASKER_LOG__FILTER".to_owned(), "info".to_owned()),
            // the sweeper repairs what a crash between a commit and its publish leaves
            // (a task request, a step execution): on shorter timeouts than the defaults
            // (30 s, 5 min), so that the soak drains within its bound
            ("TASKER_ORCHESTRATOR__PENDING_TASK_TIMEOUT".to_owned(), "10s".to_owned()),
            ("TASKER_ORCHESTRATOR__ENQUEUED_STEP_TIMEOUT".to_owned(), "15s".to_owned()),
            ("TASKER_ORCHESTRATOR__SWEEP_INTERVAL".to_owned(), "2s".to_owned()),
            // a silent server is noticed within a fault's length: after 2 s of heartbeats,
            // or a statement's 2 s and the watchdog's grace (defaults 10 s, 10 s and 2 s)
            ("TASKER_AMQP__HEARTBEAT".to_owned(), "1s".to_owned()),
            ("TASKER_DATABASE__STATEMENT_TIMEOUT".to_owned(), "2s".to_owned()),
        ];
        let mut members = Vec::new();
        let api_ports = free_api_ports(apis);
        for port in &api_ports {
            members.push((Kind::TaskApi, vec![("TASKER_API__LISTEN".to_owned(), format!("127.0.0.1:{port}"))]));
        }
        for _ in 0..2 {
            members.push((Kind::Orchestrator, vec![]));
            members.push((Kind::EventPublisher, vec![]));
        }
        for i in 0..workers {
            members.push((
                Kind::Worker,
                vec![
                    ("TASKER_WORKER__NAMESPACES".to_owned(), format!("[{namespace}]")),
                    ("TASKER_WORKER__ID".to_owned(), format!("chaos-worker-{i}")),
                ],
            ));
        }
        let mut cluster = Cluster {
            bin_dir,
            database,
            broker,
            base,
            members: members.into_iter().map(|(kind, extra)| Member { kind, extra, process: None }).collect(),
            api_ports,
        };
        for i in 0..cluster.members.len() {
            cluster.launch(i, env, cluster.members[i].kind.ready()).await;
        }
        cluster
    }

    /// Starts member `index` and waits for it to log `ready`.
    async fn launch(&mut self, index: usize, env: &TestEnv, ready: &str) {
        let member = &self.members[index];
        let binary = self.bin_dir.join(member.kind.binary());
        let extra: Vec<(&str, &str)> =
            self.base.iter().chain(&member.extra).map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let process = Service::start(binary.to_str().expect("utf-8 path"), env, &extra, ready).await;
        self.members[index].process = Some(process);
    }

    /// SIGKILLs one process of this kind, chosen at random, and starts it again.
    pub async fn crash(&mut self, kind: Kind, env: &TestEnv) {
        self.crash_until(kind, env, kind.ready()).await;
    }

    /// Takes the database down, then SIGKILLs one process of this kind (not a worker,
    /// which does not use it) and starts it again, waiting until it says it waits for the
    /// database. The caller brings the database back.
    pub async fn crash_without_database(&mut self, kind: Kind, env: &TestEnv) {
        assert_ne!(kind, Kind::Worker, "workers do not use the database");
        self.database.down();
        self.crash_until(kind, env, "waiting for the database").await;
    }

    async fn crash_until(&mut self, kind: Kind, env: &TestEnv, ready: &str) {
        let of_kind: Vec<usize> = (0..self.members.len()).filter(|&i| self.members[i].kind == kind).collect();
        let index = of_kind[rand::random_range(0..of_kind.len())];
        if let Some(process) = self.members[index].process.take() {
            process.kill().await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.launch(index, env, ready).await;
    }

    /// Stops every process (SIGTERM) and reports those that did not stop cleanly.
    pub async fn stop(self) -> Vec<String> {
        let mut problems = Vec::new();
        for member in self.members {
            if let Some(process) = member.process {
                let (status, lines) = process.terminate().await;
                if !status.success() {
                    problems.push(format!("{:?} exited with {status}: {:?}", member.kind, lines.last()));
                }
            }
        }
        problems
    }
}
