//! The four services as separate processes, started from the release binaries.

use std::{path::PathBuf, process::Stdio, time::Duration};

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

/// task-api's gRPC port: below the kernel's ephemeral range (32768–60999 by default on
/// Linux), like the admin ports, so no outgoing connection holds it when the services are
/// started again (B8 restarts them).
pub const API_PORT: u16 = 20151;
pub const ADMIN: [(&str, u16); 3] = [("task-api", 19090), ("orchestrator", 19091), ("event-publisher", 19093)];

pub struct Services {
    bin_dir: PathBuf,
    logs: PathBuf,
    env: Vec<(String, String)>,
    core: Vec<Child>,
    workers: Vec<Child>,
    next_worker: u16,
}

impl Services {
    pub fn new(bin_dir: PathBuf, logs: PathBuf, database_url: &str, amqp_url: &str, prefix: &str) -> Services {
        let env = vec![
            ("TASKER_DATABASE__URL".into(), database_url.into()),
            ("TASKER_AMQP__URL".into(), amqp_url.into()),
            ("TASKER_AMQP__PREFIX".into(), prefix.into()),
            ("TASKER_LOG__FILTER".into(), "warn".into()),
            // B9's 10,000-step task (its template is about 700 KB)
            ("TASKER_LIMITS__MAX_STEPS".into(), "10000".into()),
            ("TASKER_LIMITS__MAX_TEMPLATE_BYTES".into(), (2 << 20).to_string()),
            ("TASKER_API__LISTEN".into(), format!("127.0.0.1:{API_PORT}")),
            ("TASKER_API__ADMIN_LISTEN".into(), format!("127.0.0.1:{}", ADMIN[0].1)),
            ("TASKER_ORCHESTRATOR__ADMIN_LISTEN".into(), format!("127.0.0.1:{}", ADMIN[1].1)),
            ("TASKER_PUBLISHER__ADMIN_LISTEN".into(), format!("127.0.0.1:{}", ADMIN[2].1)),
        ];
        Services { bin_dir, logs, env, core: Vec::new(), workers: Vec::new(), next_worker: 0 }
    }

    /// One more variable for every service.
    pub fn set(&mut self, key: &str, value: &str) {
        self.env.push((key.to_owned(), value.to_owned()));
    }

    /// task-api serves gRPC over TLS with this certificate and key.
    pub fn serve_tls(&mut self, cert: &std::path::Path, key: &std::path::Path) {
        self.env.push(("TASKER_API__TLS__CERT_FILE".into(), cert.display().to_string()));
        self.env.push(("TASKER_API__TLS__KEY_FILE".into(), key.display().to_string()));
    }

    fn spawn(&self, binary: &str, log: &str, extra: &[(String, String)]) -> anyhow::Result<Child> {
        let log = std::fs::File::create(self.logs.join(format!("{log}.log")))?;
        let mut command = Command::new(self.bin_dir.join(binary));
        command.envs(self.env.iter().cloned()).envs(extra.iter().cloned());
        command.stdout(Stdio::from(log.try_clone()?)).stderr(Stdio::from(log)).kill_on_drop(true);
        command.spawn().with_context(|| format!("starting {}", self.bin_dir.join(binary).display()))
    }

    pub async fn start_core(&mut self) -> anyhow::Result<()> {
        for (name, port) in ADMIN {
            let child = self.spawn(name, name, &[])?;
            self.core.push(child);
            wait_ready(port).await.with_context(|| format!("{name} did not become ready (see its log)"))?;
        }
        Ok(())
    }

    /// Starts `n` worker processes serving `namespaces` with `concurrency` each.
    pub async fn start_workers(&mut self, n: usize, namespaces: &str, concurrency: u16) -> anyhow::Result<()> {
        for _ in 0..n {
            let port = 19100 + self.next_worker;
            let id = format!("bench-worker-{}", self.next_worker);
            self.next_worker += 1;
            let extra = vec![
                ("TASKER_WORKER__NAMESPACES".to_owned(), namespaces.to_owned()),
                ("TASKER_WORKER__CONCURRENCY".to_owned(), concurrency.to_string()),
                ("TASKER_WORKER__ID".to_owned(), id.clone()),
                ("TASKER_WORKER__ADMIN_LISTEN".to_owned(), format!("127.0.0.1:{port}")),
            ];
            self.workers.push(self.spawn("step-worker", &id, &extra)?);
            wait_ready(port).await.with_context(|| format!("{id} did not become ready"))?;
        }
        Ok(())
    }

    /// How many worker processes run now (a mark for [`Services::stop_workers_from`]).
    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// Stops the workers started after `mark`, leaving the earlier ones running.
    pub async fn stop_workers_from(&mut self, mark: usize) {
        for child in self.workers.drain(mark.min(self.workers.len())..) {
            terminate(child).await;
        }
    }

    /// Stops every process and starts the core again on another database (B8 moves
    /// between the history and an empty database); the workers are the caller's to start.
    pub async fn restart_core_on(&mut self, database_url: &str) -> anyhow::Result<()> {
        self.stop_all().await;
        for (key, value) in &mut self.env {
            if key == "TASKER_DATABASE__URL" {
                database_url.clone_into(value);
            }
        }
        self.start_core().await
    }

    pub async fn stop(mut self) {
        self.stop_all().await;
    }

    async fn stop_all(&mut self) {
        self.stop_workers_from(0).await;
        for child in self.core.drain(..).rev() {
            terminate(child).await;
        }
    }
}

async fn terminate(mut child: Child) {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await;
    }
    if tokio::time::timeout(Duration::from_secs(15), child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

pub async fn wait_ready(port: u16) -> anyhow::Result<()> {
    let url = format!("http://127.0.0.1:{port}/health/ready");
    for _ in 0..200 {
        if let Ok(r) = reqwest::get(&url).await
            && r.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{url} never answered 200")
}

/// Prometheus text of a service's `/metrics`.
pub async fn metrics(port: u16) -> anyhow::Result<String> {
    Ok(reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await?.text().await?)
}
