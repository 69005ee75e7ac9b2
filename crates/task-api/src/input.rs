//! Checks on what clients send, before anything is read or written: every field is either
//! refused with INVALID_ARGUMENT (or RESOURCE_EXHAUSTED when too large) naming it, or can
//! be stored as given. Messages quote at most a short prefix of the input.

use chrono::{DateTime, Utc};
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

/// An optional instant: a protobuf `Timestamp` as its definition bounds it (0001-01-01 to
/// 9999-12-31, UTC; nanoseconds 0 to 999,999,999), which Postgres can hold too.
pub fn instant(field: &str, value: Option<&prost_types::Timestamp>) -> ApiResult<Option<DateTime<Utc>>> {
    const FIRST: i64 = -62_135_596_800; // 0001-01-01T00:00:00Z
    const LAST: i64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    let Some(ts) = value else { return Ok(None) };
    let within = (FIRST..=LAST).contains(&ts.seconds) && (0..1_000_000_000).contains(&ts.nanos);
    let at = if within { DateTime::from_timestamp(ts.seconds, ts.nanos as u32) } else { None };
    at.map(Some).ok_or_else(|| {
        let problem = format!(
            "seconds {} and nanos {} are not an instant between 0001-01-01 and 9999-12-31",
            ts.seconds, ts.nanos
        );
        ApiError::invalid(field, problem)
    })
}

#[cfg(test)]
mod tests {
    use prost_types::Timestamp;

    use super::*;

    #[test]
    fn instants_within_a_timestamps_bounds_pass_and_others_are_refused_by_name() {
        let at = |seconds, nanos| Timestamp { seconds, nanos };
        assert_eq!(instant("created_after", None).unwrap(), None);
        let ok = instant("created_after", Some(&at(1_796_681_842, 5))).unwrap().unwrap();
        assert_eq!((ok.timestamp(), ok.timestamp_subsec_nanos()), (1_796_681_842, 5));
        assert!(instant("x", Some(&at(-62_135_596_800, 0))).is_ok(), "the first instant");
        assert!(instant("x", Some(&at(253_402_300_799, 999_999_999))).is_ok(), "the last");
        for (seconds, nanos) in [(-62_135_596_801, 0), (253_402_300_800, 0), (0, -1), (0, 1_000_000_000), (i64::MAX, 0)]
        {
            let error = instant("created_before", Some(&at(seconds, nanos))).unwrap_err();
            let status = tonic::Status::from(error);
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{seconds} {nanos}");
            assert!(status.message().starts_with("created_before: "), "{}", status.message());
        }
    }
}
