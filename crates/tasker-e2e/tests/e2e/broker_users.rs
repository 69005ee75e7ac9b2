//! Least privilege on the broker (`scripts/broker-users.sh`), against the real RabbitMQ:
//! a worker's user runs a real worker for its namespace and is refused any other
//! namespace's queue; the event-publisher's user cannot read the orchestrator's input.

use std::collections::HashMap;

use lapin::{
    Connection, ConnectionProperties,
    options::{BasicConsumeOptions, QueueDeclareOptions},
    types::FieldTable,
};
use serde_json::json;
use step_worker::{Registry, Worker};
use tasker_proto::v1 as pb;
use tasker_test_support::{System, TestEnv};
use tokio_util::sync::CancellationToken;

fn script(prefix: &str, extra: &[&str]) -> Option<HashMap<String, String>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/broker-users.sh");
    let output = std::process::Command::new("bash").arg(path).args(["--prefix", prefix]).args(extra).output().ok()?;
    if !output.status.success() {
        eprintln!("broker-users.sh: {}", String::from_utf8_lossy(&output.stderr));
        return None;
    }
    Some(
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|l| l.split_once(' ').map(|(user, url)| (user.to_owned(), url.to_owned())))
            .collect(),
    )
}

/// Whether `url`'s user may consume `queue` (a refusal closes the channel: 403).
async fn may_consume(url: &str, queue: &str) -> bool {
    let connection = Connection::connect(url, ConnectionProperties::default()).await.expect("the user connects");
    let channel = connection.create_channel().await.unwrap();
    let consumed =
        channel.basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()).await;
    let _ = connection.close(200, "checked".into()).await;
    match consumed {
        Ok(_) => true,
        Err(error) => {
            assert!(error.to_string().contains("ACCESS_REFUSED"), "refused for its rights, not otherwise: {error}");
            false
        }
    }
}

#[tokio::test]
async fn each_role_reaches_only_its_own_queues() {
    let env = TestEnv::new().await;
    let prefix = env.config.amqp.prefix.clone();
    let admin = env.broker().await;
    for namespace in ["alpha", "beta"] {
        env.uses_namespace(namespace);
        admin.declare_steps(namespace).await.unwrap();
    }
    let Some(users) = script(&prefix, &["--worker", "w1=alpha"]) else {
        if std::process::Command::new("rabbitmqctl").arg("version").output().is_ok_and(|o| o.status.success()) {
            panic!("broker-users.sh failed where rabbitmqctl works");
        }
        eprintln!("rabbitmqctl is not usable here: the broker permissions are not checked");
        admin.close().await.unwrap();
        env.cleanup().await;
        return;
    };
    let url_of = |role: &str| users[&format!("{prefix}-{role}")].clone();
    let (worker_url, publisher_url) = (url_of("worker-w1"), url_of("event-publisher"));
    let topology = admin.topology().clone();

    assert!(may_consume(&worker_url, &topology.steps_queue("alpha")).await, "its own namespace");
    assert!(!may_consume(&worker_url, &topology.steps_queue("beta")).await, "another namespace");
    assert!(!may_consume(&worker_url, &topology.tasks_queue()).await, "the orchestrator's input");
    assert!(!may_consume(&publisher_url, &topology.tasks_queue()).await, "the event-publisher reads nothing");
    assert!(!may_consume(&url_of("subscriber"), &topology.tasks_queue()).await, "a subscriber reads only events");
    let connection = Connection::connect(&worker_url, ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let declared = channel
        .queue_declare(
            format!("{prefix}.steps.gamma").as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert!(declared.is_err_and(|e| e.to_string().contains("ACCESS_REFUSED")), "no queue of another namespace");
    let _ = connection.close(200, "checked".into()).await;

    // every service runs with exactly its role's rights (as docker-compose runs them), a
    // task goes through, and the subscriber's user sees its events
    let system = System::start_each(
        &env,
        |service| {
            let mut config = env.config.clone();
            config.amqp.url = match service {
                "step-worker" => worker_url.clone(),
                role => url_of(role),
            };
            config
        },
        vec![],
    )
    .await;
    let subscriber = tasker_messaging::Broker::connect(&url_of("subscriber"), topology.clone(), "subscriber")
        .await
        .expect("the subscriber's user connects");
    let mut events = subscriber.subscribe_events(&["alpha.#"]).await.expect("the subscriber binds its own queue");
    let mut config = env.config.clone();
    config.amqp.url = worker_url.clone();
    config.worker.namespaces = vec!["alpha".into()];
    config.worker.id = Some("least-privilege".into());
    let worker = Worker::bind(config, Registry::with_builtins()).await.unwrap();
    let stop = CancellationToken::new();
    let running = tokio::spawn(worker.run(stop.clone()));
    system
        .register(&env, "namespace: alpha\nname: one\nversion: 1.0.0\nsteps:\n  - { name: s, handler: echo }\n")
        .await;
    let done = system.wait_final(&system.submit("alpha", "one", json!({})).await.id).await;
    assert_eq!(done.status(), pb::TaskStatus::Complete);
    let completed =
        crate::support::collect_until(&mut events, |got| got.iter().any(|e| e.kind() == "dev.tasker.task.completed"))
            .await;
    assert!(completed.iter().all(|e| e.task_id() == done.id));
    stop.cancel();
    running.await.unwrap().unwrap();
    drop(events);
    subscriber.close().await.unwrap();
    system.stop().await;

    script(&prefix, &["--worker", "w1=alpha", "--delete"]).expect("users deleted");
    admin.close().await.unwrap();
    env.cleanup().await;
}
