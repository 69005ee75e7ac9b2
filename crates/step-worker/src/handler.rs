//! The handler trait, its input and errors, and the registry of handlers by name.

use std::{collections::HashMap, sync::Arc, time::Duration};

use serde_json::Value;
use uuid::Uuid;

/// What a handler gets for one attempt.
#[derive(Debug, Clone)]
pub struct StepInput {
    pub task_id: Uuid,
    pub step_id: Uuid,
    pub step_name: String,
    pub namespace: String,
    pub task_name: String,
    pub task_version: String,
    /// The attempt's number: 1 for the first, counting on across operator retries.
    pub attempt: u32,
    /// The task context.
    pub context: Value,
    /// Results of the step's parents, by step name.
    pub parent_results: HashMap<String, Value>,
    /// The step's `config` from the template.
    pub config: Value,
    /// When the worker stops waiting on the handler.
    pub deadline: tokio::time::Instant,
}

/// How an attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    /// Worth trying again (subject to the step's attempts and backoff).
    #[error("{0}")]
    Retryable(String),
    /// Trying again will not help.
    #[error("{0}")]
    Permanent(String),
    /// Try again after this delay (capped by the backoff maximum).
    #[error("{message} (retry after {after:?})")]
    RetryAfter { message: String, after: Duration },
}

impl StepError {
    pub fn retryable(message: impl Into<String>) -> Self {
        StepError::Retryable(message.into())
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        StepError::Permanent(message.into())
    }
}

/// A step handler: does the work of one attempt and returns JSON results. A panic fails
/// the attempt as retryable, with the panic's message.
#[async_trait::async_trait]
pub trait StepHandler: Send + Sync + 'static {
    async fn call(&self, input: StepInput) -> Result<Value, StepError>;
}

/// Handlers by name (the `handler` field of a step template).
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<String, Arc<dyn StepHandler>>,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    /// The built-in handlers: `noop`, `echo`, `sleep`, `fail` and `http`.
    pub fn with_builtins() -> Registry {
        let mut registry = Registry::new();
        crate::builtins::register(&mut registry);
        registry
    }

    pub fn register(&mut self, name: impl Into<String>, handler: impl StepHandler) -> &mut Self {
        self.handlers.insert(name.into(), Arc::new(handler));
        self
    }

    pub fn get(&self, name: &str) -> Option<Arc<dyn StepHandler>> {
        self.handlers.get(name).cloned()
    }

    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.handlers.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }
}
