use crate::Result;
use lapin::{
    Channel, ExchangeKind,
    options::{
        ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable, LongString},
};

/// Durable queue flavour. Quorum (replicated, with a delivery limit) is the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueType {
    #[default]
    Quorum,
    Classic,
}

impl QueueType {
    pub fn name(self) -> &'static str {
        match self {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        }
    }
}

impl std::str::FromStr for QueueType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "quorum" => Ok(QueueType::Quorum),
            "classic" => Ok(QueueType::Classic),
            other => Err(format!("unknown queue type `{other}` (quorum or classic)")),
        }
    }
}

/// Every broker name, derived from one prefix, so deployments and tests can share a broker.
#[derive(Debug, Clone)]
pub struct Topology {
    prefix: String,
    queue_type: QueueType,
    /// Deliveries of one message before it is dead-lettered (quorum queues only).
    delivery_limit: u32,
}

impl Topology {
    pub fn new(prefix: impl Into<String>, queue_type: QueueType, delivery_limit: u32) -> Topology {
        Topology { prefix: prefix.into(), queue_type, delivery_limit }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn tasks_queue(&self) -> String {
        format!("{}.orchestrator.tasks", self.prefix)
    }

    pub fn results_queue(&self) -> String {
        format!("{}.orchestrator.results", self.prefix)
    }

    pub fn steps_queue(&self, namespace: &str) -> String {
        format!("{}.steps.{namespace}", self.prefix)
    }

    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.prefix)
    }

    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.prefix)
    }

    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    pub(crate) async fn declare_queue(&self, channel: &Channel, name: &str) -> Result<()> {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), AMQPValue::LongString(LongString::from(self.queue_type.name())));
        args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(self.dead_letter_exchange().into()));
        if self.queue_type == QueueType::Quorum {
            args.insert("x-delivery-limit".into(), AMQPValue::LongInt(self.delivery_limit as i32));
        }
        let options = QueueDeclareOptions { durable: true, ..Default::default() };
        channel.queue_declare(name.into(), options, args).await?;
        Ok(())
    }

    pub(crate) async fn declare_dead_letter(&self, channel: &Channel) -> Result<()> {
        let options = ExchangeDeclareOptions { durable: true, ..Default::default() };
        channel
            .exchange_declare(self.dead_letter_exchange().into(), ExchangeKind::Fanout, options, FieldTable::default())
            .await?;
        let queue = self.dead_letter_queue();
        let options = QueueDeclareOptions { durable: true, ..Default::default() };
        channel.queue_declare(queue.as_str().into(), options, FieldTable::default()).await?;
        channel
            .queue_bind(
                queue.into(),
                self.dead_letter_exchange().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }

    pub(crate) async fn declare_events(&self, channel: &Channel) -> Result<()> {
        let options = ExchangeDeclareOptions { durable: true, ..Default::default() };
        channel
            .exchange_declare(self.events_exchange().into(), ExchangeKind::Topic, options, FieldTable::default())
            .await?;
        Ok(())
    }

    pub(crate) async fn delete(&self, channel: &Channel, namespaces: &[String]) -> Result<()> {
        let mut queues = vec![self.tasks_queue(), self.results_queue(), self.dead_letter_queue()];
        queues.extend(namespaces.iter().map(|ns| self.steps_queue(ns)));
        for queue in queues {
            channel.queue_delete(queue.into(), QueueDeleteOptions::default()).await?;
        }
        for exchange in [self.events_exchange(), self.dead_letter_exchange()] {
            channel.exchange_delete(exchange.into(), ExchangeDeleteOptions::default()).await?;
        }
        Ok(())
    }
}
