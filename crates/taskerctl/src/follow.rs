//! Following what outlives a connection: a task's events (`watch`, `task submit --wait`)
//! and the event exchange (`events`), each tried again through an outage of its server,
//! and what a watched task's end means for taskerctl's exit code.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use anyhow::Context;
use tasker_proto::v1::{self as pb, task_service_client::TaskServiceClient};
use tasker_runtime::Config;

use crate::{Api, print};

/// How long `watch` and `events` go on trying to reach their server again before they
/// give up.
const OUTLAST: Duration = Duration::from_secs(120);

/// A server reached, then lost and tried again: backoff between tries (the services'
/// own), and a limit on how long it may stay out of reach. A server never reached is an
/// error at once (a wrong address is not an outage).
#[derive(Default)]
struct Outage {
    reached: bool,
    failures: u32,
    since: Option<Instant>,
}

impl Outage {
    /// Reached the server: a later failure begins a new outage.
    fn ended(&mut self) {
        *self = Outage { reached: true, ..Outage::default() };
    }

    /// Lost `server` with `error`: waits before the next try, or gives the error back when
    /// the server was never reached or has been out of reach for [`OUTLAST`].
    async fn wait(&mut self, server: &str, error: anyhow::Error, again: &str) -> anyhow::Result<()> {
        if !self.reached {
            return Err(error);
        }
        let since = *self.since.get_or_insert_with(Instant::now);
        if since.elapsed() >= OUTLAST {
            eprintln!("{server} out of reach for {}s; giving up", OUTLAST.as_secs());
            return Err(error);
        }
        self.failures += 1;
        let delay = tasker_runtime::reconnect_delay(self.failures);
        eprintln!("lost {server} ({error:#}); {again} in {delay:.1?}");
        tokio::time::sleep(delay).await;
        Ok(())
    }
}

/// A watched task that ended otherwise than `complete`: taskerctl exits with
/// [`NotCompleted::EXIT_CODE`], so that a script tells it from taskerctl's own failure (1)
/// and from bad arguments (2, as clap exits).
#[derive(Debug)]
pub struct NotCompleted {
    task_id: String,
    /// The event that ended the watch (`task.failed`, `task.cancelled`).
    event: String,
}

impl std::fmt::Display for NotCompleted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let status = match self.event.as_str() {
            "task.failed" => "error",
            "task.cancelled" => "cancelled",
            other => other,
        };
        write!(f, "task {} ended {status} ({}), not complete", self.task_id, self.event)
    }
}

impl std::error::Error for NotCompleted {}

impl NotCompleted {
    pub const EXIT_CODE: u8 = 3;

    /// Ok when the watch of `task_id` ended with `task.completed` (`last_routing_key`,
    /// `{namespace}.{task_name}.task.{event}`: neither name holds a dot).
    pub fn check(task_id: &str, last_routing_key: &str) -> Result<(), NotCompleted> {
        let event = last_routing_key.splitn(3, '.').nth(2).unwrap_or_default();
        if event == "task.completed" {
            Ok(())
        } else {
            Err(NotCompleted { task_id: task_id.to_owned(), event: event.to_owned() })
        }
    }
}

/// Prints a task's events until it is final. When the stream breaks because task-api went
/// away (it stopped, or the connection was lost), the task is watched again, through
/// another replica or the same one back, for up to [`OUTLAST`]. The history each new
/// stream replays is skipped by event id, so every event is printed once and none is
/// missed. Returns the routing key of the task's last event, which ended the watch.
pub async fn watch(client: &mut TaskServiceClient<Api>, task_id: &str) -> anyhow::Result<String> {
    let (mut seen, mut outage, mut last) = (HashSet::new(), Outage::default(), String::new());
    loop {
        match watch_once(client, task_id, &mut seen, &mut last, &mut outage).await {
            Ok(()) => return Ok(last),
            Err(status) if lost_task_api(&status) => outage.wait("task-api", status.into(), "watching again").await?,
            Err(status) => return Err(status.into()),
        }
    }
}

/// A watched task's final state: GetTask, asked again while task-api is away (it was
/// reached: the watch just ended there), for up to [`OUTLAST`].
pub async fn final_state(client: &mut TaskServiceClient<Api>, task_id: &str) -> anyhow::Result<pb::Task> {
    let mut outage = Outage { reached: true, ..Outage::default() };
    let request = pb::GetTaskRequest { task_id: task_id.to_owned(), include_transitions: false };
    loop {
        match client.get_task(request.clone()).await {
            Ok(task) => return Ok(task.into_inner()),
            Err(status) if lost_task_api(&status) => outage.wait("task-api", status.into(), "asking again").await?,
            Err(status) => return Err(status.into()),
        }
    }
}

/// Prints the events that match `patterns` (all of them, or the first `count`), subscribing
/// again after the broker goes away, for up to [`OUTLAST`] of trying.
pub async fn events(config: &Config, patterns: &[&str], json: bool, count: Option<usize>) -> anyhow::Result<()> {
    let (mut seen, mut outage) = (0, Outage::default());
    while let Err(error) = tail_events(config, patterns, json, count, &mut seen, &mut outage).await {
        outage.wait("the broker", error, "subscribing again").await?;
    }
    Ok(())
}

/// Binds a private queue to the events exchange and prints what arrives, until `count`
/// events were `seen` in all or the connection is lost (an error). The queue lives as
/// long as the connection: subscribing again after an outage misses what was published
/// meanwhile, and says so.
async fn tail_events(
    config: &Config,
    patterns: &[&str],
    json: bool,
    count: Option<usize>,
    seen: &mut usize,
    outage: &mut Outage,
) -> anyhow::Result<()> {
    let broker = tasker_runtime::connect_broker(&config.amqp, "taskerctl").await?;
    let mut events = broker.subscribe_events(patterns).await?;
    let exchange = broker.topology().events_exchange();
    if outage.reached {
        eprintln!("listening again on {exchange}; events published while away were not seen");
    } else {
        eprintln!("listening on {exchange} for {}", patterns.join(", "));
    }
    outage.ended();
    while count.is_none_or(|n| *seen < n) {
        let event = events.next().await.context("the subscription ended")??;
        if json {
            println!("{}", event.payload);
        } else {
            print::event_line(&event.routing_key, &event.payload);
        }
        *seen += 1;
    }
    Ok(())
}

/// Whether a stream broke because task-api went away: it said UNAVAILABLE (it is stopping,
/// or could not be reached), or the connection broke under the stream (UNKNOWN, made here
/// from the transport's error, which it carries; an UNKNOWN the server sent carries none).
fn lost_task_api(status: &tonic::Status) -> bool {
    match status.code() {
        tonic::Code::Unavailable => true,
        tonic::Code::Unknown => std::error::Error::source(status).is_some(),
        _ => false,
    }
}

/// One WatchTask stream, printing the events not `seen` before and keeping the routing key
/// of the `last` one streamed (a replayed one included).
async fn watch_once(
    client: &mut TaskServiceClient<Api>,
    task_id: &str,
    seen: &mut HashSet<String>,
    last: &mut String,
    outage: &mut Outage,
) -> Result<(), tonic::Status> {
    let mut stream = client.watch_task(pb::WatchTaskRequest { task_id: task_id.to_owned() }).await?.into_inner();
    outage.ended();
    while let Some(event) = stream.message().await? {
        if seen.insert(event.id.clone()) {
            print::event_line(&event.routing_key, &event.data_json);
        }
        *last = event.routing_key;
    }
    Ok(())
}
