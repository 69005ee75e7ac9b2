//! Scenarios 19–20: template validation through the API, and immutable versions.

use tasker_domain::{Limits, Template};
use tasker_proto::v1 as pb;
use tasker_store::Store;
use tasker_test_support::{System, TestEnv};
use tonic::Code;

async fn register(system: &System, yaml: &str) -> Result<pb::RegisterTemplateResponse, tonic::Status> {
    system
        .templates()
        .register_template(pb::RegisterTemplateRequest { yaml: yaml.into() })
        .await
        .map(|r| r.into_inner())
}

fn with_steps(steps: &str) -> String {
    format!("namespace: tpl\nname: t\nversion: 1.0.0\nsteps:\n{steps}")
}

#[tokio::test]
async fn invalid_templates_are_refused_naming_the_problem() {
    let mut env = TestEnv::new().await;
    env.config.limits.max_steps = 3;
    env.config.limits.max_template_bytes = 2_000;
    let system = System::start(&env, vec![]).await;
    let cases = [
        (with_steps("  - { name: a, handler: noop, depends_on: [a] }\n"), Code::InvalidArgument, "cycle a -> a"),
        (
            with_steps(
                "  - { name: a, handler: noop, depends_on: [c] }\n  - { name: b, handler: noop, depends_on: [a] }\n  - { name: c, handler: noop, depends_on: [b] }\n",
            ),
            Code::InvalidArgument,
            "dependency cycle",
        ),
        (with_steps("  - { name: a, handler: noop, depends_on: [ghost] }\n"), Code::InvalidArgument, "unknown step `ghost`"),
        (with_steps("  - { name: a, handler: noop }\n  - { name: a, handler: noop }\n"), Code::InvalidArgument, "duplicate step name `a`"),
        (with_steps("  - { name: Not-Valid, handler: noop }\n"), Code::InvalidArgument, "`Not-Valid`"),
        ("namespace: Bad NS\nname: t\nversion: 1.0.0\nsteps: [{ name: a, handler: noop }]".into(), Code::InvalidArgument, "namespace"),
        ("namespace: tpl\nname: t\nversion: v1\nsteps: [{ name: a, handler: noop }]".into(), Code::InvalidArgument, "version: `v1`"),
        (
            with_steps("  - { name: a, handler: noop }\n  - { name: b, handler: noop }\n  - { name: c, handler: noop }\n  - { name: d, handler: noop }\n"),
            Code::InvalidArgument,
            "4 steps, more than the limit of 3",
        ),
        (
            "namespace: tpl\nname: t\nversion: 1.0.0\ninput_schema: { type: object, properties: { a: { type: bogus } } }\nsteps: [{ name: a, handler: noop }]".into(),
            Code::InvalidArgument,
            "input_schema",
        ),
        (format!("{}# {}\n", with_steps("  - { name: a, handler: noop }\n"), "x".repeat(2_100)), Code::ResourceExhausted, "limit"),
        ("namespace: [".into(), Code::InvalidArgument, "YAML"),
        (String::new(), Code::InvalidArgument, "yaml"),
    ];
    for (yaml, code, problem) in cases {
        let error = register(&system, &yaml).await.expect_err(&yaml);
        assert_eq!(error.code(), code, "{yaml}: {}", error.message());
        assert!(error.message().contains(problem), "{} should mention {problem}", error.message());
    }
    let listed = system.templates().list_templates(pb::ListTemplatesRequest::default()).await.unwrap().into_inner();
    assert!(listed.templates.is_empty(), "nothing registered");
    system.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn versions_are_immutable_and_identical_re_registration_is_a_no_op() {
    let env = TestEnv::new().await;
    let system = System::start(&env, vec![]).await;
    let yaml = with_steps("  - { name: a, handler: noop }\n  - { name: b, handler: noop, depends_on: [a] }\n");
    let first = register(&system, &yaml).await.unwrap();
    assert!(first.created);
    let template = first.template.unwrap();
    assert_eq!(template.steps.len(), 2);
    assert_eq!(template.steps[1].depends_on, ["a"]);
    // same meaning, different formatting: still a no-op
    let reformatted = "namespace: tpl\nname: t\nversion: 1.0.0\nsteps:\n  - name: a\n    handler: noop\n  - name: b\n    handler: noop\n    depends_on:\n      - a\n";
    let again = register(&system, reformatted).await.unwrap();
    assert!(!again.created);
    assert_eq!(again.template.unwrap().created_at, template.created_at);

    let changed = with_steps("  - { name: a, handler: noop }\n  - { name: b, handler: sleep, depends_on: [a] }\n");
    let error = register(&system, &changed).await.unwrap_err();
    assert_eq!(error.code(), Code::AlreadyExists);
    assert!(error.message().contains("tpl/t 1.0.0"), "{}", error.message());
    let stored = system
        .templates()
        .get_template(pb::GetTemplateRequest { namespace: "tpl".into(), name: "t".into(), version: "1.0.0".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.steps[1].handler, "noop", "the registered version is unchanged");
    let newer = changed.replace("version: 1.0.0", "version: 1.0.1");
    assert!(register(&system, &newer).await.unwrap().created, "a new version is fine");
    let listed = system.templates().list_templates(pb::ListTemplatesRequest::default()).await.unwrap().into_inner();
    let versions: Vec<&str> = listed.templates.iter().map(|t| t.version.as_str()).collect();
    assert_eq!(versions, ["1.0.1", "1.0.0"]);
    system.stop().await;
    env.cleanup().await;
}

/// CreateTask without a version uses the newest version registered anywhere, and checks the
/// request against that version's input schema: here a newer version is registered by
/// another replica (straight into the database), after this one has created from the older.
#[tokio::test]
async fn create_without_a_version_uses_the_newest_registered_anywhere() {
    let env = TestEnv::new().await;
    // the orchestrator declares the namespace's step queue to dispatch the tasks created
    env.uses_namespace("tpl");
    let system = System::start(&env, vec![]).await;
    let v1 = "namespace: tpl\nname: t\nversion: 1.0.0\nsteps:\n  - { name: a, handler: noop }\n";
    register(&system, v1).await.unwrap();
    let create = |version: &str, context: &str| {
        let request = pb::CreateTaskRequest {
            namespace: "tpl".into(),
            name: "t".into(),
            version: version.into(),
            context_json: context.into(),
            ..Default::default()
        };
        let mut client = system.tasks();
        async move { client.create_task(request).await.map(|r| r.into_inner().task.unwrap()) }
    };
    let shape = |task: &pb::Task| (task.version.clone(), task.steps.iter().map(|s| s.name.clone()).collect::<Vec<_>>());
    assert_eq!(shape(&create("", "{}").await.unwrap()), ("1.0.0".to_owned(), vec!["a".to_owned()]));

    let other_replica = Store::connect(&env.config.database.url, 1, tasker_store::Workload::General).await.unwrap();
    let v2 = "namespace: tpl\nname: t\nversion: 1.1.0\ninput_schema: { type: object, required: [x] }\nsteps:\n  \
        - { name: b, handler: noop }\n";
    other_replica.register_template(&Template::from_yaml(v2, &Limits::default()).unwrap()).await.unwrap();
    let refused = create("", "{}").await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("context_json") && refused.message().contains("\"x\""), "{}", refused.message());
    assert_eq!(shape(&create("", r#"{"x": 1}"#).await.unwrap()), ("1.1.0".to_owned(), vec!["b".to_owned()]));
    assert_eq!(shape(&create("1.0.0", "{}").await.unwrap()), ("1.0.0".to_owned(), vec!["a".to_owned()]));

    // and through this replica
    let v3 = "namespace: tpl\nname: t\nversion: 2.0.0\nsteps:\n  - { name: c, handler: noop }\n";
    register(&system, v3).await.unwrap();
    assert_eq!(shape(&create("", "{}").await.unwrap()), ("2.0.0".to_owned(), vec!["c".to_owned()]));
    let tasks = system.tasks().list_tasks(pb::ListTasksRequest::default()).await.unwrap().into_inner().tasks;
    assert_eq!(tasks.len(), 4, "the refused request wrote nothing");
    system.stop().await;
    env.cleanup().await;
}
