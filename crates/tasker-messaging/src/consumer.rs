use std::{collections::HashMap, marker::PhantomData};

use futures::{FutureExt, StreamExt};
use lapin::{
    Acker, BasicProperties, Channel, Connection,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable},
};

use crate::{Error, Result, Topology};

/// The header in which Tasker's consumers of a classic queue count how many times a
/// message came back to its queue (a quorum queue counts in the broker).
pub const RETURNS_HEADER: &str = "x-tasker-returns";

/// Settles one delivery. Ack only once the delivery's effects are committed and what it
/// caused is confirmed.
pub struct Ack {
    acker: Acker,
    /// Set on a classic queue: what a retry needs to count the delivery itself.
    counted: Option<Counted>,
}

/// A delivery from a classic queue, kept so that a retry can send it back counted.
struct Counted {
    channel: Channel,
    queue: String,
    data: Vec<u8>,
    properties: BasicProperties,
    returns: u32,
    limit: u32,
}

impl Ack {
    pub async fn ack(&self) -> Result<()> {
        self.acker.ack(BasicAckOptions::default()).await?;
        Ok(())
    }

    /// Returns the delivery to the queue for another try; past the delivery limit it goes
    /// to the dead-letter queue instead (counted by the broker on a quorum queue, by this
    /// consumer on a classic one).
    pub async fn retry(&self) -> Result<()> {
        match &self.counted {
            Some(counted) => counted.send_back(&self.acker).await,
            None => {
                self.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await?;
                Ok(())
            }
        }
    }

    /// Refuses the delivery for good: it goes to the dead-letter queue.
    pub async fn reject(&self) -> Result<()> {
        self.acker.nack(BasicNackOptions { requeue: false, ..Default::default() }).await?;
        Ok(())
    }
}

/// A decoded delivery and its ack handle; `message` is `None` when the payload did not
/// decode (reject it).
pub struct Incoming<T> {
    pub message: Option<T>,
    pub redelivered: bool,
    /// AMQP headers that are strings (e.g. W3C trace context).
    pub headers: HashMap<String, String>,
    pub ack: Ack,
}

/// A manual-ack consumer of protobuf messages.
///
/// On a classic queue (`limit` set), which keeps no delivery count, it counts the tries
/// itself: [`Ack::retry`] sends the message to the back of the queue with its count raised
/// in [`RETURNS_HEADER`], confirmed, and only then acks the delivery; a message retried
/// more than `limit` times is dead-lettered. A delivery returned because its channel
/// closed (an outage, a restart) is not counted: no outage counts against a message.
pub struct Consumer<T> {
    queue: String,
    inner: lapin::Consumer,
    channel: Channel,
    limit: Option<u32>,
    _kind: PhantomData<fn() -> T>,
}

impl<T: prost::Message + Default> Consumer<T> {
    pub(crate) async fn open(
        connection: &Connection,
        queue: &str,
        prefetch: u16,
        limit: Option<u32>,
    ) -> Result<Consumer<T>> {
        let channel = connection.create_channel().await?;
        if limit.is_some() {
            // counted deliveries are sent back on this channel, confirmed before the ack
            channel.confirm_select(ConfirmSelectOptions::default()).await?;
        }
        channel.basic_qos(prefetch.max(1), BasicQosOptions::default()).await?;
        let inner = channel
            .basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await?;
        Ok(Consumer { queue: queue.to_owned(), inner, channel, limit, _kind: PhantomData })
    }

    /// Stops consuming: deliveries not acked yet go back to the queue.
    pub async fn close(self) {
        crate::close_channel(&self.channel).await;
    }

    /// The next delivery; an error when the consumer is gone.
    pub async fn next(&mut self) -> Result<Incoming<T>> {
        match self.inner.next().await {
            Some(delivery) => Ok(self.accept(delivery?)),
            None => Err(Error::ConsumerClosed(self.queue.clone())),
        }
    }

    /// Waits for one delivery, then takes whatever else has already arrived, up to `max`:
    /// a batch to handle in one transaction.
    pub async fn next_batch(&mut self, max: usize) -> Result<Vec<Incoming<T>>> {
        let mut batch = vec![self.next().await?];
        while batch.len() < max {
            match self.inner.next().now_or_never() {
                Some(Some(delivery)) => batch.push(self.accept(delivery?)),
                Some(None) => return Err(Error::ConsumerClosed(self.queue.clone())),
                None => break,
            }
        }
        Ok(batch)
    }

    /// A delivery, decoded; on a classic queue with what a retry needs to count it (its
    /// body and properties moved there, not copied).
    fn accept(&self, delivery: lapin::message::Delivery) -> Incoming<T> {
        let (incoming, data, properties) = decode(delivery);
        let counted = self.limit.map(|limit| Counted {
            channel: self.channel.clone(),
            queue: self.queue.clone(),
            returns: returns_of(&properties),
            data,
            properties,
            limit,
        });
        Incoming { ack: Ack { counted, ..incoming.ack }, ..incoming }
    }
}

/// How many times a message came back to its classic queue, by Tasker's count.
fn returns_of(properties: &BasicProperties) -> u32 {
    let value = properties.headers().as_ref().and_then(|h| h.inner().get(RETURNS_HEADER).cloned());
    match value {
        Some(AMQPValue::LongUInt(n)) => n,
        Some(AMQPValue::LongInt(n)) => n.max(0) as u32,
        Some(AMQPValue::LongLongInt(n)) => n.clamp(0, i64::from(u32::MAX)) as u32,
        Some(AMQPValue::ShortUInt(n)) => u32::from(n),
        Some(AMQPValue::ShortShortUInt(n)) => u32::from(n),
        _ => 0,
    }
}

impl Counted {
    /// Sends the delivery back to the end of its classic queue with its count raised, and
    /// acks it once the copy is confirmed; past the limit it is dead-lettered instead.
    /// (Should the ack be lost, the delivery comes back too: a copy more, never one less.)
    async fn send_back(&self, acker: &Acker) -> Result<()> {
        let (queue, returns, limit) = (self.queue.as_str(), self.returns + 1, self.limit);
        if returns > limit {
            tracing::warn!(
                queue,
                returns,
                limit,
                "message came back more times than the delivery limit; dead-lettered"
            );
            acker.nack(BasicNackOptions { requeue: false, ..Default::default() }).await?;
            return Ok(());
        }
        let mut headers = self.properties.headers().clone().unwrap_or_default();
        headers.insert(RETURNS_HEADER.into(), AMQPValue::LongUInt(returns));
        let copy = self.properties.clone().with_headers(headers);
        let options = BasicPublishOptions { mandatory: true, ..Default::default() };
        let confirm = self.channel.basic_publish("".into(), queue.into(), options, &self.data, copy).await?;
        crate::bounded("a publisher confirm", crate::publisher::confirmed(confirm, queue.to_owned())).await?;
        acker.ack(BasicAckOptions::default()).await?;
        Ok(())
    }
}

/// The delivery decoded (its ack not counted yet), and its body and properties.
fn decode<T: prost::Message + Default>(delivery: lapin::message::Delivery) -> (Incoming<T>, Vec<u8>, BasicProperties) {
    let headers = delivery
        .properties
        .headers()
        .as_ref()
        .map(|table| {
            table
                .inner()
                .iter()
                .filter_map(|(k, v)| match v {
                    AMQPValue::LongString(s) => Some((k.to_string(), s.to_string())),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let message = T::decode(delivery.data.as_slice()).ok();
    let ack = Ack { acker: delivery.acker, counted: None };
    (Incoming { message, redelivered: delivery.redelivered, headers, ack }, delivery.data, delivery.properties)
}

/// A lifecycle event as received by a subscriber.
#[derive(Debug, Clone)]
pub struct ReceivedEvent {
    pub routing_key: String,
    /// The CloudEvent, JSON text.
    pub payload: String,
}

/// Events from a private queue bound to the events exchange.
pub struct EventStream {
    inner: lapin::Consumer,
    _channel: Channel,
}

impl EventStream {
    pub(crate) async fn open(connection: &Connection, topology: &Topology, patterns: &[&str]) -> Result<EventStream> {
        let channel = connection.create_channel().await?;
        topology.declare_events(&channel).await?;
        let options = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
        let queue = channel.queue_declare("".into(), options, FieldTable::default()).await?;
        for pattern in patterns {
            channel
                .queue_bind(
                    queue.name().clone(),
                    topology.events_exchange().into(),
                    (*pattern).into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        let options = BasicConsumeOptions { no_ack: true, ..Default::default() };
        let inner = channel.basic_consume(queue.name().clone(), "".into(), options, FieldTable::default()).await?;
        Ok(EventStream { inner, _channel: channel })
    }

    /// The next event; `None` when the subscription ended.
    pub async fn next(&mut self) -> Option<Result<ReceivedEvent>> {
        let delivery = self.inner.next().await?;
        Some(delivery.map_err(Error::from).map(|d| ReceivedEvent {
            routing_key: d.routing_key.to_string(),
            payload: String::from_utf8_lossy(&d.data).into_owned(),
        }))
    }
}
