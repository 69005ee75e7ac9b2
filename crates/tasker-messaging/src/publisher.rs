use std::{collections::BTreeMap, task::Poll};

use futures::future::try_join_all;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, PublisherConfirm,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::{AMQPValue, FieldTable, LongString},
};
use prost::Message;
use tasker_proto::messages::{StepExecution, StepReport, TaskRequest};

use crate::{Error, Notice, Result, Topology};

const PERSISTENT: u8 = 2;

/// A protobuf command and where it goes.
#[derive(Debug, Clone)]
pub enum Command {
    Task(TaskRequest),
    Step(StepExecution),
    Report(StepReport),
}

impl Command {
    fn route(&self, topology: &Topology) -> (String, &'static str, Vec<u8>) {
        match self {
            Command::Task(m) => (topology.tasks_queue(), "tasker.messages.v1.TaskRequest", m.encode_to_vec()),
            Command::Step(m) => {
                (topology.steps_queue(&m.namespace), "tasker.messages.v1.StepExecution", m.encode_to_vec())
            }
            Command::Report(m) => (topology.results_queue(), "tasker.messages.v1.StepReport", m.encode_to_vec()),
        }
    }

    /// Sent as AMQP headers too (W3C trace context: `traceparent`, `tracestate`).
    fn trace_context(&self) -> Option<&std::collections::HashMap<String, String>> {
        match self {
            Command::Task(m) => Some(&m.trace_context),
            Command::Step(m) => Some(&m.trace_context),
            Command::Report(m) => Some(&m.trace_context),
        }
    }
}

/// A channel in confirm mode. Cheap to clone; publishes from several tasks at once are
/// safe, each awaiting only its own confirms.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
    topology: Topology,
    notice: Notice,
}

impl Publisher {
    pub(crate) async fn open(connection: &Connection, topology: Topology, notice: Notice) -> Result<Publisher> {
        let channel = connection.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(Publisher { channel, topology, notice })
    }

    /// Whether the channel (and so its connection) is open.
    pub fn is_open(&self) -> bool {
        self.channel.status().connected()
    }

    /// Closes the channel (every clone's), before the connection closes.
    pub async fn close(&self) {
        crate::close_channel(&self.channel, &self.notice).await;
    }

    /// Publishes the commands (persistent, mandatory) back to back, then awaits every
    /// confirm together: one round trip for the batch, not one per message. Fails if any
    /// is nacked or unroutable, or unconfirmed after [`crate::TIMEOUT`] not counting the
    /// time the broker blocks the connection (a resource alarm: it then waits for the
    /// alarm to clear); the caller then must not ack its input.
    pub async fn send(&self, commands: &[Command]) -> Result<()> {
        let publishes: Vec<_> = commands
            .iter()
            .map(|command| {
                let (queue, kind, payload) = command.route(&self.topology);
                let mut props = BasicProperties::default()
                    .with_delivery_mode(PERSISTENT)
                    .with_content_type("application/x-protobuf".into())
                    .with_type(kind.into());
                if let Some(trace) = command.trace_context().filter(|t| !t.is_empty()) {
                    let mut headers = FieldTable::default();
                    for (k, v) in trace.iter().collect::<BTreeMap<_, _>>() {
                        headers.insert(k.as_str().into(), AMQPValue::LongString(LongString::from(v.as_str())));
                    }
                    props = props.with_headers(headers);
                }
                async move {
                    let options = BasicPublishOptions { mandatory: true, ..Default::default() };
                    let confirm =
                        self.channel.basic_publish("".into(), queue.as_str().into(), options, &payload, props).await?;
                    confirmed(confirm, queue).await
                }
            })
            .collect();
        pipelined(publishes, &self.notice).await
    }

    /// Publishes CloudEvents (structured JSON) on the events exchange, then awaits every
    /// confirm. Not mandatory: an event nobody subscribed to is not an error.
    /// Each event is `(event id, routing key, CloudEvent JSON)`.
    pub async fn publish_events(&self, events: &[(&str, &str, &str)]) -> Result<()> {
        let exchange = self.topology.events_exchange();
        let publishes: Vec<_> = events
            .iter()
            .map(|&(event_id, routing_key, payload)| {
                let props = BasicProperties::default()
                    .with_delivery_mode(PERSISTENT)
                    .with_content_type("application/cloudevents+json".into())
                    .with_message_id(event_id.into());
                let exchange = exchange.as_str();
                async move {
                    let options = BasicPublishOptions::default();
                    let confirm = self
                        .channel
                        .basic_publish(exchange.into(), routing_key.into(), options, payload.as_bytes(), props)
                        .await?;
                    confirmed(confirm, routing_key.to_owned()).await
                }
            })
            .collect();
        pipelined(publishes, &self.notice).await
    }

    /// Why the broker blocks this channel's connection, while it does (see
    /// [`crate::Broker::blocked`]).
    pub fn blocked(&self) -> Option<String> {
        self.notice.blocked()
    }
}

/// Starts the publishes one after another, in the given order, then awaits them all and
/// their confirms (nothing runs until then: they are futures not yet polled).
///
/// lapin completes a publish only once its I/O thread has written the frames: awaited one
/// at a time, every message cost two hand-offs between threads and a socket write of its
/// own. A publish's first poll queues its frames and takes its confirm's delivery tag, so
/// polling each once, in turn, keeps the messages in this order on the channel while the
/// I/O thread writes them together.
async fn pipelined<F: Future<Output = Result<()>>>(publishes: Vec<F>, notice: &Notice) -> Result<()> {
    let mut pending = Vec::with_capacity(publishes.len());
    for publish in publishes {
        let mut publish = Box::pin(publish);
        match futures::poll!(publish.as_mut()) {
            Poll::Ready(done) => done?,
            Poll::Pending => pending.push(publish),
        }
    }
    notice.bounded("publisher confirms", try_join_all(pending)).await?;
    Ok(())
}

pub(crate) async fn confirmed(confirm: PublisherConfirm, target: String) -> Result<()> {
    match confirm.await? {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(_returned)) => Err(Error::Unroutable(target)),
        Confirmation::Nack(_) => Err(Error::Nacked(target)),
    }
}
