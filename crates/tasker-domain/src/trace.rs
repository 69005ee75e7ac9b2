//! W3C trace context as Tasker carries it: the `traceparent` and `tracestate` of the span
//! a task was created in, stored with the task, sent in the AMQP headers of every message
//! about it and put on its lifecycle events (the CloudEvents distributed-tracing
//! extension). Plain strings here; tasker-runtime turns them into spans.

use std::collections::HashMap;

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// A W3C trace context; empty when the task was created outside any trace and Tasker
/// exports none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceContext {
    pub traceparent: String,
    pub tracestate: String,
}

impl TraceContext {
    /// From carrier headers (gRPC metadata, AMQP headers), keeping a `traceparent` only
    /// when it is well formed (`00-{32 hex}-{16 hex}-{2 hex}`, not all zeros).
    pub fn from_headers(headers: &HashMap<String, String>) -> TraceContext {
        let traceparent = headers.get(TRACEPARENT).map(|v| v.trim()).filter(|v| is_valid_traceparent(v));
        match traceparent {
            Some(traceparent) => TraceContext {
                traceparent: traceparent.to_owned(),
                tracestate: headers
                    .get(TRACESTATE)
                    .map(|v| v.trim())
                    .filter(|v| v.len() <= 512)
                    .unwrap_or("")
                    .to_owned(),
            },
            None => TraceContext::default(),
        }
    }

    /// As carrier headers (none when empty).
    pub fn to_headers(&self) -> HashMap<String, String> {
        let mut headers = HashMap::new();
        if !self.traceparent.is_empty() {
            headers.insert(TRACEPARENT.to_owned(), self.traceparent.clone());
            if !self.tracestate.is_empty() {
                headers.insert(TRACESTATE.to_owned(), self.tracestate.clone());
            }
        }
        headers
    }

    pub fn is_empty(&self) -> bool {
        self.traceparent.is_empty()
    }

    /// The trace id (32 hex digits), when there is a context.
    pub fn trace_id(&self) -> Option<&str> {
        self.traceparent.get(3..35).filter(|_| !self.is_empty())
    }
}

/// `version-traceid-parentid-flags`, version `00`, ids not all zeros.
pub fn is_valid_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    parts.len() == 4
        && parts[0] == "00"
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
        && parts[1].bytes().any(|b| b != b'0')
        && parts[2].bytes().any(|b| b != b'0')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_traceparents_are_kept() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let headers = |tp: &str| {
            HashMap::from([(TRACEPARENT.to_owned(), tp.to_owned()), (TRACESTATE.to_owned(), "k=v".to_owned())])
        };
        let context = TraceContext::from_headers(&headers(good));
        assert_eq!(context.traceparent, good);
        assert_eq!(context.tracestate, "k=v");
        assert_eq!(context.trace_id(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(TraceContext::from_headers(&context.to_headers()), context);
        for bad in [
            "",
            "garbage",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert!(TraceContext::from_headers(&headers(bad)).is_empty(), "{bad}");
        }
        assert!(TraceContext::default().to_headers().is_empty());
    }
}
