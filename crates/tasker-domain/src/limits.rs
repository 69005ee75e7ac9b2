//! Size limits on what clients and handlers send (design §6, "bounded inputs").

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest task context, in bytes of JSON text.
    pub max_context_bytes: usize,
    /// Largest step results, in bytes of JSON text.
    pub max_results_bytes: usize,
    /// Largest template, in bytes of YAML text.
    pub max_template_bytes: usize,
    /// Most steps in one template.
    pub max_steps: usize,
    /// Largest step execution the orchestrator publishes, in bytes of its encoded message:
    /// it carries the task's context and its parents' results. Keep it, and the context and
    /// results limits, within the broker's own largest message (RabbitMQ's
    /// `max_message_size`: 16 MiB by default from 4.0, 128 MiB before).
    pub max_execution_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_context_bytes: 1 << 20,
            max_results_bytes: 1 << 20,
            max_template_bytes: 256 << 10,
            max_steps: 2_000,
            max_execution_bytes: 16 << 20,
        }
    }
}
