//! The worker SDK and the `step-worker` service.
//!
//! Implement [`StepHandler`], register it by name in a [`Registry`], and run a [`Worker`]
//! for the namespaces it serves. The runtime consumes `{prefix}.steps.{namespace}` with a
//! prefetch equal to its concurrency (and runs that many handlers of a namespace at once,
//! those of a connection lost meanwhile included), reports `started` and then the outcome
//! to the orchestrator (publisher-confirmed), stops waiting on a handler at the step's
//! timeout, and acks an execution only once its outcome is confirmed. Workers never touch
//! Postgres: adding workers adds no database load.

mod builtins;
mod handler;
pub mod http;
mod runtime;

pub use builtins::{Echo, Fail, Noop, Sleep};
pub use handler::{Registry, StepError, StepHandler, StepInput};
pub use runtime::Worker;

use tasker_runtime::Config;
use tokio_util::sync::CancellationToken;

/// Runs a worker with the built-in handlers until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    Worker::bind(config, Registry::with_builtins()).await?.run(shutdown).await
}
