use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    tasker_runtime::service_main("event-publisher", event_publisher::run).await
}
