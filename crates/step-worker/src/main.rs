use std::process::ExitCode;

// One thread: the built-in handlers wait, they do not compute (ARCHITECTURE.md, "One
// thread per service, but task-api").
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    tasker_runtime::service_main("step-worker", step_worker::run).await
}
