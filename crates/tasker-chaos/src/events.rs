//! A real event subscriber, straight to the broker (not through the proxies): records
//! the order in which each event first arrived, and counts duplicates.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Instant,
};

use tasker_messaging::EventStream;
use uuid::Uuid;

#[derive(Default)]
pub struct Seen {
    /// Arrival position of each event's first delivery.
    pub first: HashMap<Uuid, usize>,
    pub duplicates: usize,
    /// When each task's `task.completed` first arrived.
    pub completed: HashMap<String, Instant>,
}

pub type Shared = Arc<Mutex<Seen>>;

pub fn record(mut stream: EventStream) -> Shared {
    let seen = Shared::default();
    let shared = seen.clone();
    tokio::spawn(async move {
        while let Some(Ok(event)) = stream.next().await {
            let Ok(value) = serde_json::from_str::<serde_json::Value>(&event.payload) else { continue };
            let Some(id) = value["id"].as_str().and_then(|id| id.parse::<Uuid>().ok()) else { continue };
            let mut seen = shared.lock().expect("seen lock");
            let position = seen.first.len();
            match seen.first.entry(id) {
                std::collections::hash_map::Entry::Occupied(_) => seen.duplicates += 1,
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(position);
                }
            }
            if value["type"] == "dev.tasker.task.completed"
                && let Some(task) = value["data"]["task_id"].as_str()
            {
                seen.completed.entry(task.to_owned()).or_insert_with(Instant::now);
            }
        }
    });
    seen
}
