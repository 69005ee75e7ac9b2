use std::process::ExitCode;

// One thread: a batch's round trips, publishes and acks are a chain of small waits, and
// on a multi-thread runtime each wake-up could hand the chain to the other thread
// (ARCHITECTURE.md, "One thread per service, but task-api").
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    tasker_runtime::service_main("orchestrator", orchestrator::run).await
}
