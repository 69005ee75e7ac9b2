//! Workflow templates (design §8): the YAML model, its validation, and the validated,
//! immutable form the store keeps per namespace/name/version.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::{
    Limits,
    payload::{self, PayloadError, quote},
};

/// Why a template was refused. Each message names the problem and where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("template is not valid YAML: {0}")]
    Yaml(String),
    #[error("template is {size} bytes, more than the limit of {max}")]
    TooLarge { size: usize, max: usize },
    #[error(
        "{field}: {} is not a valid name (lowercase letters, digits and `_`, starting with a letter, at most 64 characters)",
        quote(.value)
    )]
    InvalidName { field: String, value: String },
    #[error("handler of step {}: {} is not a valid handler name", quote(.step), quote(.value))]
    InvalidHandler { step: String, value: String },
    #[error("version: {} is not a semantic version (e.g. 1.2.0)", quote(.0))]
    InvalidVersion(String),
    #[error("steps: a template needs at least one step")]
    NoSteps,
    #[error("steps: {count} steps, more than the limit of {max}")]
    TooManySteps { count: usize, max: usize },
    #[error("steps: duplicate step name {}", quote(.0))]
    DuplicateStep(String),
    #[error("step {} depends on unknown step {}", quote(.step), quote(.dependency))]
    UnknownDependency { step: String, dependency: String },
    #[error("steps: dependency cycle {}", .0.join(" -> "))]
    Cycle(Vec<String>),
    #[error("{field}: max_attempts must be at least 1")]
    InvalidMaxAttempts { field: String },
    #[error("{field}: timeout must be more than zero")]
    InvalidTimeout { field: String },
    #[error("input_schema: does not compile: {0}")]
    InvalidSchema(String),
    #[error("config of step {}: must be a mapping", quote(.0))]
    InvalidConfig(String),
    #[error("{field}: {problem}")]
    Payload { field: String, problem: PayloadError },
}

/// A task context refused by the template's input schema.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("context{}: {message}", if path.is_empty() { String::new() } else { format!(" at `{path}`") })]
pub struct ContextError {
    /// JSON pointer to the failing value (empty for the root).
    pub path: String,
    pub message: String,
}

/// A compiled input schema.
pub struct ContextSchema(jsonschema::Validator);

impl ContextSchema {
    /// The first violation, with the JSON pointer of the failing value.
    pub fn validate(&self, context: &Value) -> Result<(), ContextError> {
        match self.0.iter_errors(context).next() {
            None => Ok(()),
            Some(err) => Err(ContextError { path: err.instance_path().to_string(), message: err.to_string() }),
        }
    }
}

const DEFAULT_MAX_ATTEMPTS: u32 = 3;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTemplate {
    namespace: String,
    name: String,
    version: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    input_schema: Option<Value>,
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default)]
    steps: Vec<RawStep>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    max_attempts: Option<u32>,
    retryable: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    name: String,
    handler: String,
    #[serde(default)]
    depends_on: Vec<String>,
    max_attempts: Option<u32>,
    retryable: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    #[serde(default)]
    config: Option<Value>,
}

/// A validated template. Steps are in topological order (parents before children).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Template {
    pub namespace: String,
    pub name: String,
    pub version: semver::Version,
    pub description: String,
    pub input_schema: Option<Value>,
    pub steps: Vec<StepTemplate>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepTemplate {
    pub name: String,
    pub handler: String,
    pub depends_on: Vec<String>,
    /// Total attempts, the first included.
    pub max_attempts: u32,
    pub retryable: bool,
    pub timeout_ms: u64,
    pub config: Value,
    /// Longest path from a root (roots are level 0).
    pub dependency_level: u32,
}

/// `true` for names usable in queue names and routing keys: `[a-z][a-z0-9_]{0,63}`.
pub fn is_valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    s.len() <= 64
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Handler names may be dotted (`payments.validate_eligibility`).
fn is_valid_handler(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.split('.').all(|part| {
            part.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
                && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        })
}

impl Template {
    /// Parses and validates a YAML template.
    pub fn from_yaml(text: &str, limits: &Limits) -> Result<Template, TemplateError> {
        if text.len() > limits.max_template_bytes {
            return Err(TemplateError::TooLarge { size: text.len(), max: limits.max_template_bytes });
        }
        // the parser's message may quote the input (an unknown key, a bad value): keep a prefix
        let raw: RawTemplate =
            serde_yaml_ng::from_str(text).map_err(|e| TemplateError::Yaml(truncate(&e.to_string(), 300)))?;
        Self::validate(raw, limits)
    }

    fn validate(mut raw: RawTemplate, limits: &Limits) -> Result<Template, TemplateError> {
        for step in &mut raw.steps {
            let mut seen = std::collections::HashSet::new();
            step.depends_on.retain(|d| seen.insert(d.clone()));
        }
        for (field, value) in [("namespace", &raw.namespace), ("name", &raw.name)] {
            if !is_valid_name(value) {
                return Err(TemplateError::InvalidName { field: field.into(), value: value.clone() });
            }
        }
        let version =
            semver::Version::parse(&raw.version).map_err(|_| TemplateError::InvalidVersion(raw.version.clone()))?;
        if raw.steps.is_empty() {
            return Err(TemplateError::NoSteps);
        }
        if raw.steps.len() > limits.max_steps {
            return Err(TemplateError::TooManySteps { count: raw.steps.len(), max: limits.max_steps });
        }
        if !payload::storable(&raw.description) {
            return Err(TemplateError::Payload { field: "description".into(), problem: PayloadError::Nul });
        }
        if let Some(schema) = &raw.input_schema {
            check_payload("input_schema", schema)?;
            jsonschema::validator_for(schema).map_err(|e| TemplateError::InvalidSchema(e.to_string()))?;
        }
        if raw.defaults.max_attempts == Some(0) {
            return Err(TemplateError::InvalidMaxAttempts { field: "defaults".into() });
        }
        if raw.defaults.timeout == Some(Duration::ZERO) {
            return Err(TemplateError::InvalidTimeout { field: "defaults".into() });
        }

        let mut index = HashMap::with_capacity(raw.steps.len());
        for (i, step) in raw.steps.iter().enumerate() {
            if !is_valid_name(&step.name) {
                return Err(TemplateError::InvalidName { field: format!("steps[{i}].name"), value: step.name.clone() });
            }
            if index.insert(step.name.as_str(), i).is_some() {
                return Err(TemplateError::DuplicateStep(step.name.clone()));
            }
        }
        for step in &raw.steps {
            if !is_valid_handler(&step.handler) {
                return Err(TemplateError::InvalidHandler { step: step.name.clone(), value: step.handler.clone() });
            }
            for dep in &step.depends_on {
                if !index.contains_key(dep.as_str()) {
                    return Err(TemplateError::UnknownDependency { step: step.name.clone(), dependency: dep.clone() });
                }
            }
            if step.max_attempts == Some(0) {
                return Err(TemplateError::InvalidMaxAttempts { field: format!("step `{}`", step.name) });
            }
            if step.timeout == Some(Duration::ZERO) {
                return Err(TemplateError::InvalidTimeout { field: format!("step `{}`", step.name) });
            }
            if step.config.as_ref().is_some_and(|c| !c.is_object() && !c.is_null()) {
                return Err(TemplateError::InvalidConfig(step.name.clone()));
            }
            if let Some(config) = &step.config {
                check_payload(&format!("config of step `{}`", step.name), config)?;
            }
        }
        let parents: Vec<Vec<usize>> =
            raw.steps.iter().map(|s| s.depends_on.iter().map(|d| index[d.as_str()]).collect()).collect();
        let (order, levels) = topological_order(&parents)
            .map_err(|cycle| TemplateError::Cycle(cycle.into_iter().map(|i| raw.steps[i].name.clone()).collect()))?;

        let defaults = &raw.defaults;
        let mut steps_by_index: Vec<Option<RawStep>> = raw.steps.into_iter().map(Some).collect();
        let steps = order
            .into_iter()
            .map(|i| {
                let raw = steps_by_index[i].take().expect("each index once");
                StepTemplate {
                    name: raw.name,
                    handler: raw.handler,
                    depends_on: raw.depends_on,
                    max_attempts: raw.max_attempts.or(defaults.max_attempts).unwrap_or(DEFAULT_MAX_ATTEMPTS),
                    retryable: raw.retryable.or(defaults.retryable).unwrap_or(true),
                    timeout_ms: raw.timeout.or(defaults.timeout).unwrap_or(DEFAULT_TIMEOUT).as_millis() as u64,
                    config: match raw.config {
                        Some(Value::Object(map)) => Value::Object(map),
                        _ => Value::Object(Default::default()),
                    },
                    dependency_level: levels[i],
                }
            })
            .collect();
        Ok(Template {
            namespace: raw.namespace,
            name: raw.name,
            version,
            description: raw.description,
            input_schema: raw.input_schema,
            steps,
        })
    }

    /// A digest of the validated content: equal for templates that mean the same thing,
    /// whatever their YAML formatting.
    pub fn content_hash(&self) -> String {
        let canonical = serde_json::to_vec(&canonical(serde_json::to_value(self).expect("template serializes")))
            .expect("value serializes");
        Sha256::digest(&canonical).iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Checks a task context against the input schema, if the template has one.
    pub fn validate_context(&self, context: &Value) -> Result<(), ContextError> {
        match self.context_schema() {
            Some(schema) => schema.validate(context),
            None => Ok(()),
        }
    }

    /// The compiled input schema, to check many contexts without compiling it again.
    pub fn context_schema(&self) -> Option<ContextSchema> {
        let schema = self.input_schema.as_ref()?;
        // registration only accepts schemas that compile
        jsonschema::validator_for(schema).ok().map(ContextSchema)
    }

    pub fn step(&self, name: &str) -> Option<&StepTemplate> {
        self.steps.iter().find(|s| s.name == name)
    }
}

/// A payload carried by the template (handler config, input schema) must be storable and
/// deliverable like any other (see [`payload`]).
fn check_payload(field: &str, value: &Value) -> Result<(), TemplateError> {
    payload::check(&value.to_string(), usize::MAX)
        .map_err(|problem| TemplateError::Payload { field: field.to_owned(), problem })
}

/// At most `max` bytes of a message, cut at a character boundary.
fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().map(|(i, _)| i).take_while(|&i| i <= max).last() {
        Some(end) if text.len() > max => format!("{}…", &text[..end]),
        _ => text.to_owned(),
    }
}

/// Sorts object keys recursively so the digest does not depend on key order.
fn canonical(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let sorted: BTreeMap<String, Value> = map.into_iter().map(|(k, v)| (k, canonical(v))).collect();
            Value::Object(sorted.into_iter().collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(canonical).collect()),
        other => other,
    }
}

/// Kahn's algorithm over `parents[i]` (the indices step `i` depends on). Returns the order
/// (stable: by declaration among ready steps) and each step's dependency level, or one
/// cycle as a closed path of indices.
fn topological_order(parents: &[Vec<usize>]) -> Result<(Vec<usize>, Vec<u32>), Vec<usize>> {
    let n = parents.len();
    let mut children = vec![Vec::new(); n];
    let mut pending: Vec<usize> = parents.iter().map(Vec::len).collect();
    for (child, ps) in parents.iter().enumerate() {
        for &p in ps {
            children[p].push(child);
        }
    }
    let mut levels = vec![0u32; n];
    let mut order = Vec::with_capacity(n);
    let mut ready: std::collections::VecDeque<usize> = (0..n).filter(|&i| pending[i] == 0).collect();
    while let Some(i) = ready.pop_front() {
        order.push(i);
        for &c in &children[i] {
            levels[c] = levels[c].max(levels[i] + 1);
            pending[c] -= 1;
            if pending[c] == 0 {
                ready.push_back(c);
            }
        }
    }
    if order.len() == n {
        return Ok((order, levels));
    }
    // Every unplaced step is on or behind a cycle: walk parents among them until a step repeats.
    let mut seen = vec![usize::MAX; n];
    let mut path = Vec::new();
    let mut at = (0..n).find(|&i| pending[i] > 0).expect("an unplaced step");
    loop {
        if seen[at] != usize::MAX {
            let mut cycle = path[seen[at]..].to_vec();
            cycle.push(at);
            cycle.reverse();
            return Err(cycle);
        }
        seen[at] = path.len();
        path.push(at);
        at = *parents[at].iter().find(|&&p| pending[p] > 0).expect("an unplaced parent");
    }
}

#[cfg(test)]
mod tests;
