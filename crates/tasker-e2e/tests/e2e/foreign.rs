//! A worker written from the README's wire protocol alone, as one in another language
//! would be: a plain AMQP client (lapin here, used directly) and the protobuf messages.

use std::time::Duration;

use futures::StreamExt;
use lapin::{
    BasicProperties, Connection, ConnectionProperties,
    options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, LongString},
};
use prost::Message;
use serde_json::{Value, json};
use tasker_proto::{
    messages::{Completed, StepExecution, StepReport, step_report::Outcome},
    v1 as pb,
};
use tasker_test_support::{System, TestEnv, http_get};
use tokio::task::JoinHandle;

use crate::support::{BIG, PI};

/// The arguments the README documents for a step queue (defaults: quorum, limit 10).
fn documented_arguments(prefix: &str) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString(LongString::from("quorum")));
    args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(LongString::from(format!("{prefix}.dlx"))));
    args.insert("x-delivery-limit".into(), AMQPValue::LongInt(10));
    args
}

/// Declares `{prefix}.steps.{namespace}` with `arguments`, then serves it: each execution
/// is answered with results carrying big numbers and the context text it was given.
async fn foreign_worker(env: &TestEnv, namespace: &str, arguments: FieldTable) -> JoinHandle<()> {
    let prefix = env.config.amqp.prefix.clone();
    env.uses_namespace(namespace);
    let connection = Connection::connect(&env.config.amqp.url, ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let queue = format!("{prefix}.steps.{namespace}");
    let options = QueueDeclareOptions { durable: true, ..Default::default() };
    channel.queue_declare(queue.as_str().into(), options, arguments).await.expect("declare the step queue");
    let publish = connection.create_channel().await.unwrap();
    publish.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let mut deliveries = channel
        .basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    tokio::spawn(async move {
        let _connection = connection;
        while let Some(Ok(delivery)) = deliveries.next().await {
            let execution = StepExecution::decode(delivery.data.as_slice()).expect("a StepExecution");
            let results = format!(r#"{{"big": {BIG}, "pi": {PI}, "context_text": {}}}"#, json!(execution.context_json));
            let report = StepReport {
                task_id: execution.task_id,
                step_id: execution.step_id,
                attempt: execution.attempt,
                worker_id: "foreign-1".into(),
                outcome: Some(Outcome::Completed(Completed { results_json: results })),
                started_at_unix_ms: chrono::Utc::now().timestamp_millis(),
                trace_context: Default::default(),
            };
            let properties = BasicProperties::default().with_delivery_mode(2);
            publish
                .basic_publish(
                    "".into(),
                    format!("{prefix}.orchestrator.results").as_str().into(),
                    BasicPublishOptions { mandatory: true, ..Default::default() },
                    &report.encode_to_vec(),
                    properties,
                )
                .await
                .unwrap()
                .await
                .unwrap();
            delivery.acker.ack(BasicAckOptions::default()).await.unwrap();
        }
    })
}

async fn run_one(system: &System, env: &TestEnv, namespace: &str) -> pb::Task {
    let yaml = format!(
        "namespace: {namespace}\nname: compute\nversion: 1.0.0\nsteps:\n  - {{ name: compute, handler: py.compute }}\n"
    );
    system.register(env, &yaml).await;
    let request = pb::CreateTaskRequest {
        namespace: namespace.into(),
        name: "compute".into(),
        context_json: format!(r#"{{"amount": {BIG}, "rate": {PI}}}"#),
        ..Default::default()
    };
    let created = system.tasks().create_task(request).await.unwrap().into_inner().task.unwrap();
    let task = system.wait_final(&created.id).await;
    assert_eq!(task.status(), pb::TaskStatus::Complete, "{task:#?}");
    task
}

/// A worker that declares its queue with the documented arguments before anything was
/// ever dispatched to it gets the executions, with the context's numbers as they were
/// sent, and its own big numbers are stored and returned digit for digit.
#[tokio::test]
async fn a_foreign_worker_declaring_its_queue_first_gets_work_and_every_digit() {
    let env = TestEnv::new().await;
    let system = System::start(&env, vec![]).await;
    let worker = foreign_worker(&env, "foreign", documented_arguments(&env.config.amqp.prefix)).await;
    let task = run_one(&system, &env, "foreign").await;
    let step = &task.steps[0];
    assert!(step.results_json.contains(BIG) && step.results_json.contains(PI), "{}", step.results_json);
    let results: Value = serde_json::from_str(&step.results_json).unwrap();
    let received: Value = serde_json::from_str(results["context_text"].as_str().unwrap()).unwrap();
    assert_eq!((received["amount"].to_string(), received["rate"].to_string()), (BIG.to_owned(), PI.to_owned()));
    let metrics = http_get(system.orchestrator_admin, "/metrics").await;
    assert!(!metrics.contains("tasker_orchestrator_queue_mismatch{"), "no mismatch: {metrics}");
    worker.abort();
    system.stop().await;
    env.cleanup().await;
}

/// A step queue declared otherwise (a plain durable queue, common AMQP practice) does not
/// stall the namespace: executions still go to it, and the mismatch is raised as an alert.
#[tokio::test]
async fn a_step_queue_declared_otherwise_still_gets_work_and_raises_an_alert() {
    let env = TestEnv::new().await;
    let system = System::start(&env, vec![]).await;
    let worker = foreign_worker(&env, "plain", FieldTable::default()).await;
    let task = tokio::time::timeout(Duration::from_secs(60), run_one(&system, &env, "plain")).await.expect("no stall");
    assert_eq!(task.steps[0].status(), pb::StepStatus::Complete);
    let metrics = http_get(system.orchestrator_admin, "/metrics").await;
    let queue = format!("{}.steps.plain", env.config.amqp.prefix);
    let alert = format!("tasker_orchestrator_queue_mismatch{{queue=\"{queue}\"}} 1");
    assert!(metrics.contains(&alert), "{alert} in {metrics}");
    worker.abort();
    system.stop().await;
    env.cleanup().await;
}
