//! Scenarios 15–18: idempotent submission, input validation, lookup by version, and two
//! namespaces sharing a task name.

use serde_json::json;
use tasker_proto::v1 as pb;
use tasker_test_support::{System, TestEnv, WorkerSpec};
use tonic::Code;

use crate::support::*;

const REFUND: &str = r#"
namespace: payments
name: process_refund
version: 2.1.0
input_schema:
  type: object
  required: [payment_id, refund_amount]
  properties:
    payment_id: { type: string }
    refund_amount: { type: number, exclusiveMinimum: 0 }
steps:
  - { name: validate_payment_eligibility, handler: echo }
  - { name: process_gateway_refund, handler: echo, depends_on: [validate_payment_eligibility] }
"#;

const CS_REFUND: &str = r#"
namespace: customer_success
name: process_refund
version: 1.3.0
steps:
  - { name: validate_refund_request, handler: echo }
  - { name: get_manager_approval, handler: echo, depends_on: [validate_refund_request] }
  - { name: execute_refund_workflow, handler: echo, depends_on: [get_manager_approval] }
"#;

fn refund(context: serde_json::Value, key: &str) -> pb::CreateTaskRequest {
    pb::CreateTaskRequest {
        namespace: "payments".into(),
        name: "process_refund".into(),
        context_json: context.to_string(),
        idempotency_key: key.into(),
        ..Default::default()
    }
}

async fn task_count(system: &System) -> usize {
    let request = pb::ListTasksRequest { page_size: 500, ..Default::default() };
    system.tasks().list_tasks(request).await.unwrap().into_inner().tasks.len()
}

#[tokio::test]
async fn the_same_idempotency_key_returns_the_original_task() {
    let env = TestEnv::new().await;
    let system = System::start(&env, vec![WorkerSpec::new("w1", &["payments"])]).await;
    system.register(&env, REFUND).await;
    let context = json!({ "payment_id": "pay_1", "refund_amount": 10 });

    let first = system.tasks().create_task(refund(context.clone(), "refund-pay_1")).await.unwrap().into_inner();
    assert!(!first.deduplicated);
    let second = system.tasks().create_task(refund(context.clone(), "refund-pay_1")).await.unwrap().into_inner();
    assert!(second.deduplicated);
    assert_eq!(second.task.unwrap().id, first.task.as_ref().unwrap().id);

    let different = refund(json!({ "payment_id": "pay_1", "refund_amount": 11 }), "refund-pay_1");
    let error = system.tasks().create_task(different).await.unwrap_err();
    assert_eq!(error.code(), Code::AlreadyExists);
    assert!(error.message().contains("idempotency_key"), "{}", error.message());

    // two identical requests racing: one task, one of them marked deduplicated
    let race = || {
        let mut client = system.tasks();
        let request = refund(json!({ "payment_id": "pay_2", "refund_amount": 5 }), "refund-pay_2");
        async move { client.create_task(request).await.unwrap().into_inner() }
    };
    let (a, b) = tokio::join!(race(), race());
    assert_eq!(a.task.as_ref().unwrap().id, b.task.as_ref().unwrap().id);
    assert!(a.deduplicated ^ b.deduplicated, "exactly one created it");
    assert_eq!(task_count(&system).await, 2);

    let done = system.wait_final(&first.task.unwrap().id).await;
    assert_eq!(done.status(), pb::TaskStatus::Complete);
    assert_eq!(done.steps.iter().map(|s| s.attempts).sum::<u32>(), 2, "it ran once");
    system.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn bad_input_is_refused_naming_the_field_and_nothing_is_written() {
    let env = TestEnv::new().await;
    let mut env = env;
    env.config.limits.max_context_bytes = 200;
    let system = System::start(&env, vec![]).await;
    system.register(&env, REFUND).await;
    let cases = [
        (refund(json!({ "payment_id": "pay_1" }), ""), Code::InvalidArgument, "refund_amount"),
        (refund(json!({ "payment_id": "pay_1", "refund_amount": -3 }), ""), Code::InvalidArgument, "/refund_amount"),
        (refund(json!({ "payment_id": 7, "refund_amount": 3 }), ""), Code::InvalidArgument, "/payment_id"),
        (refund(json!([1, 2]), ""), Code::InvalidArgument, "context_json"),
        (
            refund(json!({ "payment_id": "x".repeat(300), "refund_amount": 1 }), ""),
            Code::ResourceExhausted,
            "context_json",
        ),
        (
            pb::CreateTaskRequest { context_json: "{nope".into(), ..refund(json!({}), "") },
            Code::InvalidArgument,
            "context_json",
        ),
        (
            pb::CreateTaskRequest { namespace: String::new(), ..refund(json!({}), "") },
            Code::InvalidArgument,
            "namespace",
        ),
        (pb::CreateTaskRequest { name: "Bad-Name".into(), ..refund(json!({}), "") }, Code::InvalidArgument, "name"),
        (pb::CreateTaskRequest { version: "2.x".into(), ..refund(json!({}), "") }, Code::InvalidArgument, "version"),
    ];
    for (request, code, field) in cases {
        let error = system.tasks().create_task(request.clone()).await.unwrap_err();
        assert_eq!(error.code(), code, "{request:?}: {}", error.message());
        assert!(error.message().contains(field), "{}: should name {field}", error.message());
    }
    assert_eq!(task_count(&system).await, 0, "nothing written");
    system.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn unknown_templates_are_not_found_and_no_version_means_the_latest() {
    let env = TestEnv::new().await;
    let system = System::start(&env, vec![WorkerSpec::new("w1", &["versions"])]).await;
    for version in ["1.2.0", "1.10.0", "1.9.3", "2.0.0-rc.1"] {
        let yaml = format!(
            "namespace: versions\nname: job\nversion: {version}\nsteps: [{{ name: s, handler: noop, config: {{ result: {{ v: \"{version}\" }} }} }}]\n"
        );
        system.register(&env, &yaml).await;
    }
    let create = |ns: &str, name: &str, version: &str| pb::CreateTaskRequest {
        namespace: ns.into(),
        name: name.into(),
        version: version.into(),
        ..Default::default()
    };
    for (ns, name, version) in [("nowhere", "job", ""), ("versions", "nothing", ""), ("versions", "job", "3.0.0")] {
        let error = system.tasks().create_task(create(ns, name, version)).await.unwrap_err();
        assert_eq!(error.code(), Code::NotFound, "{ns}/{name} {version}");
    }
    let latest = system.tasks().create_task(create("versions", "job", "")).await.unwrap().into_inner().task.unwrap();
    assert_eq!(latest.version, "1.10.0", "semver order, releases over pre-releases");
    let pinned =
        system.tasks().create_task(create("versions", "job", "1.2.0")).await.unwrap().into_inner().task.unwrap();
    assert_eq!(pinned.version, "1.2.0");
    let done = system.wait_final(&pinned.id).await;
    assert_eq!(done.steps[0].results_json, r#"{"v": "1.2.0"}"#);
    let template = system
        .templates()
        .get_template(pb::GetTemplateRequest {
            namespace: "versions".into(),
            name: "job".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(template.version, "1.10.0");
    system.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn two_namespaces_with_the_same_task_name_run_independently() {
    let env = TestEnv::new().await;
    let system = System::start(&env, vec![WorkerSpec::new("w1", &["payments", "customer_success"])]).await;
    system.register(&env, REFUND).await;
    system.register(&env, CS_REFUND).await;
    let payments = system.submit("payments", "process_refund", json!({ "payment_id": "p", "refund_amount": 1 })).await;
    let support = system.submit("customer_success", "process_refund", json!({ "ticket": 9 })).await;
    let payments = system.wait_final(&payments.id).await;
    let support = system.wait_final(&support.id).await;
    assert_eq!((payments.status(), support.status()), (pb::TaskStatus::Complete, pb::TaskStatus::Complete));
    assert_eq!((payments.version.as_str(), support.version.as_str()), ("2.1.0", "1.3.0"));
    let names = |t: &pb::Task| -> Vec<String> { t.steps.iter().map(|s| s.name.clone()).collect() };
    assert_eq!(names(&payments), ["validate_payment_eligibility", "process_gateway_refund"]);
    assert_eq!(names(&support), ["validate_refund_request", "get_manager_approval", "execute_refund_workflow"]);
    let namespaces = system.templates().list_namespaces(pb::ListNamespacesRequest {}).await.unwrap().into_inner();
    let listed: Vec<&str> = namespaces.namespaces.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(listed, ["customer_success", "payments"]);
    let only_payments = pb::ListTasksRequest { namespace: "payments".into(), ..Default::default() };
    let listed = system.tasks().list_tasks(only_payments).await.unwrap().into_inner().tasks;
    assert_eq!(listed.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(), [payments.id.as_str()]);
    assert_parents_first(&payments);
    system.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn list_tasks_pages_through_everything_newest_first() {
    let env = TestEnv::new().await;
    let system = System::start(&env, vec![]).await;
    system.register(&env, CS_REFUND).await;
    let mut created = Vec::new();
    for i in 0..7 {
        created.push(system.submit("customer_success", "process_refund", json!({ "i": i })).await.id);
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let request = pb::ListTasksRequest { page_size: 3, page_token: token.clone(), ..Default::default() };
        let page = system.tasks().list_tasks(request).await.unwrap().into_inner();
        assert!(page.tasks.len() <= 3);
        seen.extend(page.tasks);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    created.reverse();
    let ids = |tasks: &[pb::Task]| tasks.iter().map(|t| t.id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&seen), created);

    // by creation time: at or after an instant, before it, and both (nothing)
    let boundary = seen[3].created_at;
    let between =
        |created_after, created_before| pb::ListTasksRequest { created_after, created_before, ..Default::default() };
    let list = |request| async { system.tasks().list_tasks(request).await.unwrap().into_inner().tasks };
    assert_eq!(ids(&list(between(boundary, None)).await), created[..4]);
    assert_eq!(ids(&list(between(None, boundary)).await), created[4..]);
    assert!(list(between(boundary, boundary)).await.is_empty());
    // an instant a Timestamp cannot be, or a status that is none, is refused by name, not
    // read as no filter at all
    for (field, request) in [
        ("created_after", between(Some(prost_types::Timestamp { seconds: 0, nanos: 1_000_000_000 }), None)),
        ("created_before", between(None, Some(prost_types::Timestamp { seconds: i64::MAX, nanos: 0 }))),
        ("status", pb::ListTasksRequest { status: 99, ..Default::default() }),
    ] {
        let error = system.tasks().list_tasks(request).await.unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{field}");
        assert!(error.message().starts_with(&format!("{field}: ")), "{}", error.message());
    }
    let bad = pb::ListTasksRequest { page_token: "garbage".into(), ..Default::default() };
    let error = system.tasks().list_tasks(bad).await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(error.message().starts_with("page_token"));
    let pending = pb::ListTasksRequest { status: pb::TaskStatus::Complete as i32, ..Default::default() };
    assert!(
        system.tasks().list_tasks(pending).await.unwrap().into_inner().tasks.is_empty(),
        "no worker: none complete"
    );
    system.stop().await;
    env.cleanup().await;
}

/// A context of hundreds of KB (Postgres stores it compressed) reaches every handler
/// whole, and results of that size reach the children and GetTask whole: each `echo`
/// step returns the context and its parents' results, so the last step's execution
/// carries three times the context.
#[tokio::test]
async fn contexts_and_results_of_hundreds_of_kb_arrive_whole() {
    let env = TestEnv::new().await;
    let system = System::start(&env, vec![WorkerSpec::new("w1", &["customer_success"])]).await;
    system.register(&env, CS_REFUND).await;
    let items: Vec<serde_json::Value> =
        (0..4000).map(|i| json!({ "id": i, "sku": format!("sku-{}", i * 7919 % 10007), "note": "fragile" })).collect();
    let context = json!({ "order": "o-1", "amount": 123456789012345678901234567890_u128, "items": items });
    assert!(context.to_string().len() > 150_000);
    let created = system.submit("customer_success", "process_refund", context.clone()).await;
    let task = system.wait_final(&created.id).await;
    assert_eq!(task.status(), pb::TaskStatus::Complete);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&task.context_json).unwrap(), context);
    let steps = steps_by_name(&task);
    let results = |name: &str| serde_json::from_str::<serde_json::Value>(&steps[name].results_json).unwrap();
    let (first, second, third) =
        (results("validate_refund_request"), results("get_manager_approval"), results("execute_refund_workflow"));
    assert_eq!(first["context"], context);
    assert_eq!(second["context"], context);
    assert_eq!(second["parents"]["validate_refund_request"], first);
    assert_eq!(third["context"], context);
    assert_eq!(third["parents"]["get_manager_approval"], second);
    env.cleanup().await;
}
