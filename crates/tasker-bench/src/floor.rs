//! The floor under B1 and B2, measured in the same run: the round trips, commits and
//! broker hops a 4-step linear task makes, made by the bench itself with no work in them.
//!
//! One skeleton task is: a committed write (the create) and its request through the
//! orchestrator's tasks queue; five batches, each (decided from the task as the
//! orchestrator keeps it, the first from the task as its request tells it) one round trip
//! that begins, locks, updates and commits; after each of the first four, an execution
//! through a step queue (confirmed) and a report back through the results queue; after the
//! last, a wake-up (`NOTIFY`, delivered to a listening connection), the relay's claim (a
//! round trip) and one event through the events exchange to a subscriber. The queues have
//! the types the services were given. Everything a real task does beyond that (the gRPC
//! call, the rows and indexes written, the decisions, serialization, other processes'
//! wake-ups) is what the services add above this floor.

use std::time::{Duration, Instant};

use anyhow::Context;
use futures::{StreamExt, TryFutureExt};
use tasker_messaging::{Broker, Command, EventStream, QueueType, Topology};
use tasker_proto::messages::{StepExecution, StepReport, TaskRequest};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls, Statement};

use crate::stats::Latencies;

const PREFIX: &str = "bench-floor";
const NAMESPACE: &str = "floor";
const CHANNEL: &str = "bench_floor";
/// The relay's wake-up as the services send it: a transaction of its own, committed
/// asynchronously, right behind the batch's commit.
const WAKE: &str = "BEGIN; SET LOCAL synchronous_commit = off; NOTIFY bench_floor; COMMIT";

/// Where the skeleton runs: the bench's database and broker, with the queue types the
/// services were given.
#[derive(Clone)]
pub struct Setup {
    pub database_url: String,
    pub amqp_url: String,
    pub step_queues: QueueType,
    pub orchestrator_queues: QueueType,
}

/// One report→dispatch hop of the skeleton, by part.
struct Hop {
    trip: Duration,
    publish: Duration,
}

/// What [`measure`] found.
pub struct Floor {
    /// One skeleton task, start to the subscriber's receipt of its last event.
    pub task: Latencies,
    /// Report received → the next execution confirmed (batches 2–4 of each task).
    pub hop: Latencies,
    /// The hop's parts: its round trip (`BEGIN`, the lock, the update, `COMMIT`), the
    /// execution published and confirmed.
    pub trip: Latencies,
    pub publish: Latencies,
    /// Each of the four executions of each task, from its batch's start to its delivery
    /// to the step queue's consumer: the part of a step's queue wait that is the
    /// database's and the broker's.
    pub wait: Latencies,
}

/// Runs `tasks` skeleton tasks one after another and times them.
pub async fn measure(setup: &Setup, tasks: usize) -> anyhow::Result<Floor> {
    let topology = Topology::new(PREFIX, setup.step_queues, setup.orchestrator_queues, 10);
    let broker = Broker::connect(&setup.amqp_url, topology, "tasker-bench-floor").await?;
    let result = async {
        let mut probe = Probe::open(&setup.database_url, &broker).await?;
        // warm up: connections, plans, queues
        probe.task().await?;
        let mut floor = Floor {
            task: Latencies::new(),
            hop: Latencies::new(),
            trip: Latencies::new(),
            publish: Latencies::new(),
            wait: Latencies::new(),
        };
        for _ in 0..tasks {
            let (took, hops, waits) = probe.task().await?;
            floor.task.record(took);
            for wait in waits {
                floor.wait.record(wait);
            }
            for hop in hops {
                floor.hop.record(hop.trip + hop.publish);
                floor.trip.record(hop.trip);
                floor.publish.record(hop.publish);
            }
        }
        probe.close().await?;
        anyhow::Ok(floor)
    }
    .await;
    broker.delete_topology(&[NAMESPACE.to_owned()]).await?;
    broker.close().await?;
    result
}

/// The connections and queues of the skeleton.
struct Probe {
    db: Client,
    relay: Client,
    _listener: Client,
    notified: mpsc::UnboundedReceiver<()>,
    begin: Statement,
    lock: Statement,
    update: Statement,
    commit: Statement,
    claim_begin: Statement,
    claim_lock: Statement,
    claim_read: Statement,
    claim_end: Statement,
    publisher: tasker_messaging::Publisher,
    tasks: tasker_messaging::Consumer<TaskRequest>,
    steps: tasker_messaging::Consumer<StepExecution>,
    results: tasker_messaging::Consumer<StepReport>,
    events: EventStream,
}

impl Probe {
    async fn open(database_url: &str, broker: &Broker) -> anyhow::Result<Probe> {
        let (db, connection) = tokio_postgres::connect(database_url, NoTls).await?;
        tokio::spawn(connection);
        let (relay, connection) = tokio_postgres::connect(database_url, NoTls).await?;
        tokio::spawn(connection);
        let (listener, mut connection) = tokio_postgres::connect(database_url, NoTls).await?;
        let (tx, notified) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(Ok(message)) = messages.next().await {
                if matches!(message, AsyncMessage::Notification(_)) && tx.send(()).is_err() {
                    break;
                }
            }
        });
        listener.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
        db.batch_execute(
            "DROP TABLE IF EXISTS bench_floor_probe; \
             CREATE TABLE bench_floor_probe (id int PRIMARY KEY, n int8 NOT NULL); \
             INSERT INTO bench_floor_probe VALUES (1, 0)",
        )
        .await?;
        broker.declare_orchestrator().await?;
        broker.declare_steps(NAMESPACE).await?;
        let topology = broker.topology();
        let probe = Probe {
            begin: db.prepare("BEGIN").await?,
            lock: db.prepare("SELECT n FROM bench_floor_probe WHERE id = 1 FOR UPDATE").await?,
            update: db.prepare("UPDATE bench_floor_probe SET n = n + 1 WHERE id = 1").await?,
            commit: db.prepare("COMMIT").await?,
            claim_begin: relay.prepare("BEGIN").await?,
            claim_lock: relay.prepare("SELECT pg_try_advisory_xact_lock(42)").await?,
            claim_read: relay.prepare("SELECT n FROM bench_floor_probe WHERE id = 1").await?,
            claim_end: relay.prepare("COMMIT").await?,
            publisher: broker.publisher().await?,
            tasks: broker.consume(&topology.tasks_queue(), 1).await?,
            steps: broker.consume(&topology.steps_queue(NAMESPACE), 1).await?,
            results: broker.consume(&topology.results_queue(), 1).await?,
            events: broker.subscribe_events(&[&format!("{NAMESPACE}.#")]).await?,
            db,
            relay,
            _listener: listener,
            notified,
        };
        Ok(probe)
    }

    /// One skeleton task: how long it took, its report→dispatch hops, and each execution's
    /// wait from its batch's start to its delivery.
    async fn task(&mut self) -> anyhow::Result<(Duration, Vec<Hop>, Vec<Duration>)> {
        let start = Instant::now();
        // the create: one statement, committed
        self.db.execute(&self.update, &[]).await?;
        let request = Command::Task(TaskRequest { task_id: "floor".into(), ..Default::default() });
        let (_, incoming) = futures::try_join!(
            self.publisher.send(std::slice::from_ref(&request)).map_err(anyhow::Error::from),
            self.tasks.next().map_err(anyhow::Error::from),
        )?;
        incoming.ack.ack().await?;
        let (mut hops, mut waits) = (Vec::new(), Vec::new());
        for step in 0..4 {
            let batch_start = Instant::now();
            let trip = self.batch(false).await?;
            let committed = Instant::now();
            let execution = Command::Step(StepExecution { namespace: NAMESPACE.into(), ..Default::default() });
            let (confirmed, (incoming, delivered)) = futures::try_join!(
                self.publisher
                    .send(std::slice::from_ref(&execution))
                    .map_ok(|()| Instant::now())
                    .map_err(anyhow::Error::from),
                self.steps.next().map_ok(|incoming| (incoming, Instant::now())).map_err(anyhow::Error::from),
            )?;
            waits.push(delivered - batch_start);
            if step > 0 {
                hops.push(Hop { trip, publish: confirmed - committed });
            }
            let report = Command::Report(StepReport::default());
            let (_, reported) = futures::try_join!(
                self.publisher.send(std::slice::from_ref(&report)).map_err(anyhow::Error::from),
                self.results.next().map_err(anyhow::Error::from),
            )?;
            // the acks are off the path (each is sent after its effects, not before them)
            incoming.ack.ack().await?;
            reported.ack.ack().await?;
        }
        self.batch(true).await?;
        // the relay: woken, claims (one round trip), publishes, the subscriber has it
        self.notified.recv().await.context("the listener stopped")?;
        futures::try_join!(
            self.relay.execute(&self.claim_begin, &[]),
            self.relay.query_one(&self.claim_lock, &[]),
            self.relay.query_one(&self.claim_read, &[]),
        )?;
        let key = format!("{NAMESPACE}.linear4.task.completed");
        let event = [("floor", key.as_str(), "{}")];
        futures::try_join!(self.publisher.publish_events(&event).map_err(anyhow::Error::from), async {
            self.events.next().await.context("the subscription ended")?.map_err(anyhow::Error::from)
        },)?;
        let took = start.elapsed();
        self.relay.execute(&self.claim_end, &[]).await?;
        Ok((took, hops, waits))
    }

    /// An orchestrator batch decided from a kept task, in one round trip: begin, lock,
    /// update and commit, and for the last batch wake the relay right behind the commit.
    /// How long it took.
    async fn batch(&self, wake: bool) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let lock = async {
            futures::try_join!(self.db.execute(&self.begin, &[]), self.db.query_one(&self.lock, &[]))?;
            Ok(())
        };
        let write = async {
            futures::try_join!(self.db.execute(&self.update, &[]), self.db.execute(&self.commit, &[]), async {
                if wake { self.db.batch_execute(WAKE).await } else { Ok(()) }
            })?;
            Ok::<_, tokio_postgres::Error>(())
        };
        // polled in order, so sent in order, in one pipeline
        futures::try_join!(lock, write)?;
        Ok(start.elapsed())
    }

    async fn close(self) -> anyhow::Result<()> {
        self.db.batch_execute("DROP TABLE bench_floor_probe").await?;
        Ok(())
    }
}
