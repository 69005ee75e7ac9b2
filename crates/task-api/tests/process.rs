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
