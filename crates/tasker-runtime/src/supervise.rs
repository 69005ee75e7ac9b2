//! One supervision model for every service's broker connection: a lost connection is
//! noticed at once ([`Broker::closed`]), the service's broker-facing loops end together,
//! and the connection is made again after a capped, jittered backoff, while readiness
//! reports it down and metrics count the reconnects and the time disconnected.

use std::{
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use tasker_messaging::Broker;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::{Problem, ReadyCheck, ready_check};

/// The broker connection a supervised service currently uses (none while reconnecting),
/// and its history for `/metrics`.
#[derive(Clone)]
pub struct BrokerSlot(Arc<Mutex<SlotState>>);

#[derive(Default)]
struct SlotState {
    broker: Option<Arc<Broker>>,
    /// Connections made after the first.
    reconnects: u64,
    connected_once: bool,
    /// Disconnected time before the current outage.
    disconnected: Duration,
    /// Since when the service has had no connection (from its start until the first).
    down_since: Option<Instant>,
}

impl Default for BrokerSlot {
    fn default() -> Self {
        BrokerSlot::new()
    }
}

impl BrokerSlot {
    /// A slot with no connection yet (counted as disconnected from now).
    pub fn new() -> BrokerSlot {
        BrokerSlot(Arc::new(Mutex::new(SlotState { down_since: Some(Instant::now()), ..SlotState::default() })))
    }

    pub fn set(&self, broker: Option<Arc<Broker>>) {
        let mut state = self.0.lock().expect("broker slot lock");
        match (&broker, state.down_since) {
            (Some(_), since) => {
                if let Some(since) = since {
                    state.disconnected += since.elapsed();
                }
                state.down_since = None;
                if state.connected_once {
                    state.reconnects += 1;
                }
                state.connected_once = true;
            }
            (None, None) => state.down_since = Some(Instant::now()),
            (None, Some(_)) => {}
        }
        state.broker = broker;
    }

    /// The connection in use, if any.
    pub fn get(&self) -> Option<Arc<Broker>> {
        self.0.lock().expect("broker slot lock").broker.clone()
    }

    /// Readiness check: a broker connection is open, and the broker does not block it. A
    /// block (a resource alarm) fails readiness but not liveness: a restart cannot clear
    /// the broker's alarm, and the work waits for it.
    pub fn check(&self) -> ReadyCheck {
        let slot = self.clone();
        ready_check("broker", move || {
            let problem = match slot.get() {
                Some(broker) if broker.is_connected() => broker.blocked().map(|reason| Problem {
                    text: format!("blocked by the broker: {reason} (a resource alarm); work waits until it clears"),
                    restart_helps: false,
                }),
                _ => Some("not connected".to_owned().into()),
            };
            std::future::ready(problem.map_or(Ok(()), Err))
        })
    }

    /// Registers `tasker_broker_connected`, `tasker_broker_blocked`,
    /// `tasker_broker_reconnects_total` and `tasker_broker_disconnected_seconds_total`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register_collector(Box::new(SlotMetrics(self.clone())));
    }
}

#[derive(Clone)]
struct SlotMetrics(BrokerSlot);

impl std::fmt::Debug for SlotMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SlotMetrics")
    }
}

impl Collector for SlotMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (connected, blocked, reconnects, disconnected) = {
            let state = self.0.0.lock().expect("broker slot lock");
            let current = state.down_since.map(|t| t.elapsed()).unwrap_or_default();
            let open = state.broker.as_ref().filter(|b| b.is_connected());
            let blocked = open.is_some_and(|b| b.blocked().is_some());
            (open.is_some(), blocked, state.reconnects, (state.disconnected + current).as_secs_f64())
        };
        for (name, help, on) in [
            ("tasker_broker_connected", "1 while the service holds an open broker connection", connected),
            (
                "tasker_broker_blocked",
                "1 while the broker blocks the service's connection (a resource alarm: nothing is published until it clears)",
                blocked,
            ),
        ] {
            let gauge = ConstGauge::new(i64::from(on));
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        let counter = ConstCounter::new(reconnects);
        counter.encode(encoder.encode_descriptor(
            "tasker_broker_reconnects",
            "Broker connections made again after one was lost",
            None,
            counter.metric_type(),
        )?)?;
        let counter = ConstCounter::new(disconnected);
        counter.encode(encoder.encode_descriptor(
            "tasker_broker_disconnected_seconds",
            "Time spent without a broker connection",
            None,
            counter.metric_type(),
        )?)?;
        Ok(())
    }
}

/// The wait before connecting again after `failures` failures in a row: 250 ms doubling
/// to a cap of 3 s, then ±25 % at random, so replicas that lost the broker together do not
/// come back in lockstep, and a service is back within ~4 s of the broker.
pub fn reconnect_delay(failures: u32) -> Duration {
    let exponent = failures.saturating_sub(1).min(8) as i32;
    let capped = (0.25 * 2f64.powi(exponent)).min(3.0);
    Duration::from_secs_f64(capped * rand::random_range(0.75..=1.25))
}

/// The wait between tries of work held through an outage of the database or broker:
/// 100 ms doubling to 1 s, so the work resumes within a second of the server's return.
pub fn hold_delay(failures: u32) -> Duration {
    Duration::from_millis(100 << failures.saturating_sub(1).min(4)).min(Duration::from_secs(1))
}

/// Runs `attempt` until it returns `Ok` (it does when `stop` is cancelled). When it fails
/// — a lost broker connection, say — logs the cause and runs it again after
/// [`reconnect_delay`], so a service outlives broker restarts instead of exiting with work
/// half-done. A run that lasted 30 s resets the backoff.
pub async fn supervise<F, Fut>(name: &'static str, stop: &CancellationToken, mut attempt: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let mut failures = 0;
    loop {
        let started = Instant::now();
        match attempt().await {
            Ok(()) => return Ok(()),
            Err(_) if stop.is_cancelled() => return Ok(()),
            Err(error) => {
                if started.elapsed() > Duration::from_secs(30) {
                    failures = 0;
                }
                failures += 1;
                let delay = reconnect_delay(failures);
                tracing::warn!(service = name, error = format!("{error:#}"), retry_in = ?delay, "lost the broker; connecting again");
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Adds to `set` a loop that fails as soon as `broker`'s connection is lost, so the other
/// loops end with it (through [`join_loops`]) and the supervisor connects again.
pub fn watch_connection(set: &mut JoinSet<anyhow::Result<()>>, broker: Arc<Broker>, stop: CancellationToken) {
    set.spawn(async move {
        tokio::select! {
            _ = stop.cancelled() => Ok(()),
            _ = broker.closed() => Err(anyhow::anyhow!("the broker connection was lost")),
        }
    });
}

/// Waits for a set of loops that should run until `stop`: the first to end (with an error,
/// a panic, or on its own before `stop`) ends them all through `local`; returns that
/// first failure, or `Ok` when they ended because of `stop`.
pub async fn join_loops(
    mut set: JoinSet<anyhow::Result<()>>,
    local: &CancellationToken,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let mut result = Ok(());
    while let Some(done) = set.join_next().await {
        let outcome = done.map_err(|e| anyhow::anyhow!("a loop panicked: {e}")).and_then(|r| r);
        if let Err(error) = outcome {
            if result.is_ok() {
                result = Err(error);
            }
        } else if !stop.is_cancelled() && result.is_ok() {
            // a loop ended on its own (e.g. the broker cancelled a consumer)
            result = Err(anyhow::anyhow!("a loop stopped unexpectedly"));
        }
        local.cancel();
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_delays_grow_to_a_cap_with_jitter() {
        for _ in 0..200 {
            let first = reconnect_delay(1).as_secs_f64();
            assert!((0.1875..=0.3125).contains(&first), "{first}");
            let late = reconnect_delay(20).as_secs_f64();
            assert!((2.25..=3.75).contains(&late), "{late}");
        }
        let many: std::collections::HashSet<u128> = (0..50).map(|_| reconnect_delay(20).as_micros()).collect();
        assert!(many.len() > 40, "jittered at the cap too");
    }
}
