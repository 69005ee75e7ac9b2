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
