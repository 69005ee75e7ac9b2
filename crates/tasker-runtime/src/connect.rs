//! Connecting to the two dependencies the way every service does.

use anyhow::Context;
use tasker_messaging::{Broker, QueueType, Topology};
use tasker_store::{Store, Workload};

use tokio_util::sync::CancellationToken;

use crate::{Admin, AmqpConfig, Config, DatabaseConfig, ReadyCheck, Serving, ready_check};

/// A service with a database, started: its stop token (a child of the shutdown's), its
/// admin endpoint (served from the start) and its store.
pub struct Started {
    pub stop: CancellationToken,
    pub admin: Serving,
    pub store: Store,
}

/// Serves `admin` at once and opens the store, waiting for the database as
/// [`connect_store`] does. `None` when `shutdown` came first.
pub async fn start_with_store(
    admin: Admin,
    config: &Config,
    workload: Workload,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Started>> {
    let stop = shutdown.child_token();
    let admin = admin.start(config.health.live_timeout, stop.clone());
    let store = connect_store(&config.database, workload, &admin, &stop).await?;
    Ok(store.map(|store| Started { stop, admin, store }))
}

/// Migrates (when configured) and opens the pool, waiting for a database out of reach
/// at start as for one lost later, and for a migration blocked by a lock held elsewhere:
/// it is tried again after [`crate::reconnect_delay`] while `admin` says what the service
/// is waiting for. `None` when `stop` came first. A database that answers and refuses (a
/// wrong password, no such database, a failed migration) is an error at once.
async fn connect_store(
    config: &DatabaseConfig,
    workload: Workload,
    admin: &Serving,
    stop: &CancellationToken,
) -> anyhow::Result<Option<Store>> {
    admin.waiting_for("database", "connecting".into());
    let mut failures = 0;
    loop {
        let opened = tokio::select! {
            _ = stop.cancelled() => return Ok(None),
            opened = open_store(config, workload) => opened,
        };
        let (error, what) = match opened {
            Ok(store) => return Ok(Some(store)),
            Err(failed) => failed,
        };
        let worth_waiting = error.is_worth_waiting_for();
        let error = anyhow::Error::new(error).context(what);
        if !worth_waiting {
            return Err(error);
        }
        failures += 1;
        let delay = crate::reconnect_delay(failures);
        tracing::warn!(error = format!("{error:#}"), retry_in = ?delay, "waiting for the database");
        admin.waiting_for("database", format!("{error:#}"));
        tokio::select! {
            _ = stop.cancelled() => return Ok(None),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

async fn open_store(config: &DatabaseConfig, workload: Workload) -> Result<Store, (tasker_store::Error, &'static str)> {
    if config.migrate {
        tasker_store::migrate(&config.url).await.map_err(|e| (e, "migrating the database"))?;
    }
    Store::connect_with(&config.url, config.pool_size, workload, config.statement_timeout)
        .await
        .map_err(|e| (e, "connecting to the database"))
}

/// The broker names for this configuration.
pub fn topology(config: &AmqpConfig) -> anyhow::Result<Topology> {
    let steps: QueueType = config.queue_type.parse().map_err(|e: String| anyhow::anyhow!("amqp.queue_type: {e}"))?;
    let orchestrator: QueueType = config
        .orchestrator_queue_type
        .parse()
        .map_err(|e: String| anyhow::anyhow!("amqp.orchestrator_queue_type: {e}"))?;
    Ok(Topology::new(&config.prefix, steps, orchestrator, config.delivery_limit))
}

/// Connects to the broker; `service` names the connection.
pub async fn connect_broker(config: &AmqpConfig, service: &str) -> anyhow::Result<Broker> {
    let name = format!("{service}@{}", std::process::id());
    let ca = config.ca_file.as_deref().map(|path| crate::tls::read_pem("amqp.ca_file", path)).transpose()?;
    let heartbeat = u16::try_from(config.heartbeat.as_secs()).unwrap_or(u16::MAX);
    Broker::connect_trusting(&config.url, ca, heartbeat, topology(config)?, &name)
        .await
        .context("connecting to the broker")
}

/// Readiness check: a database round trip, and every migration this build carries
/// applied (a replica of a newer build waits until the schema is there).
pub fn store_check(store: &Store) -> ReadyCheck {
    let store = store.clone();
    ready_check("database", move || {
        let store = store.clone();
        async move {
            let pending = tasker_store::pending_migrations(&store).await.map_err(|e| e.to_string())?;
            if let [_, ..] = pending.as_slice() {
                return Err(format!("{} migration(s) not applied: {pending:?}", pending.len()));
            }
            if tasker_store::read_only(&store).await.map_err(|e| e.to_string())? {
                return Err("read-only: the server refuses writes (a standby, or default_transaction_read_only)".into());
            }
            Ok(())
        }
    })
}

/// How many of a service's consumers are attached to their queues, for readiness: a
/// connected service that is not consuming is not ready.
#[derive(Clone)]
pub struct Consumers {
    attached: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    expected: usize,
}

impl Consumers {
    pub fn expecting(expected: usize) -> Consumers {
        Consumers { attached: Default::default(), expected }
    }

    /// Counts one consumer attached until the returned guard is dropped.
    pub fn attach(&self) -> AttachedConsumer {
        self.attached.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        AttachedConsumer(self.attached.clone())
    }

    pub fn check(&self) -> ReadyCheck {
        let consumers = self.clone();
        ready_check("consumers", move || {
            let attached = consumers.attached.load(std::sync::atomic::Ordering::SeqCst);
            let expected = consumers.expected;
            async move { if attached >= expected { Ok(()) } else { Err(format!("{attached} of {expected} attached")) } }
        })
    }
}

/// See [`Consumers::attach`].
pub struct AttachedConsumer(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl Drop for AttachedConsumer {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The database pool's gauges, read at each scrape: `tasker_db_pool_connections{state}`
/// (`in_use`, `idle`), `tasker_db_pool_max` and `tasker_db_pool_waiting` (callers waiting
/// for a connection: the pool is too small, or the database slow).
pub fn register_store_metrics(store: &Store, registry: &mut prometheus_client::registry::Registry) {
    registry.register_collector(Box::new(PoolCollector(store.clone())));
}

struct PoolCollector(Store);

impl std::fmt::Debug for PoolCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PoolCollector")
    }
}

impl prometheus_client::collector::Collector for PoolCollector {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::{
            encoding::EncodeMetric,
            metrics::{MetricType, gauge::ConstGauge},
        };
        let status = self.0.pool_status();
        let mut connections = encoder.encode_descriptor(
            "tasker_db_pool_connections",
            "Database connections by state",
            None,
            MetricType::Gauge,
        )?;
        for (state, n) in [("in_use", status.open.saturating_sub(status.idle)), ("idle", status.idle)] {
            let labels = [("state", state)];
            ConstGauge::new(n as i64).encode(connections.encode_family(&labels)?)?;
        }
        for (name, help, value) in [
            ("tasker_db_pool_max", "Most database connections the pool opens", status.max),
            ("tasker_db_pool_waiting", "Callers waiting for a database connection", status.waiting),
        ] {
            let gauge = ConstGauge::new(value as i64);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}
