//! Test support. Each test gets its own database (uniquely named, migrated, dropped at the
//! end) and its own broker prefix (its queues and exchanges deleted at the end), so tests
//! share one Postgres and one RabbitMQ with each other and with later runs. [`System`]
//! starts the services in-process on ephemeral ports; tests then use only the public
//! surfaces: the generated gRPC clients and a real AMQP subscriber.
//!
//! Set `TASKER_TEST_LOG=debug` (an `EnvFilter`) to see the services' logs.

mod infra;
mod otlp;
mod process;
mod proxy;
mod system;
mod tls;

use std::{sync::Mutex, time::Duration};

use tasker_messaging::{Broker, EventStream};
use tasker_runtime::Config;
use tokio_postgres::NoTls;

pub use infra::{Infra, infra};
pub use otlp::{CollectedSpan, OtlpCollector};
pub use process::{Service, http_get, http_request, wait_status};
pub use proxy::FaultProxy;
pub use system::{System, WorkerSpec};
pub use tls::{CertFiles, StartTls, TestCa, TlsTerminator};

static NO_TRACE: tasker_domain::TraceContext =
    tasker_domain::TraceContext { traceparent: String::new(), tracestate: String::new() };

/// A task of this template as a test writes it straight into the store: an empty context,
/// no trace, created from the name's latest version.
pub fn new_task(template: &tasker_store::TemplateRecord) -> tasker_store::NewTask<'_> {
    tasker_store::NewTask {
        template,
        context: "{}",
        tags: &[],
        initiator: "test",
        source_system: "",
        reason: "",
        priority: 0,
        idempotency_key: None,
        request_hash: "h",
        actor: "test",
        trace: &NO_TRACE,
        as_latest: true,
    }
}

/// One test's private database and broker prefix, and the configuration pointing at them.
pub struct TestEnv {
    pub config: Config,
    database: String,
    server_url: String,
    namespaces: Mutex<Vec<String>>,
    cleaned: bool,
}

impl TestEnv {
    /// Creates and migrates a fresh database and picks a fresh broker prefix.
    pub async fn new() -> TestEnv {
        init_logging();
        let infra = infra().await;
        let id = uuid::Uuid::now_v7().simple().to_string();
        let database = format!("tasker_test_{id}");
        let (client, connection) =
            tokio_postgres::connect(&infra.database_url, NoTls).await.expect("connect to the test Postgres server");
        tokio::spawn(connection);
        client.batch_execute(&format!("CREATE DATABASE {database}")).await.expect("create the test database");
        let database_url = replace_database(&infra.database_url, &database);
        tasker_store::migrate(&database_url).await.expect("migrate the test database");

        let mut config = Config::default();
        config.database.url = database_url;
        config.database.pool_size = 8;
        config.database.migrate = false;
        config.amqp.url = infra.amqp_url.clone();
        config.amqp.prefix = format!("test-{}", &id[id.len() - 12..]);
        let local = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        config.api.listen = local;
        config.api.admin_listen = local;
        config.orchestrator.admin_listen = local;
        config.worker.admin_listen = local;
        config.publisher.admin_listen = local;
        // short waits, so retry and timeout scenarios run fast (the tests assert order and
        // bounds, never speed)
        config.orchestrator.backoff.base = Duration::from_millis(100);
        config.orchestrator.backoff.max = Duration::from_secs(2);
        config.orchestrator.retry_poll_interval = Duration::from_millis(250);
        config.orchestrator.sweep_interval = Duration::from_millis(500);
        config.orchestrator.timeout_grace = Duration::from_millis(500);
        config.orchestrator.pending_task_timeout = Duration::from_secs(1);
        // long enough that a quick step still running under a loaded machine (its start is
        // reported with its outcome) is not taken for a lost one and run twice
        config.orchestrator.enqueued_step_timeout = Duration::from_secs(5);
        config.publisher.poll_interval = Duration::from_millis(250);
        config.worker.drain_timeout = Duration::from_secs(5);
        TestEnv {
            config,
            database,
            server_url: infra.database_url.clone(),
            namespaces: Mutex::default(),
            cleaned: false,
        }
    }

    /// Remembers a namespace whose step queue this test uses, for clean-up.
    pub fn uses_namespace(&self, namespace: &str) {
        let mut namespaces = self.namespaces.lock().expect("namespaces lock");
        if !namespaces.iter().any(|n| n == namespace) {
            namespaces.push(namespace.to_owned());
        }
    }

    /// A broker connection under this test's prefix.
    pub async fn broker(&self) -> Broker {
        tasker_runtime::connect_broker(&self.config.amqp, "test").await.expect("connect to the test broker")
    }

    /// A real AMQP subscriber bound to the events exchange with these patterns.
    pub async fn subscribe(&self, patterns: &[&str]) -> (Broker, EventStream) {
        let broker = self.broker().await;
        let stream = broker.subscribe_events(patterns).await.expect("subscribe to events");
        (broker, stream)
    }

    /// A direct connection to this test's database, for assertions about what is stored.
    pub async fn database(&self) -> tokio_postgres::Client {
        let (client, connection) =
            tokio_postgres::connect(&self.config.database.url, NoTls).await.expect("connect to the test database");
        tokio::spawn(connection);
        client
    }

    /// Drops the database and deletes the broker objects.
    pub async fn cleanup(mut self) {
        self.cleaned = true;
        cleanup(self.config.clone(), self.database.clone(), self.server_url.clone(), self.namespaces()).await;
    }

    fn namespaces(&self) -> Vec<String> {
        self.namespaces.lock().map(|n| n.clone()).unwrap_or_default()
    }
}

impl Drop for TestEnv {
    /// A test that panicked still cleans up, on a thread of its own.
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        let (config, database, server, namespaces) =
            (self.config.clone(), self.database.clone(), self.server_url.clone(), self.namespaces());
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                rt.block_on(cleanup(config, database, server, namespaces));
            }
        })
        .join();
    }
}

async fn cleanup(config: Config, database: String, server_url: String, namespaces: Vec<String>) {
    if let Ok(broker) = tasker_runtime::connect_broker(&config.amqp, "test-cleanup").await {
        if let Err(error) = broker.delete_topology(&namespaces).await {
            eprintln!("test clean-up: deleting broker objects of {}: {error}", config.amqp.prefix);
        }
        let _ = broker.close().await;
    }
    if let Ok((client, connection)) = tokio_postgres::connect(&server_url, NoTls).await {
        tokio::spawn(connection);
        if let Err(error) = client.batch_execute(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)")).await {
            eprintln!("test clean-up: dropping {database}: {error}");
        }
    }
}

/// The same server URL with another database name.
pub fn replace_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let root = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    format!("{root}/{database}{query}")
}

fn init_logging() {
    if let Ok(filter) = std::env::var("TASKER_TEST_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn database_names_are_replaced() {
        use super::replace_database as r;
        assert_eq!(r("postgres://postgres@127.0.0.1:5432/postgres", "x"), "postgres://postgres@127.0.0.1:5432/x");
        assert_eq!(r("postgres://u:p@h/db?sslmode=disable", "x"), "postgres://u:p@h/x?sslmode=disable");
        assert_eq!(r("postgres://h:1", "x"), "postgres://h:1/x");
    }
}
