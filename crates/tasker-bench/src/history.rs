//! The analytics figures (A1–A5): a database holding a long history, written directly
//! (finished tasks spread over the last 30 days, each with its steps and every transition
//! the engine would have recorded, run and wait times included), then each
//! AnalyticsService RPC timed through task-api. Test data, so the SQL lives here rather
//! than in the store.

use std::time::Instant;

use tasker_proto::v1::{self as pb, analytics_service_client::AnalyticsServiceClient};
use tokio_postgres::NoTls;
use tonic::transport::Channel;

use crate::stats::Figure;

pub const TEMPLATE: &str = "namespace: bench_history\nname: history3\nversion: 1.0.0\nsteps:\n  - { name: s1, handler: noop }\n  - { name: s2, handler: noop, depends_on: [s1] }\n  - { name: s3, handler: noop, depends_on: [s2] }\n";

/// Tasks written for A1–A5: 15 transitions each (3 of the task, 4 of each of its 3
/// steps). B8 runs on `B8_TASKS`: the analytics' history, topped up when they ran first.
pub const TASKS: i64 = 80_000;
pub const B8_TASKS: i64 = 1_000_000;
const DAYS: f64 = 30.0;

/// Writes `tasks` finished tasks of history, in chunks of 100,000; returns the transition
/// rows the database then holds.
pub async fn seed(database_url: &str, tasks: i64) -> anyhow::Result<i64> {
    let (client, connection) = tokio_postgres::connect(database_url, NoTls).await?;
    tokio::spawn(connection);
    let started = Instant::now();
    let seconds = DAYS * 86_400.0;
    const CHUNK: i64 = 100_000;
    let mut first = 1;
    while first <= tasks {
        let last = (first + CHUNK - 1).min(tasks);
        client
            .batch_execute(&format!(
                "BEGIN;
                 CREATE TEMP TABLE h ON COMMIT DROP AS
                   SELECT gen_random_uuid() AS id, now() - (g * {seconds}::float8 / {tasks}) * interval '1 second' AS at,
                          g % 20 = 0 AS failed, g
                   FROM generate_series({first}, {last}) g;
                 INSERT INTO tasks (id, named_task_id, namespace, name, version, status, context, created_at, started_at,
                                    completed_at, updated_at, last_sort_key)
                   SELECT h.id, n.id, 'bench_history', 'history3', '1.0.0',
                          CASE WHEN failed THEN 'error' ELSE 'complete' END, '{{}}', at, at + interval '5 ms',
                          at + (300 + g % 200) * interval '1 ms', at + (300 + g % 200) * interval '1 ms', 3
                   FROM h, named_tasks n JOIN task_namespaces ns ON ns.id = n.namespace_id
                   WHERE ns.name = 'bench_history' AND n.name = 'history3';
                 INSERT INTO task_transitions (id, task_id, from_state, to_state, sort_key, metadata, created_at)
                   SELECT gen_random_uuid(), h.id, t.f, t.t, t.k, '{{}}', h.at + t.ms * interval '1 ms'
                   FROM h, LATERAL (VALUES (1, NULL, 'pending', 0), (2, 'pending', 'in_progress', 5),
                                           (3, 'in_progress', CASE WHEN h.failed THEN 'error' ELSE 'complete' END,
                                            300 + h.g % 200)) AS t(k, f, t, ms);
                 CREATE TEMP TABLE hs ON COMMIT DROP AS
                   SELECT gen_random_uuid() AS sid, h.id AS tid, h.at, h.g, k, h.failed AND k = 3 AS failed
                   FROM h, generate_series(1, 3) k;
                 INSERT INTO workflow_steps (id, task_id, name, handler, retryable, max_attempts, attempts, timeout_ms,
                                             status, pending_parents, dependency_level, started_at, completed_at,
                                             last_sort_key)
                   SELECT sid, tid, 's' || k, 'noop', true, 3, 1, 30000,
                          CASE WHEN failed THEN 'error' ELSE 'complete' END, 0, k - 1,
                          at + (k * 90) * interval '1 ms', at + (k * 90 + 20 + g % 50) * interval '1 ms', 4
                   FROM hs;
                 INSERT INTO workflow_step_transitions (id, workflow_step_id, task_id, from_state, to_state, sort_key,
                                                        metadata, created_at)
                   SELECT gen_random_uuid(), hs.sid, hs.tid, t.f, t.t, t.k, t.meta::jsonb,
                          hs.at + (hs.k * 90 + t.ms) * interval '1 ms'
                   FROM hs, LATERAL (VALUES
                     (1, NULL, 'pending', '{{}}', -90),
                     (2, 'pending', 'enqueued', '{{}}', -5),
                     (3, 'enqueued', 'in_progress', format('{{\"wait_ms\": %s}}', 5 + hs.g % 7), 0),
                     (4, 'in_progress', CASE WHEN hs.failed THEN 'error' ELSE 'complete' END,
                      CASE WHEN hs.failed
                           THEN format('{{\"run_ms\": %s, \"error\": {{\"message\": \"upstream timeout %s\", \"kind\": \"permanent\"}}}}',
                                       20 + hs.g % 50, hs.g % 5)
                           ELSE format('{{\"run_ms\": %s}}', 20 + hs.g % 50 + hs.k * 10) END,
                      20 + hs.g % 50)) AS t(k, f, t, meta, ms);
                 COMMIT;"
            ))
            .await?;
        first = last + 1;
    }
    // Settle the bulk load as a database that gathered this history over a month would be:
    // its rows vacuumed (hint bits, visibility map) and its statistics current, and what
    // that wrote flushed by a checkpoint. Otherwise the scenarios that follow would pay for
    // the load (autovacuum or the bench's VACUUM freezing fifteen million fresh rows, a
    // checkpoint spreading gigabytes of dirty pages over the next minutes and every page's
    // first change after it logged in full), not for the history.
    client.batch_execute("VACUUM (ANALYZE) tasks, workflow_steps, task_transitions, workflow_step_transitions").await?;
    if let Err(error) = client.batch_execute("CHECKPOINT").await {
        eprintln!("bench: could not checkpoint after writing the history ({error}); the next figures include it");
    }
    let rows: i64 = client
        .query_one(
            "SELECT (SELECT count(*) FROM task_transitions) + (SELECT count(*) FROM workflow_step_transitions)",
            &[],
        )
        .await?
        .get(0);
    eprintln!("bench: {tasks} tasks of history written in {:.1?} ({rows} transition rows in all)", started.elapsed());
    Ok(rows)
}

/// The median of `n` timed calls of `call`, in milliseconds.
async fn median_ms<F, Fut>(n: usize, mut call: F) -> anyhow::Result<f64>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        call().await?;
        times.push(started.elapsed());
    }
    times.sort();
    Ok(times[times.len() / 2].as_secs_f64() * 1000.0)
}

/// Times each analytics RPC (median of 5 calls after one warm-up call).
pub async fn measure(channel: Channel) -> anyhow::Result<Vec<Figure>> {
    let client = AnalyticsServiceClient::new(channel);
    let hour = 3600;
    let day = 24 * 3600;
    let performance = |window_seconds: u32| {
        let client = client.clone();
        move || {
            let mut client = client.clone();
            async move {
                client.get_performance(pb::PerformanceRequest { window_seconds, namespace: String::new() }).await?;
                Ok(())
            }
        }
    };
    let bottlenecks = |window_seconds: u32| {
        let client = client.clone();
        move || {
            let mut client = client.clone();
            async move {
                let request = pb::BottlenecksRequest { window_seconds, namespace: String::new(), limit: 10 };
                client.get_bottlenecks(request).await?;
                Ok(())
            }
        }
    };
    let health = || {
        let mut client = client.clone();
        async move {
            client.get_system_health(pb::SystemHealthRequest::default()).await?;
            Ok(())
        }
    };
    let mut figures = Vec::new();
    let mut figure = |id, name, value, target| {
        figures.push(Figure { id, name, unit: "ms", value, target, lower_is_better: true });
    };
    performance(hour)().await?;
    bottlenecks(hour)().await?;
    performance(day)().await?;
    figure("A1", "GetPerformance, 1 h window", median_ms(5, performance(hour)).await?, Some("≤ 100"));
    figure("A2", "GetBottlenecks, 1 h window", median_ms(5, bottlenecks(hour)).await?, Some("≤ 100"));
    figure("A3", "GetSystemHealth", median_ms(5, health).await?, Some("≤ 100"));
    figure("A4", "GetPerformance, 24 h window", median_ms(5, performance(day)).await?, None);
    figure("A5", "GetBottlenecks, 24 h window", median_ms(5, bottlenecks(day)).await?, None);
    Ok(figures)
}
