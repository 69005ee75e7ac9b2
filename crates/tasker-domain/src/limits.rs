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
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_context_bytes: 1 << 20, max_results_bytes: 1 << 20, max_template_bytes: 256 << 10, max_steps: 2_000 }
    }
}
