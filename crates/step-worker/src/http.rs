//! The built-in `http` handler: POSTs the step's input as JSON to `config.url`.
//!
//! - 2xx → the response body (JSON; a non-JSON body becomes `{ "status", "body" }`)
//! - 429 and 503 → retry after the `Retry-After` header (seconds or an HTTP date), or the
//!   computed backoff when there is none
//! - other 5xx, connection errors and timeouts → retryable
//! - other 4xx → permanent
//!
//! Only plain `http://` URLs: this build carries no TLS stack.

use std::time::{Duration, SystemTime};

use reqwest::{StatusCode, header::RETRY_AFTER};
use serde_json::{Value, json};

use crate::{StepError, StepHandler, StepInput};

#[derive(Default)]
pub struct Http {
    client: reqwest::Client,
}

#[async_trait::async_trait]
impl StepHandler for Http {
    async fn call(&self, input: StepInput) -> Result<Value, StepError> {
        let url = input
            .config
            .get("url")
            .and_then(Value::as_str)
            .ok_or_else(|| StepError::permanent("http handler needs config.url"))?
            .to_owned();
        let body = json!({
            "task_id": input.task_id,
            "step_id": input.step_id,
            "step_name": input.step_name,
            "namespace": input.namespace,
            "task_name": input.task_name,
            "attempt": input.attempt,
            "context": input.context,
            "parent_results": input.parent_results,
        });
        let remaining = input.deadline.saturating_duration_since(tokio::time::Instant::now());
        let response = self.client.post(&url).json(&body).timeout(remaining).send().await.map_err(|e| {
            if e.is_timeout() {
                StepError::retryable(format!("POST {url} timed out"))
            } else if e.is_builder() {
                StepError::permanent(format!("POST {url}: {e}"))
            } else {
                StepError::retryable(format!("POST {url}: {e}"))
            }
        })?;
        let status = response.status();
        let retry_after = response.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
        let text = response.text().await.map_err(|e| StepError::retryable(format!("reading the response: {e}")))?;
        classify(status, retry_after, &url, &text)
    }
}

fn classify(status: StatusCode, retry_after: Option<Duration>, url: &str, text: &str) -> Result<Value, StepError> {
    let message = || format!("POST {url} answered {status}: {}", text.chars().take(200).collect::<String>());
    if status.is_success() {
        return Ok(serde_json::from_str(text).unwrap_or_else(|_| json!({ "status": status.as_u16(), "body": text })));
    }
    match status {
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => match retry_after {
            Some(after) => Err(StepError::RetryAfter { message: message(), after }),
            None => Err(StepError::Retryable(message())),
        },
        s if s.is_server_error() => Err(StepError::Retryable(message())),
        _ => Err(StepError::Permanent(message())),
    }
}

/// `Retry-After`: delay-seconds or an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(SystemTime::now()).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        let later = SystemTime::now() + Duration::from_secs(120);
        let parsed = parse_retry_after(&httpdate::fmt_http_date(later)).unwrap();
        assert!(parsed > Duration::from_secs(100) && parsed <= Duration::from_secs(120), "{parsed:?}");
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn statuses_map_to_outcomes() {
        let ok = classify(StatusCode::OK, None, "u", r#"{"a":1}"#).unwrap();
        assert_eq!(ok, json!({ "a": 1 }));
        let text = classify(StatusCode::CREATED, None, "u", "done").unwrap();
        assert_eq!(text, json!({ "status": 201, "body": "done" }));
        assert!(matches!(
            classify(StatusCode::TOO_MANY_REQUESTS, Some(Duration::from_secs(3)), "u", ""),
            Err(StepError::RetryAfter { after, .. }) if after == Duration::from_secs(3)
        ));
        assert!(matches!(classify(StatusCode::SERVICE_UNAVAILABLE, None, "u", ""), Err(StepError::Retryable(_))));
        assert!(matches!(classify(StatusCode::BAD_GATEWAY, None, "u", ""), Err(StepError::Retryable(_))));
        assert!(matches!(classify(StatusCode::NOT_FOUND, None, "u", ""), Err(StepError::Permanent(_))));
        assert!(matches!(classify(StatusCode::UNPROCESSABLE_ENTITY, None, "u", ""), Err(StepError::Permanent(_))));
    }
}
