//! Connecting to the two dependencies the way every service does.

use anyhow::Context;
use tasker_messaging::{Broker, QueueType, Topology};
use tasker_store::Store;

use crate::{AmqpConfig, DatabaseConfig, ReadyCheck, ready_check};

/// Migrates (when configured) and opens the pool.
pub async fn connect_store(config: &DatabaseConfig) -> anyhow::Result<Store> {
    if config.migrate {
        tasker_store::migrate(&config.url).await.context("migrating the database")?;
    }
    Store::connect(&config.url, config.pool_size).await.context("connecting to the database")
}

/// The broker names for this configuration.
pub fn topology(config: &AmqpConfig) -> anyhow::Result<Topology> {
    let queue_type: QueueType =
        config.queue_type.parse().map_err(|e: String| anyhow::anyhow!("amqp.queue_type: {e}"))?;
    Ok(Topology::new(&config.prefix, queue_type, config.delivery_limit))
}

/// Connects to the broker; `service` names the connection.
pub async fn connect_broker(config: &AmqpConfig, service: &str) -> anyhow::Result<Broker> {
    let name = format!("{service}@{}", std::process::id());
    let ca = config.ca_file.as_deref().map(|path| crate::tls::read_pem("amqp.ca_file", path)).transpose()?;
    Broker::connect_trusting(&config.url, ca, topology(config)?, &name).await.context("connecting to the broker")
}

/// Readiness check: a database round trip.
pub fn store_check(store: &Store) -> ReadyCheck {
    let store = store.clone();
    ready_check("database", move || {
        let store = store.clone();
        async move { store.ping().await.map_err(|e| e.to_string()) }
    })
}
