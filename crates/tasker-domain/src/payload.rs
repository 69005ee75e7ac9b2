//! What every JSON payload (task context, step results, handler config) must be for the
//! system to store it and hand it on, and how refusals quote what they were given.
//!
//! A payload is accepted only if every place it later passes through can take it:
//! - Postgres `jsonb` cannot hold the character U+0000 (`\u0000`), nor can `text`;
//! - the delivery path parses payloads with serde_json, whose nesting limit is 128, and a
//!   step's input nests its context and its parents' results up to two levels deeper than
//!   they are themselves (`parents.{step}.…`). Payloads are therefore held to
//!   [`MAX_DEPTH`] levels, so that whatever was accepted can always be delivered.
//!
//! Numbers are never parsed into floats on the way through: the text is kept as given (and
//! serde_json is built with `arbitrary_precision` where a payload must be parsed), so
//! `123456789012345678901234567890` arrives as it was sent.

use std::fmt;

/// Deepest nesting of arrays and objects a payload may have.
pub const MAX_DEPTH: usize = 64;

/// How much of a client's or handler's input an error message quotes.
pub const QUOTE_CHARS: usize = 64;

/// Longest failure message recorded from a worker, in characters.
pub const MAX_ERROR_MESSAGE: usize = 16 * 1024;

/// Why a payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("{size} bytes, more than the limit of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("not valid JSON: {0}")]
    Invalid(String),
    #[error("nested {depth} levels deep, more than the limit of {MAX_DEPTH}")]
    TooDeep { depth: usize },
    #[error("contains the character U+0000 (\\u0000), which cannot be stored")]
    Nul,
}

impl PayloadError {
    /// Too large is a different status (RESOURCE_EXHAUSTED) from malformed.
    pub fn is_too_large(&self) -> bool {
        matches!(self, PayloadError::TooLarge { .. })
    }
}

/// Checks a JSON text against the size limit, the JSON grammar, [`MAX_DEPTH`] and the
/// NUL rule, without building a value (numbers stay text).
pub fn check(text: &str, max_bytes: usize) -> Result<(), PayloadError> {
    if text.len() > max_bytes {
        return Err(PayloadError::TooLarge { size: text.len(), max: max_bytes });
    }
    // the shape first: past serde_json's own nesting limit it would only say "recursion
    // limit exceeded"
    let shape = shape(text);
    if shape.depth > MAX_DEPTH {
        return Err(PayloadError::TooDeep { depth: shape.depth });
    }
    serde_json::from_str::<serde::de::IgnoredAny>(text).map_err(|e| PayloadError::Invalid(e.to_string()))?;
    if shape.has_nul {
        return Err(PayloadError::Nul);
    }
    Ok(())
}

struct Shape {
    depth: usize,
    has_nul: bool,
}

/// Nesting depth and NUL escapes of a JSON text, in one pass: outside strings only
/// structure can appear, inside them a backslash always starts an escape. (On a text that
/// is not JSON the answer is meaningless but harmless: it is parsed right after.)
fn shape(text: &str) -> Shape {
    let bytes = text.as_bytes();
    let (mut depth, mut deepest, mut has_nul, mut in_string) = (0usize, 0usize, false, false);
    let mut i = 0;
    while i < bytes.len() {
        match (in_string, bytes[i]) {
            (true, b'\\') => {
                has_nul |= bytes.get(i + 1..i + 6) == Some(b"u0000");
                i += 1; // skip the escaped character
            }
            (true, b'"') | (false, b'"') => in_string = !in_string,
            (false, b'[' | b'{') => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            (false, b']' | b'}') => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    Shape { depth: deepest, has_nul }
}

/// Whether a plain string (a name, a reason, a tag) can be stored: no U+0000.
pub fn storable(text: &str) -> bool {
    !text.contains('\0')
}

/// The string with U+0000 replaced by U+FFFD, for text that is recorded rather than
/// refused (a worker's error message).
pub fn scrub(text: &str) -> std::borrow::Cow<'_, str> {
    if storable(text) { text.into() } else { text.replace('\0', "\u{FFFD}").into() }
}

/// A worker's text as it can be recorded: U+0000 replaced, at most `max` characters, the
/// rest cut and `… (cut at {max} characters)` put in its place.
pub fn recordable(text: &str, max: usize) -> String {
    let text = scrub(text);
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}… (cut at {max} characters)", &text[..cut]),
        None => text.into_owned(),
    }
}

/// Quotes at most [`QUOTE_CHARS`] characters of untrusted input in an error message:
/// `` `abc` `` or `` `abcdef…` (10240 bytes) ``. Control characters are escaped.
pub struct Quoted<'a>(pub &'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut chars = self.0.chars();
        let shown: String = chars.by_ref().take(QUOTE_CHARS).flat_map(char::escape_debug).collect();
        let shown = shown.replace("\\'", "'").replace("\\\"", "\"");
        if chars.next().is_some() { write!(f, "`{shown}…` ({} bytes)", self.0.len()) } else { write!(f, "`{shown}`") }
    }
}

/// Shorthand for [`Quoted`].
pub fn quote(text: &str) -> Quoted<'_> {
    Quoted(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_payloads_and_keeps_escaped_backslashes_apart_from_nul() {
        assert_eq!(check(r#"{"a": [1, {"b": "x\\u0000y"}], "c": "\"{["}"#, 1000), Ok(()));
        assert_eq!(check("null", 10), Ok(()));
    }

    #[test]
    fn refuses_nul_wherever_it_is() {
        assert_eq!(check(r#"{"a": "x\u0000"}"#, 1000), Err(PayloadError::Nul));
        assert_eq!(check(r#"{"\u0000": 1}"#, 1000), Err(PayloadError::Nul));
        assert_eq!(check(r#"["\\\u0000"]"#, 1000), Err(PayloadError::Nul));
    }

    #[test]
    fn refuses_depth_past_the_limit_but_not_at_it() {
        let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert_eq!(check(&nested(MAX_DEPTH), 1 << 20), Ok(()));
        assert_eq!(check(&nested(MAX_DEPTH + 1), 1 << 20), Err(PayloadError::TooDeep { depth: MAX_DEPTH + 1 }));
        // brackets inside strings are not structure
        assert_eq!(check(&format!("[\"{}\"]", "[".repeat(200)), 1 << 20), Ok(()));
        // far past serde_json's own limit: still named for what it is
        assert_eq!(check(&nested(10_000), 1 << 20), Err(PayloadError::TooDeep { depth: 10_000 }));
    }

    #[test]
    fn refuses_size_before_parsing() {
        assert_eq!(check("[1, 2]", 3), Err(PayloadError::TooLarge { size: 6, max: 3 }));
    }

    #[test]
    fn quotes_a_short_prefix_only() {
        assert_eq!(quote("abc").to_string(), "`abc`");
        let long = "x".repeat(10_240);
        let quoted = quote(&long).to_string();
        assert!(quoted.len() < 100, "{quoted}");
        assert!(quoted.ends_with("…` (10240 bytes)"), "{quoted}");
        assert_eq!(quote("a\0b\n").to_string(), "`a\\0b\\n`");
    }

    #[test]
    fn scrubs_nul_from_recorded_text() {
        assert_eq!(scrub("ok"), "ok");
        assert_eq!(scrub("a\0b"), "a\u{FFFD}b");
    }
}
