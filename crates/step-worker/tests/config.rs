//! Settings a worker refuses before it connects to anything.

use step_worker::{Registry, Worker};
use tasker_runtime::Config;

fn config(namespaces: &[&str], concurrency: u16) -> Config {
    let mut config = Config::default();
    config.worker.namespaces = namespaces.iter().map(|ns| (*ns).to_owned()).collect();
    config.worker.concurrency = concurrency;
    config.worker.admin_listen = ([127, 0, 0, 1], 0).into();
    config
}

/// A prefetch of 0 is no limit at all to RabbitMQ: a concurrency of 0 is refused, not
/// taken as "unbounded"; each refusal names the setting.
#[tokio::test]
async fn a_worker_needs_a_namespace_and_a_step_at_a_time() {
    for (config, setting) in [
        (config(&["payments"], 0), "worker.concurrency"),
        (config(&[], 4), "worker.namespaces"),
        (config(&["Payments"], 4), "worker.namespaces"),
    ] {
        let error = Worker::bind(config, Registry::with_builtins()).await.err().expect("refused");
        assert!(error.to_string().starts_with(setting), "{setting}: {error:#}");
    }
    assert!(Worker::bind(config(&["payments"], 1), Registry::with_builtins()).await.is_ok());
}
