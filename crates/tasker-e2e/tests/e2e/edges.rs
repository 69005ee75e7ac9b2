//! The edges: fencing across operator retries, reports the database cannot store, odd
//! reports of a hand-made worker, hostile client input, payload depth and number precision end to end, transition ids
//! that join to event ids, and server reflection in both protocol versions.

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use serde_json::{Value, json};
use step_worker::{Registry, StepError, StepHandler, StepInput};
use tasker_messaging::Command;
use tasker_proto::{
    messages::{Completed, Failed, FailureKind, StepReport, step_report::Outcome},
    v1 as pb,
};
use tasker_test_support::{System, TestEnv, WorkerSpec};
use tonic::Code;

use crate::support::*;

/// Fails its first call for good; every later call waits for `release`, then completes.
struct Gate {
    calls: Arc<AtomicU32>,
    release: Arc<tokio::sync::Semaphore>,
}

#[async_trait::async_trait]
impl StepHandler for Gate {
    async fn call(&self, input: StepInput) -> Result<Value, StepError> {
        if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
            return Err(StepError::permanent("first round fails"));
        }
        let _permit = self.release.acquire().await.expect("gate open");
        Ok(json!({ "attempt": input.attempt }))
    }
}

/// After RetryStep, a duplicate of the earlier round's failure report (at-least-once
/// delivery makes such copies) arrives while the new attempt runs: it must be dropped.
#[tokio::test]
async fn a_duplicate_report_of_an_earlier_round_cannot_touch_the_retried_step() {
    let env = TestEnv::new().await;
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let mut registry = Registry::with_builtins();
    registry.register("gate", Gate { calls: Arc::new(AtomicU32::new(0)), release: release.clone() });
    let system = System::start(&env, vec![WorkerSpec::new("w1", &["fence"]).registry(registry)]).await;
    system
        .register(&env, "namespace: fence\nname: gated\nversion: 1.0.0\nsteps:\n  - { name: gated, handler: gate, max_attempts: 1 }\n")
        .await;
    let task = system.wait_final(&system.submit("fence", "gated", json!({})).await.id).await;
    assert_eq!(task.status(), pb::TaskStatus::Error);
    let step = steps_by_name(&task)["gated"].clone();
    assert_eq!(step.attempts, 1);

    let retry = pb::RetryStepRequest { step_id: step.id.clone(), reason: "try again".into() };
    system.steps().retry_step(retry).await.unwrap();
    let running = system.wait_for(&task.id, |t| steps_by_name(t)["gated"].status() == pb::StepStatus::InProgress).await;
    assert_eq!(steps_by_name(&running)["gated"].attempts, 2, "the new round's attempt has a new number");

    // the first round's failure, delivered again
    let duplicate = StepReport {
        task_id: task.id.clone(),
        step_id: step.id.clone(),
        attempt: 1,
        worker_id: "w1".into(),
        outcome: Some(Outcome::Failed(Failed {
            message: "first round fails".into(),
            kind: FailureKind::Permanent as i32,
            retry_after_ms: None,
        })),
        started_at_unix_ms: 0,
        trace_context: Default::default(),
    };
    let broker = env.broker().await;
    broker.publisher().await.unwrap().send(&[Command::Report(duplicate)]).await.unwrap();
    let results = broker.topology().results_queue();
    while broker.queue_state(&results).await.unwrap().is_some_and(|q| q.ready > 0) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let get = pb::GetStepRequest { step_id: step.id.clone(), ..Default::default() };
    let during = system.steps().get_step(get).await.unwrap().into_inner();
    assert_eq!(during.status(), pb::StepStatus::InProgress, "the stale report was applied");

    release.add_permits(1);
    let done = system.wait_final(&task.id).await;
    assert_eq!(done.status(), pb::TaskStatus::Complete);
    let step = steps_by_name(&done)["gated"].clone();
    let states: Vec<&str> = step.transitions.iter().map(|t| t.to_state.as_str()).collect();
    assert_eq!(states, ["enqueued", "in_progress", "error", "pending", "enqueued", "in_progress", "complete"]);
    let results: Value = serde_json::from_str(&step.results_json).unwrap();
    assert_eq!(results["attempt"], 2, "the handler saw the attempt's number");
    broker.close().await.unwrap();
    system.stop().await;
    env.cleanup().await;
}

/// A worker in another language is read as the README's wire protocol says: a report
/// without an outcome is dropped (and counted), a failure whose `kind` is unspecified or
/// not one listed is retryable, and a long message and worker id are cut where it says.
/// The test is the worker: the step's executions wait in its queue, unconsumed.
#[tokio::test]
async fn odd_reports_of_a_hand_made_worker_are_read_as_the_protocol_says() {
    let env = TestEnv::new().await;
    let system = System::start(&env, vec![]).await;
    system
        .register(
            &env,
            "namespace: odd\nname: one\nversion: 1.0.0\nsteps:\n  - { name: a, handler: noop, max_attempts: 3 }\n",
        )
        .await;
    let task = system.submit("odd", "one", json!({})).await;
    let enqueued = |attempts| {
        move |t: &pb::Task| t.steps[0].status() == pb::StepStatus::Enqueued && t.steps[0].attempts == attempts
    };
    let step_id = system.wait_for(&task.id, enqueued(1)).await.steps[0].id.clone();
    let report = |attempt, worker_id: String, outcome| StepReport {
        task_id: task.id.clone(),
        step_id: step_id.clone(),
        attempt,
        worker_id,
        outcome: Some(outcome),
        started_at_unix_ms: 0,
        trace_context: Default::default(),
    };
    let failed = |message: String, kind| Outcome::Failed(Failed { message, kind, retry_after_ms: Some(0) });
    let broker = env.broker().await;
    let publisher = broker.publisher().await.unwrap();

    let empty = StepReport { outcome: None, ..report(1, "hand".into(), Outcome::Started(Default::default())) };
    publisher.send(&[Command::Report(empty)]).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let counted = |body: &str| {
        body.lines().any(|l| {
            l.starts_with("tasker_orchestrator_reports_dropped_total")
                && l.contains(r#"reason="report without an outcome""#)
                && l.ends_with(" 1")
        })
    };
    while !counted(&tasker_test_support::http_get(system.orchestrator_admin, "/metrics").await) {
        assert!(tokio::time::Instant::now() < deadline, "the report without an outcome was not counted as dropped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let get = pb::GetStepRequest { step_id: step_id.clone(), ..Default::default() };
    let untouched = system.steps().get_step(get).await.unwrap().into_inner();
    assert_eq!((untouched.status(), untouched.attempts), (pb::StepStatus::Enqueued, 1), "dropped, nothing applied");

    // unspecified: retried; the message cut at 16,384 characters, the worker id at 256
    let unspecified = failed("m".repeat(20_000), FailureKind::Unspecified as i32);
    publisher.send(&[Command::Report(report(1, "w".repeat(300), unspecified))]).await.unwrap();
    let retried = system.wait_for(&task.id, enqueued(2)).await;
    let error: Value = serde_json::from_str(&retried.steps[0].last_error_json).unwrap();
    let cut = "… (cut at 16384 characters)";
    assert_eq!(error["message"].as_str(), Some(format!("{}{cut}", "m".repeat(16_384)).as_str()));
    let failure = retried.steps[0].transitions.iter().find(|t| t.to_state == "waiting_for_retry").expect("retried");
    let metadata: Value = serde_json::from_str(&failure.metadata_json).unwrap();
    assert_eq!(metadata["worker"].as_str(), Some(format!("{}… (cut at 256 characters)", "w".repeat(256)).as_str()));

    // a kind no version of the protocol lists: retried too
    publisher.send(&[Command::Report(report(2, "hand".into(), failed("odd".into(), 7)))]).await.unwrap();
    system.wait_for(&task.id, enqueued(3)).await;
    // a start an hour ahead (a worker's clock) is kept between the enqueue and the report
    let completed = Outcome::Completed(Completed { results_json: r#"{"by": "hand"}"#.into() });
    let ahead = chrono::Utc::now().timestamp_millis() + 3_600_000;
    let last = StepReport { started_at_unix_ms: ahead, ..report(3, "hand".into(), completed) };
    publisher.send(&[Command::Report(last)]).await.unwrap();
    let done = system.wait_final(&task.id).await;
    assert_eq!(done.status(), pb::TaskStatus::Complete);
    let step = &done.steps[0];
    assert_eq!(serde_json::from_str::<Value>(&step.results_json).unwrap(), json!({ "by": "hand" }));
    let micros = |t: &Option<prost_types::Timestamp>| t.map(|t| t.seconds * 1_000_000 + i64::from(t.nanos / 1_000));
    let enqueued = step.transitions.iter().rev().find(|t| t.to_state == "enqueued").unwrap();
    let (start, end) = (micros(&step.started_at).unwrap(), micros(&step.completed_at).unwrap());
    assert!(micros(&enqueued.created_at).unwrap() <= start && start <= end, "{step:#?}");
    broker.close().await.unwrap();
    system.stop().await;
    env.cleanup().await;
}

/// Returns what `config.results` holds as JSON text, parsed as it is.
struct Says(&'static str);

#[async_trait::async_trait]
impl StepHandler for Says {
    async fn call(&self, _input: StepInput) -> Result<Value, StepError> {
        Ok(serde_json::from_str(self.0).expect("test JSON"))
    }
}

struct FailsWith(&'static str);

#[async_trait::async_trait]
impl StepHandler for FailsWith {
    async fn call(&self, _input: StepInput) -> Result<Value, StepError> {
        Err(StepError::permanent(self.0))
    }
}

/// Reports whose content Postgres cannot store (U+0000 in results or in an error message,
/// a number beyond `numeric`) are decided once: the attempt fails with a clear error,
/// nothing is requeued, dead-lettered or republished, and the task ends.
#[tokio::test]
async fn reports_the_database_cannot_store_fail_their_attempt_once() {
    let env = TestEnv::new().await;
    let mut registry = Registry::with_builtins();
    registry.register("nul_results", Says(r#"{"text": "a\u0000b"}"#));
    registry.register("nul_error", FailsWith("bad\0input"));
    registry.register("huge_number", Says(r#"{"x": 1e1000000}"#));
    let system = System::start(&env, vec![WorkerSpec::new("w1", &["poison"]).registry(registry)]).await;
    system
        .register(
            &env,
            r#"
namespace: poison
name: unstorable
version: 1.0.0
defaults: { max_attempts: 3 }
steps:
  - { name: nul_results, handler: nul_results }
  - { name: nul_error, handler: nul_error }
  - { name: huge_number, handler: huge_number }
  - { name: fine, handler: noop }
"#,
        )
        .await;
    let task = system.wait_final(&system.submit("poison", "unstorable", json!({})).await.id).await;
    assert_eq!(task.status(), pb::TaskStatus::Error);
    let steps = steps_by_name(&task);
    assert_eq!(steps["fine"].status(), pb::StepStatus::Complete);
    let error = |name: &str| {
        let step = steps[name];
        assert_eq!(step.status(), pb::StepStatus::Error, "{name}");
        assert_eq!(step.attempts, 1, "{name}: decided once, not retried");
        let error: Value = serde_json::from_str(&step.last_error_json).unwrap();
        error["message"].as_str().unwrap().to_owned()
    };
    let nul_results = error("nul_results");
    assert!(nul_results.contains("results refused") && nul_results.contains("U+0000"), "{nul_results}");
    assert_eq!(error("nul_error"), "bad\u{FFFD}input", "recorded with the NUL replaced");
    let huge = error("huge_number");
    assert!(huge.contains("could not be recorded") && huge.contains("numeric"), "{huge}");

    let broker = env.broker().await;
    let dead = broker.queue_state(&broker.topology().dead_letter_queue()).await.unwrap();
    assert_eq!(dead.map(|q| q.ready), Some(0), "nothing was dead-lettered");
    broker.close().await.unwrap();
    system.stop().await;
    env.cleanup().await;
}

/// Panics on every call.
struct Panics;

#[async_trait::async_trait]
impl StepHandler for Panics {
    async fn call(&self, _input: StepInput) -> Result<Value, StepError> {
        panic!("index out of bounds: the len is 0 but the index is 3")
    }
}

/// A handler that panics fails its attempt like any error, with the panic's message, and
/// follows the retry policy; the worker acks each attempt and goes on with other work,
/// more panics than its concurrency notwithstanding.
#[tokio::test]
async fn a_handler_that_panics_fails_its_attempt_and_the_worker_goes_on() {
    let env = TestEnv::new().await;
    let mut registry = Registry::with_builtins();
    registry.register("panics", Panics);
    let worker = WorkerSpec::new("w1", &["poison"]).registry(registry).concurrency(2);
    let system = System::start(&env, vec![worker]).await;
    system
        .register(
            &env,
            r#"
namespace: poison
name: panicky
version: 1.0.0
defaults: { max_attempts: 2, timeout: 60s }
steps:
  - { name: p1, handler: panics }
  - { name: p2, handler: panics }
  - { name: p3, handler: panics }
  - { name: fine, handler: noop }
"#,
        )
        .await;
    let task = system.submit("poison", "panicky", json!({})).await;
    let task = system.wait_final(&task.id).await;
    assert_eq!(task.status(), pb::TaskStatus::Error, "{task:#?}");
    let steps = steps_by_name(&task);
    assert_eq!(steps["fine"].status(), pb::StepStatus::Complete);
    for name in ["p1", "p2", "p3"] {
        let step = steps[name];
        assert_eq!((step.status(), step.attempts), (pb::StepStatus::Error, 2), "{name}: retried, then failed");
        let error: Value = serde_json::from_str(&step.last_error_json).unwrap();
        let message = error["message"].as_str().unwrap();
        assert!(message.contains("panicked") && message.contains("index out of bounds"), "{message}");
    }
    // six panics on a worker taking two steps at a time: every delivery was settled
    let again = system.submit("poison", "panicky", json!({})).await;
    let again = system.wait_final(&again.id).await;
    assert_eq!(steps_by_name(&again)["fine"].status(), pb::StepStatus::Complete);
    system.stop().await;
    env.cleanup().await;
}

const HOSTILE: &str =
    "namespace: hostile\nname: target\nversion: 1.0.0\nsteps:\n  - { name: only, handler: fail, max_attempts: 1 }\n";

fn create(request: pb::CreateTaskRequest) -> pb::CreateTaskRequest {
    pb::CreateTaskRequest { namespace: "hostile".into(), name: "target".into(), ..request }
}

/// U+0000 anywhere a client can put it is refused with INVALID_ARGUMENT naming the field,
/// and nothing is written.
#[tokio::test]
async fn nul_in_any_client_field_is_refused_by_name_and_nothing_is_written() {
    let env = TestEnv::new().await;
    let system = System::start(&env, vec![WorkerSpec::new("w1", &["hostile"])]).await;
    system.register(&env, HOSTILE).await;
    let nul = || "a\0b".to_owned();
    let cases = [
        (
            "context_json",
            create(pb::CreateTaskRequest { context_json: r#"{"a": "x\u0000"}"#.into(), ..Default::default() }),
        ),
        (
            "context_json",
            create(pb::CreateTaskRequest { context_json: r#"{"\u0000": 1}"#.into(), ..Default::default() }),
        ),
        ("initiator", create(pb::CreateTaskRequest { initiator: nul(), ..Default::default() })),
        ("reason", create(pb::CreateTaskRequest { reason: nul(), ..Default::default() })),
        ("source_system", create(pb::CreateTaskRequest { source_system: nul(), ..Default::default() })),
        ("tags[1]", create(pb::CreateTaskRequest { tags: vec!["ok".into(), nul()], ..Default::default() })),
        ("idempotency_key", create(pb::CreateTaskRequest { idempotency_key: nul(), ..Default::default() })),
        (
            "namespace",
            pb::CreateTaskRequest { namespace: "host\0ile".into(), name: "target".into(), ..Default::default() },
        ),
        ("name", pb::CreateTaskRequest { namespace: "hostile".into(), name: "tar\0get".into(), ..Default::default() }),
        ("version", create(pb::CreateTaskRequest { version: "1.0.0\0".into(), ..Default::default() })),
        // not NUL, but refused by the database all the same: a number beyond `numeric`
        (
            "context_json",
            create(pb::CreateTaskRequest { context_json: r#"{"x": 1e1000000}"#.into(), ..Default::default() }),
        ),
    ];
    for (field, request) in cases {
        let status = system.tasks().create_task(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(status.message().starts_with(&format!("{field}:")), "{field}: {}", status.message());
    }
    let listed = system.tasks().list_tasks(pb::ListTasksRequest::default()).await.unwrap().into_inner();
    assert!(listed.tasks.is_empty(), "nothing was written: {listed:?}");

    let filter = pb::ListTasksRequest { namespace: nul(), ..Default::default() };
    assert_eq!(system.tasks().list_tasks(filter).await.unwrap_err().code(), Code::InvalidArgument);
    let get = pb::GetTemplateRequest { namespace: "hostile".into(), name: nul(), version: String::new() };
    assert_eq!(system.templates().get_template(get).await.unwrap_err().code(), Code::InvalidArgument);
    let yaml = HOSTILE.replace("version: 1.0.0", "version: 1.0.1\ndescription: \"a\\0b\"");
    let status = system.templates().register_template(pb::RegisterTemplateRequest { yaml }).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("description:"), "{}", status.message());
    let yaml = HOSTILE
        .replace("version: 1.0.0", "version: 1.0.2")
        .replace("max_attempts: 1 }", "max_attempts: 1, config: { x: \"\\0\" } }");
    let status = system.templates().register_template(pb::RegisterTemplateRequest { yaml }).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("config of step `only`") && status.message().contains("U+0000"),
        "{}",
        status.message()
    );

    // operator actions on a failed task
    let task = system.wait_final(&system.submit("hostile", "target", json!({})).await.id).await;
    let step_id = task.steps[0].id.clone();
    let cancel = pb::CancelTaskRequest { task_id: task.id.clone(), reason: nul() };
    let status = system.tasks().cancel_task(cancel).await.unwrap_err();
    assert_eq!((status.code(), status.message().starts_with("reason:")), (Code::InvalidArgument, true));
    let retry = pb::RetryStepRequest { step_id: step_id.clone(), reason: nul() };
    let status = system.steps().retry_step(retry).await.unwrap_err();
    assert_eq!((status.code(), status.message().starts_with("reason:")), (Code::InvalidArgument, true));
    for results in [r#"{"a": "\u0000"}"#, r#"{"x": 1e1000000}"#] {
        let resolve =
            pb::ResolveStepRequest { step_id: step_id.clone(), results_json: results.into(), reason: String::new() };
        let status = system.steps().resolve_step(resolve).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().starts_with("results_json:"), "{}", status.message());
    }
    let after = system.wait_final(&task.id).await;
    assert_eq!(after.status(), pb::TaskStatus::Error, "no operator action was applied");
    assert_eq!(after.transitions.len(), task.transitions.len());
    system.stop().await;
    env.cleanup().await;
}

/// Error messages quote at most a short prefix of what they were given.
#[tokio::test]
async fn errors_quote_only_a_prefix_of_hostile_input() {
    let env = TestEnv::new().await;
    let system = System::start(&env, vec![]).await;
    let long = "x".repeat(10 * 1024);
    let statuses = [
        system
            .tasks()
            .create_task(pb::CreateTaskRequest { namespace: long.clone(), name: "n".into(), ..Default::default() })
            .await
            .unwrap_err(),
        system
            .tasks()
            .get_task(pb::GetTaskRequest { task_id: long.clone(), include_transitions: false })
            .await
            .unwrap_err(),
        system
            .templates()
            .register_template(pb::RegisterTemplateRequest {
                yaml: format!("namespace: {long}\nname: n\nversion: 1.0.0\nsteps: [{{ name: s, handler: noop }}]\n"),
            })
            .await
            .unwrap_err(),
        system
            .templates()
            .register_template(pb::RegisterTemplateRequest {
                yaml: format!("namespace: a\nname: n\nversion: 1.0.0\nsteps: [{{ name: s, handler: noop, depends_on: [{long}] }}]\n"),
            })
            .await
            .unwrap_err(),
    ];
    for status in statuses {
        assert_eq!(status.code(), Code::InvalidArgument, "{:.200}", status.message());
        assert!(status.message().len() < 512, "{} bytes: {:.200}", status.message().len(), status.message());
        assert!(status.message().contains("xxxx"), "still quotes the start: {}", status.message());
    }
    system.stop().await;
    env.cleanup().await;
}

/// Each `echo` nests its parent's results two levels deeper. Results are held to the
/// payload depth limit (64) on arrival, so the chain fails clearly at the first step whose
/// results pass it — never later, while handing on what was accepted.
#[tokio::test]
async fn a_long_echo_chain_fails_clearly_where_results_get_too_deep() {
    let env = TestEnv::new().await;
    let system = System::start(&env, vec![WorkerSpec::new("w1", &["deep"])]).await;
    let mut yaml = "namespace: deep\nname: chain\nversion: 1.0.0\nsteps:\n  - { name: s1, handler: echo }\n".to_owned();
    for i in 2..=100 {
        yaml.push_str(&format!("  - {{ name: s{i}, handler: echo, depends_on: [s{}] }}\n", i - 1));
    }
    system.register(&env, &yaml).await;
    let task = system.wait_final(&system.submit("deep", "chain", json!({})).await.id).await;
    assert_eq!(task.status(), pb::TaskStatus::Error);
    let steps = steps_by_name(&task);
    // results of step k are 2k levels deep: s32's are 64, s33's 66
    for i in 1..=32 {
        assert_eq!(steps[format!("s{i}").as_str()].status(), pb::StepStatus::Complete, "s{i}");
    }
    let failed = steps["s33"];
    assert_eq!(failed.status(), pb::StepStatus::Error);
    let error: Value = serde_json::from_str(&failed.last_error_json).unwrap();
    assert_eq!(error["message"], "results refused: nested 66 levels deep, more than the limit of 64");
    assert_eq!(error["kind"], "permanent");
    for i in 34..=100 {
        assert_eq!(steps[format!("s{i}").as_str()].status(), pb::StepStatus::Pending, "s{i} never ran");
    }
    system.stop().await;
    env.cleanup().await;
}

/// Numbers keep every digit: context → `echo` → child's input → results, as stored and
/// as GetTask returns them.
#[tokio::test]
async fn numbers_keep_every_digit_through_the_built_in_handlers() {
    let env = TestEnv::new().await;
    let system = System::start(&env, vec![WorkerSpec::new("w1", &["digits"])]).await;
    system
        .register(
            &env,
            "namespace: digits\nname: carry\nversion: 1.0.0\nsteps:\n  - { name: first, handler: echo }\n  - { name: second, handler: echo, depends_on: [first] }\n  - { name: again, handler: fail, depends_on: [second], max_attempts: 2, config: { times: 1 } }\n",
        )
        .await;
    let context = format!(r#"{{"big": {BIG}, "pi": {PI}, "list": [{BIG}, -{PI}]}}"#);
    let request = pb::CreateTaskRequest {
        namespace: "digits".into(),
        name: "carry".into(),
        context_json: context,
        ..Default::default()
    };
    let created = system.tasks().create_task(request).await.unwrap().into_inner().task.unwrap();
    let task = system.wait_final(&created.id).await;
    assert_eq!(task.status(), pb::TaskStatus::Complete);
    for text in [&task.context_json, &steps_by_name(&task)["first"].results_json] {
        assert!(text.contains(BIG) && text.contains(PI) && text.contains(&format!("-{PI}")), "{text}");
    }
    let second: Value = serde_json::from_str(&steps_by_name(&task)["second"].results_json).unwrap();
    assert_eq!(second["parents"]["first"]["context"]["big"].to_string(), BIG);
    assert_eq!(second["parents"]["first"]["context"]["pi"].to_string(), PI);
    let again: Value = serde_json::from_str(&steps_by_name(&task)["again"].results_json).unwrap();
    assert_eq!(again["parents"]["second"]["context"]["list"].to_string(), format!("[{BIG},-{PI}]"));
    system.stop().await;
    env.cleanup().await;
}

/// GetTask's transition ids are the ids of the events that announced them.
#[tokio::test]
async fn transition_ids_are_the_event_ids() {
    let env = TestEnv::new().await;
    let system = System::start(&env, vec![WorkerSpec::new("w1", &["joins"])]).await;
    system
        .register(
            &env,
            "namespace: joins\nname: two\nversion: 1.0.0\nsteps:\n  - { name: a, handler: fail, max_attempts: 2, config: { times: 1 } }\n  - { name: b, handler: noop, depends_on: [a] }\n",
        )
        .await;
    let (broker, mut events) = env.subscribe(&["joins.#"]).await;
    let task = system.submit("joins", "two", json!({})).await;
    let received = collect_until(&mut events, |got| got.iter().any(|r| r.kind() == "dev.tasker.task.completed")).await;
    let done = system.wait_final(&task.id).await;
    let mut transition_ids: Vec<String> = done.transitions.iter().map(|t| t.id.clone()).collect();
    transition_ids.extend(done.steps.iter().flat_map(|s| s.transitions.iter().map(|t| t.id.clone())));
    assert!(transition_ids.iter().all(|id| id.parse::<uuid::Uuid>().is_ok()), "{transition_ids:?}");
    let event_ids: HashSet<String> = received
        .iter()
        .filter(|r| r.task_id() == task.id)
        .map(|r| r.event["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(transition_ids.len(), 12, "3 task and 6 + 3 step transitions");
    assert_eq!(transition_ids.into_iter().collect::<HashSet<_>>(), event_ids);
    broker.close().await.unwrap();
    system.stop().await;
    env.cleanup().await;
}

/// The services a reflection client of protocol version `$v` lists.
macro_rules! listed_services {
    ($v:ident, $channel:expr) => {{
        use tonic_reflection::pb::$v::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut client = ServerReflectionClient::new($channel);
        let mut answers = client.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
        let answer = answers.message().await.unwrap().expect("an answer");
        let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
            panic!("not a service list: {answer:?}");
        };
        list.service.into_iter().map(|s| s.name).collect::<Vec<String>>()
    }};
}

/// Reflection answers in v1 (grpcurl) and v1alpha (grpcio-reflection, many GUI clients).
#[tokio::test]
async fn reflection_lists_the_services_in_both_protocol_versions() {
    let env = TestEnv::new().await;
    let system = System::start(&env, vec![]).await;
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", system.api_addr)).unwrap().connect().await.unwrap();
    let expected =
        ["tasker.v1.TaskService", "tasker.v1.StepService", "tasker.v1.TemplateService", "grpc.health.v1.Health"];
    for (version, names) in
        [("v1alpha", listed_services!(v1alpha, channel.clone())), ("v1", listed_services!(v1, channel))]
    {
        for service in expected {
            assert!(names.iter().any(|n| n == service), "{version} lists {service}: {names:?}");
        }
    }
    system.stop().await;
    env.cleanup().await;
}
