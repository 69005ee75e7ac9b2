//! Settling deliveries (tasker-messaging's `Ack`), against the real RabbitMQ: acks made at
//! the same moment go to the broker together, and that never settles a delivery still
//! being worked on or one being sent back; on the orchestrator's classic input queue (whose
//! retries Tasker counts itself) and on a quorum step queue alike.

use std::{collections::BTreeMap, future::Future, time::Duration};

use futures::future::join_all;
use tasker_messaging::{Ack, Broker, Command, Consumer, Incoming};
use tasker_proto::messages::{StepExecution, TaskRequest};
use tasker_test_support::TestEnv;

/// One of the two queue kinds, with a message carrying a number `n`.
trait Numbered: prost::Message + Default + Send + 'static {
    fn command(broker: &Broker, n: usize) -> (String, Command);
    fn number(&self) -> usize;
}

impl Numbered for TaskRequest {
    fn command(broker: &Broker, n: usize) -> (String, Command) {
        let request = TaskRequest { task_id: n.to_string(), ..Default::default() };
        (broker.topology().tasks_queue(), Command::Task(request))
    }
    fn number(&self) -> usize {
        self.task_id.parse().expect("a number")
    }
}

impl Numbered for StepExecution {
    fn command(broker: &Broker, n: usize) -> (String, Command) {
        let execution = StepExecution { namespace: "settle".into(), step_id: n.to_string(), ..Default::default() };
        (broker.topology().steps_queue("settle"), Command::Step(execution))
    }
    fn number(&self) -> usize {
        self.step_id.parse().expect("a number")
    }
}

/// Publishes messages `0..count` and opens a consumer with room for all of them.
async fn queue_of<T: Numbered>(env: &TestEnv, count: usize) -> (Broker, String, Consumer<T>) {
    let broker = env.broker().await;
    env.uses_namespace("settle");
    broker.declare_orchestrator().await.unwrap();
    broker.declare_steps("settle").await.unwrap();
    let commands: Vec<(String, Command)> = (0..count).map(|n| T::command(&broker, n)).collect();
    let queue = commands[0].0.clone();
    let publisher = broker.publisher().await.unwrap();
    publisher.send(&commands.into_iter().map(|(_, c)| c).collect::<Vec<_>>()).await.unwrap();
    publisher.close().await;
    let consumer = broker.consume::<T>(&queue, count as u16).await.unwrap();
    (broker, queue, consumer)
}

async fn take<T: Numbered>(consumer: &mut Consumer<T>) -> (usize, Ack) {
    let Incoming { message, ack, .. } =
        tokio::time::timeout(Duration::from_secs(30), consumer.next()).await.expect("a delivery").unwrap();
    (message.expect("decodes").number(), ack)
}

/// Checks that nothing more arrives and that nothing is left in the queue once the
/// consumer is closed (its unsettled deliveries would return): every message was settled
/// for good, none twice. Then cleans up.
async fn ends_settled<T: Numbered>(env: TestEnv, broker: Broker, queue: &str, mut consumer: Consumer<T>) {
    let more = tokio::time::timeout(Duration::from_millis(500), consumer.next()).await;
    assert!(more.is_err(), "no further delivery");
    consumer.close().await;
    assert_eq!(broker.queue_state(queue).await.unwrap().expect("the queue").ready, 0, "every message settled for good");
    broker.close().await.unwrap();
    env.cleanup().await;
}

async fn all_ok(settling: Vec<impl Future<Output = tasker_messaging::Result<()>>>) {
    for result in join_all(settling).await {
        result.expect("settled without a channel error");
    }
}

async fn acks_together_never_reach_a_held_or_returned_delivery<T: Numbered>() {
    let env = TestEnv::new().await;
    let (broker, queue, mut consumer) = queue_of::<T>(&env, 8).await;
    let mut acks = BTreeMap::new();
    for expected in 0..8 {
        let (n, ack) = take(&mut consumer).await;
        assert_eq!(n, expected, "delivered in order");
        acks.insert(n, ack);
    }
    // 1–3 acked together while 0 is still held
    all_ok((1..=3).map(|n| acks[&n].ack()).collect()).await;
    // 0 and 4 together: 0–4 are all done
    all_ok([0, 4].iter().map(|n| acks[n].ack()).collect()).await;
    // 5 sent back while 6 and 7 are acked at the same moment
    let (retried, ()) = tokio::join!(acks[&5].retry(), all_ok(vec![acks[&6].ack(), acks[&7].ack()]));
    retried.expect("sent back");
    let (n, ack) = take(&mut consumer).await;
    assert_eq!(n, 5, "only the delivery sent back comes back");
    ack.ack().await.unwrap();
    ends_settled(env, broker, &queue, consumer).await;
}

#[tokio::test]
async fn acks_together_never_reach_a_held_or_returned_delivery_on_a_classic_queue() {
    acks_together_never_reach_a_held_or_returned_delivery::<TaskRequest>().await;
}

#[tokio::test]
async fn acks_together_never_reach_a_held_or_returned_delivery_on_a_quorum_queue() {
    acks_together_never_reach_a_held_or_returned_delivery::<StepExecution>().await;
}

/// Many handlers settling at once, each after its own short while, every tenth message
/// sent back once: each message is acked exactly once and the queue ends empty.
async fn concurrent_settling_loses_and_repeats_nothing<T: Numbered>() {
    const COUNT: usize = 300;
    let env = TestEnv::new().await;
    let (broker, queue, mut consumer) = queue_of::<T>(&env, 64).await;
    let publisher = broker.publisher().await.unwrap();
    let rest: Vec<Command> = (64..COUNT).map(|n| T::command(&broker, n).1).collect();
    publisher.send(&rest).await.unwrap();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut acked = vec![0u32; COUNT];
    let mut sent_back = std::collections::HashSet::new();
    let mut deliveries = 0;
    while acked.contains(&0) {
        tokio::select! {
            Some(n) = done_rx.recv() => acked[n] += 1,
            (n, ack) = take(&mut consumer) => {
                deliveries += 1;
                let send_back = n % 10 == 0 && sent_back.insert(n);
                let done = done_tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_micros((n as u64 * 7919) % 3000)).await;
                    if send_back {
                        ack.retry().await.expect("sent back");
                    } else {
                        ack.ack().await.expect("acked");
                        let _ = done.send(n);
                    }
                });
            }
        }
    }
    assert!(acked.iter().all(|&times| times == 1), "each message acked once");
    assert_eq!(deliveries, COUNT + COUNT / 10, "each tenth came back once, nothing else did");
    publisher.close().await;
    ends_settled(env, broker, &queue, consumer).await;
}

#[tokio::test]
async fn concurrent_settling_loses_and_repeats_nothing_on_a_classic_queue() {
    concurrent_settling_loses_and_repeats_nothing::<TaskRequest>().await;
}

#[tokio::test]
async fn concurrent_settling_loses_and_repeats_nothing_on_a_quorum_queue() {
    concurrent_settling_loses_and_repeats_nothing::<StepExecution>().await;
}
