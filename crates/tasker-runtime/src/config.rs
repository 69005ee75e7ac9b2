//! One configuration for every service; each reads its own section.
//!
//! Sources, later ones winning: built-in defaults → the TOML file (`--config` or
//! `TASKER_CONFIG`) → `TASKER_*` environment variables, `__` separating sections
//! (`TASKER_DATABASE__URL`, `TASKER_WORKER__NAMESPACES=[payments,shipping]`).
//! Unknown keys and bad values fail at start with an error naming the key.

use std::{net::SocketAddr, path::Path, path::PathBuf, time::Duration};

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use serde::{Deserialize, Serialize};
use tasker_domain::{Backoff, Limits};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub database: DatabaseConfig,
    pub amqp: AmqpConfig,
    pub log: LogConfig,
    pub telemetry: TelemetryConfig,
    pub limits: Limits,
    pub api: ApiConfig,
    pub orchestrator: OrchestratorConfig,
    pub worker: WorkerConfig,
    pub publisher: PublisherConfig,
    pub health: HealthConfig,
    /// Who may call task-api (`auth.mode = none | jwt`, keys, issuer, audience).
    pub auth: tasker_auth::Settings,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// A service whose dependency (database, broker) has been unreachable this long stops
    /// answering `/health/live`, so its orchestrator (Kubernetes) restarts it; until then
    /// only `/health/ready` fails.
    #[serde(with = "humantime_serde")]
    pub live_timeout: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self { live_timeout: Duration::from_secs(120) }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    pub url: String,
    pub pool_size: usize,
    /// Apply pending migrations at start (advisory-locked, so safe from every replica).
    pub migrate: bool,
    /// The longest a statement may run: Postgres cancels it past this, and a connection
    /// whose server sends nothing for this long and 2 s more while an answer is awaited
    /// is dropped as lost (a partition, a frozen host).
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
}

/// The local server's Unix socket (Debian's directory), then TCP on 127.0.0.1: each host
/// is tried in turn, as libpq does. Over the socket each statement's answer skips the
/// loopback's TCP stack: about 0.2 ms less an orchestrator hop (README, Performance).
const DEFAULT_DATABASE_URL: &str = "postgres://postgres@%2Fvar%2Frun%2Fpostgresql,127.0.0.1:5432/tasker";

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: DEFAULT_DATABASE_URL.into(),
            pool_size: 16,
            migrate: true,
            statement_timeout: tasker_store::DEFAULT_STATEMENT_TIMEOUT,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpConfig {
    pub url: String,
    /// Every queue and exchange name starts with it.
    pub prefix: String,
    /// The step queues' type: `quorum` or `classic`.
    pub queue_type: String,
    /// The type of the orchestrator's two input queues: `classic` or `quorum`.
    pub orchestrator_queue_type: String,
    /// Times a message may come back to its queue before it goes to `{prefix}.dead`.
    pub delivery_limit: u32,
    /// PEM certificates of a private CA to trust for an `amqps://` URL (besides the system
    /// roots).
    pub ca_file: Option<PathBuf>,
    /// The heartbeat asked of the broker (whole seconds; the lower of this and the
    /// broker's applies): a connection that hears nothing for two of them is lost, so a
    /// broker that went silent (a partition, a frozen host) is noticed within that.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// A file holding the URL (it carries the password), read at start instead of `url`:
    /// a mounted Secret, or the file `scripts/broker-users.sh --out` writes per role.
    pub url_file: Option<PathBuf>,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            prefix: "tasker".into(),
            queue_type: "quorum".into(),
            orchestrator_queue_type: "classic".into(),
            delivery_limit: 10,
            ca_file: None,
            heartbeat: Duration::from_secs(5),
            url_file: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// An `EnvFilter` directive; `RUST_LOG` overrides it.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { format: LogFormat::Pretty, filter: "info".into() }
    }
}

/// Traces: exported over OTLP/gRPC when an endpoint is set, nothing otherwise.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// The OTLP/gRPC collector (`http://otel-collector:4317`); unset: no spans leave the
    /// process (trace context is still carried through, so a caller's trace id reaches the
    /// events).
    pub otlp_endpoint: Option<String>,
    /// The share of new traces recorded (0–1); a trace started by a caller follows the
    /// caller's sampling decision.
    pub sample_ratio: f64,
    /// `service.instance.id` on every span; default `{hostname}-{pid}`.
    pub instance: Option<String>,
    /// How long finished spans wait to be exported in a batch.
    #[serde(with = "humantime_serde")]
    pub export_interval: Duration,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self { otlp_endpoint: None, sample_ratio: 1.0, instance: None, export_interval: Duration::from_secs(2) }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// YAML templates registered at start-up (`*.yaml`, `*.yml`).
    pub templates_dir: Option<PathBuf>,
    /// WatchTask streams one caller (subject) may hold open at once.
    pub max_watches_per_caller: usize,
    /// Live events a WatchTask stream may hold unsent (its client reading slower than its
    /// task makes them) before it falls behind: it then stops taking them and catches up
    /// from the database, so a slow client costs bounded memory.
    pub watch_buffer: usize,
    /// How often an HTTP/2 ping is sent on a client connection, and how long its answer
    /// may take: a client that vanished without closing (a partition, a crashed host) has
    /// its connection closed, and its calls and WatchTask streams ended, within the two.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// TLS for the gRPC listener; off unless `cert_file` is set.
    pub tls: ServerTls,
}

/// A TLS listener's certificate and key (PEM), and optionally the CA whose certificates
/// clients must present (mutual TLS).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerTls {
    /// The server's certificate chain, leaf first.
    pub cert_file: Option<PathBuf>,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// When set, every client must present a certificate this CA signed.
    pub client_ca_file: Option<PathBuf>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: ([0, 0, 0, 0], 50051).into(),
            admin_listen: ([0, 0, 0, 0], 9090).into(),
            templates_dir: None,
            max_watches_per_caller: 32,
            watch_buffer: 1024,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            tls: ServerTls::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OrchestratorConfig {
    pub admin_listen: SocketAddr,
    /// Most messages applied in one transaction.
    pub batch_size: usize,
    /// Unacked deliveries per input queue.
    pub prefetch: u16,
    /// Batches of one input queue applied at once: the next batch's transaction runs
    /// while the last one's executions are being confirmed by the broker.
    pub batches_in_flight: usize,
    pub backoff: Backoff,
    /// How often the retry scheduler looks for due retries when none is known to be due.
    #[serde(with = "humantime_serde")]
    pub retry_poll_interval: Duration,
    /// How often the sweeper looks for stuck work.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// A task still `pending` this long is requested again.
    #[serde(with = "humantime_serde")]
    pub pending_task_timeout: Duration,
    /// A step `enqueued` this long and never started is published again (same attempt).
    #[serde(with = "humantime_serde")]
    pub enqueued_step_timeout: Duration,
    /// A step `in_progress` past its timeout plus this grace fails as timed out.
    #[serde(with = "humantime_serde")]
    pub timeout_grace: Duration,
    /// Finished tasks (complete, error, cancelled) older than this are deleted with their
    /// steps and history, in bounded batches by the sweeper; unset: kept for good.
    #[serde(with = "humantime_serde")]
    pub retention: Option<Duration>,
}

impl Default for OrchestratorConfig {
    fn default() -> Self {
        Self {
            admin_listen: ([0, 0, 0, 0], 9091).into(),
            batch_size: 64,
            prefetch: 256,
            batches_in_flight: 2,
            backoff: Backoff::default(),
            retry_poll_interval: Duration::from_secs(5),
            sweep_interval: Duration::from_secs(5),
            pending_task_timeout: Duration::from_secs(30),
            enqueued_step_timeout: Duration::from_secs(300),
            timeout_grace: Duration::from_secs(10),
            retention: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    pub admin_listen: SocketAddr,
    /// Namespaces whose steps this worker runs.
    pub namespaces: Vec<String>,
    /// Steps run at once (the prefetch of each namespace queue).
    pub concurrency: u16,
    /// Shown in step transitions; defaults to `{hostname}-{pid}`.
    pub id: Option<String>,
    /// How long in-flight steps may take to finish at shutdown.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// A step still running after this long is reported `started` on its own; a quicker
    /// one's start is reported with its outcome (one message and one orchestrator
    /// transaction fewer per step). Zero reports every start at once.
    #[serde(with = "humantime_serde")]
    pub started_report_after: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            admin_listen: ([0, 0, 0, 0], 9092).into(),
            namespaces: vec!["default".into()],
            concurrency: 16,
            id: None,
            drain_timeout: Duration::from_secs(30),
            started_report_after: Duration::from_millis(100),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PublisherConfig {
    pub admin_listen: SocketAddr,
    /// Most outbox rows relayed per transaction (each row holds the events of one
    /// transaction that wrote some).
    pub batch_size: i64,
    /// Polling fallback when no notification arrives.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        Self { admin_listen: ([0, 0, 0, 0], 9093).into(), batch_size: 500, poll_interval: Duration::from_secs(5) }
    }
}

impl Config {
    /// Defaults → `file` → `TASKER_*` environment; then `amqp.url_file`, when set, is read
    /// into `amqp.url`.
    pub fn load(file: Option<&Path>) -> Result<Config, Box<figment::Error>> {
        let mut config: Config = Self::figment(file).extract().map_err(Box::new)?;
        if let Some(path) = &config.amqp.url_file {
            let url = std::fs::read_to_string(path)
                .map_err(|e| Box::new(figment::Error::from(format!("amqp.url_file {}: {e}", path.display()))))?;
            config.amqp.url = url.trim().to_owned();
        }
        let refuse = |message: &str| Err(Box::new(figment::Error::from(message.to_owned())));
        if config.database.statement_timeout.is_zero() {
            return refuse("database.statement_timeout: must be more than 0");
        }
        if !(1..=u64::from(u16::MAX)).contains(&config.amqp.heartbeat.as_secs()) {
            return refuse("amqp.heartbeat: must be from 1s to 65535s");
        }
        if config.api.watch_buffer == 0 {
            return refuse("api.watch_buffer: must be at least 1");
        }
        Ok(config)
    }

    pub fn figment(file: Option<&Path>) -> Figment {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            figment = figment.merge(Toml::file_exact(path));
        }
        figment.merge(
            // TASKER_CONFIG names the file; TASKER_TEST_* configure the test suite and
            // TASKER_API, TASKER_TOKEN(_FILE), TASKER_CA_CERT, TASKER_CLIENT_CERT and
            // TASKER_CLIENT_KEY taskerctl, not a service
            Env::prefixed("TASKER_").split("__").filter(|key| {
                let key = key.as_str().to_ascii_lowercase();
                !matches!(
                    key.as_str(),
                    "config" | "api" | "token" | "token_file" | "ca_cert" | "client_cert" | "client_key"
                ) && !key.starts_with("test_")
            }),
        )
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment's Jail API returns its own large error
mod tests {
    use super::*;

    #[test]
    fn defaults_file_then_environment() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "tasker.toml",
                "[database]\nurl = \"postgres://file/db\"\npool_size = 3\n[worker]\nnamespaces = [\"a\"]\n",
            )?;
            jail.set_env("TASKER_DATABASE__POOL_SIZE", "7");
            jail.set_env("TASKER_WORKER__NAMESPACES", "[payments, shipping]");
            jail.set_env("TASKER_ORCHESTRATOR__SWEEP_INTERVAL", "250ms");
            jail.set_env("TASKER_TEST_LOG", "debug");
            jail.set_env("TASKER_CONFIG", "tasker.toml");
            // taskerctl's own, set in the same shell
            jail.set_env("TASKER_TOKEN", "eyJ.x.y");
            jail.set_env("TASKER_TOKEN_FILE", "/tmp/token");
            jail.set_env("TASKER_API", "http://127.0.0.1:50051");
            let config = Config::load(Some(Path::new("tasker.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(config.database.url, "postgres://file/db");
            assert_eq!(config.database.pool_size, 7);
            assert_eq!(config.worker.namespaces, ["payments", "shipping"]);
            assert_eq!(config.orchestrator.sweep_interval, Duration::from_millis(250));
            assert_eq!(config.amqp.prefix, "tasker");
            Ok(())
        });
    }

    #[test]
    fn a_bad_value_names_its_key() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("TASKER_ORCHESTRATOR__BATCH_SIZE", "many");
            let error = Config::load(None).unwrap_err().to_string().to_lowercase();
            assert!(error.contains("orchestrator.batch_size"), "{error}");
            jail.set_env("TASKER_ORCHESTRATOR__BATCH_SIZE", "8");
            jail.set_env("TASKER_DATABSE__URL", "x");
            let error = Config::load(None).unwrap_err().to_string().to_lowercase();
            assert!(error.contains("databse"), "{error}");
            jail.clear_env();
            jail.set_env("TASKER_DATABASE__STATEMENT_TIMEOUT", "0s");
            let error = Config::load(None).unwrap_err().to_string();
            assert!(error.contains("database.statement_timeout"), "{error}");
            jail.set_env("TASKER_DATABASE__STATEMENT_TIMEOUT", "3s");
            jail.set_env("TASKER_AMQP__HEARTBEAT", "500ms");
            let error = Config::load(None).unwrap_err().to_string();
            assert!(error.contains("amqp.heartbeat"), "{error}");
            jail.set_env("TASKER_AMQP__HEARTBEAT", "2s");
            let config = Config::load(None).unwrap();
            assert_eq!(
                (config.database.statement_timeout, config.amqp.heartbeat),
                (Duration::from_secs(3), Duration::from_secs(2))
            );
            Ok(())
        });
    }

    #[test]
    fn the_broker_url_can_come_from_a_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("broker.url", "amqps://worker:s3cret@broker:5671/%2f\n")?;
            jail.set_env("TASKER_AMQP__URL_FILE", "broker.url");
            assert_eq!(Config::load(None).unwrap().amqp.url, "amqps://worker:s3cret@broker:5671/%2f");
            jail.set_env("TASKER_AMQP__URL_FILE", "missing.url");
            let error = Config::load(None).unwrap_err().to_string();
            assert!(error.contains("amqp.url_file missing.url"), "{error}");
            Ok(())
        });
    }

    #[test]
    fn an_empty_otlp_endpoint_loads() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("TASKER_TELEMETRY__OTLP_ENDPOINT", "");
            jail.set_env("TASKER_ORCHESTRATOR__RETENTION", "30d");
            let config = Config::load(None).unwrap();
            assert!(config.telemetry.otlp_endpoint.as_deref().is_none_or(str::is_empty));
            assert_eq!(config.orchestrator.retention, Some(Duration::from_secs(30 * 86_400)));
            Ok(())
        });
    }
}
