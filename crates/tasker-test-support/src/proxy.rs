//! A TCP fault proxy: services reach Postgres or RabbitMQ through it, and a test cuts
//! every connection, refuses new ones, adds latency, then heals — an outage of the shared
//! servers, made without restarting them (other tests keep using them).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

#[derive(Default)]
struct State {
    refusing: bool,
    latency: Duration,
    connections: Vec<JoinHandle<()>>,
    /// The local ports of the proxy's connections to the upstream, as the server sees
    /// them (e.g. to pick them out of `rabbitmqctl list_connections peer_port`).
    upstream_ports: Vec<u16>,
}

/// A proxy listening on an ephemeral loopback port, forwarding to `upstream`.
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    state: Arc<Mutex<State>>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the fault proxy");
        let addr = listener.local_addr().expect("proxy address");
        let state = Arc::new(Mutex::new(State::default()));
        let accept = tokio::spawn(accept(listener, upstream, state.clone()));
        FaultProxy { addr, upstream, state, accept }
    }

    /// A proxy in front of the server a URL (`postgres://…`, `amqp://…`) points at.
    pub async fn for_url(url: &str) -> FaultProxy {
        FaultProxy::start(upstream_of(url).await).await
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// `url` with its host and port replaced by the proxy's.
    pub fn url(&self, url: &str) -> String {
        with_addr(url, self.addr)
    }

    /// Closes every open connection (both sides see the socket close).
    pub fn cut(&self) {
        let mut state = self.state.lock().expect("proxy lock");
        state.upstream_ports.clear();
        for connection in state.connections.drain(..) {
            connection.abort();
        }
    }

    /// The ports the upstream server sees the proxied connections come from.
    pub fn upstream_ports(&self) -> Vec<u16> {
        self.state.lock().expect("proxy lock").upstream_ports.clone()
    }

    /// New connections are closed as soon as they are accepted (and open ones cut): the
    /// server is down, as far as its clients can tell.
    pub fn down(&self) {
        self.state.lock().expect("proxy lock").refusing = true;
        self.cut();
    }

    /// Every chunk of data waits this long before it is forwarded.
    pub fn latency(&self, latency: Duration) {
        self.state.lock().expect("proxy lock").latency = latency;
    }

    /// Accepts and forwards again, without latency.
    pub fn heal(&self) {
        let mut state = self.state.lock().expect("proxy lock");
        state.refusing = false;
        state.latency = Duration::ZERO;
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// The address of the server a URL (`postgres://…`, `amqp://…`) points at.
pub(crate) async fn upstream_of(url: &str) -> SocketAddr {
    let host_port = authority(url).rsplit('@').next().expect("host");
    tokio::net::lookup_host(host_port).await.expect("resolve the upstream").next().expect("an upstream address")
}

/// `url` with its host and port replaced by `addr`.
pub(crate) fn with_addr(url: &str, addr: SocketAddr) -> String {
    let authority = authority(url);
    let replaced = match authority.rsplit_once('@') {
        Some((user, _)) => format!("{user}@{addr}"),
        None => addr.to_string(),
    };
    url.replacen(authority, &replaced, 1)
}

/// The `user@host:port` part of a URL.
fn authority(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.split(['/', '?']).next().unwrap_or(rest)
}

async fn accept(listener: TcpListener, upstream: SocketAddr, state: Arc<Mutex<State>>) {
    while let Ok((client, _)) = listener.accept().await {
        if state.lock().expect("proxy lock").refusing {
            drop(client);
            continue;
        }
        let connection = tokio::spawn(forward(client, upstream, state.clone()));
        let mut state = state.lock().expect("proxy lock");
        state.connections.retain(|c| !c.is_finished());
        state.connections.push(connection);
    }
}

async fn forward(client: TcpStream, upstream: SocketAddr, state: Arc<Mutex<State>>) {
    let Ok(server) = TcpStream::connect(upstream).await else { return };
    if let Ok(local) = server.local_addr() {
        state.lock().expect("proxy lock").upstream_ports.push(local.port());
    }
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::select! {
        _ = pipe(client_read, server_write, state.clone()) => {}
        _ = pipe(server_read, client_write, state) => {}
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: Arc<Mutex<State>>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let latency = state.lock().expect("proxy lock").latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rewrites_urls_to_the_proxy() {
        let proxy = FaultProxy::start("127.0.0.1:5432".parse().unwrap()).await;
        let port = proxy.addr().port();
        assert_eq!(
            proxy.url("postgres://postgres@127.0.0.1:5432/tasker_test_1"),
            format!("postgres://postgres@127.0.0.1:{port}/tasker_test_1")
        );
        assert_eq!(
            proxy.url("amqp://guest:guest@localhost:5672/%2f"),
            format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
        );
        assert_eq!(proxy.url("amqp://127.0.0.1:5672"), format!("amqp://127.0.0.1:{port}"));
    }

    #[tokio::test]
    async fn forwards_cuts_refuses_and_heals() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = echo.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 16];
                    while let Ok(n @ 1..) = socket.read(&mut buf).await {
                        let _ = socket.write_all(&buf[..n]).await;
                    }
                });
            }
        });
        let proxy = FaultProxy::start(upstream).await;
        let roundtrip = |mut socket: TcpStream| async move {
            socket.write_all(b"ping").await.ok()?;
            let mut buf = [0u8; 4];
            socket.read_exact(&mut buf).await.ok()?;
            Some((socket, buf))
        };
        let socket = TcpStream::connect(proxy.addr()).await.unwrap();
        let (mut socket, answer) = roundtrip(socket).await.expect("forwarded");
        assert_eq!(&answer, b"ping");

        proxy.down();
        let mut buf = [0u8; 4];
        assert!(matches!(socket.read(&mut buf).await, Ok(0) | Err(_)), "the open connection was cut");
        let refused = TcpStream::connect(proxy.addr()).await.unwrap();
        assert!(roundtrip(refused).await.is_none(), "a new connection is closed at once");

        proxy.heal();
        let socket = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(roundtrip(socket).await.expect("forwarded again").1, *b"ping");
    }
}
