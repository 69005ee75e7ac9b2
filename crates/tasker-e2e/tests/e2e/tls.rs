//! TLS end to end, with a CA made at run time: task-api serving gRPC over TLS (and
//! requiring client certificates when configured), and every service reaching RabbitMQ
//! over `amqps://` and Postgres with `sslmode=verify-full` through TLS terminators in front
//! of the shared servers.

use serde_json::json;
use tasker_proto::v1::{self as pb, template_service_client::TemplateServiceClient};
use tasker_runtime::tls::ClientTls;
use tasker_test_support::{StartTls, System, TestCa, TestEnv, TlsTerminator, WorkerSpec};

const ECHO: &str = "namespace: secure\nname: pair\nversion: 1.0.0\nsteps:\n  - { name: a, handler: echo }\n  - { name: b, handler: echo, depends_on: [a] }\n";

/// What a client gets back from `ListNamespaces` on `url` with these TLS settings.
async fn list_namespaces(url: &str, tls: &ClientTls) -> Result<(), String> {
    let endpoint = tasker_runtime::tls::endpoint(url, tls).map_err(|e| format!("{e:#}"))?;
    let channel = endpoint.connect().await.map_err(|e| format!("connect: {e:?}"))?;
    TemplateServiceClient::new(channel)
        .list_namespaces(pb::ListNamespacesRequest {})
        .await
        .map(|_| ())
        .map_err(|status| format!("{status:?}"))
}

#[tokio::test]
async fn grpc_over_tls_runs_a_task_and_refuses_clients_that_do_not_trust_the_ca() {
    let env = TestEnv::new().await;
    let ca = TestCa::new("api");
    let server = ca.server("task-api");
    let mut config = env.config.clone();
    config.api.tls.cert_file = Some(server.cert_file.clone());
    config.api.tls.key_file = Some(server.key_file.clone());
    let trusting = ClientTls { ca_file: Some(ca.ca_file.clone()), ..Default::default() };
    let system =
        System::start_with_client(&env, config, vec![WorkerSpec::new("tls-worker", &["secure"])], &trusting).await;

    // the whole API works over TLS: register, create, watch it complete, read it back
    system.register(&env, ECHO).await;
    let created = system.submit("secure", "pair", json!({ "over": "tls" })).await;
    let task = system.wait_final(&created.id).await;
    assert_eq!(task.status(), pb::TaskStatus::Complete);
    assert!(task.steps.iter().all(|s| s.status() == pb::StepStatus::Complete));

    let https = format!("https://{}", system.api_addr);
    assert_eq!(list_namespaces(&https, &trusting).await, Ok(()));
    // a client trusting only the system roots does not accept the server's certificate
    let untrusting = list_namespaces(&https, &ClientTls::default()).await.expect_err("the CA is not trusted");
    assert!(untrusting.to_lowercase().contains("certificate"), "{untrusting}");
    // a client trusting another CA neither
    let other = TestCa::new("other");
    let wrong_ca = ClientTls { ca_file: Some(other.ca_file.clone()), ..Default::default() };
    assert!(list_namespaces(&https, &wrong_ca).await.is_err());
    // and plaintext HTTP/2 gets no answer from a TLS listener
    assert!(list_namespaces(&format!("http://{}", system.api_addr), &ClientTls::default()).await.is_err());

    system.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_task_api_that_requires_client_certificates_serves_only_clients_its_ca_signed() {
    let env = TestEnv::new().await;
    let ca = TestCa::new("mtls");
    let server = ca.server("task-api");
    let client = ca.client("ops-console");
    let mut config = env.config.clone();
    config.api.tls.cert_file = Some(server.cert_file.clone());
    config.api.tls.key_file = Some(server.key_file.clone());
    config.api.tls.client_ca_file = Some(ca.ca_file.clone());
    let with_cert = ClientTls {
        ca_file: Some(ca.ca_file.clone()),
        cert_file: Some(client.cert_file.clone()),
        key_file: Some(client.key_file.clone()),
    };
    let system = System::start_with_client(&env, config, vec![], &with_cert).await;
    let https = format!("https://{}", system.api_addr);

    assert_eq!(list_namespaces(&https, &with_cert).await, Ok(()));
    let without_cert = ClientTls { ca_file: Some(ca.ca_file.clone()), ..Default::default() };
    assert!(list_namespaces(&https, &without_cert).await.is_err(), "no client certificate");
    let stranger_ca = TestCa::new("stranger");
    let stranger = stranger_ca.client("stranger");
    let foreign_cert = ClientTls {
        ca_file: Some(ca.ca_file.clone()),
        cert_file: Some(stranger.cert_file.clone()),
        key_file: Some(stranger.key_file.clone()),
    };
    assert!(list_namespaces(&https, &foreign_cert).await.is_err(), "a certificate another CA signed");

    system.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn services_reach_the_broker_over_amqps_and_postgres_over_verified_tls() {
    let env = TestEnv::new().await;
    let ca = TestCa::new("servers");
    let cert = ca.server("servers");
    let postgres = TlsTerminator::for_url(&env.config.database.url, &cert, StartTls::PostgresRequest).await;
    let rabbit = TlsTerminator::for_url(&env.config.amqp.url, &cert, StartTls::Immediately).await;
    let ca_path = ca.ca_file.display().to_string();

    let mut config = env.config.clone();
    config.database.url =
        format!("{}?sslmode=verify-full&sslrootcert={ca_path}", postgres.url(&env.config.database.url));
    // the migrator connects too (over TLS; the schema is current, so it only checks)
    config.database.migrate = true;
    config.amqp.url = rabbit.url(&env.config.amqp.url).replacen("amqp://", "amqps://", 1);
    config.amqp.ca_file = Some(ca.ca_file.clone());

    // a client trusting another CA is refused by both, before anything is sent
    let other = TestCa::new("other");
    let distrusting =
        format!("{}?sslmode=require&sslrootcert={}", postgres.url(&env.config.database.url), other.ca_file.display());
    let refused = tasker_store::Store::connect(&distrusting, 1, tasker_store::Workload::General)
        .await
        .err()
        .expect("an unknown issuer is refused");
    assert!(refused.to_string().to_lowercase().contains("certificate"), "{refused}");
    let mut amqp = config.amqp.clone();
    amqp.ca_file = Some(other.ca_file.clone());
    assert!(tasker_runtime::connect_broker(&amqp, "tls-test").await.is_err());

    let system = System::start_with(&env, config, vec![WorkerSpec::new("tls-worker", &["secure"])]).await;
    system.register(&env, ECHO).await;
    let created = system.submit("secure", "pair", json!({ "n": 1 })).await;
    let task = system.wait_final(&created.id).await;
    assert_eq!(task.status(), pb::TaskStatus::Complete);
    // every service went through the terminators: four broker connections at least
    // (task-api, orchestrator, event-publisher, worker) and the database pools of the three that use one
    assert!(rabbit.handshakes() >= 4, "amqps handshakes: {}", rabbit.handshakes());
    assert!(postgres.handshakes() >= 3, "postgres TLS handshakes: {}", postgres.handshakes());

    system.stop().await;
    env.cleanup().await;
}
