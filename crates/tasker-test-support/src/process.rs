//! Real service binaries for process-level tests: start one against a [`TestEnv`], stop
//! it with SIGTERM, and read what it logged.

use std::{
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncRead, BufReader},
    process::{Child, Command},
};

use crate::TestEnv;

/// A service binary running against a test's database and broker prefix.
pub struct Service {
    binary: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Service {
    /// Starts `binary` with the test's configuration (every admin and API port on an
    /// ephemeral port, plain logs) plus `extra` variables, and waits until it logs a line
    /// containing `ready`.
    pub async fn start(binary: &str, env: &TestEnv, extra: &[(&str, &str)], ready: &str) -> Service {
        let config = &env.config;
        let mut command = Command::new(binary);
        command
            .env("TASKER_DATABASE__URL", &config.database.url)
            .env("TASKER_AMQP__URL", &config.amqp.url)
            .env("TASKER_AMQP__PREFIX", &config.amqp.prefix)
            .env("TASKER_LOG__FORMAT", "json")
            .env("TASKER_LOG__FILTER", "info")
            .env_remove("RUST_LOG");
        for key in ["API__LISTEN", "API__ADMIN_LISTEN", "ORCHESTRATOR__ADMIN_LISTEN", "WORKER__ADMIN_LISTEN"] {
            command.env(format!("TASKER_{key}"), "127.0.0.1:0");
        }
        command.env("TASKER_PUBLISHER__ADMIN_LISTEN", "127.0.0.1:0");
        for (key, value) in extra {
            command.env(key, value);
        }
        Service::spawn(command, ready).await
    }

    /// Starts `command` (its output collected) and waits until it writes a line
    /// containing `ready`.
    pub async fn spawn(mut command: Command, ready: &str) -> Service {
        let binary = command.as_std().get_program().to_string_lossy().into_owned();
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("start {binary}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        collect(child.stdout.take().expect("stdout"), lines.clone());
        collect(child.stderr.take().expect("stderr"), lines.clone());
        let service = Service { binary, child, lines };
        service.wait_for_line(ready).await;
        service
    }

    /// Waits (up to 30 s) until the process has written a line containing `text`.
    pub async fn wait_for_line(&self, text: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !self.logged(text) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} wrote no line with {text:?}: {:#?}",
                self.binary,
                self.lines()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every line logged so far (stdout and stderr).
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lines lock").clone()
    }

    fn logged(&self, text: &str) -> bool {
        self.lines.lock().expect("lines lock").iter().any(|l| l.contains(text))
    }

    /// SIGKILL: the process dies on the spot, as in a crash.
    pub async fn kill(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// Waits (up to 60 s) for the process to exit by itself; returns the status and every
    /// line.
    pub async fn exited(mut self) -> (ExitStatus, Vec<String>) {
        let Ok(status) = tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await else {
            panic!("{} did not exit within 60 s: {:#?}", self.binary, self.lines());
        };
        let status = status.expect("wait for the process");
        // the readers finish with the pipes
        tokio::time::sleep(Duration::from_millis(100)).await;
        (status, self.lines())
    }

    /// SIGTERM, then waits (up to 30 s) for the exit; returns the status and every line.
    pub async fn terminate(mut self) -> (ExitStatus, Vec<String>) {
        let pid = self.child.id().expect("running").to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status().await;
        let Ok(status) = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await else {
            let lines = self.lines();
            let last = &lines[lines.len().saturating_sub(40)..];
            panic!("{} did not exit within 30 s of SIGTERM; its last lines: {last:#?}", self.binary);
        };
        let status = status.expect("wait for the service");
        // the readers finish with the pipes
        tokio::time::sleep(Duration::from_millis(100)).await;
        (status, self.lines())
    }
}

impl Service {
    /// SIGTERM, then asserts a clean stop: exit status 0 and no line logged at ERROR
    /// (the services log JSON here). Returns every line.
    pub async fn stop_cleanly(self) -> Vec<String> {
        let (status, lines) = self.terminate().await;
        assert!(status.success(), "exited with {status}: {lines:#?}");
        let errors: Vec<&String> = lines.iter().filter(|l| l.contains(r#""level":"ERROR""#)).collect();
        assert!(errors.is_empty(), "a clean stop logged errors: {errors:#?}");
        lines
    }
}

fn collect(stream: impl AsyncRead + Unpin + Send + 'static, lines: Arc<Mutex<Vec<String>>>) {
    tokio::spawn(async move {
        let mut reader = BufReader::new(stream).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            lines.lock().expect("lines lock").push(line);
        }
    });
}

/// A plain HTTP GET (an admin endpoint: `/metrics`, `/health/ready`); returns the
/// status code and the body.
pub async fn http_request(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect to the admin endpoint");
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await.expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read the response");
    let code = response.split_whitespace().nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    (code, response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default())
}

/// The body of a plain HTTP GET.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    http_request(addr, path).await.1
}

/// Polls an admin endpoint until it answers `code` (panics after 30 s).
pub async fn wait_status(addr: std::net::SocketAddr, path: &str, code: u16) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while http_request(addr, path).await.0 != code {
        assert!(tokio::time::Instant::now() < deadline, "{path} at {addr} never answered {code}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
