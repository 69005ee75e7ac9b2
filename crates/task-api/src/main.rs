use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    tasker_runtime::service_main("task-api", task_api::run).await
}
