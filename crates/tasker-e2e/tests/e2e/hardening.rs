//! Bounds on what one caller can hold: WatchTask streams per caller (given back when the
//! caller vanishes), message sizes.

use std::time::Duration;

use serde_json::json;
use tasker_proto::v1 as pb;
use tasker_proto::v1::task_service_client::TaskServiceClient;
use tasker_test_support::{FaultProxy, System, TestEnv, WorkerSpec};
use tonic::{Code, Request};

fn as_caller<T>(message: T, who: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("x-tasker-actor", who.parse().unwrap());
    request
}

/// A task that runs for a minute, to be watched (each test cancels it when done).
const LONG: &str =
    "namespace: watch\nname: long\nversion: 1.0.0\nsteps:\n  - { name: s, handler: sleep, config: { ms: 60000 } }\n";

/// Opens a WatchTask stream as soon as a slot is free: RESOURCE_EXHAUSTED until then, for
/// at most `within`, else the test fails saying `otherwise`.
async fn watch_once_free(
    open: impl AsyncFn() -> Result<tonic::Response<tonic::Streaming<pb::Event>>, tonic::Status>,
    within: Duration,
    otherwise: &str,
) -> tonic::Response<tonic::Streaming<pb::Event>> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match open().await {
            Ok(stream) => return stream,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(tokio::time::Instant::now() < deadline, "{otherwise}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Past `api.max_watches_per_caller` open streams a caller gets RESOURCE_EXHAUSTED;
/// other callers are not affected, and a closed stream frees its slot.
#[tokio::test]
async fn watch_streams_are_bounded_per_caller() {
    let env = TestEnv::new().await;
    let mut config = env.config.clone();
    config.api.max_watches_per_caller = 2;
    let system = System::start_with(&env, config, vec![WorkerSpec::new("w1", &["watch"])]).await;
    system.register(&env, LONG).await;
    let task = system.submit("watch", "long", json!({})).await;
    let watch = |who: &str| {
        let mut tasks = system.tasks();
        let request = as_caller(pb::WatchTaskRequest { task_id: task.id.clone() }, who);
        async move { tasks.watch_task(request).await }
    };
    let first = watch("viewer").await.unwrap();
    let second = watch("viewer").await.unwrap();
    let refused = watch("viewer").await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("api.max_watches_per_caller"));
    let other = watch("someone-else").await.unwrap();
    drop(first);
    let again = watch_once_free(
        async || watch("viewer").await,
        Duration::from_secs(10),
        "a closed stream never freed its slot",
    )
    .await;
    drop((second, other, again));
    let cancel = pb::CancelTaskRequest { task_id: task.id.clone(), reason: "done".into() };
    system.tasks().cancel_task(cancel).await.unwrap();
    system.stop().await;
    env.cleanup().await;
}

/// A watcher that vanished without closing its connection (a partition, a crashed host)
/// does not keep its slot: task-api's keepalive pings go unanswered, it closes the
/// connection, and the stream's slot is free again.
#[tokio::test]
async fn a_vanished_watcher_gives_its_stream_back() {
    let env = TestEnv::new().await;
    let mut config = env.config.clone();
    config.api.max_watches_per_caller = 1;
    config.api.keepalive_interval = Duration::from_secs(1);
    config.api.keepalive_timeout = Duration::from_secs(1);
    let system = System::start_with(&env, config, vec![WorkerSpec::new("w1", &["watch"])]).await;
    system.register(&env, LONG).await;
    let task = system.submit("watch", "long", json!({})).await;
    let request = || as_caller(pb::WatchTaskRequest { task_id: task.id.clone() }, "viewer");

    // the far watcher reaches task-api through a proxy, which then goes silent
    let proxy = FaultProxy::start(system.api_addr).await;
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", proxy.addr())).unwrap().connect().await.unwrap();
    let far = TaskServiceClient::new(channel).watch_task(request()).await.expect("the far watcher's stream");
    let refused = system.tasks().watch_task(request()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    proxy.silence();

    let near = watch_once_free(
        async || system.tasks().watch_task(request()).await,
        Duration::from_secs(20),
        "the vanished watcher kept its slot",
    )
    .await;
    drop((far, near));
    let cancel = pb::CancelTaskRequest { task_id: task.id.clone(), reason: "done".into() };
    system.tasks().cancel_task(cancel).await.unwrap();
    system.stop().await;
    env.cleanup().await;
}

/// task-api stopping does not wait for the tasks its callers watch to finish: each open
/// WatchTask stream ends with UNAVAILABLE, to be opened again on another replica, and the
/// service stops.
#[tokio::test]
async fn stopping_ends_open_watches_with_unavailable() {
    let env = TestEnv::new().await;
    let mut system = System::start(&env, vec![WorkerSpec::new("w1", &["watch"])]).await;
    system.register(&env, LONG).await;
    let task = system.submit("watch", "long", json!({})).await;
    let mut stream = system
        .tasks()
        .watch_task(as_caller(pb::WatchTaskRequest { task_id: task.id.clone() }, "viewer"))
        .await
        .unwrap()
        .into_inner();
    // the history is replayed first: the stream is open and live once it has come
    let first = stream.message().await.unwrap().expect("the task's first event");
    assert_eq!(first.r#type, "dev.tasker.task.created");

    system.stop_service("task-api").await;
    let ended = loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without saying why"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    assert!(ended.message().contains("shutting down"), "{ended:?}");
    system.stop().await;
    env.cleanup().await;
}

/// Messages are decoded up to twice the largest payload limit: a context a little over
/// its limit gets the API's RESOURCE_EXHAUSTED naming the field, a far larger message is
/// refused by the transport before it is read.
#[tokio::test]
async fn message_sizes_are_bounded_by_the_limits() {
    let env = TestEnv::new().await;
    let system = System::start(&env, vec![]).await;
    let create = |bytes: usize| pb::CreateTaskRequest {
        namespace: "sizes".into(),
        name: "any".into(),
        context_json: format!(r#"{{"pad": "{}"}}"#, "x".repeat(bytes)),
        ..Default::default()
    };
    let over = system.tasks().create_task(create(1_200_000)).await.unwrap_err();
    assert_eq!(over.code(), Code::ResourceExhausted, "{over:?}");
    assert!(over.message().starts_with("context_json:"), "{}", over.message());
    let far_over = system.tasks().create_task(create(3_000_000)).await.unwrap_err();
    assert_eq!(far_over.code(), Code::OutOfRange, "{far_over:?}");
    system.stop().await;
    env.cleanup().await;
}
