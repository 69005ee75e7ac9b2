//! Keeping a service's broker-facing loops alive across lost connections.

use std::{
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use tasker_messaging::Broker;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::{ReadyCheck, ready_check};

/// The broker connection a supervised service currently uses (none while reconnecting).
#[derive(Clone, Default)]
pub struct BrokerSlot(Arc<Mutex<Option<Arc<Broker>>>>);

impl BrokerSlot {
    pub fn set(&self, broker: Option<Arc<Broker>>) {
        *self.0.lock().expect("broker slot lock") = broker;
    }

    /// Readiness check: a broker connection is open.
    pub fn check(&self) -> ReadyCheck {
        let slot = self.clone();
        ready_check("broker", move || {
            let connected = slot.0.lock().expect("broker slot lock").as_ref().is_some_and(|b| b.is_connected());
            async move { if connected { Ok(()) } else { Err("not connected".to_owned()) } }
        })
    }
}

/// Runs `attempt` until it returns `Ok` (it does when `stop` is cancelled) . When it fails
/// — a lost broker connection, say — logs the cause and runs it again after a backoff
/// (0.5 s doubling to 30 s, reset after a minute of health), so a service outlives broker
/// restarts instead of exiting with work half-done.
pub async fn supervise<F, Fut>(name: &'static str, stop: &CancellationToken, mut attempt: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let mut delay = Duration::from_millis(500);
    loop {
        let started = std::time::Instant::now();
        match attempt().await {
            Ok(()) => return Ok(()),
            Err(_) if stop.is_cancelled() => return Ok(()),
            Err(error) => {
                if started.elapsed() > Duration::from_secs(60) {
                    delay = Duration::from_millis(500);
                }
                tracing::warn!(service = name, error = format!("{error:#}"), retry_in = ?delay, "lost the broker or database; restarting");
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
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
