//! Scenarios B1–B7 and B9 of `shared/bench.md`, driven through the public gRPC API (B8
//! is B3 again, once `main` has written the history).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use serde_json::Value;
use tasker_messaging::EventStream;
use tasker_proto::v1::{self as pb, task_service_client::TaskServiceClient};
use tokio::sync::oneshot;
use tonic::transport::Channel;

use crate::{
    cpu,
    services::{self, ADMIN, Services},
    stats::{Figure, Latencies, bucket_quantile, counter, histogram_delta},
};

/// Tasks run, unmeasured, before B1's: see [`Bench::b1_b2`].
const SETTLING_TASKS: usize = 3;

/// Completions seen before anyone waited for them, and waiters for those not seen yet.
type Pending = (HashMap<String, Instant>, HashMap<String, oneshot::Sender<Instant>>);

/// Completion times of tasks, from a subscriber on `*.*.task.completed`.
#[derive(Clone, Default)]
pub struct Completions {
    inner: Arc<Mutex<Pending>>,
}

impl Completions {
    pub fn listen(mut stream: EventStream) -> Completions {
        let completions = Completions::default();
        let inner = completions.inner.clone();
        tokio::spawn(async move {
            while let Some(Ok(event)) = stream.next().await {
                let at = Instant::now();
                let Ok(value) = serde_json::from_str::<Value>(&event.payload) else { continue };
                let Some(id) = value["data"]["task_id"].as_str() else { continue };
                let mut guard = inner.lock().expect("completions lock");
                match guard.1.remove(id) {
                    Some(waiter) => {
                        let _ = waiter.send(at);
                    }
                    None => {
                        guard.0.insert(id.to_owned(), at);
                    }
                }
            }
        });
        completions
    }

    /// When the task completed (waits for it, up to two minutes).
    pub async fn wait(&self, task_id: &str) -> anyhow::Result<Instant> {
        let rx = {
            let mut guard = self.inner.lock().expect("completions lock");
            if let Some(at) = guard.0.remove(task_id) {
                return Ok(at);
            }
            let (tx, rx) = oneshot::channel();
            guard.1.insert(task_id.to_owned(), tx);
            rx
        };
        Ok(tokio::time::timeout(Duration::from_secs(120), rx).await.context("task did not complete in 2 min")??)
    }
}

pub struct Bench {
    pub client: TaskServiceClient<Channel>,
    pub broker: tasker_messaging::Broker,
    pub completions: Completions,
    pub quick: bool,
    /// Where B1's floor is measured.
    pub floor: crate::floor::Setup,
}

fn create(namespace: &str, name: &str) -> pb::CreateTaskRequest {
    pb::CreateTaskRequest { namespace: namespace.into(), name: name.into(), ..Default::default() }
}

pub(crate) fn figure(
    id: &'static str,
    name: &'static str,
    unit: &'static str,
    value: f64,
    target: Option<&'static str>,
) -> Figure {
    let lower_is_better = matches!(unit, "ms" | "s" | "statements/s");
    Figure { id, name, unit, value, target, lower_is_better }
}

impl Bench {
    async fn submit(&self, request: pb::CreateTaskRequest) -> anyhow::Result<(String, Instant, Duration)> {
        let start = Instant::now();
        let response = self.client.clone().create_task(request).await?.into_inner();
        Ok((response.task.context("created task")?.id, start, start.elapsed()))
    }

    /// B1 and B2: linear 4-step tasks one at a time; per-hop latency from the
    /// orchestrator's own histogram over the same run.
    ///
    /// The first tasks after the bench's `VACUUM (ANALYZE)` (between scenarios, where the
    /// server has autovacuum off) are not measured: the first task after it was among the
    /// slowest few of its round (after `VACUUM` or `ANALYZE` alone too, never after a
    /// `SELECT 1` in its place), likely because updating the tables' statistics drops the
    /// plans the services' sessions keep.
    pub async fn b1_b2(&self) -> anyhow::Result<Vec<Figure>> {
        let n = if self.quick { 40 } else { 200 };
        for _ in 0..SETTLING_TASKS {
            let (id, _, _) = self.submit(create("bench", "linear4")).await?;
            self.completions.wait(&id).await?;
        }
        let before = services::metrics(ADMIN[1].1).await?;
        let mut latencies = Latencies::new();
        let mut ids = Vec::with_capacity(n);
        for _ in 0..n {
            let (id, start, _) = self.submit(create("bench", "linear4")).await?;
            latencies.record(self.completions.wait(&id).await? - start);
            ids.push(id);
        }
        let after = services::metrics(ADMIN[1].1).await?;
        let waits = self.queue_waits(&ids).await?;
        // a quantile of a histogram the orchestrator kept over the run, in ms
        let ms = |series: &str, q| {
            bucket_quantile(&histogram_delta(&before, &after, series), q).map_or(f64::NAN, |s| s * 1000.0)
        };
        let hop = |q| ms("tasker_orchestrator_hop_seconds", q);
        let phase_at = |name: &str, q| ms(&format!("tasker_orchestrator_hop_phase_seconds{{phase=\"{name}\"}}"), q);
        let phase = |name: &str| phase_at(name, 0.5);
        // in the same minute: the same round trips, commits and hops, with nothing in them
        let floor = crate::floor::measure(&self.floor, n).await.context("B1's floor")?;
        Ok(vec![
            figure("B1", "4-step linear, submit→complete p50", "ms", latencies.quantile_ms(0.5), Some("≤ 8")),
            figure("B1", "4-step linear, submit→complete p99", "ms", latencies.quantile_ms(0.99), Some("≤ 15")),
            figure("B1", "floor: its round trips and hops, no work, p50", "ms", floor.task.quantile_ms(0.5), None),
            figure("B1", "floor: its round trips and hops, no work, p99", "ms", floor.task.quantile_ms(0.99), None),
            figure("B2", "per hop, report received→child dispatched p50", "ms", hop(0.5), Some("≤ 1.5")),
            figure("B2", "per hop, report received→child dispatched p99", "ms", hop(0.99), None),
            figure(
                "B2",
                "floor: a round trip with its commit, confirmed publish p50",
                "ms",
                floor.hop.quantile_ms(0.5),
                None,
            ),
            // where the hop's time goes, part by part beside the floor's
            figure("B2", "part p50: reads (from memory for a kept task)", "ms", phase("read"), None),
            figure("B2", "part p50: in memory", "ms", phase("apply"), None),
            figure("B2", "part p50: the writing round trip (fence, writes, reads, commit)", "ms", phase("write"), None),
            figure(
                "B2",
                "floor part p50: its round trip (begin, lock, update, commit)",
                "ms",
                floor.trip.quantile_ms(0.5),
                None,
            ),
            figure("B2", "part p50: executions published, confirmed", "ms", phase("publish"), None),
            figure("B2", "floor part p50: publish, confirmed", "ms", floor.publish.quantile_ms(0.5), None),
            // and where its tail goes (B1's p99 is its slowest few tasks)
            figure("B2", "part p99: the writing round trip", "ms", phase_at("write", 0.99), None),
            figure("B2", "floor part p99: its round trip", "ms", floor.trip.quantile_ms(0.99), None),
            figure("B2", "part p99: executions published, confirmed", "ms", phase_at("publish", 0.99), None),
            figure("B2", "floor part p99: publish, confirmed", "ms", floor.publish.quantile_ms(0.99), None),
            // where B1's slowest tasks lose their time: a step's wait, beside the floor's
            figure("B1", "a step's wait, enqueued → its worker's start, p50", "ms", waits.quantile_ms(0.5), None),
            figure("B1", "a step's wait, enqueued → its worker's start, p99", "ms", waits.quantile_ms(0.99), None),
            figure("B1", "floor: an execution's wait, batch → delivered, p50", "ms", floor.wait.quantile_ms(0.5), None),
            figure(
                "B1",
                "floor: an execution's wait, batch → delivered, p99",
                "ms",
                floor.wait.quantile_ms(0.99),
                None,
            ),
        ])
    }

    /// Each step's wait in these tasks, from the recorded time of its `enqueued`
    /// transition (the orchestrator's clock as its batch wrote it) to its start as the
    /// worker reported it: the batch's writing round trip, the publish, the quorum queue's
    /// delivery and the worker's wake-up. Read after the run, outside its timing.
    async fn queue_waits(&self, ids: &[String]) -> anyhow::Result<Latencies> {
        let mut waits = Latencies::new();
        for id in ids {
            let request = pb::GetTaskRequest { task_id: id.clone(), include_transitions: true };
            let task = self.client.clone().get_task(request).await?.into_inner();
            for step in &task.steps {
                let enqueued = step.transitions.iter().rev().find(|t| t.to_state == "enqueued");
                if let (Some(from), Some(to)) = (enqueued.and_then(|t| t.created_at), step.started_at) {
                    let micros = |t: prost_types::Timestamp| t.seconds * 1_000_000 + i64::from(t.nanos) / 1_000;
                    waits.record(Duration::from_micros(micros(to).saturating_sub(micros(from)).max(0) as u64));
                }
            }
        }
        Ok(waits)
    }

    /// Submits `total` tasks from `clients` concurrent clients; returns each task's id,
    /// submit time and CreateTask latency.
    async fn submit_many(
        &self,
        namespace: &'static str,
        name: &'static str,
        total: usize,
        clients: usize,
    ) -> anyhow::Result<Vec<(String, Instant, Duration)>> {
        let per_client = total.div_ceil(clients);
        let mut handles = Vec::new();
        for c in 0..clients {
            let count = per_client.min(total.saturating_sub(c * per_client));
            let client = self.client.clone();
            handles.push(tokio::spawn(async move {
                let mut out = Vec::with_capacity(count);
                for _ in 0..count {
                    let start = Instant::now();
                    let response = client.clone().create_task(create(namespace, name)).await?.into_inner();
                    out.push((response.task.context("created task")?.id, start, start.elapsed()));
                }
                anyhow::Ok(out)
            }));
        }
        let mut all = Vec::with_capacity(total);
        for handle in handles {
            all.extend(handle.await??);
        }
        Ok(all)
    }

    /// Warms freshly started services up (connections, prepared statements and plans,
    /// queue declarations): 200 diamonds from 16 clients, each awaited.
    pub async fn warm_up(&self) -> anyhow::Result<()> {
        for (id, _, _) in self.submit_many("bench", "diamond7", 200, 16).await? {
            self.completions.wait(&id).await?;
        }
        Ok(())
    }

    /// B3: 2,000 diamond tasks from 16 clients: sustained steps/s and task latency.
    pub async fn b3(&self) -> anyhow::Result<Vec<Figure>> {
        let total = if self.quick { 300 } else { 2_000 };
        let busy = cpu::busy_seconds();
        let start = Instant::now();
        let submitted = self.submit_many("bench", "diamond7", total, 16).await?;
        let mut latencies = Latencies::new();
        let mut last = start;
        for (id, at, _) in &submitted {
            let done = self.completions.wait(id).await?;
            latencies.record(done - *at);
            last = last.max(done);
        }
        let (busy, wall) = (cpu::busy_seconds() - busy, (last - start).as_secs_f64());
        let steps = (total * 7) as f64;
        Ok(vec![
            figure("B3", "2,000 diamonds, 16 clients: steps/s", "steps/s", steps / wall, Some("≥ 3000")),
            figure("B3", "task latency under load p50", "ms", latencies.quantile_ms(0.5), None),
            figure("B3", "task latency under load p99", "ms", latencies.quantile_ms(0.99), None),
            figure("B3", "CPU per step, whole machine", "ms", busy * 1000.0 / steps, None),
            figure("B3", "share of the cores busy", "ratio", busy / (wall * cpu::cores()), None),
            figure("B3", "ceiling: steps/s, every core busy at that CPU", "steps/s", cpu::ceiling(steps, busy), None),
        ])
    }

    /// B4: CreateTask for a 7-step template, 16 clients (its namespace has no worker).
    pub async fn b4(&self) -> anyhow::Result<Vec<Figure>> {
        let total = if self.quick { 300 } else { 2_000 };
        // one create per client first, unmeasured: task-api opens its pool's connections
        // as they are first needed and reads a template on its first create (run alone,
        // after B1's one client at a time, B4's first sixteen creates took 30–180 ms)
        let settling = self.submit_many("bench_idle", "diamond7", 16, 16).await?;
        let (cpu_before, busy) = (cpu::snapshot(), cpu::busy_seconds());
        let start = Instant::now();
        let submitted = self.submit_many("bench_idle", "diamond7", total, 16).await?;
        let elapsed = start.elapsed();
        let busy = cpu::busy_seconds() - busy;
        eprintln!("  B4 creating ({:.1} s): {}", elapsed.as_secs_f64(), cpu::used(&cpu_before, &cpu::snapshot()));
        let mut latencies = Latencies::new();
        for (_, _, took) in &submitted {
            latencies.record(*took);
        }
        // leave nothing behind for later scenarios: cancel the tasks (their steps' events
        // are part of the clean-up, not of the figures)
        let ids: Vec<String> = settling.into_iter().chain(submitted).map(|(id, _, _)| id).collect();
        futures::future::try_join_all(ids.chunks(ids.len().div_ceil(16).max(1)).map(|chunk| {
            let client = self.client.clone();
            async move {
                for id in chunk {
                    let request = pb::CancelTaskRequest { task_id: id.clone(), reason: "benchmark clean-up".into() };
                    client.clone().cancel_task(request).await?;
                }
                anyhow::Ok(())
            }
        }))
        .await?;
        // the same request from one client at a time: the latency without queueing
        let mut alone = Latencies::new();
        for _ in 0..if self.quick { 50 } else { 200 } {
            let (id, _, took) = self.submit(create("bench_idle", "diamond7")).await?;
            alone.record(took);
            let request = pb::CancelTaskRequest { task_id: id, reason: "benchmark clean-up".into() };
            self.client.clone().cancel_task(request).await?;
        }
        // and drop their executions from the queue nobody serves
        self.broker.purge(&self.broker.topology().steps_queue("bench_idle")).await?;
        Ok(vec![
            figure("B4", "CreateTask, 16 clients: requests/s", "req/s", total as f64 / elapsed.as_secs_f64(), None),
            figure("B4", "CreateTask latency p50", "ms", latencies.quantile_ms(0.5), Some("≤ 8")),
            figure("B4", "CreateTask latency p99", "ms", latencies.quantile_ms(0.99), None),
            figure("B4", "CreateTask latency, 1 client p50", "ms", alone.quantile_ms(0.5), None),
            figure("B4", "CreateTask latency mean", "ms", latencies.mean_ms(), None),
            figure("B4", "CPU per create, whole machine", "ms", busy * 1000.0 / total as f64, None),
            figure("B4", "share of the cores busy", "ratio", busy / (elapsed.as_secs_f64() * cpu::cores()), None),
            // 16 clients, each always waiting for an answer: mean latency = 16 ÷ throughput
            // (Little's law), and the throughput is at most the ceiling
            figure(
                "B4",
                "bound: mean latency, every core busy (16 ÷ ceiling)",
                "ms",
                16_000.0 / cpu::ceiling(total as f64, busy),
                None,
            ),
        ])
    }

    /// B5: one task of 1,000 steps (10 layers of 100).
    pub async fn b5(&self) -> anyhow::Result<Vec<Figure>> {
        let (id, start, created) = self.submit(create("bench", "wide1000")).await?;
        let done = self.completions.wait(&id).await?;
        Ok(vec![
            figure("B5", "1,000-step task: created", "s", created.as_secs_f64(), Some("≤ 1")),
            figure("B5", "1,000-step task: completed", "s", (done - start).as_secs_f64(), Some("≤ 10")),
        ])
    }

    /// B9: one task of 10,000 `noop` steps in 100 layers (task-api runs with the step and
    /// template limits raised for it).
    pub async fn b9(&self) -> anyhow::Result<Vec<Figure>> {
        let (id, start, created) = self.submit(create("bench", "wide10000")).await?;
        let done = self.completions.wait(&id).await?;
        Ok(vec![
            figure("B9", "10,000-step task: created", "s", created.as_secs_f64(), Some("≤ 0.3")),
            figure("B9", "10,000-step task: completed", "s", (done - start).as_secs_f64(), Some("≤ 4")),
        ])
    }

    /// B6: `sleep 50ms` steps on 1, 2 and 4 worker processes.
    pub async fn b6(&self, services: &mut Services) -> anyhow::Result<Vec<Figure>> {
        let tasks = if self.quick { 20 } else { 60 };
        let mut throughput = Vec::new();
        for workers in [1usize, 2, 4] {
            let mark = services.workers();
            services.start_workers(workers, "[bench_sleep]", 4).await?;
            let start = Instant::now();
            let submitted = self.submit_many("bench_sleep", "sleep10", tasks, 8).await?;
            let mut last = start;
            for (id, _, _) in &submitted {
                last = last.max(self.completions.wait(id).await?);
            }
            throughput.push((tasks * 10) as f64 / (last - start).as_secs_f64());
            services.stop_workers_from(mark).await;
        }
        let scaling = |i: usize, n: f64| throughput[i] / (n * throughput[0]);
        Ok(vec![
            figure("B6", "sleep 50ms, 1 worker: steps/s", "steps/s", throughput[0], None),
            figure("B6", "sleep 50ms, 2 workers: steps/s", "steps/s", throughput[1], None),
            figure("B6", "sleep 50ms, 4 workers: steps/s", "steps/s", throughput[2], None),
            figure("B6", "2 workers: share of linear scaling", "ratio", scaling(1, 2.0), Some("≥ 0.85")),
            figure("B6", "4 workers: share of linear scaling", "ratio", scaling(2, 4.0), Some("≥ 0.85")),
        ])
    }

    /// B7: database statements per second, everything started, no work.
    pub async fn b7(&self) -> anyhow::Result<Vec<Figure>> {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let read = || async {
            let mut total = 0.0;
            for (_, port) in ADMIN {
                total += counter(&services::metrics(port).await?, "tasker_db_statements_total");
            }
            anyhow::Ok(total)
        };
        let before = read().await?;
        let start = Instant::now();
        tokio::time::sleep(Duration::from_secs(if self.quick { 5 } else { 10 })).await;
        let per_second = (read().await? - before) / start.elapsed().as_secs_f64();
        Ok(vec![figure("B7", "idle: database statements/s, all services", "statements/s", per_second, Some("≤ 2"))])
    }
}
