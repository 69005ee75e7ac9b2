//! A TCP fault proxy: services reach Postgres or RabbitMQ through it, and a test cuts
//! every connection, refuses new ones, adds latency, or goes silent, then heals — an
//! outage of the shared servers, made without restarting them (other tests keep using
//! them). In front of RabbitMQ ([`FaultProxy::for_broker`]) it also reads the AMQP frames
//! and can block the connections as a resource alarm of the broker does, an alarm of the
//! shared broker itself being one that every other test would suffer.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
    task::{JoinHandle, JoinSet},
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
    /// Why the broker blocks the connections, while it does (AMQP frames only).
    block: watch::Sender<Option<String>>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        FaultProxy::listen(upstream, false).await
    }

    async fn listen(upstream: SocketAddr, frames: bool) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the fault proxy");
        let addr = listener.local_addr().expect("proxy address");
        let state = Arc::new(Mutex::new(State::default()));
        let silence = watch::Sender::new(false);
        let block = watch::Sender::new(None);
        let faults = Faults { silence: silence.subscribe(), block: frames.then(|| block.subscribe()) };
        let accept = tokio::spawn(accept(listener, upstream, state.clone(), faults));
        FaultProxy { addr, upstream, state, silence, block, accept }
    }

    /// A proxy in front of the server a URL (`postgres://…`, `amqp://…`) points at.
    pub async fn for_url(url: &str) -> FaultProxy {
        FaultProxy::start(upstream_of(url).await).await
    }

    /// A proxy in front of the broker an `amqp://` URL points at that forwards whole AMQP
    /// frames, so that it can also [`FaultProxy::block`] the connections (latency is the
    /// plain proxy's only).
    pub async fn for_broker(url: &str) -> FaultProxy {
        FaultProxy::listen(upstream_of(url).await, true).await
    }

    /// What RabbitMQ does to its connections in a resource alarm (its disk or memory past
    /// the limit): each client is told `connection.blocked` with the reason, and nothing
    /// it sends is read any more (held here, in order) but its heartbeats, which the
    /// proxy goes on sending for it (the broker does not expect them from a blocked
    /// connection; this one does not know of the block). Deliveries still come.
    /// [`FaultProxy::unblock`] tells `connection.unblocked` and forwards what was held.
    /// Only for [`FaultProxy::for_broker`]; only connections past their handshake.
    pub fn block(&self, reason: &str) {
        self.block.send_replace(Some(reason.to_owned()));
    }

    /// The alarm clears (see [`FaultProxy::block`]).
    pub fn unblock(&self) {
        self.block.send_replace(None);
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

/// What the connections read of the proxy's faults.
#[derive(Clone)]
struct Faults {
    silence: watch::Receiver<bool>,
    /// Set when the proxy forwards AMQP frames.
    block: Option<watch::Receiver<Option<String>>>,
}

async fn accept(listener: TcpListener, upstream: SocketAddr, state: Arc<Mutex<State>>, faults: Faults) {
    while let Ok((client, _)) = listener.accept().await {
        if state.lock().expect("proxy lock").refusing {
            drop(client);
            continue;
        }
        let connection = tokio::spawn(forward(client, upstream, state.clone(), faults.clone()));
        let mut state = state.lock().expect("proxy lock");
        state.connections.retain(|c| !c.is_finished());
        state.connections.push(connection);
    }
}

/// Resolves once the proxy is not silent.
async fn heard(silence: &mut watch::Receiver<bool>) {
    let _ = silence.wait_for(|silent| !silent).await;
}

async fn forward(client: TcpStream, upstream: SocketAddr, state: Arc<Mutex<State>>, faults: Faults) {
    let Faults { mut silence, block } = faults;
    heard(&mut silence).await;
    let Ok(server) = TcpStream::connect(upstream).await else { return };
    if let Ok(local) = server.local_addr() {
        state.lock().expect("proxy lock").upstream_ports.push(local.port());
    }
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    if let Some(block) = block {
        tokio::select! {
            _ = to_broker(client_read, server_write, block.clone(), silence.clone()) => {}
            _ = from_broker(server_read, client_write, block, silence) => {}
        }
        return;
    }
    tokio::select! {
        _ = pipe(client_read, server_write, state.clone(), silence.clone()) => {}
        _ = pipe(server_read, client_write, state, silence) => {}
    }
}

/// An AMQP heartbeat frame.
const HEARTBEAT: [u8; 8] = [8, 0, 0, 0, 0, 0, 0, 0xCE];

/// One whole AMQP frame (type, channel, size, payload, end), as read.
async fn read_frame(from: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Vec<u8>> {
    let mut frame = vec![0u8; 7];
    from.read_exact(&mut frame).await?;
    let size = u32::from_be_bytes([frame[3], frame[4], frame[5], frame[6]]) as usize;
    frame.resize(7 + size + 1, 0);
    from.read_exact(&mut frame[7..]).await?;
    Ok(frame)
}

/// Reads whole frames on a task of its own (a read cut short would lose part of one), into
/// a channel the forwarding loop can wait on beside its faults; the task ends with `tasks`.
fn frames_of(mut from: tokio::net::tcp::OwnedReadHalf, tasks: &mut JoinSet<()>) -> mpsc::Receiver<Vec<u8>> {
    let (sender, frames) = mpsc::channel(64);
    tasks.spawn(async move {
        while let Ok(frame) = read_frame(&mut from).await {
            if sender.send(frame).await.is_err() {
                return;
            }
        }
    });
    frames
}

/// `connection.blocked` with its reason, or `connection.unblocked`.
fn notice_frame(blocked: Option<&str>) -> Vec<u8> {
    let mut payload = vec![0, 10]; // class: connection
    match blocked {
        Some(reason) => {
            let reason = &reason.as_bytes()[..reason.len().min(255)];
            payload.extend([0, 60, reason.len() as u8]);
            payload.extend(reason);
        }
        None => payload.extend([0, 61]),
    }
    let mut frame = vec![1, 0, 0];
    frame.extend((payload.len() as u32).to_be_bytes());
    frame.extend(payload);
    frame.push(0xCE);
    frame
}

/// Writes a frame once the proxy is not silent.
async fn send(to: &mut tokio::net::tcp::OwnedWriteHalf, frame: &[u8], silence: &mut watch::Receiver<bool>) -> bool {
    heard(silence).await;
    to.write_all(frame).await.is_ok()
}

/// Client to broker: the protocol header, then frame by frame; while blocked, every frame
/// but a heartbeat is held, and a heartbeat is sent every second in the client's stead.
async fn to_broker(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut block: watch::Receiver<Option<String>>,
    mut silence: watch::Receiver<bool>,
) {
    let mut header = [0u8; 8];
    if from.read_exact(&mut header).await.is_err() || !send(&mut to, &header, &mut silence).await {
        return;
    }
    let mut tasks = JoinSet::new();
    let mut frames = frames_of(from, &mut tasks);
    let mut held: Vec<Vec<u8>> = Vec::new();
    let mut beat = tokio::time::interval(Duration::from_secs(1));
    // a connection made during a block is left alone until the next one (so that its
    // handshake goes through)
    let mut exempt = block.borrow().is_some();
    loop {
        let blocked = block.borrow_and_update().is_some();
        exempt &= blocked;
        let blocked = blocked && !exempt;
        if !blocked {
            for frame in held.drain(..) {
                if !send(&mut to, &frame, &mut silence).await {
                    return;
                }
            }
        }
        tokio::select! {
            frame = frames.recv() => {
                let Some(frame) = frame else { return };
                if blocked && frame[0] != HEARTBEAT[0] {
                    held.push(frame);
                } else if !send(&mut to, &frame, &mut silence).await {
                    return;
                }
            }
            changed = block.changed() => if changed.is_err() { return },
            _ = beat.tick(), if blocked => if !send(&mut to, &HEARTBEAT, &mut silence).await { return },
        }
    }
}

/// Broker to client: frame by frame, with `connection.blocked` / `unblocked` told between
/// frames as the block starts and ends.
async fn from_broker(
    from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut block: watch::Receiver<Option<String>>,
    mut silence: watch::Receiver<bool>,
) {
    let mut tasks = JoinSet::new();
    let mut frames = frames_of(from, &mut tasks);
    // a connection made during a block is not told of it, nor of its end (see `to_broker`)
    block.borrow_and_update();
    let mut told = false;
    loop {
        tokio::select! {
            frame = frames.recv() => {
                let Some(frame) = frame else { return };
                if !send(&mut to, &frame, &mut silence).await {
                    return;
                }
            }
            changed = block.changed() => {
                if changed.is_err() {
                    return;
                }
                let reason = block.borrow_and_update().clone();
                if reason.is_some() != told {
                    told = reason.is_some();
                    if !send(&mut to, &notice_frame(reason.as_deref()), &mut silence).await {
                        return;
                    }
                }
            }
        }
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

    /// A broker that answers each frame with the same frame (after the protocol header).
    async fn echoing_broker() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut header = [0u8; 8];
                    socket.read_exact(&mut header).await.unwrap();
                    while let Ok(frame) = read_frame(&mut socket).await {
                        socket.write_all(&frame).await.unwrap();
                    }
                });
            }
        });
        addr
    }

    /// A method frame on channel 1 with this payload.
    fn method(payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![1, 0, 1];
        frame.extend((payload.len() as u32).to_be_bytes());
        frame.extend(payload);
        frame.push(0xCE);
        frame
    }

    #[tokio::test]
    async fn blocks_a_brokers_connections_as_a_resource_alarm_does() {
        let proxy = FaultProxy::listen(echoing_broker().await, true).await;
        let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
        client.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
        client.write_all(&method(b"first")).await.unwrap();
        assert_eq!(read_frame(&mut client).await.unwrap(), method(b"first"), "forwarded both ways");

        proxy.block("low on disk");
        let told = read_frame(&mut client).await.unwrap();
        assert_eq!(told, notice_frame(Some("low on disk")));
        assert_eq!(&told[7..11], &[0, 10, 0, 60], "connection.blocked");
        assert_eq!(&told[12..told.len() - 1], b"low on disk");
        client.write_all(&method(b"held")).await.unwrap();
        // what comes back meanwhile: the heartbeats sent for the client, echoed; not the frame
        for _ in 0..2 {
            let frame = tokio::time::timeout(Duration::from_secs(3), read_frame(&mut client)).await;
            assert_eq!(frame.expect("a heartbeat within 3 s").unwrap(), HEARTBEAT);
        }
        let late = TcpStream::connect(proxy.addr()).await.unwrap();

        proxy.unblock();
        let mut after = Vec::new();
        while after.last() != Some(&method(b"held")) {
            after.push(read_frame(&mut client).await.unwrap());
        }
        after.retain(|f| *f != HEARTBEAT);
        assert_eq!(after, [notice_frame(None), method(b"held")], "unblocked, then the held frame forwarded");
        let mut late = late;
        late.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
        late.write_all(&method(b"late")).await.unwrap();
        assert_eq!(read_frame(&mut late).await.unwrap(), method(b"late"), "a connection made meanwhile works");
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
