//! Scenarios 1–4 for every DAG shape of the seed projects: roots first, parents before
//! children, independent steps in parallel on two workers, parents' results by name, the
//! legal path for every step.

use std::collections::{BTreeSet, HashMap};

use serde_json::{Value, json};
use step_worker::{Registry, StepError, StepHandler, StepInput};
use tasker_proto::v1 as pb;
use tasker_test_support::{System, TestEnv, WorkerSpec};

use crate::support::*;

/// Sleeps `config.ms`, fails the first `config.fail_times` attempts, and returns its name
/// and its parents' names as it saw them.
struct Probe;

#[async_trait::async_trait]
impl StepHandler for Probe {
    async fn call(&self, input: StepInput) -> Result<Value, StepError> {
        if let Some(ms) = input.config.get("ms").and_then(Value::as_u64) {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
        let fail_times = input.config.get("fail_times").and_then(Value::as_u64).unwrap_or(0);
        if u64::from(input.attempt) <= fail_times {
            return Err(StepError::retryable(format!("planned failure {}", input.attempt)));
        }
        let parents: HashMap<&String, &Value> = input.parent_results.iter().map(|(k, v)| (k, &v["step"])).collect();
        Ok(json!({ "step": input.step_name, "parents": parents }))
    }
}

fn registry() -> Registry {
    let mut registry = Registry::with_builtins();
    registry.register("probe", Probe);
    registry
}

/// A template of `probe` steps: (name, parents, extra config).
fn template(name: &str, steps: &[(&str, &[&str], Value)]) -> String {
    let mut yaml =
        format!("namespace: shapes\nname: {name}\nversion: 1.0.0\ndefaults: {{ max_attempts: 3 }}\nsteps:\n");
    for (step, parents, extra) in steps {
        let mut config = json!({ "ms": 150 });
        if let Value::Object(more) = extra {
            config.as_object_mut().unwrap().extend(more.clone());
        }
        yaml.push_str(&format!(
            "  - {{ name: {step}, handler: probe, depends_on: [{}], config: {config} }}\n",
            parents.join(", ")
        ));
    }
    yaml
}

async fn run_shape(name: &str, steps: &[(&str, &[&str], Value)], retried: &[(&str, u32)]) {
    let env = TestEnv::new().await;
    let workers = vec![
        WorkerSpec::new("w1", &["shapes"]).registry(registry()).concurrency(1),
        WorkerSpec::new("w2", &["shapes"]).registry(registry()).concurrency(1),
    ];
    let system = System::start(&env, workers).await;
    system.register(&env, &template(name, steps)).await;
    let (_broker, mut events) = env.subscribe(&["shapes.#"]).await;
    let created = system.submit("shapes", name, json!({ "shape": name })).await;
    let task = system.wait_final(&created.id).await;
    let received = collect_until(&mut events, |r| r.iter().any(|e| e.kind() == "dev.tasker.task.completed")).await;

    assert_eq!(task.status(), pb::TaskStatus::Complete, "{name}");
    let by_name = steps_by_name(&task);
    // 1. only the roots are dispatched first; no step before its parents completed
    let roots: BTreeSet<&str> = steps.iter().filter(|(_, p, _)| p.is_empty()).map(|(s, _, _)| *s).collect();
    let first_enqueued: BTreeSet<&str> = received
        .iter()
        .skip_while(|r| r.kind() != "dev.tasker.step.enqueued")
        .take_while(|r| r.kind() == "dev.tasker.step.enqueued")
        .filter_map(Received::step_name)
        .collect();
    assert_eq!(first_enqueued, roots, "{name}: the first dispatch is the roots");
    assert_parents_first(&task);
    for edge in &task.edges {
        let enqueued = received
            .iter()
            .position(|r| r.step_name() == Some(edge.to_step.as_str()) && r.kind() == "dev.tasker.step.enqueued")
            .unwrap();
        let parent_done = received
            .iter()
            .position(|r| r.step_name() == Some(edge.from_step.as_str()) && r.kind() == "dev.tasker.step.completed")
            .unwrap();
        assert!(enqueued > parent_done, "{name}: {} dispatched before {} completed", edge.to_step, edge.from_step);
    }
    // 2. independent steps ran in parallel on the two workers (their runs overlapped)
    let independent: Vec<(&str, &str)> = steps
        .iter()
        .flat_map(|(a, _, _)| steps.iter().map(move |(b, _, _)| (*a, *b)))
        .filter(|(a, b)| a < b && !depends(steps, a, b) && !depends(steps, b, a))
        .collect();
    if !independent.is_empty() {
        let overlapped = independent.iter().any(|(a, b)| {
            let (a, b) = (by_name[a], by_name[b]);
            ts(&a.started_at) < ts(&b.completed_at) && ts(&b.started_at) < ts(&a.completed_at)
        });
        assert!(overlapped, "{name}: no two independent steps overlapped");
        let mut workers = BTreeSet::new();
        for step in &task.steps {
            for t in step.transitions.iter().filter(|t| t.to_state == "in_progress") {
                let meta: Value = serde_json::from_str(&t.metadata_json).unwrap();
                workers.insert(meta["worker"].as_str().unwrap().to_owned());
            }
        }
        assert_eq!(workers.len(), 2, "{name}: both workers ran steps");
    }
    // 3. each handler saw its parents' results by step name
    for (step, parents, _) in steps {
        let results: Value = serde_json::from_str(&by_name[step].results_json).unwrap();
        let seen: BTreeSet<String> = results["parents"].as_object().unwrap().keys().cloned().collect();
        let expected: BTreeSet<String> = parents.iter().map(|p| (*p).to_owned()).collect();
        assert_eq!(seen, expected, "{name}: parents of {step}");
        for parent in parents.iter() {
            assert_eq!(results["parents"][*parent], *parent, "{name}: {step} saw {parent}'s own results");
        }
    }
    // 4. attempts and the legal path
    for step in &task.steps {
        let failures = retried.iter().find(|(s, _)| *s == step.name).map_or(0, |(_, n)| *n);
        assert_eq!(step.attempts, failures + 1, "{name}: attempts of {}", step.name);
        let mut expected = vec!["pending"];
        for _ in 0..failures {
            expected.extend(["enqueued", "in_progress", "waiting_for_retry"]);
        }
        expected.extend(["enqueued", "in_progress", "complete"]);
        assert_eq!(path(step), expected, "{name}: path of {}", step.name);
    }
    system.stop().await;
    env.cleanup().await;
}

/// Whether `child` depends on `ancestor`, directly or not.
fn depends(steps: &[(&str, &[&str], Value)], child: &str, ancestor: &str) -> bool {
    let parents = steps.iter().find(|(s, _, _)| *s == child).map(|(_, p, _)| *p).unwrap_or(&[]);
    parents.iter().any(|p| *p == ancestor || depends(steps, p, ancestor))
}

fn none() -> Value {
    json!({})
}

#[tokio::test]
async fn linear() {
    let steps: Vec<(&str, &[&str], Value)> = vec![
        ("a", &[], none()),
        ("b", &["a"], none()),
        ("c", &["b"], none()),
        ("d", &["c"], none()),
        ("e", &["d"], none()),
        ("f", &["e"], none()),
    ];
    run_shape("linear", &steps, &[]).await;
}

#[tokio::test]
async fn diamond() {
    let steps: Vec<(&str, &[&str], Value)> = vec![
        ("start", &[], none()),
        ("b1", &["start"], none()),
        ("b2", &["start"], none()),
        ("c1", &["b1"], none()),
        ("c2", &["b2"], none()),
        ("merge", &["c1", "c2"], none()),
        ("end", &["merge"], none()),
    ];
    run_shape("diamond", &steps, &[]).await;
}

#[tokio::test]
async fn parallel_merge() {
    let steps: Vec<(&str, &[&str], Value)> = vec![
        ("r1", &[], none()),
        ("r2", &[], none()),
        ("r3", &[], none()),
        ("r4", &[], none()),
        ("p1", &["r1", "r2"], none()),
        ("p2", &["r3", "r4"], none()),
        ("merge", &["p1", "p2"], none()),
    ];
    run_shape("parallel_merge", &steps, &[]).await;
}

#[tokio::test]
async fn tree() {
    let steps: Vec<(&str, &[&str], Value)> = vec![
        ("root", &[], none()),
        ("l", &["root"], none()),
        ("r", &["root"], none()),
        ("l1", &["l"], none()),
        ("l2", &["l"], none()),
        ("r1", &["r"], none()),
        ("r2", &["r"], none()),
        ("aggregate", &["l1", "l2", "r1", "r2"], none()),
    ];
    run_shape("tree", &steps, &[]).await;
}

#[tokio::test]
async fn mixed() {
    let steps: Vec<(&str, &[&str], Value)> = vec![
        ("x", &[], none()),
        ("y", &[], none()),
        ("join", &["x", "y"], none()),
        ("flaky", &["join"], json!({ "fail_times": 2 })),
        ("dead_end", &["x"], none()),
        ("final", &["flaky"], none()),
    ];
    run_shape("mixed", &steps, &[("flaky", 2)]).await;
}
