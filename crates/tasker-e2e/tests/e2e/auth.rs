//! Authentication and authorization, against a real task-api with `auth.mode = jwt`:
//! every RPC × every kind of credential, the database unchanged by every refusal, the
//! audit trail's actor, health left open.

use std::time::Duration;

use tasker_auth::{ApiKey, Mint, Mode, sha256_hex};
use tasker_proto::v1::{
    self as pb, analytics_service_client::AnalyticsServiceClient, step_service_client::StepServiceClient,
    task_service_client::TaskServiceClient, template_service_client::TemplateServiceClient,
};
use tasker_test_support::{System, TestEnv, WorkerSpec};
use tonic::{Code, Request, Status, transport::Channel};

use crate::support::*;

const SECRET: &str = "a-test-secret-of-at-least-32-bytes!";
const TEMPLATE: &str =
    "namespace: authz\nname: target\nversion: 1.0.0\nsteps:\n  - { name: only, handler: fail, max_attempts: 1 }\n";

fn token(
    secret: &str,
    subject: &str,
    permissions: &[&str],
    namespaces: &[&str],
    issued_at: u64,
    audience: &str,
) -> String {
    let permissions: Vec<String> = permissions.iter().map(|s| (*s).to_owned()).collect();
    let namespaces: Vec<String> = namespaces.iter().map(|s| (*s).to_owned()).collect();
    tasker_auth::mint(&Mint {
        secret,
        subject,
        permissions: &permissions,
        namespaces: &namespaces,
        lifetime: Duration::from_secs(600),
        issuer: Some("tasker-test"),
        audience: Some(audience),
        issued_at,
    })
    .unwrap()
}

/// How a call identifies itself.
#[derive(Debug, Clone)]
enum Creds {
    Nothing,
    Bearer(String),
    ApiKey(&'static str),
}

fn request<T>(message: T, creds: &Creds) -> Request<T> {
    let mut request = Request::new(message);
    // the header auth ignores: only `auth.mode = none` records it
    request.metadata_mut().insert("x-tasker-actor", "mallory".parse().unwrap());
    match creds {
        Creds::Nothing => {}
        Creds::Bearer(token) => {
            request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        Creds::ApiKey(key) => {
            request.metadata_mut().insert("x-api-key", key.parse().unwrap());
        }
    }
    request
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Rpc {
    RegisterTemplate,
    GetTemplate,
    ListTemplates,
    ListNamespaces,
    CreateTask,
    GetTask,
    ListTasks,
    CancelTask,
    WatchTask,
    GetStep,
    RetryStep,
    ResolveStep,
    GetPerformance,
    GetBottlenecks,
    GetSystemHealth,
}

impl Rpc {
    /// The permission the RPC needs.
    fn permission(self) -> &'static str {
        match self {
            Rpc::RegisterTemplate => "templates:register",
            Rpc::GetTemplate | Rpc::ListTemplates | Rpc::ListNamespaces => "templates:read",
            Rpc::CreateTask => "tasks:create",
            Rpc::GetTask => "tasks:read",
            Rpc::ListTasks => "tasks:list",
            Rpc::CancelTask => "tasks:cancel",
            Rpc::WatchTask => "tasks:watch",
            Rpc::GetStep => "steps:read",
            Rpc::RetryStep => "steps:retry",
            Rpc::ResolveStep => "steps:resolve",
            Rpc::GetPerformance | Rpc::GetBottlenecks | Rpc::GetSystemHealth => "analytics:read",
        }
    }
}

const RPCS: [Rpc; 15] = [
    Rpc::RegisterTemplate,
    Rpc::GetTemplate,
    Rpc::ListTemplates,
    Rpc::ListNamespaces,
    Rpc::CreateTask,
    Rpc::GetTask,
    Rpc::ListTasks,
    Rpc::CancelTask,
    Rpc::WatchTask,
    Rpc::GetStep,
    Rpc::RetryStep,
    Rpc::ResolveStep,
    Rpc::GetPerformance,
    Rpc::GetBottlenecks,
    Rpc::GetSystemHealth,
];

/// The failed tasks the calls act on (all in namespace `authz`).
struct Targets {
    task: String,
    retry_step: String,
    resolve_step: String,
}

async fn call(channel: &Channel, rpc: Rpc, creds: &Creds, t: &Targets) -> Result<(), Status> {
    let mut templates = TemplateServiceClient::new(channel.clone());
    let mut tasks = TaskServiceClient::new(channel.clone());
    let mut steps = StepServiceClient::new(channel.clone());
    let mut analytics = AnalyticsServiceClient::new(channel.clone());
    let task_id = || t.task.clone();
    let namespace = || "authz".to_owned();
    match rpc {
        Rpc::RegisterTemplate => {
            templates.register_template(request(pb::RegisterTemplateRequest { yaml: TEMPLATE.into() }, creds)).await?;
        }
        Rpc::GetTemplate => {
            let r = pb::GetTemplateRequest { namespace: "authz".into(), name: "target".into(), version: String::new() };
            templates.get_template(request(r, creds)).await?;
        }
        Rpc::ListTemplates => {
            templates.list_templates(request(pb::ListTemplatesRequest { namespace: "authz".into() }, creds)).await?;
        }
        Rpc::ListNamespaces => {
            templates.list_namespaces(request(pb::ListNamespacesRequest {}, creds)).await?;
        }
        Rpc::CreateTask => {
            let r = pb::CreateTaskRequest { namespace: "authz".into(), name: "target".into(), ..Default::default() };
            tasks.create_task(request(r, creds)).await?;
        }
        Rpc::GetTask => {
            tasks
                .get_task(request(pb::GetTaskRequest { task_id: task_id(), include_transitions: true }, creds))
                .await?;
        }
        Rpc::ListTasks => {
            let r = pb::ListTasksRequest { namespace: "authz".into(), ..Default::default() };
            tasks.list_tasks(request(r, creds)).await?;
        }
        Rpc::CancelTask => {
            tasks.cancel_task(request(pb::CancelTaskRequest { task_id: task_id(), reason: "x".into() }, creds)).await?;
        }
        Rpc::WatchTask => {
            let mut stream =
                tasks.watch_task(request(pb::WatchTaskRequest { task_id: task_id() }, creds)).await?.into_inner();
            while stream.message().await?.is_some() {}
        }
        Rpc::GetStep => {
            let r = pb::GetStepRequest { step_id: t.retry_step.clone(), include_transitions: false };
            steps.get_step(request(r, creds)).await?;
        }
        Rpc::RetryStep => {
            let r = pb::RetryStepRequest { step_id: t.retry_step.clone(), reason: "try again".into() };
            steps.retry_step(request(r, creds)).await?;
        }
        Rpc::ResolveStep => {
            let r = pb::ResolveStepRequest {
                step_id: t.resolve_step.clone(),
                results_json: "{}".into(),
                reason: "by hand".into(),
            };
            steps.resolve_step(request(r, creds)).await?;
        }
        Rpc::GetPerformance => {
            let r = pb::PerformanceRequest { window_seconds: 600, namespace: namespace() };
            analytics.get_performance(request(r, creds)).await?;
        }
        Rpc::GetBottlenecks => {
            let r = pb::BottlenecksRequest { window_seconds: 600, namespace: namespace(), limit: 5 };
            analytics.get_bottlenecks(request(r, creds)).await?;
        }
        Rpc::GetSystemHealth => {
            analytics.get_system_health(request(pb::SystemHealthRequest { namespace: namespace() }, creds)).await?;
        }
    }
    Ok(())
}

/// What is stored, to prove a refusal wrote nothing.
async fn snapshot(env: &TestEnv) -> Vec<i64> {
    let db = env.database().await;
    let mut counts = Vec::new();
    for table in ["named_tasks", "tasks", "task_transitions", "workflow_steps", "workflow_step_transitions"] {
        counts.push(db.query_one(&format!("SELECT count(*) FROM {table}"), &[]).await.unwrap().get(0));
    }
    counts
}

#[tokio::test]
async fn every_rpc_checks_credentials_permissions_and_namespaces() {
    let env = TestEnv::new().await;
    let mut config = env.config.clone();
    config.auth.mode = Mode::Jwt;
    config.auth.hs256_secret = Some(SECRET.into());
    config.auth.issuer = Some("tasker-test".into());
    config.auth.audience = Some("tasker".into());
    config.auth.api_keys = vec![ApiKey {
        name: "ops-bot".into(),
        sha256: sha256_hex("key-ops"),
        permissions: vec!["steps:*".into()],
        namespaces: vec!["authz".into()],
    }];
    let system = System::start_with(&env, config, vec![WorkerSpec::new("w1", &["authz"])]).await;
    env.uses_namespace("authz");
    let channel = Channel::from_shared(format!("http://{}", system.api_addr)).unwrap().connect().await.unwrap();
    let now = tasker_auth::now();
    let admin = Creds::Bearer(token(SECRET, "admin", &["*"], &["*"], now, "tasker"));

    // health stays open
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let served = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();
    assert_eq!(served.into_inner().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

    // three failed tasks to act on
    call(
        &channel,
        Rpc::RegisterTemplate,
        &admin,
        &Targets { task: String::new(), retry_step: String::new(), resolve_step: String::new() },
    )
    .await
    .unwrap();
    let mut failed = Vec::new();
    for _ in 0..3 {
        let r = pb::CreateTaskRequest { namespace: "authz".into(), name: "target".into(), ..Default::default() };
        let created = TaskServiceClient::new(channel.clone()).create_task(request(r, &admin)).await.unwrap();
        let id = created.into_inner().task.unwrap().id;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let get = pb::GetTaskRequest { task_id: id.clone(), include_transitions: false };
            let task =
                TaskServiceClient::new(channel.clone()).get_task(request(get, &admin)).await.unwrap().into_inner();
            if task.status() == pb::TaskStatus::Error {
                failed.push(task);
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "task {id} did not fail");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let targets = Targets {
        task: failed[0].id.clone(),
        retry_step: failed[1].steps[0].id.clone(),
        resolve_step: failed[2].steps[0].id.clone(),
    };

    let denied = [
        ("no credentials", Creds::Nothing, Code::Unauthenticated),
        ("malformed token", Creds::Bearer("a.b.c".into()), Code::Unauthenticated),
        ("unknown API key", Creds::ApiKey("key-nope"), Code::Unauthenticated),
        (
            "wrong signature",
            Creds::Bearer(token("another-secret-of-at-least-32-bytes", "alice", &["*"], &["*"], now, "tasker")),
            Code::Unauthenticated,
        ),
        ("expired", Creds::Bearer(token(SECRET, "alice", &["*"], &["*"], now - 7200, "tasker")), Code::Unauthenticated),
        (
            "wrong audience",
            Creds::Bearer(token(SECRET, "alice", &["*"], &["*"], now, "elsewhere")),
            Code::Unauthenticated,
        ),
        // every permission but the one the RPC needs (filled in per RPC below)
        ("lacking the permission", Creds::Nothing, Code::PermissionDenied),
        (
            "other namespace",
            Creds::Bearer(token(SECRET, "alice", &["*"], &["other"], now, "tasker")),
            Code::PermissionDenied,
        ),
    ];
    let before = snapshot(&env).await;
    for (what, creds, code) in &denied {
        for rpc in RPCS {
            let lacking;
            let creds = if *what == "lacking the permission" {
                let others: Vec<&str> =
                    tasker_auth::PERMISSIONS.iter().copied().filter(|p| *p != rpc.permission()).collect();
                lacking = Creds::Bearer(token(SECRET, "alice", &others, &["*"], now, "tasker"));
                &lacking
            } else {
                creds
            };
            let result = call(&channel, rpc, creds, &targets).await;
            // listing namespaces is not refused for a narrower scope: it shows only the caller's
            if rpc == Rpc::ListNamespaces && what == &"other namespace" {
                assert!(result.is_ok(), "{rpc:?} with {what}: {result:?}");
                continue;
            }
            let status = result.expect_err(&format!("{rpc:?} with {what} was let through"));
            assert_eq!(status.code(), *code, "{rpc:?} with {what}: {status:?}");
            assert!(!status.message().contains(SECRET), "no secret in errors");
        }
    }
    assert_eq!(snapshot(&env).await, before, "no refusal wrote anything");
    let scoped = Creds::Bearer(token(SECRET, "alice", &["*"], &["other"], now, "tasker"));
    let mut templates = TemplateServiceClient::new(channel.clone());
    let listed = templates.list_namespaces(request(pb::ListNamespacesRequest {}, &scoped)).await.unwrap().into_inner();
    assert!(listed.namespaces.iter().all(|n| n.name != "authz"), "only the caller's namespaces: {listed:?}");
    let all_tasks = pb::ListTasksRequest::default();
    let mut tasks = TaskServiceClient::new(channel.clone());
    assert!(tasks.list_tasks(request(all_tasks, &scoped)).await.unwrap().into_inner().tasks.is_empty());

    // an API key with steps:* may read steps, not create tasks
    let bot = Creds::ApiKey("key-ops");
    call(&channel, Rpc::GetStep, &bot, &targets).await.unwrap();
    assert_eq!(call(&channel, Rpc::CreateTask, &bot, &targets).await.unwrap_err().code(), Code::PermissionDenied);

    // valid: each RPC goes through
    let alice = Creds::Bearer(token(
        SECRET,
        "alice",
        &["templates:*", "tasks:*", "steps:*", "analytics:read"],
        &["authz"],
        now,
        "tasker",
    ));
    for rpc in RPCS {
        call(&channel, rpc, &alice, &targets).await.unwrap_or_else(|e| panic!("{rpc:?} with a valid token: {e:?}"));
    }

    // the audit trail records the token's subject, never the header
    let get = pb::GetTaskRequest { task_id: failed[1].id.clone(), include_transitions: true };
    let retried = tasks.get_task(request(get, &admin)).await.unwrap().into_inner();
    let reset = retried.steps[0].transitions.iter().find(|t| t.to_state == "pending").expect("the retry");
    assert_eq!(metadata(reset)["actor"], "alice");
    let get = pb::GetTaskRequest { task_id: failed[2].id.clone(), include_transitions: true };
    let resolved = tasks.get_task(request(get, &admin)).await.unwrap().into_inner();
    let resolution = resolved.steps[0].transitions.iter().find(|t| t.to_state == "resolved_manually").unwrap();
    assert_eq!(metadata(resolution)["actor"], "alice");
    let get = pb::GetTaskRequest { task_id: failed[0].id.clone(), include_transitions: true };
    let first = tasks.get_task(request(get, &admin)).await.unwrap().into_inner();
    assert_eq!(metadata(&first.transitions[0])["actor"], "admin", "task creation records its subject");
    system.stop().await;
    env.cleanup().await;
}
