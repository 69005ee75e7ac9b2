use prometheus_client::{
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// The orchestrator's counters, exposed on `/metrics`.
#[derive(Clone)]
pub struct Metrics {
    hop: Histogram,
    dispatched: Counter,
    completed: Counter,
    failed: Counter,
    retried: Counter,
    dropped: Counter,
    batches: Counter,
    queue_mismatch: Family<Vec<(String, String)>, Gauge>,
    paused: Gauge,
    dead_lettered: Family<Vec<(String, String)>, Counter>,
    dead_letter_depth: Gauge,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Metrics {
        let m = Metrics {
            hop: Histogram::new(exponential_buckets(0.0002, 1.25, 48)),
            dispatched: Counter::default(),
            completed: Counter::default(),
            failed: Counter::default(),
            retried: Counter::default(),
            dropped: Counter::default(),
            batches: Counter::default(),
            queue_mismatch: Family::default(),
            paused: Gauge::default(),
            dead_lettered: Family::default(),
            dead_letter_depth: Gauge::default(),
        };
        let r = registry.sub_registry_with_prefix("tasker_orchestrator");
        r.register("steps_dispatched", "Step attempts dispatched to workers", m.dispatched.clone());
        r.register("steps_completed", "Step attempts that completed", m.completed.clone());
        r.register("steps_failed", "Steps that failed for good", m.failed.clone());
        r.register("steps_retried", "Failed attempts scheduled for a retry", m.retried.clone());
        r.register("reports_dropped", "Duplicate, stale or late reports dropped", m.dropped.clone());
        r.register("batches", "Transactions applied", m.batches.clone());
        r.register(
            "consumers_paused",
            "Batches held unacked while the database or broker is unavailable, being retried in place",
            m.paused.clone(),
        );
        r.register(
            "dead_lettered",
            "Messages this orchestrator sent to the dead-letter queue, by reason",
            m.dead_lettered.clone(),
        );
        r.register(
            "dead_letter_queue_depth",
            "Messages waiting in {prefix}.dead (the broker also dead-letters after the delivery limit), read by the sweeper",
            m.dead_letter_depth.clone(),
        );
        r.register(
            "queue_mismatch",
            "1 for a step queue that exists with other arguments than Tasker declares (alert on it)",
            m.queue_mismatch.clone(),
        );
        r.register(
            "hop_seconds",
            "From a batch of reports received to the executions it made ready confirmed by the broker",
            m.hop.clone(),
        );
        m
    }

    pub fn dispatched(&self, n: usize) {
        self.dispatched.inc_by(n as u64);
    }
    pub fn completed(&self) {
        self.completed.inc();
    }
    pub fn failed(&self) {
        self.failed.inc();
    }
    pub fn retried(&self) {
        self.retried.inc();
    }
    pub fn dropped(&self, n: usize) {
        self.dropped.inc_by(n as u64);
    }
    pub fn hop(&self, seconds: f64) {
        self.hop.observe(seconds);
    }
    pub fn queue_mismatch(&self, queue: &str) {
        self.queue_mismatch.get_or_create(&vec![("queue".to_owned(), queue.to_owned())]).set(1);
    }
    pub fn paused(&self, by: i64) {
        self.paused.inc_by(by);
    }
    pub fn dead_lettered(&self, reason: &str) {
        self.dead_lettered.get_or_create(&vec![("reason".to_owned(), reason.to_owned())]).inc();
    }
    pub fn dead_letter_depth(&self, depth: u32) {
        self.dead_letter_depth.set(i64::from(depth));
    }
    pub fn batch(&self) {
        self.batches.inc();
    }
}
