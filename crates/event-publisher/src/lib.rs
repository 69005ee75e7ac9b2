//! The event publisher: relays the transactional outbox to the `{prefix}.events` topic
//! exchange, oldest first, as CloudEvents JSON with publisher confirms, deleting rows only
//! once the broker confirmed them. Woken by LISTEN/NOTIFY, with a polling fallback. Safe
//! in several replicas: one relays at a time (advisory lock), so per-task order holds.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use prometheus_client::{
    metrics::{
        counter::Counter,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tasker_messaging::Publisher;
use tasker_runtime::{Admin, Config, PublisherConfig};
use tasker_store::Store;
use tokio_util::sync::CancellationToken;

/// Binds the admin listener, then relays until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    EventPublisher::bind(config).await?.run(shutdown).await
}

pub struct EventPublisher {
    config: Config,
    admin: Admin,
}

#[derive(Clone)]
struct Metrics {
    published: Counter,
    lag_ms: Gauge,
    lag: Histogram,
    depth: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            published: Counter::default(),
            lag_ms: Gauge::default(),
            lag: Histogram::new(exponential_buckets(0.001, 2.0, 20)),
            depth: Gauge::default(),
        }
    }
}

impl EventPublisher {
    pub async fn bind(config: Config) -> anyhow::Result<EventPublisher> {
        let admin = Admin::bind(config.publisher.admin_listen).await.context("binding the admin listener")?;
        Ok(EventPublisher { config, admin })
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr()
    }

    /// Relays until `shutdown`; a lost broker connection is re-established (with backoff).
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let EventPublisher { config, admin } = self;
        let started =
            tasker_runtime::start_with_store(admin, &config, tasker_store::Workload::Keyed, &shutdown).await?;
        let Some(tasker_runtime::Started { stop, admin, store }) = started else {
            return Ok(()); // stopped while waiting for the database
        };
        let mut registry = Registry::default();
        let metrics = Metrics::default();
        let sub = registry.sub_registry_with_prefix("tasker_events");
        sub.register("published", "Events relayed to the exchange", metrics.published.clone());
        sub.register("outbox_lag_ms", "Age of the oldest event in the last relayed batch", metrics.lag_ms.clone());
        sub.register(
            "relay_lag_seconds",
            "From an event written to its batch relayed, for the oldest event of each batch",
            metrics.lag.clone(),
        );
        sub.register(
            "outbox_depth",
            "Events written and not yet relayed (after the last batch)",
            metrics.depth.clone(),
        );
        let slot = tasker_runtime::BrokerSlot::new();
        slot.register(&mut registry);
        tasker_runtime::register_store_metrics(&store, &mut registry);
        admin.wire(vec![tasker_runtime::store_check(&store), slot.check()], registry);
        let result = tasker_runtime::supervise("event-publisher", &stop, || async {
            let broker = Arc::new(tasker_runtime::connect_broker(&config.amqp, "event-publisher").await?);
            slot.set(Some(broker.clone()));
            broker.declare_events().await.context("declaring the events exchange")?;
            let publisher = broker.publisher().await?;
            tracing::info!(exchange = broker.topology().events_exchange(), "event publisher running");
            let local = stop.child_token();
            let relayed = tokio::select! {
                relayed = relay(&store, &publisher, &config.publisher, &metrics, local.clone()) => relayed,
                // noticed at once, even while the outbox is quiet
                _ = broker.closed() => Err(anyhow::anyhow!("the broker connection was lost")),
            };
            local.cancel();
            slot.set(None);
            publisher.close().await;
            let _ = broker.close().await;
            relayed
        })
        .await;
        stop.cancel();
        let _ = admin.stopped().await;
        result
    }
}

async fn relay(
    store: &Store,
    publisher: &Publisher,
    config: &PublisherConfig,
    metrics: &Metrics,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let listener = store.listen_outbox(stop.clone());
    let mut failures = 0u32;
    while !stop.is_cancelled() {
        // a blocked connection (a resource alarm) sends nothing until it clears: claiming
        // meanwhile would hold the claim, and its lock, for as long as the alarm lasts
        if publisher.blocked().is_some() {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_millis(250)) => continue,
            }
        }
        // a stop gives the claim back at once, even while its confirms wait on a block
        let relayed = tokio::select! {
            relayed = relay_batch(store, publisher, config.batch_size, metrics) => relayed,
            _ = stop.cancelled() => break,
        };
        match relayed {
            // a full batch (of outbox rows) leaves a backlog: take the next one at once; a
            // short one took everything committed before it was read, and whatever committed
            // since has woken the listener (its wake-up waits below), so no empty claim
            // follows it
            Ok(Some(claimed)) if claimed as i64 >= config.batch_size => {
                failures = 0;
                continue;
            }
            Ok(_) => failures = 0,
            // The broker failed a publish: the claim was given back at once (dropping it
            // rolls back and frees the lock for a healthy replica), and this replica
            // connects again rather than trying the same broken channel.
            Err(Failure::Broker(error)) => return Err(error.into()),
            // The database: nothing to reconnect on the broker side; try again shortly.
            Err(Failure::Store(error)) => {
                failures += 1;
                tracing::warn!(%error, failures, "relaying events failed on the database; trying again");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(tasker_runtime::hold_delay(failures)) => {}
                }
                continue;
            }
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = listener.notified() => {}
            _ = tokio::time::sleep(config.poll_interval) => {}
        }
    }
    Ok(())
}

/// Why a batch was not relayed.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Store(#[from] tasker_store::Error),
    #[error(transparent)]
    Broker(#[from] tasker_messaging::Error),
}

/// How long a claim may wait, idle, for its events' confirms: as long as the publish
/// waits for them, and a little more for the delete to reach the server.
const CLAIM_HOLD: Duration = Duration::from_secs(tasker_messaging::TIMEOUT.as_secs() + 5);

/// Relays one batch; the outbox rows it claimed, or `None` when another replica holds the
/// relay lock.
async fn relay_batch(
    store: &Store,
    publisher: &Publisher,
    limit: i64,
    metrics: &Metrics,
) -> Result<Option<usize>, Failure> {
    let Some(batch) = store.claim_outbox(limit, CLAIM_HOLD).await? else { return Ok(None) };
    let (claimed, n) = (batch.claimed(), batch.events.len());
    if claimed == 0 {
        batch.release().await?;
        return Ok(Some(0));
    }
    if let Some(oldest) = batch.events.first() {
        let at = oldest.event_id.get_timestamp().map(|ts| ts.to_unix());
        if let Some((secs, nanos)) = at {
            let created = std::time::UNIX_EPOCH + Duration::new(secs, nanos);
            let lag = std::time::SystemTime::now().duration_since(created).unwrap_or_default();
            metrics.lag_ms.set(lag.as_millis() as i64);
            metrics.lag.observe(lag.as_secs_f64());
        }
    }
    let ids: Vec<String> = batch.events.iter().map(|r| r.event_id.to_string()).collect();
    let events: Vec<(&str, &str, &str)> = batch
        .events
        .iter()
        .zip(&ids)
        .map(|(r, id)| (id.as_str(), r.routing_key.as_str(), r.payload.as_str()))
        .collect();
    publisher.publish_events(&events).await?;
    batch.complete().await?;
    metrics.published.inc_by(n as u64);
    // a batch short of the limit took everything there was; a full one leaves a backlog,
    // counted (the count scans the outbox, so only then)
    let depth = if (claimed as i64) < limit { 0 } else { store.outbox_depth().await? };
    metrics.depth.set(depth as i64);
    Ok(Some(claimed))
}
