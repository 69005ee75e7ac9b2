use std::process::ExitCode;

// One thread: the relay is one claim, publish and delete at a time (ARCHITECTURE.md,
// "One thread per service, but task-api").
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    tasker_runtime::service_main("event-publisher", event_publisher::run).await
}
