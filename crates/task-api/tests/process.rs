//! Process level: the real `task-api` binary.

use tasker_test_support::{Service, TestEnv};

/// A SIGTERM is a normal stop: the process exits 0 and logs no error (lapin used to log a
/// connection error when a channel closed itself while the connection was closing: a
/// race, seen in about half of the stops, hence several rounds).
#[tokio::test]
async fn a_clean_stop_logs_no_error() {
    let env = TestEnv::new().await;
    for _ in 0..6 {
        let api = Service::start(env!("CARGO_BIN_EXE_task-api"), &env, &[], "task-api serving").await;
        let lines = api.stop_cleanly().await;
        assert!(lines.iter().any(|l| l.contains("stopped")), "{lines:#?}");
    }
    env.cleanup().await;
}

/// No secret reaches the logs or `/metrics`: a JWT secret, and passwords in the database
/// and broker URLs, with the broker unreachable so that connection failures are logged,
/// and a call refused for a bad token.
#[tokio::test]
async fn secrets_stay_out_of_logs_and_metrics() {
    let env = TestEnv::new().await;
    let jwt_secret = "jwt-secret-that-must-not-leak-0123456789";
    let db_password = "db-password-that-must-not-leak";
    let amqp_password = "amqp-password-that-must-not-leak";
    // trust auth ignores the password, so the database is still reachable with it
    let database_url = env.config.database.url.replacen("postgres@", &format!("postgres:{db_password}@"), 1);
    assert!(database_url.contains(db_password), "{database_url}");
    let amqp_url = format!("amqp://guest:{amqp_password}@127.0.0.1:1/%2f");
    let admin = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let admin_text = admin.to_string();
    let extra = [
        ("TASKER_DATABASE__URL", database_url.as_str()),
        ("TASKER_AMQP__URL", amqp_url.as_str()),
        ("TASKER_AUTH__MODE", "jwt"),
        ("TASKER_AUTH__HS256_SECRET", jwt_secret),
        ("TASKER_API__ADMIN_LISTEN", admin_text.as_str()),
        ("TASKER_LOG__FILTER", "debug,h2=info,tower=info,hyper=info"),
    ];
    let api = Service::start(env!("CARGO_BIN_EXE_task-api"), &env, &extra, "task-api serving").await;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let metrics = tasker_test_support::http_get(admin, "/metrics").await;
    let ready = tasker_test_support::http_request(admin, "/health/ready").await;
    let (_, lines) = api.terminate().await;
    assert!(
        lines.iter().any(|l| l.contains("lost the broker") || l.contains("connecting to the broker")),
        "the failure was logged"
    );
    for secret in [jwt_secret, db_password, amqp_password] {
        let leaked: Vec<&String> = lines.iter().filter(|l| l.contains(secret)).collect();
        assert!(leaked.is_empty(), "{secret} in the logs: {leaked:#?}");
        assert!(!metrics.contains(secret) && !ready.1.contains(secret), "{secret} on the admin endpoint");
    }
    env.cleanup().await;
}

/// The real binary exports its spans over OTLP with its own service name, version and
/// instance, continuing the caller's trace; what is still buffered at SIGTERM is flushed
/// before the process exits (the export interval here is far longer than the test).
#[tokio::test]
async fn spans_are_exported_as_task_api_and_flushed_at_stop() {
    use tasker_proto::v1::{
        self as pb, task_service_client::TaskServiceClient, template_service_client::TemplateServiceClient,
    };
    let env = TestEnv::new().await;
    let collector = tasker_test_support::OtlpCollector::start().await;
    let endpoint = collector.endpoint();
    let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let listen_text = listen.to_string();
    let extra = [
        ("TASKER_TELEMETRY__OTLP_ENDPOINT", endpoint.as_str()),
        ("TASKER_TELEMETRY__EXPORT_INTERVAL", "10m"),
        ("TASKER_TELEMETRY__INSTANCE", "api-under-test"),
        ("TASKER_API__LISTEN", listen_text.as_str()),
    ];
    let api = Service::start(env!("CARGO_BIN_EXE_task-api"), &env, &extra, "task-api serving").await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{listen}")).unwrap().connect().await.unwrap();
    let yaml = "namespace: exported\nname: one\nversion: 1.0.0\nsteps:\n  - { name: a, handler: echo }\n";
    TemplateServiceClient::new(channel.clone())
        .register_template(pb::RegisterTemplateRequest { yaml: yaml.into() })
        .await
        .unwrap();
    let mut request = tonic::Request::new(pb::CreateTaskRequest {
        namespace: "exported".into(),
        name: "one".into(),
        ..Default::default()
    });
    let trace_id = "5bf92f3577b34da6a3ce929d0e0e4737";
    request.metadata_mut().insert("traceparent", format!("00-{trace_id}-10f067aa0ba902b7-01").parse().unwrap());
    let task = TaskServiceClient::new(channel).create_task(request).await.unwrap().into_inner().task.unwrap();
    assert!(collector.spans().is_empty(), "nothing exported before the interval or the stop");

    api.stop_cleanly().await;
    let spans = collector.wait_for(|spans| spans.iter().any(|s| s.name == "CreateTask")).await;
    let create = spans.iter().find(|s| s.name == "CreateTask").unwrap();
    assert_eq!(create.service, "task-api");
    assert_eq!(create.resource["service.version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(create.resource["service.instance.id"], "api-under-test");
    assert_eq!((create.trace_id.as_str(), create.parent_span_id.as_str()), (trace_id, "10f067aa0ba902b7"));
    assert_eq!(create.attributes["task_id"], task.id);
    env.cleanup().await;
}
