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
    let system = System::start(&env, vec![WorkerSpec::new("healthy", &["health_a", "health_b"])]).await;

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
