use crate::Result;
use lapin::{
    Channel, ExchangeKind,
    options::{
        ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable, LongString},
};

/// Durable queue flavour, chosen per role (README "Queue types"): quorum queues replicate
/// and count deliveries in the broker; classic queues deliver a message before it reaches
/// the disk (it is still confirmed only once it is there), and Tasker's own consumers count
/// their deliveries instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
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

/// A queue argument's value: a long string or a signed 32-bit integer on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueArgument {
    Text(String),
    Int(i32),
}

impl std::fmt::Display for QueueArgument {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QueueArgument::Text(text) => write!(f, "{text:?}"),
            QueueArgument::Int(n) => write!(f, "{n}"),
        }
    }
}

/// Every broker name, derived from one prefix, so deployments and tests can share a broker.
#[derive(Debug, Clone)]
pub struct Topology {
    prefix: String,
    /// The step queues' type (workers in any language consume them).
    steps_type: QueueType,
    /// The type of the orchestrator's two input queues (only Tasker consumes them).
    orchestrator_type: QueueType,
    /// Times one message may come back to its queue before it is dead-lettered.
    delivery_limit: u32,
}

impl Topology {
    pub fn new(
        prefix: impl Into<String>,
        steps_type: QueueType,
        orchestrator_type: QueueType,
        delivery_limit: u32,
    ) -> Topology {
        Topology { prefix: prefix.into(), steps_type, orchestrator_type, delivery_limit }
    }

    /// The type a queue of this topology is declared with.
    pub fn queue_type(&self, queue: &str) -> QueueType {
        if queue == self.tasks_queue() || queue == self.results_queue() {
            self.orchestrator_type
        } else {
            self.steps_type
        }
    }

    /// For a queue whose consumers count deliveries themselves (a classic one): how many
    /// times a message may come back before it is dead-lettered.
    pub(crate) fn counted_by_consumer(&self, queue: &str) -> Option<u32> {
        (self.queue_type(queue) == QueueType::Classic).then_some(self.delivery_limit)
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

    /// The arguments the step queues are declared with (durable, not exclusive, not
    /// auto-deleted): a worker in another language declares its step queues with exactly
    /// these, or RabbitMQ refuses one of the two declarations (PRECONDITION_FAILED).
    pub fn queue_arguments(&self) -> Vec<(&'static str, QueueArgument)> {
        self.arguments(self.steps_type)
    }

    fn arguments(&self, queue_type: QueueType) -> Vec<(&'static str, QueueArgument)> {
        let mut args = vec![
            ("x-queue-type", QueueArgument::Text(queue_type.name().to_owned())),
            ("x-dead-letter-exchange", QueueArgument::Text(self.dead_letter_exchange())),
        ];
        if queue_type == QueueType::Quorum {
            args.push(("x-delivery-limit", QueueArgument::Int(self.delivery_limit as i32)));
        }
        args
    }

    /// [`Topology::queue_arguments`] as `durable, x-queue-type=quorum, …` for messages.
    pub fn queue_arguments_text(&self) -> String {
        let args: Vec<String> = self.queue_arguments().iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("durable, {}", args.join(", "))
    }

    pub(crate) async fn declare_queue(&self, channel: &Channel, name: &str) -> Result<()> {
        let mut args = FieldTable::default();
        for (key, value) in self.arguments(self.queue_type(name)) {
            let value = match value {
                QueueArgument::Text(text) => AMQPValue::LongString(LongString::from(text)),
                QueueArgument::Int(n) => AMQPValue::LongInt(n),
            };
            args.insert(key.into(), value);
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
