//! Built-in handlers, for examples, tests, benchmarks and chaos runs.
//!
//! - `noop`: returns `config.result` if given, else `{}`.
//! - `echo`: returns what it was given (`step`, `attempt`, `context`, `parents`, `config`).
//! - `sleep`: waits `config.ms` milliseconds (or `config.duration`, e.g. `"50ms"`), returns
//!   `{ "slept_ms": n }`.
//! - `fail`: fails its first `config.times` attempts (every attempt when absent), then
//!   succeeds like `echo`. `config.permanent: true` fails permanently;
//!   `config.retry_after_ms` asks for a specific delay; `config.message` sets the message.
//! - `http`: see [`crate::http`].

use std::time::Duration;

use serde_json::{Value, json};

use crate::{Registry, StepError, StepHandler, StepInput};

pub(crate) fn register(registry: &mut Registry) {
    registry.register("noop", Noop).register("echo", Echo).register("sleep", Sleep).register("fail", Fail);
    registry.register("http", crate::http::Http::default());
}

pub struct Noop;

#[async_trait::async_trait]
impl StepHandler for Noop {
    async fn call(&self, input: StepInput) -> Result<Value, StepError> {
        Ok(input.config.get("result").cloned().unwrap_or_else(|| json!({})))
    }
}

pub struct Echo;

fn echo(input: &StepInput) -> Value {
    json!({
        "step": input.step_name,
        "attempt": input.attempt,
        "context": input.context,
        "parents": input.parent_results,
        "config": input.config,
    })
}

#[async_trait::async_trait]
impl StepHandler for Echo {
    async fn call(&self, input: StepInput) -> Result<Value, StepError> {
        Ok(echo(&input))
    }
}

pub struct Sleep;

fn sleep_duration(config: &Value) -> Result<Duration, StepError> {
    if let Some(ms) = config.get("ms").and_then(Value::as_u64) {
        return Ok(Duration::from_millis(ms));
    }
    match config.get("duration").and_then(Value::as_str) {
        Some(text) => {
            humantime::parse_duration(text).map_err(|e| StepError::permanent(format!("config.duration `{text}`: {e}")))
        }
        None => Err(StepError::permanent("sleep needs config.ms or config.duration")),
    }
}

#[async_trait::async_trait]
impl StepHandler for Sleep {
    async fn call(&self, input: StepInput) -> Result<Value, StepError> {
        let duration = sleep_duration(&input.config)?;
        tokio::time::sleep(duration).await;
        Ok(json!({ "slept_ms": duration.as_millis() as u64 }))
    }
}

pub struct Fail;

#[async_trait::async_trait]
impl StepHandler for Fail {
    async fn call(&self, input: StepInput) -> Result<Value, StepError> {
        let times = input.config.get("times").and_then(Value::as_u64);
        if times.is_some_and(|n| u64::from(input.attempt) > n) {
            return Ok(echo(&input));
        }
        let message = input
            .config
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| format!("planned failure of attempt {}", input.attempt));
        if input.config.get("permanent").and_then(Value::as_bool) == Some(true) {
            return Err(StepError::Permanent(message));
        }
        match input.config.get("retry_after_ms").and_then(Value::as_u64) {
            Some(ms) => Err(StepError::RetryAfter { message, after: Duration::from_millis(ms) }),
            None => Err(StepError::Retryable(message)),
        }
    }
}
