//! Tasker's RabbitMQ layer: queue and exchange names (all derived from one prefix), their
//! declaration, confirmed publishing and manual-ack consumers. Nothing outside this crate
//! speaks AMQP; services see typed messages and ack handles.
//!
//! - `{prefix}.orchestrator.tasks` — task requests (task-api → orchestrator)
//! - `{prefix}.orchestrator.results` — step reports (workers → orchestrator)
//! - `{prefix}.steps.{namespace}` — step executions (orchestrator → workers)
//! - `{prefix}.events` — topic exchange of lifecycle events
//! - `{prefix}.dead` — where messages go after the delivery limit (via `{prefix}.dlx`)

mod consumer;
mod publisher;
mod topology;

use std::time::Duration;

use futures::{Stream, StreamExt};
use lapin::{Connection, ConnectionProperties, ConnectionStatus};
use tokio::{sync::watch, task::JoinHandle};

pub use consumer::{Ack, Consumer, EventStream, Incoming, RETURNS_HEADER, ReceivedEvent};
pub use publisher::{Command, Publisher};
pub use topology::{QueueArgument, QueueType, Topology};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("amqp: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("broker refused message for `{0}` (nack)")]
    Nacked(String),
    #[error("no queue for `{0}`: message returned unroutable")]
    Unroutable(String),
    #[error("consumer of `{0}` was cancelled or its channel closed")]
    ConsumerClosed(String),
    #[error("the broker did not answer {0} within {TIMEOUT:?}")]
    Timeout(&'static str),
    #[error("the broker did not accept a connection within {CONNECT_TIMEOUT:?}")]
    ConnectTimeout,
    #[error("amqp url: {0}")]
    Url(String),
    #[error(
        "queue `{queue}` exists with other arguments than Tasker declares ({expected}): {detail}; \
         delete it, or declare it with exactly these arguments"
    )]
    Mismatch { queue: String, expected: String, detail: String },
}

/// How long any broker round trip (a declaration, a batch of confirms) may take before it
/// fails instead of hanging its caller.
pub const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How long connecting (TCP, TLS, the AMQP handshake) may take: a broker that does not
/// answer is tried again instead of hanging its service.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The heartbeat a connection asks of the broker unless its URL says otherwise
/// (`?heartbeat=N`), in seconds.
pub const DEFAULT_HEARTBEAT: u16 = 5;

/// How long closing a channel or the connection may take while the broker blocks it:
/// nothing can be written then, so the close is given up on soon (the socket closes with
/// the connection).
const CLOSE_WHILE_BLOCKED: Duration = Duration::from_secs(1);

/// What the broker has told one connection, kept by the one listener of its events.
#[derive(Debug, Clone, Default)]
struct Notices {
    /// Why the broker blocks the connection (`connection.blocked`, a resource alarm: "low
    /// on disk", "low on memory"), while it does.
    blocked: Option<String>,
    /// Errors lapin reported: the connection's, or a channel's the broker closed.
    errors: u64,
    /// The connection is lost or closed.
    lost: bool,
}

/// A connection's notices, as the round trips made on it read them.
#[derive(Clone)]
pub(crate) struct Notice(watch::Receiver<Notices>);

impl Notice {
    fn blocked(&self) -> Option<String> {
        self.0.borrow().blocked.clone()
    }

    /// Bounds a broker round trip by [`TIMEOUT`], not counting the time the broker blocks
    /// the connection: lapin writes nothing while it does (the broker reads nothing), so
    /// a round trip waiting then waits for the alarm to clear, as it should, and is not
    /// taken for a broker that does not answer (which would send its messages again, and
    /// again, for as long as the alarm lasts). Heartbeats still tell a lost broker.
    pub(crate) async fn bounded<T>(&self, what: &'static str, fut: impl Future<Output = Result<T>>) -> Result<T> {
        const SLICE: Duration = Duration::from_millis(250);
        let mut fut = std::pin::pin!(fut);
        let mut waited = Duration::ZERO;
        loop {
            match tokio::time::timeout(SLICE, fut.as_mut()).await {
                Ok(done) => return done,
                Err(_) if self.0.borrow().blocked.is_some() => {}
                Err(_) => {
                    waited += SLICE;
                    if waited >= TIMEOUT {
                        return Err(Error::Timeout(what));
                    }
                }
            }
        }
    }

    /// How long a close may take: [`TIMEOUT`], or [`CLOSE_WHILE_BLOCKED`] while blocked.
    fn close_within(&self) -> Duration {
        if self.0.borrow().blocked.is_some() { CLOSE_WHILE_BLOCKED } else { TIMEOUT }
    }
}

/// Keeps a connection's [`Notices`] from its events until it is lost. The only reader of
/// the events: lapin hands each event to one of its listeners.
async fn listen(
    events: impl Stream<Item = lapin::Event>,
    status: ConnectionStatus,
    notices: watch::Sender<Notices>,
    name: String,
) {
    let mut events = std::pin::pin!(events);
    while status.connected() {
        tokio::select! {
            event = events.next() => match event {
                Some(lapin::Event::ConnectionBlocked(reason)) => {
                    tracing::warn!(connection = name, reason,
                        "the broker blocks this connection (a resource alarm); publishing waits until it clears");
                    notices.send_modify(|n| n.blocked = Some(reason));
                }
                Some(lapin::Event::ConnectionUnblocked) => {
                    tracing::info!(connection = name, "the broker unblocked this connection");
                    notices.send_modify(|n| n.blocked = None);
                }
                // the connection's state tells whether it is the connection's own
                Some(lapin::Event::Error(_)) => notices.send_modify(|n| n.errors += 1),
                None => break,
                Some(_) => {}
            },
            // lapin reports not every close as an event
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
    notices.send_modify(|n| n.lost = true);
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Closes a channel that is still open, and waits for the broker to agree. A service
/// closes its long-lived channels this way before its connection: a channel left to close
/// itself on drop races the connection's close, and lapin then logs a connection error on
/// a perfectly clean stop.
pub(crate) async fn close_channel(channel: &lapin::Channel, notice: &Notice) {
    if channel.status().connected() {
        let _ = tokio::time::timeout(notice.close_within(), channel.close(200, "closing".into())).await;
    }
}

/// The broker refused a declaration because the entity exists with other properties.
fn is_precondition_failed(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp)
        if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)))
}

/// What a passive declare tells about a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueState {
    /// Messages waiting for a consumer (not counting those delivered and unacked).
    pub ready: u32,
    pub consumers: u32,
}

pub struct Broker {
    connection: Connection,
    topology: Topology,
    notice: Notice,
    listening: JoinHandle<()>,
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.listening.abort();
    }
}

impl Broker {
    /// Connects; `name` shows in the broker's connection list.
    pub async fn connect(url: &str, topology: Topology, name: &str) -> Result<Broker> {
        Broker::connect_trusting(url, None, DEFAULT_HEARTBEAT, topology, name).await
    }

    /// Connects, over TLS for an `amqps://` URL: the server's certificate is verified
    /// against the system roots plus `ca_pem` (PEM certificates, for a private CA).
    /// Asks for a heartbeat every `heartbeat` seconds unless the URL names one: the
    /// connection is lost, and [`Broker::closed`] resolves, once nothing at all has come
    /// from the broker for two of them (a broker that went silent closes nothing).
    pub async fn connect_trusting(
        url: &str,
        ca_pem: Option<String>,
        heartbeat: u16,
        topology: Topology,
        name: &str,
    ) -> Result<Broker> {
        let mut uri: lapin::uri::AMQPUri = url.parse().map_err(Error::Url)?;
        uri.query.heartbeat.get_or_insert(heartbeat);
        let props = ConnectionProperties::default().with_connection_name(name.to_owned().into());
        let tls = lapin::tcp::OwnedTLSConfig { identity: None, cert_chain: ca_pem };
        let connect = lapin::ConnectionBuilder::new()?.with_uri(uri).with_properties(props).with_tls_config(tls);
        let connection =
            tokio::time::timeout(CONNECT_TIMEOUT, connect.connect()).await.map_err(|_| Error::ConnectTimeout)??;
        let (notices, notice) = watch::channel(Notices::default());
        let events = connection.events_listener();
        let listening = tokio::spawn(listen(events, connection.status().clone(), notices, name.to_owned()));
        Ok(Broker { connection, topology, notice: Notice(notice), listening })
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Readiness: the connection is open.
    pub fn is_connected(&self) -> bool {
        self.connection.status().connected()
    }

    /// Resolves once the connection is lost or closed: at once on an error lapin reports
    /// from now on (the broker closed it or one of its channels, the socket died,
    /// heartbeats stopped), and within a quarter of a second of any other close.
    /// Supervisors race their loops against it, so a lost connection or a channel the
    /// broker closed under them is noticed before the next operation fails on it (a
    /// channel error before the call, such as a declaration refused and handled, is not).
    pub async fn closed(&self) {
        let mut notices = self.notice.0.clone();
        let seen = notices.borrow().errors;
        let _ = notices.wait_for(|n| n.lost || n.errors > seen).await;
    }

    /// Why the broker blocks this connection, while it does: a resource alarm (the
    /// broker's disk or memory past its limit) stops every connection that publishes.
    /// Nothing is sent meanwhile (lapin holds every frame); deliveries still come.
    pub fn blocked(&self) -> Option<String> {
        self.notice.blocked()
    }

    /// Resolves when the broker lifts a block of this connection (each time it does);
    /// never on a lost connection.
    pub async fn unblocked(&self) {
        let mut notices = self.notice.0.clone();
        let mut lost = notices.wait_for(|n| n.blocked.is_some() || n.lost).await.map_or(true, |n| n.lost);
        if !lost {
            lost = notices.wait_for(|n| n.blocked.is_none() || n.lost).await.map_or(true, |n| n.lost);
        }
        if lost {
            std::future::pending::<()>().await;
        }
    }

    /// A channel in confirm mode for publishing.
    pub async fn publisher(&self) -> Result<Publisher> {
        Publisher::open(&self.connection, self.topology.clone(), self.notice.clone()).await
    }

    /// Declares the orchestrator's input queues and the dead-letter path.
    pub async fn declare_orchestrator(&self) -> Result<()> {
        self.notice.bounded("a queue declaration", self.declare_orchestrator_now()).await
    }

    async fn declare_orchestrator_now(&self) -> Result<()> {
        let channel = self.connection.create_channel().await?;
        self.topology.declare_dead_letter(&channel).await?;
        channel.close(200, "declared".into()).await?;
        for queue in [self.topology.tasks_queue(), self.topology.results_queue()] {
            let channel = self.connection.create_channel().await?;
            match self.topology.declare_queue(&channel, &queue).await {
                // declared by an earlier version as the other type: still the orchestrator's
                // queue, and either type carries the work; the broker closed the channel
                Err(Error::Amqp(e)) if is_precondition_failed(&e) => {
                    let wanted = self.topology.queue_type(&queue).name();
                    tracing::warn!(%queue, wanted, error = %e,
                        "queue exists with other arguments; using it as it is (delete it while empty to change its type)");
                }
                Err(e) => return Err(e),
                Ok(()) => channel.close(200, "declared".into()).await?,
            }
        }
        Ok(())
    }

    /// Declares the step queue of one namespace (idempotent).
    pub async fn declare_steps(&self, namespace: &str) -> Result<()> {
        self.notice.bounded("a queue declaration", self.declare_steps_now(namespace)).await
    }

    async fn declare_steps_now(&self, namespace: &str) -> Result<()> {
        let channel = self.connection.create_channel().await?;
        self.topology.declare_dead_letter(&channel).await?;
        let queue = self.topology.steps_queue(namespace);
        match self.topology.declare_queue(&channel, &queue).await {
            // the broker closed the channel; the queue is there, just declared otherwise
            Err(Error::Amqp(e)) if is_precondition_failed(&e) => {
                Err(Error::Mismatch { expected: self.topology.queue_arguments_text(), detail: e.to_string(), queue })
            }
            Err(e) => Err(e),
            Ok(()) => {
                channel.close(200, "declared".into()).await?;
                Ok(())
            }
        }
    }

    /// Declares the events exchange (idempotent).
    pub async fn declare_events(&self) -> Result<()> {
        self.notice.bounded("an exchange declaration", self.declare_events_now()).await
    }

    async fn declare_events_now(&self) -> Result<()> {
        let channel = self.connection.create_channel().await?;
        self.topology.declare_events(&channel).await?;
        channel.close(200, "declared".into()).await?;
        Ok(())
    }

    /// Consumes a queue with manual acks and at most `prefetch` unacked deliveries.
    pub async fn consume<T: prost::Message + Default>(&self, queue: &str, prefetch: u16) -> Result<Consumer<T>> {
        let limit = self.topology.counted_by_consumer(queue);
        Consumer::open(&self.connection, queue, prefetch, limit, self.notice.clone()).await
    }

    /// Binds a private, auto-deleted queue to the events exchange with each pattern
    /// (`payments.#`, `*.*.step.failed`, …) and streams what arrives.
    pub async fn subscribe_events(&self, patterns: &[&str]) -> Result<EventStream> {
        EventStream::open(&self.connection, &self.topology, patterns).await
    }

    /// Consumers currently attached to a queue (0 when it does not exist).
    pub async fn consumer_count(&self, queue: &str) -> Result<u32> {
        Ok(self.queue_state(queue).await?.map_or(0, |q| q.consumers))
    }

    /// A queue's messages waiting for a consumer and its consumers; `None` when it does
    /// not exist.
    pub async fn queue_state(&self, queue: &str) -> Result<Option<QueueState>> {
        let channel = self.connection.create_channel().await?;
        let options = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
        let state = match channel.queue_declare(queue.into(), options, Default::default()).await {
            Ok(q) => QueueState { ready: q.message_count(), consumers: q.consumer_count() },
            Err(_) => return Ok(None), // a failed passive declare closes the channel
        };
        channel.close(200, "checked".into()).await?;
        Ok(Some(state))
    }

    /// Drops every message waiting in a queue (an operator's repair tool; tests use it to
    /// stand for a lost message). Returns how many were dropped.
    pub async fn purge(&self, queue: &str) -> Result<u32> {
        let channel = self.connection.create_channel().await?;
        let count = channel.queue_purge(queue.into(), Default::default()).await?;
        channel.close(200, "purged".into()).await?;
        Ok(count)
    }

    /// Deletes every queue and exchange this prefix uses for the given namespaces (tests
    /// and tear-downs).
    pub async fn delete_topology(&self, namespaces: &[String]) -> Result<()> {
        let channel = self.connection.create_channel().await?;
        self.topology.delete(&channel, namespaces).await?;
        channel.close(200, "deleted".into()).await?;
        Ok(())
    }

    /// Closes the connection (given up on after [`TIMEOUT`], or at once while blocked).
    pub async fn close(&self) -> Result<()> {
        if self.is_connected() {
            let closing = self.connection.close(200, "bye".into());
            tokio::time::timeout(self.notice.close_within(), closing)
                .await
                .map_err(|_| Error::Timeout("a close"))??;
        }
        Ok(())
    }
}
