use std::process::ExitCode;

// Several threads, unlike the other services: task-api serves many callers at once
// (ARCHITECTURE.md, "One thread per service, but task-api").
#[tokio::main]
async fn main() -> ExitCode {
    tasker_runtime::service_main("task-api", task_api::run).await
}
