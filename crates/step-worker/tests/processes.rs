//! Process level: real `step-worker` binaries sharing a namespace, and one serving another.

use std::{collections::HashMap, process::Stdio, time::Duration};

use serde_json::{Value, json};
use tasker_proto::v1 as pb;
use tasker_test_support::{System, TestEnv};
use tokio::process::{Child, Command};

fn spawn_worker(env: &TestEnv, id: &str, namespaces: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_step-worker"))
        .env("TASKER_AMQP__URL", &env.config.amqp.url)
        .env("TASKER_AMQP__PREFIX", &env.config.amqp.prefix)
        .env("TASKER_WORKER__NAMESPACES", namespaces)
        .env("TASKER_WORKER__ID", id)
        .env("TASKER_WORKER__CONCURRENCY", "2")
        .env("TASKER_WORKER__ADMIN_LISTEN", "127.0.0.1:0")
        .env("TASKER_LOG__FILTER", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start step-worker")
}

/// SIGTERM, then wait for a clean exit.
async fn stop(mut child: Child) {
    let pid = child.id().expect("running").to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status().await;
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait()).await.expect("worker exits").unwrap();
    assert!(status.success(), "worker exited with {status}");
}

fn fanout(namespace: &str, steps: usize) -> String {
    let mut yaml = format!("namespace: {namespace}\nname: fanout\nversion: 1.0.0\nsteps:\n");
    for i in 0..steps {
        yaml.push_str(&format!("  - {{ name: s{i}, handler: sleep, config: {{ ms: 200 }} }}\n"));
    }
    yaml
}

/// Which worker ran each step, from the `started` transitions' metadata.
fn workers_by_step(task: &pb::Task) -> HashMap<String, Vec<String>> {
    task.steps
        .iter()
        .map(|s| {
            let workers = s
                .transitions
                .iter()
                .filter(|t| t.to_state == "in_progress")
                .map(|t| {
                    let meta: Value = serde_json::from_str(&t.metadata_json).unwrap();
                    meta["worker"].as_str().unwrap_or_default().to_owned()
                })
                .collect();
            (s.name.clone(), workers)
        })
        .collect()
}

#[tokio::test]
async fn workers_share_a_namespace_and_never_see_another() {
    let env = TestEnv::new().await;
    let system = System::start(&env, vec![]).await;
    system.register(&env, &fanout("alpha", 12)).await;
    system.register(&env, &fanout("beta", 4)).await;
    let workers = [
        spawn_worker(&env, "alpha-1", "[alpha]"),
        spawn_worker(&env, "alpha-2", "[alpha]"),
        spawn_worker(&env, "beta-1", "[beta]"),
    ];
    let broker = env.broker().await;
    let topology = broker.topology().clone();
    let mut consumers = (0, 0);
    for _ in 0..600 {
        consumers = (
            broker.consumer_count(&topology.steps_queue("alpha")).await.unwrap(),
            broker.consumer_count(&topology.steps_queue("beta")).await.unwrap(),
        );
        if consumers == (2, 1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(consumers, (2, 1), "the worker processes attach to their queues");

    let alpha = system.submit("alpha", "fanout", json!({})).await;
    let beta = system.submit("beta", "fanout", json!({})).await;
    let alpha = system.wait_final(&alpha.id).await;
    let beta = system.wait_final(&beta.id).await;
    assert_eq!(alpha.status(), pb::TaskStatus::Complete);
    assert_eq!(beta.status(), pb::TaskStatus::Complete);

    let alpha_workers = workers_by_step(&alpha);
    let mut used: Vec<&str> = alpha_workers.values().flatten().map(String::as_str).collect();
    used.sort_unstable();
    used.dedup();
    assert_eq!(used, ["alpha-1", "alpha-2"], "both alpha workers ran steps: {alpha_workers:?}");
    for (step, ran) in &alpha_workers {
        assert_eq!(ran.len(), 1, "{step} ran once: {ran:?}");
    }
    for (step, ran) in workers_by_step(&beta) {
        assert_eq!(ran, ["beta-1"], "{step} ran on the beta worker only");
    }
    for step in alpha.steps.iter().chain(&beta.steps) {
        assert_eq!(step.attempts, 1);
    }

    broker.close().await.unwrap();
    for worker in workers {
        stop(worker).await;
    }
    system.stop().await;
    env.cleanup().await;
}
