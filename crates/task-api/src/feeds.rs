//! WatchTask's live events: one subscription per task name (`{namespace}.{name}.#`) on
//! each replica, shared by every stream watching a task of that name, its events handed
//! to those streams by task id.
//!
//! A subscription of its own per stream had the broker send every event of the task's
//! name to each of them, and let a stream whose client read slowly (or not at all) buffer
//! those events without bound. Here each stream gets a bounded share ([`Tap`]); one that
//! falls behind (`api.watch_buffer` events unsent) is dropped from the feed and catches up from the database.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use serde_json::Value;
use tasker_domain::CloudEvent;
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use crate::{
    error::{ApiError, ApiResult},
    link::Link,
    metrics::ApiMetrics,
};

/// How long opening a subscription waits for a broker connection.
const BROKER_PATIENCE: Duration = Duration::from_secs(5);

/// The replica's shared subscriptions, by routing pattern.
#[derive(Clone)]
pub(crate) struct Feeds {
    link: Link,
    feeds: Arc<Mutex<HashMap<String, Arc<Feed>>>>,
    /// Events a stream may hold unsent before it has fallen behind.
    buffer: usize,
    metrics: ApiMetrics,
}

/// One subscription and the streams it serves.
struct Feed {
    /// `None` while the subscription opens; then `Ok`, or why it failed or ended.
    state: watch::Sender<Option<Result<(), String>>>,
    /// The streams, by the task they watch.
    taps: Mutex<HashMap<Uuid, Vec<Outlet>>>,
    /// The task that reads the subscription; aborted when the last stream leaves.
    pump: Mutex<Option<tokio::task::AbortHandle>>,
}

/// The feed's end of a [`Tap`].
struct Outlet {
    id: u64,
    events: mpsc::Sender<Arc<CloudEvent>>,
    behind: Arc<AtomicBool>,
}

/// What a [`Tap`] gives next.
pub(crate) enum Next {
    Event(Arc<CloudEvent>),
    /// The stream fell behind: the feed dropped it. Events were missed since the last one
    /// given; tap again and read the task's history for them.
    Behind,
    /// The subscription ended (the broker connection was lost).
    Ended,
}

/// One stream's share of a feed: the events of its task as they come. Dropping it leaves
/// the feed, and the feed's subscription closes with the last one.
pub(crate) struct Tap {
    feeds: Feeds,
    pattern: String,
    feed: Arc<Feed>,
    task_id: Uuid,
    id: u64,
    events: mpsc::Receiver<Arc<CloudEvent>>,
    behind: Arc<AtomicBool>,
}

static NEXT_TAP: AtomicU64 = AtomicU64::new(1);

impl Feeds {
    pub(crate) fn new(link: Link, buffer: usize, metrics: ApiMetrics) -> Feeds {
        Feeds { link, feeds: Arc::default(), buffer: buffer.max(1), metrics }
    }

    /// The events of task `task_id`, whose events are routed by `pattern`, from the moment
    /// this returns (the subscription is open then): a caller reads the task's history
    /// after it, so that nothing falls between the two.
    pub(crate) async fn tap(&self, pattern: &str, task_id: Uuid) -> ApiResult<Tap> {
        let (events_to, events) = mpsc::channel(self.buffer);
        let behind = Arc::new(AtomicBool::new(false));
        let id = NEXT_TAP.fetch_add(1, Ordering::Relaxed);
        let feed = {
            let mut feeds = self.feeds.lock().expect("feeds lock");
            let feed = match feeds.get(pattern) {
                Some(feed) => feed.clone(),
                None => {
                    let feed = Arc::new(Feed {
                        state: watch::Sender::new(None),
                        taps: Mutex::default(),
                        pump: Mutex::default(),
                    });
                    feeds.insert(pattern.to_owned(), feed.clone());
                    self.metrics.watch_feeds.inc();
                    let pump = tokio::spawn(pump(self.clone(), pattern.to_owned(), feed.clone()));
                    *feed.pump.lock().expect("pump lock") = Some(pump.abort_handle());
                    feed
                }
            };
            let outlet = Outlet { id, events: events_to, behind: behind.clone() };
            feed.taps.lock().expect("taps lock").entry(task_id).or_default().push(outlet);
            feed
        };
        let tap =
            Tap { feeds: self.clone(), pattern: pattern.to_owned(), feed: feed.clone(), task_id, id, events, behind };
        let mut state = feed.state.subscribe();
        let opened = state.wait_for(Option::is_some).await.map(|s| s.clone());
        match opened {
            Ok(Some(Ok(()))) => Ok(tap),
            Ok(Some(Err(why))) => Err(ApiError::Unavailable(why)),
            _ => Err(ApiError::Unavailable("the event subscription ended; watch the task again".into())),
        }
    }

    /// Takes `feed` out of `feeds` if it is still the one for `pattern`.
    fn remove(&self, feeds: &mut HashMap<String, Arc<Feed>>, pattern: &str, feed: &Arc<Feed>) -> bool {
        let current = feeds.get(pattern).is_some_and(|f| Arc::ptr_eq(f, feed));
        if current {
            feeds.remove(pattern);
            self.metrics.watch_feeds.dec();
        }
        current
    }

    /// Takes `feed` out and ends its streams.
    fn end(&self, pattern: &str, feed: &Arc<Feed>, why: String) {
        let mut feeds = self.feeds.lock().expect("feeds lock");
        self.remove(&mut feeds, pattern, feed);
        feed.state.send_replace(Some(Err(why)));
        // dropping the senders ends each tap once it has read what it holds
        feed.taps.lock().expect("taps lock").clear();
    }
}

impl Tap {
    pub(crate) async fn next(&mut self) -> Next {
        match self.events.recv().await {
            Some(event) => Next::Event(event),
            None if self.behind.load(Ordering::SeqCst) => {
                self.feeds.metrics.watch_catch_ups.inc();
                Next::Behind
            }
            None => Next::Ended,
        }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let mut feeds = self.feeds.feeds.lock().expect("feeds lock");
        let mut taps = self.feed.taps.lock().expect("taps lock");
        if let Some(outlets) = taps.get_mut(&self.task_id) {
            outlets.retain(|o| o.id != self.id);
            if outlets.is_empty() {
                taps.remove(&self.task_id);
            }
        }
        // the last stream of this name: the subscription closes (its queue with it)
        if taps.is_empty()
            && self.feeds.remove(&mut feeds, &self.pattern, &self.feed)
            && let Some(pump) = self.feed.pump.lock().expect("pump lock").take()
        {
            pump.abort();
        }
    }
}

/// Opens the feed's subscription, then hands each event to the taps of its task; a tap
/// whose buffer is full is dropped from the feed, marked behind.
async fn pump(feeds: Feeds, pattern: String, feed: Arc<Feed>) {
    let opened = async {
        let broker = feeds
            .link
            .broker_within(BROKER_PATIENCE)
            .await
            .ok_or_else(|| "the message broker is unavailable; try again".to_owned())?;
        broker.subscribe_events(&[pattern.as_str()]).await.map_err(|e| format!("subscribing to the task's events: {e}"))
    }
    .await;
    let mut stream = match opened {
        Ok(stream) => {
            feed.state.send_replace(Some(Ok(())));
            stream
        }
        Err(why) => return feeds.end(&pattern, &feed, why),
    };
    while let Some(Ok(received)) = stream.next().await {
        let Ok(event) = serde_json::from_str::<CloudEvent>(&received.payload) else { continue };
        let Some(task_id) = event.data.get("task_id").and_then(Value::as_str).and_then(|s| s.parse::<Uuid>().ok())
        else {
            continue;
        };
        let event = Arc::new(event);
        let mut taps = feed.taps.lock().expect("taps lock");
        let Some(outlets) = taps.get_mut(&task_id) else { continue };
        outlets.retain(|outlet| match outlet.events.try_send(event.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                outlet.behind.store(true, Ordering::SeqCst);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
        if outlets.is_empty() {
            taps.remove(&task_id);
        }
    }
    feeds.end(&pattern, &feed, "the event subscription ended; watch the task again".into());
}
