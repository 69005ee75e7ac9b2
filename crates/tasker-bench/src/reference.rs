//! The physical reference points, measured in the same run: Postgres single-row commits and
//! RabbitMQ persistent publishes awaited on their confirms.

use std::time::{Duration, Instant};

use tasker_messaging::{Broker, Command, QueueType, Topology};
use tasker_proto::messages::TaskRequest;
use tokio_postgres::NoTls;

/// Single-row INSERT commits per second, one at a time (what `pgbench -N` bounds).
pub async fn pg_commits_per_second(database_url: &str, run: Duration) -> anyhow::Result<f64> {
    let (client, connection) = tokio_postgres::connect(database_url, NoTls).await?;
    tokio::spawn(connection);
    client.batch_execute("CREATE TABLE IF NOT EXISTS bench_commit_probe (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now())").await?;
    let insert = client.prepare("INSERT INTO bench_commit_probe DEFAULT VALUES").await?;
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < run {
        client.execute(&insert, &[]).await?;
        n += 1;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    client.batch_execute("DROP TABLE bench_commit_probe").await?;
    Ok(rate)
}

/// Persistent publishes with confirms per second: one at a time, and pipelined in batches.
pub async fn amqp_confirms_per_second(amqp_url: &str, run: Duration) -> anyhow::Result<(f64, f64)> {
    let topology = Topology::new("bench-ref", QueueType::Quorum, QueueType::Quorum, 10);
    let broker = Broker::connect(amqp_url, topology, "tasker-bench-reference").await?;
    broker.declare_orchestrator().await?;
    let publisher = broker.publisher().await?;
    let command =
        Command::Task(TaskRequest { task_id: "00000000-0000-0000-0000-000000000000".into(), ..Default::default() });
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < run {
        publisher.send(std::slice::from_ref(&command)).await?;
        n += 1;
    }
    let one_at_a_time = n as f64 / start.elapsed().as_secs_f64();
    let batch = vec![command; 200];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < run {
        publisher.send(&batch).await?;
        n += batch.len() as u64;
    }
    let pipelined = n as f64 / start.elapsed().as_secs_f64();
    broker.delete_topology(&[]).await?;
    broker.close().await?;
    Ok((one_at_a_time, pipelined))
}
