use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    tasker_runtime::service_main("step-worker", step_worker::run).await
}
