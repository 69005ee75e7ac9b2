use std::time::Duration;

use prometheus_client::{
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::engine::{Decided, Phases};

type Labels = Vec<(&'static str, String)>;
type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

/// Seconds, 1 ms to about 9 hours in ×2 steps.
fn seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 25))
}

/// Seconds, 0.2 ms to about 7 seconds in ×1.25 steps.
fn hop_seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.0002, 1.25, 48))
}

/// Seconds, 20 µs to about 4.5 seconds in ×1.3 steps: fine enough for a hop's parts (the
/// work in memory takes tens of microseconds).
fn hop_phase_seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.00002, 1.3, 48))
}

/// The parts of a hop, as the `phase` label names them.
const HOP_PARTS: [&str; 4] = ["read", "apply", "write", "publish"];

fn task_labels(namespace: &str, task: &str) -> Labels {
    vec![("namespace", namespace.to_owned()), ("task", task.to_owned())]
}

/// The orchestrator's counters, exposed on `/metrics`. Labels are bounded: namespaces and
/// task names come from registered templates, outcomes and reasons from fixed sets.
#[derive(Clone)]
pub struct Metrics {
    hop: Histogram,
    /// The hop's parts, in [`HOP_PARTS`] order.
    hop_parts: [Histogram; 4],
    tasks_finished: Family<Labels, Counter>,
    task_duration: Histograms,
    step_attempts: Family<Labels, Counter>,
    step_run: Histograms,
    queue_wait: Histograms,
    retired: Counter,
    dispatched: Counter,
    completed: Counter,
    failed: Counter,
    retried: Counter,
    dropped: Family<Labels, Counter>,
    batches: Counter,
    batches_from_kept: Counter,
    kept_stale: Counter,
    queue_mismatch: Family<Labels, Gauge>,
    paused: Gauge,
    dead_lettered: Family<Labels, Counter>,
    dead_letter_depth: Gauge,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Metrics {
        let parts: Histograms = Family::new_with_constructor(hop_phase_seconds);
        // handles on the family's own histograms (a clone shares its counts)
        let hop_parts = HOP_PARTS.map(|phase| parts.get_or_create(&vec![("phase", phase.to_owned())]).clone());
        let m = Metrics {
            hop: hop_seconds(),
            hop_parts,
            tasks_finished: Family::default(),
            task_duration: Family::new_with_constructor(seconds),
            step_attempts: Family::default(),
            step_run: Family::new_with_constructor(seconds),
            queue_wait: Family::new_with_constructor(seconds),
            retired: Counter::default(),
            dispatched: Counter::default(),
            completed: Counter::default(),
            failed: Counter::default(),
            retried: Counter::default(),
            dropped: Family::default(),
            batches: Counter::default(),
            batches_from_kept: Counter::default(),
            kept_stale: Counter::default(),
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
        r.register(
            "reports_dropped",
            "Step reports dropped, by reason (duplicate, stale, late, unknown step or task)",
            m.dropped.clone(),
        );
        r.register("batches", "Transactions applied", m.batches.clone());
        r.register(
            "batches_from_kept",
            "Transactions applied in one round trip, decided from the tasks kept in memory",
            m.batches_from_kept.clone(),
        );
        r.register(
            "kept_stale",
            "Transactions decided from kept tasks whose fence found a task changed (by an operator, another replica or another batch under way), then decided again from reads",
            m.kept_stale.clone(),
        );
        r.register(
            "tasks_finished",
            "Tasks that reached complete or error, by namespace, task and outcome",
            m.tasks_finished.clone(),
        );
        r.register(
            "task_duration_seconds",
            "From a task's creation to complete or error, by namespace, task and outcome",
            m.task_duration.clone(),
        );
        r.register(
            "step_attempts",
            "Step attempts settled, by namespace, task and outcome (complete, retry, error)",
            m.step_attempts.clone(),
        );
        r.register(
            "step_run_seconds",
            "From an attempt's start (as its worker reported it) to its outcome, by namespace, task and outcome",
            m.step_run.clone(),
        );
        r.register(
            "step_queue_wait_seconds",
            "From a step enqueued to its attempt started by a worker, by namespace and task",
            m.queue_wait.clone(),
        );
        r.register(
            "tasks_retired",
            "Finished tasks deleted with their history past orchestrator.retention",
            m.retired.clone(),
        );
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
        r.register(
            "hop_phase_seconds",
            "The parts of each hop: read (round trip 1: begin, locks, reads), apply (in memory), \
             write (round trip 2: writes, commit), publish (executions published and confirmed)",
            parts,
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
    pub fn dropped(&self, reason: &'static str) {
        self.dropped.get_or_create(&vec![("reason", reason.to_owned())]).inc();
    }
    pub fn task_finished(&self, namespace: &str, task: &str, outcome: &'static str, seconds: f64) {
        let mut labels = task_labels(namespace, task);
        labels.push(("outcome", outcome.to_owned()));
        self.tasks_finished.get_or_create(&labels).inc();
        self.task_duration.get_or_create(&labels).observe(seconds);
    }
    /// An attempt settled after running `ms` (`outcome`: complete, retry or error).
    pub fn run_time(&self, namespace: &str, task: &str, outcome: &'static str, ms: u64) {
        let mut labels = task_labels(namespace, task);
        labels.push(("outcome", outcome.to_owned()));
        self.step_attempts.get_or_create(&labels).inc();
        self.step_run.get_or_create(&labels).observe(ms as f64 / 1000.0);
    }
    pub fn retired(&self, n: u64) {
        self.retired.inc_by(n);
    }
    pub fn queue_wait(&self, namespace: &str, task: &str, ms: u64) {
        self.queue_wait.get_or_create(&task_labels(namespace, task)).observe(ms as f64 / 1000.0);
    }
    /// A hop (a batch that dispatched executions) and its parts.
    pub fn hop(&self, total: Duration, phases: &Phases, publish: Duration) {
        self.hop.observe(total.as_secs_f64());
        let parts = [phases.read, phases.apply, phases.write, publish];
        for (histogram, took) in self.hop_parts.iter().zip(parts) {
            histogram.observe(took.as_secs_f64());
        }
    }
    pub fn queue_mismatch(&self, queue: &str) {
        self.queue_mismatch.get_or_create(&vec![("queue", queue.to_owned())]).set(1);
    }
    pub fn paused(&self, by: i64) {
        self.paused.inc_by(by);
    }
    pub fn dead_lettered(&self, reason: &str) {
        self.dead_lettered.get_or_create(&vec![("reason", reason.to_owned())]).inc();
    }
    pub fn dead_letter_depth(&self, depth: u32) {
        self.dead_letter_depth.set(i64::from(depth));
    }
    /// A committed batch, and how it was decided.
    pub fn batch(&self, decided: Decided) {
        self.batches.inc();
        match decided {
            Decided::FromReads => {}
            Decided::FromKept => {
                self.batches_from_kept.inc();
            }
            Decided::AgainFromReads => {
                self.kept_stale.inc();
            }
        }
    }
}

/// What a batch counted, kept until its transaction commits and then applied with
/// [`Metrics::apply`]: a batch retried in place through an outage, or rolled back, must
/// not count twice.
#[derive(Debug, Default)]
pub struct Tally(Vec<Observation>);

#[derive(Debug)]
enum Observation {
    Dropped(&'static str),
    Completed,
    Failed,
    Retried,
    Dispatched(usize),
    QueueWait { namespace: String, task: String, ms: u64 },
    RunTime { namespace: String, task: String, outcome: &'static str, ms: u64 },
    TaskFinished { namespace: String, task: String, outcome: &'static str, seconds: f64 },
}

impl Tally {
    pub fn dropped(&mut self, reason: &'static str) {
        self.0.push(Observation::Dropped(reason));
    }
    pub fn completed(&mut self) {
        self.0.push(Observation::Completed);
    }
    pub fn failed(&mut self) {
        self.0.push(Observation::Failed);
    }
    pub fn retried(&mut self) {
        self.0.push(Observation::Retried);
    }
    pub fn dispatched(&mut self, n: usize) {
        self.0.push(Observation::Dispatched(n));
    }
    pub fn queue_wait(&mut self, namespace: &str, task: &str, ms: u64) {
        self.0.push(Observation::QueueWait { namespace: namespace.to_owned(), task: task.to_owned(), ms });
    }
    pub fn run_time(&mut self, namespace: &str, task: &str, outcome: &'static str, ms: u64) {
        self.0.push(Observation::RunTime { namespace: namespace.to_owned(), task: task.to_owned(), outcome, ms });
    }
    pub fn task_finished(&mut self, namespace: &str, task: &str, outcome: &'static str, seconds: f64) {
        let (namespace, task) = (namespace.to_owned(), task.to_owned());
        self.0.push(Observation::TaskFinished { namespace, task, outcome, seconds });
    }
}

impl Metrics {
    /// Applies what a committed batch counted.
    pub fn apply(&self, tally: Tally) {
        for observation in tally.0 {
            match observation {
                Observation::Dropped(reason) => self.dropped(reason),
                Observation::Completed => self.completed(),
                Observation::Failed => self.failed(),
                Observation::Retried => self.retried(),
                Observation::Dispatched(n) => self.dispatched(n),
                Observation::QueueWait { namespace, task, ms } => self.queue_wait(&namespace, &task, ms),
                Observation::RunTime { namespace, task, outcome, ms } => self.run_time(&namespace, &task, outcome, ms),
                Observation::TaskFinished { namespace, task, outcome, seconds } => {
                    self.task_finished(&namespace, &task, outcome, seconds)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hop_is_exposed_whole_and_by_part() {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        let ms = Duration::from_millis;
        let phases = Phases { read: ms(1), apply: ms(0), write: ms(2) };
        metrics.hop(ms(7), &phases, ms(4));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("tasker_orchestrator_hop_seconds_count 1\n"), "{text}");
        for (phase, seconds) in [("read", "0.001"), ("apply", "0.0"), ("write", "0.002"), ("publish", "0.004")] {
            assert!(
                text.contains(&format!("tasker_orchestrator_hop_phase_seconds_sum{{phase=\"{phase}\"}} {seconds}\n")),
                "{phase}: {text}"
            );
            assert!(
                text.contains(&format!("tasker_orchestrator_hop_phase_seconds_count{{phase=\"{phase}\"}} 1\n")),
                "{phase}: {text}"
            );
        }
    }
}
