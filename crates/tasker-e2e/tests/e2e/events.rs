//! Scenarios 21–22: topic subscriptions receive exactly the matching events, valid
//! CloudEvents, in transition order, one per transition; WatchTask streams until final.

use serde_json::json;
use tasker_proto::v1 as pb;
use tasker_test_support::{System, TestEnv, WorkerSpec};

use crate::support::*;

const PAYMENTS: &str = r#"
namespace: payments
name: charge
version: 1.0.0
steps:
  - { name: authorize, handler: noop }
  - { name: capture, handler: fail, depends_on: [authorize], max_attempts: 2, config: { times: 1 } }
  - { name: receipt, handler: noop, depends_on: [capture] }
"#;

const SHIPPING: &str = r#"
namespace: shipping
name: ship
version: 1.0.0
steps:
  - { name: pack, handler: noop }
  - { name: label, handler: fail, depends_on: [pack], config: { permanent: true } }
  - { name: send, handler: noop, depends_on: [label] }
"#;

#[tokio::test]
async fn subscribers_receive_exactly_the_events_their_patterns_match() {
    let env = TestEnv::new().await;
    let system = System::start(&env, vec![WorkerSpec::new("w1", &["payments", "shipping"])]).await;
    system.register(&env, PAYMENTS).await;
    system.register(&env, SHIPPING).await;
    let patterns = ["#", "#.task.completed", "*.*.step.failed", "payments.#"];
    let mut subscribers = Vec::new();
    for pattern in patterns {
        subscribers.push(env.subscribe(&[pattern]).await);
    }

    let charge = system.submit("payments", "charge", json!({})).await;
    let ship = system.submit("shipping", "ship", json!({})).await;
    let charge = system.wait_final(&charge.id).await;
    let ship = system.wait_final(&ship.id).await;
    assert_eq!((charge.status(), ship.status()), (pb::TaskStatus::Complete, pb::TaskStatus::Error));

    // every transition of both tasks has exactly one event on `#`
    let transitions: usize = [&charge, &ship]
        .iter()
        .map(|t| t.transitions.len() + t.steps.iter().map(|s| s.transitions.len()).sum::<usize>())
        .sum();
    let (_, all_stream) = &mut subscribers[0];
    let all = collect_until(all_stream, |r| r.len() >= transitions).await;
    assert_eq!(all.len(), transitions, "one event per transition");
    let mut ids: Vec<&str> = all.iter().map(|r| r.event["id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), transitions, "distinct event ids");
    for r in &all {
        assert_cloud_event(r);
    }
    // per task, events arrive in transition order: the task's own path, and each step's
    for task in [&charge, &ship] {
        let mine: Vec<&Received> = all.iter().filter(|r| r.task_id() == task.id).collect();
        let task_path: Vec<(String, String)> =
            mine.iter().filter(|r| r.kind().starts_with("dev.tasker.task.")).map(|r| r.transition()).collect();
        let recorded: Vec<(String, String)> =
            task.transitions.iter().map(|t| (t.from_state.clone(), t.to_state.clone())).collect();
        assert_eq!(task_path, recorded, "{}", task.name);
        for step in &task.steps {
            let seen: Vec<(String, String)> =
                mine.iter().filter(|r| r.step_name() == Some(step.name.as_str())).map(|r| r.transition()).collect();
            let recorded: Vec<(String, String)> =
                step.transitions.iter().map(|t| (t.from_state.clone(), t.to_state.clone())).collect();
            assert_eq!(seen, recorded, "{}/{}", task.name, step.name);
        }
        assert_eq!(mine.first().unwrap().kind(), "dev.tasker.task.created");
        assert!(
            mine.last().unwrap().kind() == "dev.tasker.task.completed"
                || mine.last().unwrap().kind() == "dev.tasker.task.failed"
        );
    }
    // each narrower subscriber got exactly the matching subset, in the same order
    for (pattern, (_, stream)) in patterns.iter().zip(subscribers.iter_mut()).skip(1) {
        let expected: Vec<&str> = all
            .iter()
            .filter(|r| topic_matches(pattern, &r.routing_key))
            .map(|r| r.event["id"].as_str().unwrap())
            .collect();
        assert!(!expected.is_empty(), "{pattern} matches something");
        let got = collect_until(stream, |r| r.len() >= expected.len()).await;
        let got_ids: Vec<&str> = got.iter().map(|r| r.event["id"].as_str().unwrap()).collect();
        assert_eq!(got_ids, expected, "{pattern}");
    }
    system.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn watch_task_streams_the_history_and_live_events_until_final() {
    let env = TestEnv::new().await;
    let system = System::start(&env, vec![WorkerSpec::new("w1", &["payments"])]).await;
    system.register(&env, PAYMENTS).await;
    let task = system.submit("payments", "charge", json!({})).await;
    let mut stream =
        system.tasks().watch_task(pb::WatchTaskRequest { task_id: task.id.clone() }).await.unwrap().into_inner();
    let mut events = Vec::new();
    let watching = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while let Some(event) = stream.message().await.unwrap() {
            events.push(event);
        }
    });
    watching.await.expect("the stream ends when the task is final");
    let done = system.wait_final(&task.id).await;
    assert_eq!(done.status(), pb::TaskStatus::Complete);

    assert_eq!(events.first().unwrap().r#type, "dev.tasker.task.created");
    assert_eq!(events.last().unwrap().r#type, "dev.tasker.task.completed");
    let transitions = done.transitions.len() + done.steps.iter().map(|s| s.transitions.len()).sum::<usize>();
    assert_eq!(events.len(), transitions, "every transition once");
    let step_events: Vec<(String, String)> = events
        .iter()
        .filter(|e| e.r#type.starts_with("dev.tasker.step."))
        .map(|e| {
            let data: serde_json::Value = serde_json::from_str(&e.data_json).unwrap();
            (data["step_name"].as_str().unwrap().to_owned(), data["to"].as_str().unwrap().to_owned())
        })
        .filter(|(name, _)| name == "capture")
        .collect();
    let capture: Vec<&str> = step_events.iter().map(|(_, to)| to.as_str()).collect();
    assert_eq!(capture, ["enqueued", "in_progress", "waiting_for_retry", "enqueued", "in_progress", "complete"]);

    // watching a finished task replays its history and ends
    let mut replay =
        system.tasks().watch_task(pb::WatchTaskRequest { task_id: task.id.clone() }).await.unwrap().into_inner();
    let mut again = Vec::new();
    while let Some(event) = replay.message().await.unwrap() {
        again.push(event.id);
    }
    assert_eq!(again, events.iter().map(|e| e.id.clone()).collect::<Vec<_>>());
    let missing = system.tasks().watch_task(pb::WatchTaskRequest { task_id: uuid::Uuid::now_v7().to_string() }).await;
    assert_eq!(missing.unwrap_err().code(), tonic::Code::NotFound);
    system.stop().await;
    env.cleanup().await;
}

const SLOW_THEN_QUICK: &str = r#"
namespace: timing
name: slow_then_quick
version: 1.0.0
steps:
  - { name: slow, handler: sleep, config: { ms: 1500 } }
  - { name: quick, handler: noop, depends_on: [slow] }
"#;

/// Workers report a step's start on its own only once it has run a while (100 ms by
/// default); a quick step's start comes with its outcome. Either way the start is
/// recorded, in order, at the time the worker began.
#[tokio::test]
async fn a_long_step_shows_in_progress_while_it_runs_and_every_start_is_recorded() {
    let env = TestEnv::new().await;
    let system = System::start(&env, vec![WorkerSpec::new("w1", &["timing"])]).await;
    system.register(&env, SLOW_THEN_QUICK).await;
    let task = system.submit("timing", "slow_then_quick", json!({})).await;

    // while the slow step runs, it is in progress and the task is not finished
    let running = system.wait_for(&task.id, |t| steps_by_name(t)["slow"].status() == pb::StepStatus::InProgress).await;
    assert_eq!(running.status(), pb::TaskStatus::InProgress);
    assert!(steps_by_name(&running)["slow"].completed_at.is_none());

    let done = system.wait_final(&task.id).await;
    assert_eq!(done.status(), pb::TaskStatus::Complete);
    let steps = steps_by_name(&done);
    for step in steps.values() {
        assert_eq!(path(step), ["pending", "enqueued", "in_progress", "complete"], "{}", step.name);
        let enqueued = step.transitions.iter().find(|t| t.to_state == "enqueued").unwrap();
        assert!(ts(&enqueued.created_at) <= ts(&step.started_at), "{} started before it was enqueued", step.name);
        assert!(ts(&step.started_at) <= ts(&step.completed_at), "{}", step.name);
    }
    // the slow step's start is when the worker began, not when its report arrived
    let (slow, quick) = (steps["slow"], steps["quick"]);
    let ran = ts(&slow.completed_at) - ts(&slow.started_at);
    assert!(ran >= chrono::Duration::milliseconds(1500), "slow step recorded as running only {ran}");
    assert!(ts(&quick.started_at) >= ts(&slow.completed_at));
    system.stop().await;
    env.cleanup().await;
}

/// The relay hands a batch's publishes to the connection together (each started in turn,
/// then all awaited with their confirms): a subscriber still gets them in the order given,
/// which is each task's transition order.
#[tokio::test]
async fn a_large_batch_of_events_reaches_a_subscriber_in_the_order_it_was_published() {
    let env = TestEnv::new().await;
    let (_subscriber, mut events) = env.subscribe(&["#"]).await;
    let broker = env.broker().await;
    let publisher = broker.publisher().await.expect("a publisher");
    let batch: Vec<(String, String, String)> = (0..500)
        .map(|n| (format!("event-{n}"), format!("orders.task{}.step.completed", n % 7), json!({ "n": n }).to_string()))
        .collect();
    let refs: Vec<(&str, &str, &str)> =
        batch.iter().map(|(id, key, body)| (id.as_str(), key.as_str(), body.as_str())).collect();
    publisher.publish_events(&refs).await.expect("every event confirmed");

    let mut received = Vec::new();
    while received.len() < batch.len() {
        let event = tokio::time::timeout(std::time::Duration::from_secs(10), events.next())
            .await
            .expect("the next event within 10 s")
            .expect("the subscription is open")
            .expect("a delivery");
        let body: serde_json::Value = serde_json::from_str(&event.payload).expect("the JSON published");
        received.push((event.routing_key, body["n"].as_i64().expect("n")));
    }
    let sent: Vec<(String, i64)> = batch.iter().zip(0..).map(|((_, key, _), n)| (key.clone(), n)).collect();
    assert_eq!(received, sent, "the order published");

    publisher.close().await;
    broker.close().await.expect("close");
    env.cleanup().await;
}

/// A created task's `task.created` goes out on the relay's wake-up from task-api, not on
/// its poll and not on the orchestrator's first batch: with the poll an hour away and no
/// orchestrator running, a subscriber still gets it.
#[tokio::test]
async fn a_created_task_is_announced_with_no_orchestrator_and_no_poll() {
    let env = TestEnv::new().await;
    let mut config = env.config.clone();
    config.publisher.poll_interval = std::time::Duration::from_secs(3600);
    let mut system = System::start_with(&env, config, vec![]).await;
    system.stop_service("orchestrator").await;
    system.register(&env, PAYMENTS).await;
    let (_subscriber, mut events) = env.subscribe(&["#"]).await;
    let task = system.submit("payments", "charge", json!({})).await;
    let seen = collect_until(&mut events, |r| !r.is_empty()).await;
    assert_eq!(seen.len(), 1, "only what task-api wrote: {seen:?}");
    assert_eq!(seen[0].kind(), "dev.tasker.task.created");
    assert_eq!(seen[0].task_id(), task.id);
    system.stop().await;
    env.cleanup().await;
}

/// A running task's events go out on the orchestrator's lazy wake-up of the relay (its
/// batches wake it at once only when a task ends): with the poll an hour away, a task
/// whose step is still running has announced everything up to that step's start.
#[tokio::test]
async fn a_running_tasks_events_go_out_before_it_ends_with_no_poll() {
    let env = TestEnv::new().await;
    let mut config = env.config.clone();
    config.publisher.poll_interval = std::time::Duration::from_secs(3600);
    let system = System::start_with(&env, config, vec![WorkerSpec::new("w1", &["slow"])]).await;
    system
        .register(
            &env,
            "namespace: slow\nname: wait\nversion: 1.0.0\nsteps:\n  - { name: nap, handler: sleep, config: { ms: 30000 } }\n",
        )
        .await;
    let (_subscriber, mut events) = env.subscribe(&["slow.#"]).await;
    let task = system.submit("slow", "wait", json!({})).await;
    let seen = collect_until(&mut events, |r| r.iter().any(|e| e.kind() == "dev.tasker.step.started")).await;
    let kinds: Vec<&str> = seen.iter().map(|e| e.kind()).collect();
    assert_eq!(
        kinds,
        ["dev.tasker.task.created", "dev.tasker.task.started", "dev.tasker.step.enqueued", "dev.tasker.step.started"],
        "everything so far, in order, while the step runs"
    );
    assert!(seen.iter().all(|e| e.task_id() == task.id));
    // the end goes out at once; the step's cancellation comes before it
    let cancel = pb::CancelTaskRequest { task_id: task.id.clone(), reason: "done watching".into() };
    system.tasks().cancel_task(cancel).await.unwrap();
    let end = collect_until(&mut events, |r| r.iter().any(|e| e.kind() == "dev.tasker.task.cancelled")).await;
    let kinds: Vec<&str> = end.iter().map(|e| e.kind()).collect();
    assert_eq!(kinds, ["dev.tasker.step.cancelled", "dev.tasker.task.cancelled"]);
    system.stop().await;
    env.cleanup().await;
}

const WATCHED: &str = r#"
namespace: watched
name: diamond
version: 1.0.0
steps:
  - { name: start, handler: sleep, config: { ms: 200 } }
  - { name: b1, handler: noop, depends_on: [start] }
  - { name: b2, handler: noop, depends_on: [start] }
  - { name: c1, handler: noop, depends_on: [b1] }
  - { name: c2, handler: noop, depends_on: [b2] }
  - { name: merge, handler: noop, depends_on: [c1, c2] }
  - { name: end, handler: noop, depends_on: [merge] }
"#;

/// An event's owner (its step's name, or empty for the task) and id.
fn owned(event: &pb::Event) -> (String, String) {
    let data: serde_json::Value = serde_json::from_str(&event.data_json).unwrap();
    (data["step_name"].as_str().unwrap_or_default().to_owned(), event.id.clone())
}

/// WatchTask streams of tasks of one name share one event subscription per task-api,
/// closed with the last of them; a stream that falls behind its task's events (here
/// `api.watch_buffer` is 1, so every burst of them does) catches up from the database,
/// and its client still sees every event once, the task's and each step's in order: what
/// a watch of the finished task replays.
#[tokio::test]
async fn watches_share_a_subscription_and_catch_up_when_behind() {
    let env = TestEnv::new().await;
    let mut config = env.config.clone();
    config.api.watch_buffer = 1;
    let system = System::start_with(&env, config, vec![WorkerSpec::new("w1", &["watched"])]).await;
    system.register(&env, WATCHED).await;
    let mut tasks = Vec::new();
    let mut streams = Vec::new();
    for _ in 0..3 {
        let task = system.submit("watched", "diamond", json!({})).await;
        let request = pb::WatchTaskRequest { task_id: task.id.clone() };
        let mut stream = system.tasks().watch_task(request).await.unwrap().into_inner();
        let first = stream.message().await.unwrap().expect("the task's first event");
        assert_eq!(first.r#type, "dev.tasker.task.created");
        tasks.push(task.id);
        streams.push((stream, vec![owned(&first)]));
    }
    let subscriptions = "tasker_api_watch_subscriptions";
    assert_eq!(metric(system.api_admin, subscriptions).await, 1.0, "one subscription for the three streams");

    let mut watched = Vec::new();
    for (mut stream, mut ids) in streams {
        let read = tokio::time::timeout(std::time::Duration::from_secs(60), async {
            while let Some(event) = stream.message().await.unwrap() {
                ids.push(owned(&event));
            }
        });
        read.await.expect("the stream ends when its task is final");
        watched.push(ids);
    }
    for (task_id, ids) in tasks.iter().zip(&watched) {
        let mut replay =
            system.tasks().watch_task(pb::WatchTaskRequest { task_id: task_id.clone() }).await.unwrap().into_inner();
        let mut history = Vec::new();
        while let Some(event) = replay.message().await.unwrap() {
            history.push(owned(&event));
        }
        assert_eq!(history.len(), 2 + 7 * 3 + 1, "created, started, each step's three, completed");
        // every event once, and the task's and each step's in their transition order (the
        // order of events of different owners made by one commit is not promised)
        let (mut got, mut all) = (ids.clone(), history.clone());
        got.sort();
        all.sort();
        assert_eq!(got, all, "every event once");
        let of = |events: &[(String, String)], owner: &str| -> Vec<String> {
            events.iter().filter(|(o, _)| o == owner).map(|(_, id)| id.clone()).collect()
        };
        for (owner, _) in &history {
            assert_eq!(of(ids, owner), of(&history, owner), "{owner:?}: in transition order");
        }
    }
    assert!(metric(system.api_admin, "tasker_api_watch_catch_ups_total").await >= 1.0, "a stream fell behind");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while metric(system.api_admin, subscriptions).await != 0.0 {
        assert!(tokio::time::Instant::now() < deadline, "the subscription outlived its streams");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    system.stop().await;
    env.cleanup().await;
}
