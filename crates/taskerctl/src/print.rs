//! Human-readable output.

use serde_json::Value;
use tasker_proto::v1 as pb;

fn status_name(name: &str, prefix: &str) -> String {
    name.trim_start_matches(prefix).to_lowercase()
}

fn task_status(code: i32) -> String {
    pb::TaskStatus::try_from(code).map(|s| status_name(s.as_str_name(), "TASK_STATUS_")).unwrap_or_default()
}

fn step_status(code: i32) -> String {
    pb::StepStatus::try_from(code).map(|s| status_name(s.as_str_name(), "STEP_STATUS_")).unwrap_or_default()
}

/// The time of day (UTC), to the millisecond.
fn time(ts: &Option<prost_types::Timestamp>) -> String {
    formatted(ts, "%H:%M:%S%.3f")
}

/// The whole instant, to the microsecond the database keeps, as `--created-after` and
/// `--created-before` take it (RFC 3339, UTC).
fn instant(ts: &Option<prost_types::Timestamp>) -> String {
    formatted(ts, "%Y-%m-%dT%H:%M:%S%.6fZ")
}

fn formatted(ts: &Option<prost_types::Timestamp>, format: &str) -> String {
    ts.as_ref()
        .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
        .map(|t| t.format(format).to_string())
        .unwrap_or_else(|| "-".into())
}

pub fn templates(templates: &[pb::Template]) {
    for t in templates {
        println!("{:<16} {:<28} {:<10} {} steps  {}", t.namespace, t.name, t.version, t.steps.len(), t.description);
    }
}

pub fn template(t: &pb::Template) {
    println!("{}/{} {}  {}", t.namespace, t.name, t.version, t.description);
    for s in &t.steps {
        let deps = if s.depends_on.is_empty() { String::new() } else { format!(" after {}", s.depends_on.join(", ")) };
        println!("  {:<28} {:<24} attempts {} timeout {}ms{deps}", s.name, s.handler, s.max_attempts, s.timeout_ms);
    }
}

pub fn task_list(tasks: &[pb::Task]) {
    for t in tasks {
        println!(
            "{}  {:<12} {}/{} {}  created {}",
            t.id,
            task_status(t.status),
            t.namespace,
            t.name,
            t.version,
            instant(&t.created_at)
        );
    }
}

pub fn step_line(s: &pb::Step) {
    let results = match s.results_json.as_str() {
        "" => String::new(),
        r if r.chars().count() > 100 => format!("  results {}…", r.chars().take(100).collect::<String>()),
        r => format!("  results {r}"),
    };
    let error = match serde_json::from_str::<Value>(&s.last_error_json) {
        Ok(e) if s.status == pb::StepStatus::Error as i32 => format!("  error {}", e["message"]),
        _ => String::new(),
    };
    // attempts of the current round against its budget, and those of earlier rounds
    let earlier = match s.attempts_before_retry {
        0 => String::new(),
        n => format!(" (+{n} before retry)"),
    };
    println!(
        "  {:<28} {:<18} attempts {}/{}{earlier}  {} → {}{results}{error}",
        s.name,
        step_status(s.status),
        s.attempts - s.attempts_before_retry,
        s.max_attempts,
        time(&s.started_at),
        time(&s.completed_at),
    );
}

pub fn task(t: &pb::Task, transitions: bool) {
    println!("task {}  {}/{} {}  {}", t.id, t.namespace, t.name, t.version, task_status(t.status));
    println!("  created {}  started {}  finished {}", time(&t.created_at), time(&t.started_at), time(&t.completed_at));
    for s in &t.steps {
        step_line(s);
        if transitions {
            for tr in &s.transitions {
                println!(
                    "      {} {:>18} → {:<18} {}",
                    time(&tr.created_at),
                    tr.from_state,
                    tr.to_state,
                    tr.metadata_json
                );
            }
        }
    }
    if transitions {
        for tr in &t.transitions {
            println!("  task {} {:>12} → {}", time(&tr.created_at), tr.from_state, tr.to_state);
        }
    }
}

/// One event per line: routing key, step and attempt, and the state change.
pub fn event_line(routing_key: &str, payload: &str) {
    let value: Value = serde_json::from_str(payload).unwrap_or(Value::Null);
    let data = value.get("data").unwrap_or(&value);
    let step = data.get("step_name").and_then(Value::as_str).map(|s| format!(" {s}")).unwrap_or_default();
    let attempt = data.get("attempt").map(|a| format!(" #{a}")).unwrap_or_default();
    let from = data.get("from").and_then(Value::as_str).unwrap_or("");
    let to = data.get("to").and_then(Value::as_str).unwrap_or("");
    let error =
        data.pointer("/metadata/error/message").and_then(Value::as_str).map(|m| format!("  ({m})")).unwrap_or_default();
    let now = chrono::Utc::now().format("%H:%M:%S%.3f");
    println!("{now}  {routing_key:<52}{step}{attempt}  {from} → {to}{error}");
}

fn ms(p: &Option<pb::Percentiles>) -> String {
    match p {
        Some(p) if p.count > 0 => format!("p50 {:.0} / p95 {:.0} / p99 {:.0} ms (n={})", p.p50, p.p95, p.p99, p.count),
        _ => "-".into(),
    }
}

pub fn stats(performance: &pb::Performance, bottlenecks: &pb::Bottlenecks, health: &pb::SystemHealth) {
    println!("window {} → {}", time(&performance.window_start), time(&performance.window_end));
    let figures = performance.overall.iter().chain(&performance.by_task);
    println!("\nPERFORMANCE");
    for f in figures {
        let who =
            if f.namespace.is_empty() { "all tasks".to_owned() } else { format!("{}/{}", f.namespace, f.task_name) };
        println!(
            "  {who:<36} created {:<6} complete {:<6} error {:<5} cancelled {:<5} {:.2}/min  completion {:.1}%  error {:.1}%",
            f.tasks_created,
            f.tasks_completed,
            f.tasks_failed,
            f.tasks_cancelled,
            f.tasks_finished_per_minute,
            100.0 * f.completion_rate,
            100.0 * f.error_rate
        );
        println!("  {:<36} tasks {}", "", ms(&f.task_duration_ms));
        println!(
            "  {:<36} step attempts {} ({} failed) {}",
            "",
            f.step_attempts,
            f.step_attempts_failed,
            ms(&f.step_duration_ms)
        );
    }
    println!("\nSLOWEST STEPS");
    for s in &bottlenecks.slowest_steps {
        println!("  {}/{}/{:<24} {}", s.namespace, s.task_name, s.step_name, ms(&s.duration_ms));
    }
    println!("\nSLOWEST TASKS");
    for t in &bottlenecks.slowest_tasks {
        println!("  {}/{:<30} {}", t.namespace, t.task_name, ms(&t.duration_ms));
    }
    println!("\nMOST RETRIED STEPS");
    for s in &bottlenecks.most_retried_steps {
        println!(
            "  {}/{}/{:<24} {} retried, {} failed for good",
            s.namespace, s.task_name, s.step_name, s.retries, s.failures
        );
    }
    println!("\nTOP ERRORS");
    for e in &bottlenecks.top_errors {
        println!(
            "  {:>5}×  {}  (last {} in {}/{}/{})",
            e.count,
            e.message,
            time(&e.last_seen),
            e.namespace,
            e.task_name,
            e.step_name
        );
    }
    println!("\nNOW");
    let states = |m: &std::collections::HashMap<String, u64>| {
        let mut v: Vec<_> = m.iter().map(|(k, n)| format!("{k} {n}")).collect();
        v.sort();
        v.join(", ")
    };
    println!("  tasks: {}", states(&health.tasks_by_state));
    println!("  steps: {}", states(&health.steps_by_state));
    println!("  retry backlog: {} ({} due)", health.retry_backlog, health.retries_due);
    match &health.oldest_unfinished_task {
        Some(t) => println!(
            "  oldest unfinished: {} {}/{} {} for {:.1}s",
            t.task_id,
            t.namespace,
            t.task_name,
            task_status(t.status),
            t.age_seconds
        ),
        None => println!("  oldest unfinished: none"),
    }
}
