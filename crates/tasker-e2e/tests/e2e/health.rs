//! Readiness means ready: the database reachable with every migration applied, the broker
//! connected, the consumers attached; `/health/status` shows each check.

use serde_json::Value;
use tasker_test_support::{System, TestEnv, WorkerSpec, http_request, wait_status};

async fn status(addr: std::net::SocketAddr) -> (u16, Value) {
    let (code, body) = http_request(addr, "/health/status").await;
    (code, serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}")))
}

fn check<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("{name}: {status}"))
}

#[tokio::test]
async fn ready_needs_the_schema_current_and_the_consumers_attached() {
    let env = TestEnv::new().await;
    let mut system = System::start(&env, vec![WorkerSpec::new("healthy", &["health_a", "health_b"])]).await;

    let (code, orchestrator) = status(system.orchestrator_admin).await;
    assert_eq!(code, 200, "{orchestrator}");
    assert_eq!((orchestrator["ready"].as_bool(), orchestrator["live"].as_bool()), (Some(true), Some(true)));
    for name in ["database", "broker", "consumers"] {
        assert_eq!(check(&orchestrator, name)["ok"], true, "{name}: {orchestrator}");
    }
    // a worker is ready once it consumes the queue of every namespace it serves
    wait_status(system.worker_admins[0], "/health/ready", 200).await;
    let (code, worker) = status(system.worker_admins[0]).await;
    assert_eq!(code, 200, "{worker}");
    assert_eq!(check(&worker, "consumers")["ok"], true, "both namespaces consumed: {worker}");

    // connected but not consuming is not ready: a worker whose step queue exists with
    // other arguments cannot declare it, so it attaches nothing until the queue is fixed
    env.uses_namespace("health_c");
    let connection =
        lapin::Connection::connect(&env.config.amqp.url, lapin::ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let queue = format!("{}.steps.health_c", env.config.amqp.prefix);
    let durable = lapin::options::QueueDeclareOptions { durable: true, ..Default::default() };
    channel.queue_declare(queue.as_str().into(), durable, Default::default()).await.unwrap();
    system.add_worker(&env, WorkerSpec::new("blocked", &["health_c"])).await;
    let blocked = system.worker_admins[1];
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while check(&status(blocked).await.1, "broker")["ok"] != true {
        assert!(tokio::time::Instant::now() < deadline, "the worker never reached the broker");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let (code, waiting) = status(blocked).await;
    assert_eq!(code, 503, "{waiting}");
    assert_eq!(check(&waiting, "consumers")["problem"], "0 of 1 attached", "{waiting}");
    channel.queue_delete(queue.as_str().into(), Default::default()).await.unwrap();
    let _ = connection.close(200, "fixed".into()).await;
    wait_status(blocked, "/health/ready", 200).await;

    // a schema behind this build (as when a new version's replica starts before the
    // migration ran): every service with a database stops being ready, and says why
    let db = env.database().await;
    let latest: i64 = db.query_one("SELECT max(version) FROM _sqlx_migrations", &[]).await.unwrap().get(0);
    db.execute("UPDATE _sqlx_migrations SET success = false WHERE version = $1", &[&latest]).await.unwrap();
    for admin in [system.api_admin, system.orchestrator_admin, system.publisher_admin] {
        let (code, body) = http_request(admin, "/health/ready").await;
        assert_eq!(code, 503, "{body}");
        assert!(body.contains(&format!("database: 1 migration(s) not applied: [{latest}]")), "{body}");
    }
    let (code, behind) = status(system.orchestrator_admin).await;
    assert_eq!(code, 503);
    assert_eq!(behind["ready"], false);
    assert_eq!(behind["live"], true, "not ready is not dead");
    assert_eq!(check(&behind, "database")["ok"], false);
    assert!(check(&behind, "database")["problem"].as_str().unwrap().contains("not applied"));
    db.execute("UPDATE _sqlx_migrations SET success = true WHERE version = $1", &[&latest]).await.unwrap();
    for admin in [system.api_admin, system.orchestrator_admin, system.publisher_admin] {
        wait_status(admin, "/health/ready", 200).await;
    }

    system.stop().await;
    env.cleanup().await;
}
