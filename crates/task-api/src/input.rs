//! Checks on what clients send, before anything is read or written: every field is either
//! refused with INVALID_ARGUMENT (or RESOURCE_EXHAUSTED when too large) naming it, or can
//! be stored as given. Messages quote at most a short prefix of the input.

use tasker_domain::{PayloadError, payload, quote, template::is_valid_name};

use crate::error::{ApiError, ApiResult};

/// Longest free-text field (initiator, source system, reason), in bytes.
pub const MAX_TEXT_BYTES: usize = 8 * 1024;
/// Longest tag, in bytes, and most tags on a task.
pub const MAX_TAG_BYTES: usize = 256;
pub const MAX_TAGS: usize = 100;
/// Longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 255;

/// A free-text field: storable (no U+0000) and at most `max` bytes.
pub fn text(field: &str, value: &str, max: usize) -> ApiResult<()> {
    if value.len() > max {
        return Err(ApiError::invalid(field, format!("{} bytes, more than the limit of {max}", value.len())));
    }
    if !payload::storable(value) {
        return Err(ApiError::invalid(field, "contains the character U+0000, which cannot be stored"));
    }
    Ok(())
}

/// A required namespace or template name.
pub fn name(field: &str, value: &str) -> ApiResult<()> {
    if value.is_empty() {
        return Err(ApiError::invalid(field, "required"));
    }
    optional_name(field, value)
}

/// A name used as a filter: empty (no filter) or a valid name.
pub fn optional_name(field: &str, value: &str) -> ApiResult<()> {
    if !value.is_empty() && !is_valid_name(value) {
        return Err(ApiError::invalid(field, format!("{} is not a valid name", quote(value))));
    }
    Ok(())
}

/// An optional semantic version.
pub fn version(field: &str, value: &str) -> ApiResult<()> {
    if !value.is_empty() && semver::Version::parse(value).is_err() {
        return Err(ApiError::invalid(field, format!("{} is not a semantic version", quote(value))));
    }
    Ok(())
}

/// A JSON payload (context, results) the system can store and hand on.
pub fn json(field: &str, value: &str, max_bytes: usize) -> ApiResult<()> {
    payload::check(value, max_bytes).map_err(|problem| match problem {
        PayloadError::TooLarge { .. } => ApiError::TooLarge(format!("{field}: {problem}")),
        problem => ApiError::invalid(field, problem),
    })
}

/// Tags: a bounded list of bounded, storable strings.
pub fn tags(tags: &[String]) -> ApiResult<()> {
    if tags.len() > MAX_TAGS {
        return Err(ApiError::invalid("tags", format!("{} tags, more than the limit of {MAX_TAGS}", tags.len())));
    }
    for (i, tag) in tags.iter().enumerate() {
        text(&format!("tags[{i}]"), tag, MAX_TAG_BYTES)?;
    }
    Ok(())
}
