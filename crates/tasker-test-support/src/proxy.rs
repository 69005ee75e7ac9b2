//! A TCP fault proxy: services reach Postgres or RabbitMQ through it, and a test cuts
//! every connection, refuses new ones, adds latency, or goes silent, then heals — an
//! outage of the shared servers, made without restarting them (other tests keep using
//! them).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
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
    /// `true` while silent: forwarding waits for it to turn `false`.
    silence: watch::Sender<bool>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the fault proxy");
        let addr = listener.local_addr().expect("proxy address");
        let state = Arc::new(Mutex::new(State::default()));
        let silence = watch::Sender::new(false);
        let accept = tokio::spawn(accept(listener, upstream, state.clone(), silence.subscribe()));
        FaultProxy { addr, upstream, state, silence, accept }
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

    /// The server goes silent without closing anything, as behind a network partition or
    /// on a frozen host: open connections stay open but nothing more is forwarded either
    /// way, and new ones are accepted but never reach the server. Only a client's own
    /// timeouts can tell. [`FaultProxy::heal`] forwards again, on the same connections.
    pub fn silence(&self) {
        self.silence.send_replace(true);
    }

    /// Accepts and forwards again, without latency.
    pub fn heal(&self) {
        let mut state = self.state.lock().expect("proxy lock");
        state.refusing = false;
        state.latency = Duration::ZERO;
        self.silence.send_replace(false);
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

async fn accept(listener: TcpListener, upstream: SocketAddr, state: Arc<Mutex<State>>, silence: watch::Receiver<bool>) {
    while let Ok((client, _)) = listener.accept().await {
        if state.lock().expect("proxy lock").refusing {
            drop(client);
            continue;
        }
        let connection = tokio::spawn(forward(client, upstream, state.clone(), silence.clone()));
        let mut state = state.lock().expect("proxy lock");
        state.connections.retain(|c| !c.is_finished());
        state.connections.push(connection);
    }
}

/// Resolves once the proxy is not silent.
async fn heard(silence: &mut watch::Receiver<bool>) {
    let _ = silence.wait_for(|silent| !silent).await;
}

async fn forward(
    client: TcpStream,
    upstream: SocketAddr,
    state: Arc<Mutex<State>>,
    mut silence: watch::Receiver<bool>,
) {
    heard(&mut silence).await;
    let Ok(server) = TcpStream::connect(upstream).await else { return };
    if let Ok(local) = server.local_addr() {
        state.lock().expect("proxy lock").upstream_ports.push(local.port());
    }
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::select! {
        _ = pipe(client_read, server_write, state.clone(), silence.clone()) => {}
        _ = pipe(server_read, client_write, state, silence) => {}
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: Arc<Mutex<State>>,
    mut silence: watch::Receiver<bool>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        // while silent, nothing is read (it waits in the sockets' buffers) or forwarded
        heard(&mut silence).await;
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let latency = state.lock().expect("proxy lock").latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        heard(&mut silence).await;
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
        let (socket, answer) = roundtrip(socket).await.expect("forwarded again");
        assert_eq!(answer, *b"ping");

        // silent: the open connection neither answers nor closes, until healed
        proxy.silence();
        let mut socket = socket;
        socket.write_all(b"pong").await.unwrap();
        let mut buf = [0u8; 4];
        let quiet = tokio::time::timeout(Duration::from_millis(300), socket.read(&mut buf)).await;
        assert!(quiet.is_err(), "nothing answered, nothing closed: {quiet:?}");
        let waiting = TcpStream::connect(proxy.addr()).await.expect("a new connection is accepted");
        proxy.heal();
        socket.read_exact(&mut buf).await.expect("the same connection goes on");
        assert_eq!(&buf, b"pong");
        assert_eq!(roundtrip(waiting).await.expect("and the one made meanwhile reaches the server").1, *b"ping");
    }
}
