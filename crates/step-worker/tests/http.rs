//! The built-in `http` handler against a real HTTP server on loopback.

use std::{collections::HashMap, time::Duration};

use axum::{
    Json, Router,
    http::{HeaderMap, StatusCode, header::RETRY_AFTER},
    routing::post,
};
use serde_json::{Value, json};
use step_worker::{StepError, StepHandler, StepInput, http::Http};

async fn server() -> String {
    let app = Router::new()
        .route("/ok", post(|Json(body): Json<Value>| async move { Json(json!({ "echo": body })) }))
        .route("/text", post(|| async { "plain words" }))
        .route(
            "/throttled",
            post(|| async {
                let mut headers = HeaderMap::new();
                headers.insert(RETRY_AFTER, "3".parse().unwrap());
                (StatusCode::TOO_MANY_REQUESTS, headers, "slow down")
            }),
        )
        .route(
            "/maintenance",
            post(|| async {
                let mut headers = HeaderMap::new();
                let later = std::time::SystemTime::now() + Duration::from_secs(90);
                headers.insert(RETRY_AFTER, httpdate::fmt_http_date(later).parse().unwrap());
                (StatusCode::SERVICE_UNAVAILABLE, headers, "back soon")
            }),
        )
        .route("/busy", post(|| async { StatusCode::SERVICE_UNAVAILABLE }))
        .route("/boom", post(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "it broke") }))
        .route("/rejected", post(|| async { (StatusCode::UNPROCESSABLE_ENTITY, "amount must be positive") }))
        .route(
            "/slow",
            post(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "late"
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

fn input(url: &str, timeout: Duration) -> StepInput {
    StepInput {
        task_id: uuid::Uuid::now_v7(),
        step_id: uuid::Uuid::now_v7(),
        step_name: "call".into(),
        namespace: "ns".into(),
        task_name: "t".into(),
        task_version: "1.0.0".into(),
        attempt: 2,
        context: json!({ "order": 7 }),
        parent_results: HashMap::from([("prev".to_owned(), json!({ "x": 1 }))]),
        config: json!({ "url": url }),
        deadline: tokio::time::Instant::now() + timeout,
    }
}

#[tokio::test]
async fn http_statuses_map_to_step_outcomes() {
    let base = server().await;
    let http = Http::default();
    let call = |path: &str| http.call(input(&format!("{base}{path}"), Duration::from_secs(2)));

    let ok = call("/ok").await.unwrap();
    assert_eq!(ok["echo"]["context"]["order"], 7, "the step input was posted");
    assert_eq!(ok["echo"]["parent_results"]["prev"]["x"], 1);
    assert_eq!(ok["echo"]["attempt"], 2);
    assert_eq!(call("/text").await.unwrap(), json!({ "status": 200, "body": "plain words" }));

    match call("/throttled").await.unwrap_err() {
        StepError::RetryAfter { after, .. } => assert_eq!(after, Duration::from_secs(3)),
        other => panic!("429 should retry after its header: {other:?}"),
    }
    match call("/maintenance").await.unwrap_err() {
        StepError::RetryAfter { after, .. } => {
            assert!(after > Duration::from_secs(80) && after <= Duration::from_secs(90))
        }
        other => panic!("503 with a date should retry after it: {other:?}"),
    }
    assert!(matches!(call("/busy").await.unwrap_err(), StepError::Retryable(_)), "503 without a header: backoff");
    let boom = call("/boom").await.unwrap_err();
    assert!(matches!(&boom, StepError::Retryable(m) if m.contains("500") && m.contains("it broke")), "{boom:?}");
    let rejected = call("/rejected").await.unwrap_err();
    assert!(matches!(&rejected, StepError::Permanent(m) if m.contains("422")), "{rejected:?}");
    assert!(matches!(call("/missing").await.unwrap_err(), StepError::Permanent(_)), "404 is permanent");

    let slow = http.call(input(&format!("{base}/slow"), Duration::from_millis(200))).await.unwrap_err();
    assert!(matches!(&slow, StepError::Retryable(m) if m.contains("timed out")), "{slow:?}");
    let refused = http.call(input("http://127.0.0.1:9/nothing", Duration::from_secs(2))).await.unwrap_err();
    assert!(matches!(refused, StepError::Retryable(_)), "connection refused is retryable");
    let mut no_url = input("", Duration::from_secs(1));
    no_url.config = json!({});
    assert!(matches!(http.call(no_url).await.unwrap_err(), StepError::Permanent(m) if m.contains("config.url")));
}
