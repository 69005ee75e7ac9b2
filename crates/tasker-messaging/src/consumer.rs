use std::{collections::HashMap, marker::PhantomData};

use futures::{FutureExt, StreamExt};
use lapin::{
    Acker, Channel, Connection,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable},
};

use crate::{Error, Result, Topology};

/// Settles one delivery. Ack only once the delivery's effects are committed and what it
/// caused is confirmed.
pub struct Ack {
    acker: Acker,
}

impl Ack {
    pub async fn ack(&self) -> Result<()> {
        self.acker.ack(BasicAckOptions::default()).await?;
        Ok(())
    }

    /// Returns the delivery to the queue for another try (counts toward the delivery
    /// limit on quorum queues).
    pub async fn retry(&self) -> Result<()> {
        self.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await?;
        Ok(())
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
pub struct Consumer<T> {
    queue: String,
    inner: lapin::Consumer,
    channel: Channel,
    _kind: PhantomData<fn() -> T>,
}

impl<T: prost::Message + Default> Consumer<T> {
    pub(crate) async fn open(connection: &Connection, queue: &str, prefetch: u16) -> Result<Consumer<T>> {
        let channel = connection.create_channel().await?;
        channel.basic_qos(prefetch.max(1), BasicQosOptions::default()).await?;
        let inner = channel
            .basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await?;
        Ok(Consumer { queue: queue.to_owned(), inner, channel, _kind: PhantomData })
    }

    /// Stops consuming: deliveries not acked yet go back to the queue.
    pub async fn close(self) {
        crate::close_channel(&self.channel).await;
    }

    /// The next delivery; an error when the consumer is gone.
    pub async fn next(&mut self) -> Result<Incoming<T>> {
        match self.inner.next().await {
            Some(delivery) => Ok(decode(delivery?)),
            None => Err(Error::ConsumerClosed(self.queue.clone())),
        }
    }

    /// Waits for one delivery, then takes whatever else has already arrived, up to `max`:
    /// a batch to handle in one transaction.
    pub async fn next_batch(&mut self, max: usize) -> Result<Vec<Incoming<T>>> {
        let mut batch = vec![self.next().await?];
        while batch.len() < max {
            match self.inner.next().now_or_never() {
                Some(Some(delivery)) => batch.push(decode(delivery?)),
                Some(None) => return Err(Error::ConsumerClosed(self.queue.clone())),
                None => break,
            }
        }
        Ok(batch)
    }
}

fn decode<T: prost::Message + Default>(delivery: lapin::message::Delivery) -> Incoming<T> {
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
    Incoming {
        message: T::decode(delivery.data.as_slice()).ok(),
        redelivered: delivery.redelivered,
        headers,
        ack: Ack { acker: delivery.acker },
    }
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
