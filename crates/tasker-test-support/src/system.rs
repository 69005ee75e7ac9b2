//! The four services started in-process against a [`TestEnv`].

use std::{net::SocketAddr, time::Duration};

use serde_json::Value;
use step_worker::{Registry, Worker};
use tasker_proto::v1::{
    self as pb, step_service_client::StepServiceClient, task_service_client::TaskServiceClient,
    template_service_client::TemplateServiceClient,
};
use tasker_runtime::{Config, tls::ClientTls};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::TestEnv;

/// A step worker to start in-process.
pub struct WorkerSpec {
    pub id: String,
    pub namespaces: Vec<String>,
    pub registry: Registry,
    pub concurrency: u16,
}

impl WorkerSpec {
    /// A worker with the built-in handlers.
    pub fn new(id: &str, namespaces: &[&str]) -> WorkerSpec {
        WorkerSpec {
            id: id.to_owned(),
            namespaces: namespaces.iter().map(|s| (*s).to_owned()).collect(),
            registry: Registry::with_builtins(),
            concurrency: 8,
        }
    }

    pub fn registry(mut self, registry: Registry) -> WorkerSpec {
        self.registry = registry;
        self
    }

    pub fn concurrency(mut self, concurrency: u16) -> WorkerSpec {
        self.concurrency = concurrency;
        self
    }
}

struct Running {
    name: String,
    stop: CancellationToken,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    fn api(api: task_api::TaskApi) -> Running {
        let stop = CancellationToken::new();
        Running { name: "task-api".into(), handle: tokio::spawn(api.run(stop.clone())), stop }
    }
}

/// task-api, orchestrator, event-publisher and workers, running in this process.
pub struct System {
    pub api_addr: SocketAddr,
    /// The admin endpoints (`/metrics`, `/health/*`) of the services.
    pub api_admin: SocketAddr,
    pub orchestrator_admin: SocketAddr,
    pub publisher_admin: SocketAddr,
    /// The workers' admin endpoints, in the order they were started.
    pub worker_admins: Vec<SocketAddr>,
    config: Config,
    api_config: Config,
    channel: Channel,
    services: Vec<Running>,
}

impl System {
    pub async fn start(env: &TestEnv, workers: Vec<WorkerSpec>) -> System {
        System::start_with(env, env.config.clone(), workers).await
    }

    /// Starts the services with this configuration (e.g. reaching the servers through a
    /// [`crate::FaultProxy`]).
    pub async fn start_with(env: &TestEnv, config: Config, workers: Vec<WorkerSpec>) -> System {
        System::start_with_client(env, config, workers, &ClientTls::default()).await
    }

    /// Starts the services and connects to task-api as `client` says: over TLS when the
    /// configuration gives task-api a certificate.
    pub async fn start_with_client(
        env: &TestEnv,
        config: Config,
        workers: Vec<WorkerSpec>,
        client: &ClientTls,
    ) -> System {
        let system = System::launch(env, &|_| config.clone(), workers, client).await;
        system.wait_ready().await;
        system
    }

    /// Starts the services without waiting for them to be ready (e.g. while their
    /// database is out of reach); [`System::wait_ready`] waits.
    pub async fn start_unready(env: &TestEnv, config: Config, workers: Vec<WorkerSpec>) -> System {
        System::launch(env, &|_| config.clone(), workers, &ClientTls::default()).await
    }

    /// Starts each service with its own configuration: `config_for` is asked for
    /// `task-api`, `orchestrator`, `event-publisher` and `step-worker` (e.g. each with its
    /// own broker user).
    pub async fn start_each(env: &TestEnv, config_for: impl Fn(&str) -> Config, workers: Vec<WorkerSpec>) -> System {
        let system = System::launch(env, &config_for, workers, &ClientTls::default()).await;
        system.wait_ready().await;
        system
    }

    async fn launch(
        env: &TestEnv,
        config_for: &dyn Fn(&str) -> Config,
        workers: Vec<WorkerSpec>,
        client: &ClientTls,
    ) -> System {
        let mut api_config = config_for("task-api");
        let scheme = if api_config.api.tls.cert_file.is_some() { "https" } else { "http" };
        let api = task_api::TaskApi::bind(api_config.clone()).await.expect("bind task-api");
        let api_addr = api.grpc_addr();
        let api_admin = api.admin_addr();
        // a restart binds the same ports
        (api_config.api.listen, api_config.api.admin_listen) = (api_addr, api_admin);
        let mut services = vec![Running::api(api)];
        let spawn = |name: &str, fut: std::pin::Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>, stop| {
            Running { name: name.to_owned(), stop, handle: tokio::spawn(fut) }
        };
        let orchestrator =
            orchestrator::Orchestrator::bind(config_for("orchestrator")).await.expect("bind orchestrator");
        let orchestrator_admin = orchestrator.admin_addr();
        let stop = CancellationToken::new();
        services.push(spawn("orchestrator", Box::pin(orchestrator.run(stop.clone())), stop));
        let publisher =
            event_publisher::EventPublisher::bind(config_for("event-publisher")).await.expect("bind event-publisher");
        let publisher_admin = publisher.admin_addr();
        let stop = CancellationToken::new();
        services.push(spawn("event-publisher", Box::pin(publisher.run(stop.clone())), stop));
        let url = format!("{scheme}://{api_addr}");
        let channel = tasker_runtime::tls::endpoint(&url, client).expect("endpoint").connect_lazy();
        let config = config_for("step-worker");
        let mut system = System {
            api_addr,
            api_admin,
            orchestrator_admin,
            publisher_admin,
            worker_admins: Vec::new(),
            config,
            api_config,
            channel,
            services,
        };
        for spec in workers {
            system.add_worker(env, spec).await;
        }
        system
    }

    /// Waits until task-api, the orchestrator and the event-publisher are ready (connected
    /// to both servers, queues and exchange declared) and task-api answers calls.
    pub async fn wait_ready(&self) {
        for admin in [self.api_admin, self.orchestrator_admin, self.publisher_admin] {
            crate::wait_status(admin, "/health/ready", 200).await;
        }
        for _ in 0..100 {
            let answered = self.templates().list_namespaces(pb::ListNamespacesRequest {}).await;
            // an answer, even "who are you?" from a task-api with auth on, means it is up
            if answered.is_ok() || answered.is_err_and(|s| s.code() == tonic::Code::Unauthenticated) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("task-api at {} did not answer", self.api_addr);
    }

    /// Starts one more worker.
    pub async fn add_worker(&mut self, env: &TestEnv, spec: WorkerSpec) {
        for ns in &spec.namespaces {
            env.uses_namespace(ns);
        }
        let mut config = self.config.clone();
        config.worker.id = Some(spec.id.clone());
        config.worker.namespaces = spec.namespaces;
        config.worker.concurrency = spec.concurrency;
        let worker = Worker::bind(config, spec.registry).await.expect("bind step-worker");
        self.worker_admins.push(worker.admin_addr());
        let stop = CancellationToken::new();
        let handle = tokio::spawn(worker.run(stop.clone()));
        self.services.push(Running { name: format!("worker {}", spec.id), stop, handle });
    }

    /// The channel to task-api, for clients of other services.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    pub fn tasks(&self) -> TaskServiceClient<Channel> {
        TaskServiceClient::new(self.channel.clone())
    }

    pub fn templates(&self) -> TemplateServiceClient<Channel> {
        TemplateServiceClient::new(self.channel.clone())
    }

    pub fn steps(&self) -> StepServiceClient<Channel> {
        StepServiceClient::new(self.channel.clone())
    }

    /// Registers a template (and remembers its namespace for clean-up).
    pub async fn register(&self, env: &TestEnv, yaml: &str) -> pb::Template {
        let response = self
            .templates()
            .register_template(pb::RegisterTemplateRequest { yaml: yaml.to_owned() })
            .await
            .expect("register template")
            .into_inner();
        let template = response.template.expect("registered template");
        env.uses_namespace(&template.namespace);
        template
    }

    /// Creates a task of the latest version with this context.
    pub async fn submit(&self, namespace: &str, name: &str, context: Value) -> pb::Task {
        let request = pb::CreateTaskRequest {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            context_json: context.to_string(),
            ..Default::default()
        };
        self.tasks().create_task(request).await.expect("create task").into_inner().task.expect("created task")
    }

    /// Polls GetTask (with transitions) until the task is complete, error or cancelled.
    pub async fn wait_final(&self, task_id: &str) -> pb::Task {
        self.wait_for(task_id, |t| {
            matches!(t.status(), pb::TaskStatus::Complete | pb::TaskStatus::Error | pb::TaskStatus::Cancelled)
        })
        .await
    }

    /// Polls GetTask (with transitions) until `done` holds; panics after 60 s.
    pub async fn wait_for(&self, task_id: &str, done: impl Fn(&pb::Task) -> bool) -> pb::Task {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let request = pb::GetTaskRequest { task_id: task_id.to_owned(), include_transitions: true };
            let task = self.tasks().get_task(request).await.expect("get task").into_inner();
            if done(&task) {
                return task;
            }
            assert!(tokio::time::Instant::now() < deadline, "task {task_id} did not get there in time: {task:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops one service (`task-api`, `orchestrator`, `event-publisher`, `worker {id}`)
    /// and checks that it stopped cleanly.
    pub async fn stop_service(&mut self, name: &str) {
        let index = self.services.iter().position(|s| s.name == name).expect("a running service of that name");
        let service = self.services.remove(index);
        service.stop.cancel();
        match tokio::time::timeout(Duration::from_secs(15), service.handle).await {
            Ok(Ok(Ok(()))) => {}
            other => panic!("{name} did not stop cleanly: {other:?}"),
        }
    }

    /// Stops task-api (checking that it stopped cleanly) and starts it again on the same
    /// ports, as a rolling restart does to its callers.
    pub async fn restart_api(&mut self) {
        self.stop_service("task-api").await;
        let api = task_api::TaskApi::bind(self.api_config.clone()).await.expect("bind task-api again");
        self.services.insert(0, Running::api(api));
        crate::wait_status(self.api_admin, "/health/ready", 200).await;
    }

    /// Stops every service and checks that each stopped cleanly.
    pub async fn stop(self) {
        for service in self.services.iter().rev() {
            service.stop.cancel();
        }
        for service in self.services {
            match tokio::time::timeout(Duration::from_secs(15), service.handle).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(error))) => panic!("{} failed: {error:#}", service.name),
                Ok(Err(join)) => panic!("{} panicked: {join}", service.name),
                Err(_) => panic!("{} did not stop within 15 s", service.name),
            }
        }
    }
}
