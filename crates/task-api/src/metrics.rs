//! task-api's counters on `/metrics`: tasks created (not counting deduplicated requests)
//! and operator actions, by namespace and task name. Bounded labels: namespaces and task
//! names of registered templates, a fixed set of actions.

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

type Labels = Vec<(&'static str, String)>;

#[derive(Clone, Default)]
pub(crate) struct ApiMetrics {
    created: Family<Labels, Counter>,
    actions: Family<Labels, Counter>,
    /// Event subscriptions open for WatchTask streams (one per task name watched).
    pub(crate) watch_feeds: Gauge,
    /// Times a WatchTask stream fell behind its task's events and caught up from the
    /// database.
    pub(crate) watch_catch_ups: Counter,
}

impl ApiMetrics {
    pub(crate) fn register(registry: &mut Registry) -> ApiMetrics {
        let metrics = ApiMetrics::default();
        let r = registry.sub_registry_with_prefix("tasker_api");
        r.register("tasks_created", "Tasks created, by namespace and task", metrics.created.clone());
        r.register(
            "operator_actions",
            "Operator actions done (cancel, retry, resolve), by namespace, task and action",
            metrics.actions.clone(),
        );
        r.register(
            "watch_subscriptions",
            "Event subscriptions open for WatchTask streams, one per task name watched, shared by its streams",
            metrics.watch_feeds.clone(),
        );
        r.register(
            "watch_catch_ups",
            "Times a WatchTask stream fell behind its task's events (api.watch_buffer) and caught up from the database",
            metrics.watch_catch_ups.clone(),
        );
        metrics
    }

    pub(crate) fn created(&self, namespace: &str, task: &str) {
        self.created.get_or_create(&vec![("namespace", namespace.to_owned()), ("task", task.to_owned())]).inc();
    }

    pub(crate) fn action(&self, namespace: &str, task: &str, action: &'static str) {
        let labels =
            vec![("namespace", namespace.to_owned()), ("task", task.to_owned()), ("action", action.to_owned())];
        self.actions.get_or_create(&labels).inc();
    }
}
