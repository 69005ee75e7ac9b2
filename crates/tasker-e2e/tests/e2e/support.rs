//! Helpers shared by the scenarios: reading events, checking CloudEvents, DAG shapes.

use std::{collections::HashMap, time::Duration};

use chrono::{DateTime, Utc};
use serde_json::Value;
use tasker_messaging::EventStream;
use tasker_proto::v1 as pb;

/// Numbers past f64's precision, which must keep every digit end to end.
pub const BIG: &str = "123456789012345678901234567890";
pub const PI: &str = "3.1415926535897932384626433832795028";

/// An event as a subscriber received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub routing_key: String,
    pub event: Value,
}

impl Received {
    pub fn kind(&self) -> &str {
        self.event["type"].as_str().unwrap_or_default()
    }
    pub fn task_id(&self) -> &str {
        self.event["data"]["task_id"].as_str().unwrap_or_default()
    }
    pub fn step_name(&self) -> Option<&str> {
        self.event["data"]["step_name"].as_str()
    }
    pub fn transition(&self) -> (String, String) {
        let d = &self.event["data"];
        (d["from"].as_str().unwrap_or_default().to_owned(), d["to"].as_str().unwrap_or_default().to_owned())
    }
}

/// Reads events until `done` holds for what was received, then keeps reading for a
/// moment so that events that should not come have the chance to show up.
pub async fn collect_until(stream: &mut EventStream, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
    let mut received = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !done(&received) {
        let next = tokio::time::timeout_at(deadline, stream.next()).await;
        let event = next.expect("events did not arrive in time").expect("subscription ended").expect("event");
        received.push(parse(event));
    }
    while let Ok(Some(event)) = tokio::time::timeout(Duration::from_millis(500), stream.next()).await {
        received.push(parse(event.expect("event")));
    }
    received
}

fn parse(event: tasker_messaging::ReceivedEvent) -> Received {
    let value: Value = serde_json::from_str(&event.payload).expect("event payload is JSON");
    Received { routing_key: event.routing_key, event: value }
}

/// Asserts the CloudEvents 1.0 structured-mode attributes.
pub fn assert_cloud_event(r: &Received) {
    let e = &r.event;
    assert_eq!(e["specversion"], "1.0", "{e}");
    assert!(e["id"].as_str().is_some_and(|id| id.parse::<uuid::Uuid>().is_ok()), "id: {e}");
    assert!(e["source"].as_str().is_some_and(|s| !s.is_empty()), "source: {e}");
    assert!(e["type"].as_str().is_some_and(|t| t.starts_with("dev.tasker.")), "type: {e}");
    assert!(e["time"].as_str().is_some_and(|t| DateTime::parse_from_rfc3339(t).is_ok()), "time: {e}");
    assert_eq!(e["datacontenttype"], "application/json");
    assert!(e["data"].is_object(), "data: {e}");
    assert_eq!(e["routingkey"].as_str(), Some(r.routing_key.as_str()));
    let (entity, event) = {
        let t = e["type"].as_str().unwrap().trim_start_matches("dev.tasker.");
        t.split_once('.').unwrap()
    };
    assert!(r.routing_key.ends_with(&format!(".{entity}.{event}")), "{} vs {}", r.routing_key, e["type"]);
}

/// Whether a topic pattern (`*` one word, `#` zero or more) matches a routing key.
pub fn topic_matches(pattern: &str, key: &str) -> bool {
    fn go(p: &[&str], k: &[&str]) -> bool {
        match (p.first(), k.first()) {
            (None, None) => true,
            (Some(&"#"), _) => go(&p[1..], k) || (!k.is_empty() && go(p, &k[1..])),
            (Some(&"*"), Some(_)) => go(&p[1..], &k[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &k[1..]),
            _ => false,
        }
    }
    let p: Vec<&str> = pattern.split('.').collect();
    let k: Vec<&str> = key.split('.').collect();
    go(&p, &k)
}

pub fn ts(t: &Option<prost_types::Timestamp>) -> DateTime<Utc> {
    let t = t.as_ref().expect("timestamp set");
    DateTime::from_timestamp(t.seconds, t.nanos as u32).expect("valid timestamp")
}

pub fn steps_by_name(task: &pb::Task) -> HashMap<&str, &pb::Step> {
    task.steps.iter().map(|s| (s.name.as_str(), s)).collect()
}

/// For every edge, the child started only after the parent completed.
pub fn assert_parents_first(task: &pb::Task) {
    let steps = steps_by_name(task);
    for edge in &task.edges {
        let (parent, child) = (steps[edge.from_step.as_str()], steps[edge.to_step.as_str()]);
        if child.started_at.is_none() {
            continue;
        }
        assert!(
            ts(&child.started_at) >= ts(&parent.completed_at),
            "{} started before its parent {} completed",
            child.name,
            parent.name
        );
    }
}

/// The states a step went through, from its transitions.
pub fn path(step: &pb::Step) -> Vec<&str> {
    let mut path = vec!["pending"];
    path.extend(step.transitions.iter().map(|t| t.to_state.as_str()));
    path
}

pub fn metadata(t: &pb::Transition) -> Value {
    serde_json::from_str(&t.metadata_json).expect("metadata is JSON")
}

/// A metric's value on an admin endpoint (the first sample of that name).
pub async fn metric(addr: std::net::SocketAddr, name: &str) -> f64 {
    let body = tasker_test_support::http_get(addr, "/metrics").await;
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {body}"))
}

/// The sum of a metric's samples on an admin endpoint (every label set); 0 without any.
pub async fn metric_sum(addr: std::net::SocketAddr, name: &str) -> f64 {
    let body = tasker_test_support::http_get(addr, "/metrics").await;
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
