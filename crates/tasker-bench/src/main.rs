//! `tasker-bench`: runs scenarios B1–B9 of `shared/bench.md` and issue 12 (B8: B3 again on
//! a million finished tasks, each round beside B3 on an empty database; B9: a 10,000-step
//! task) and the analytics timings A1–A5
//! against the four services as separate release processes on real Postgres and RabbitMQ,
//! beside the machine's physical reference points, B1's and B2's floor (`floor.rs`) and the
//! CPU ceiling of B3 and B4, and prints min/median/max over repeats (plus a JSON file).

mod cpu;
mod floor;
mod history;
mod reference;
mod scenarios;
mod services;
mod stats;

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use clap::Parser;
use serde_json::json;
use tasker_proto::v1::{
    self as pb, task_service_client::TaskServiceClient, template_service_client::TemplateServiceClient,
};
use tokio_postgres::NoTls;
use tonic::transport::Channel;

use crate::{scenarios::Bench, services::Services, stats::Figure};

#[derive(Debug, Parser)]
#[command(about = "Tasker's benchmark (shared/bench.md, B1–B9, A1–A5)")]
struct Args {
    /// Where the release binaries are.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// The benchmark's database: dropped and created afresh, and dropped again at the end
    /// unless `--keep-database`. The services get this URL; the default reaches the server
    /// as their own default does (its Unix socket, else 127.0.0.1).
    #[arg(
        long,
        env = "TASKER_BENCH_DATABASE_URL",
        default_value = "postgres://postgres@%2Fvar%2Frun%2Fpostgresql,127.0.0.1:5432/tasker_bench"
    )]
    database_url: String,
    /// Leave the benchmark's database behind at the end, to look into or to start a later
    /// run from (`--copy-of`). A full run's holds a million finished tasks, about 5 GB.
    #[arg(long)]
    keep_database: bool,
    /// Create the benchmark's database as a copy of this one (`CREATE DATABASE … TEMPLATE`)
    /// instead of empty: e.g. a copy of what a full run kept (`--keep-database`), a million
    /// finished tasks, to time B3 on that history in rounds alternating with B3 on an empty
    /// database.
    #[arg(long, value_name = "DATABASE")]
    copy_of: Option<String>,
    #[arg(long, env = "TASKER_BENCH_AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Folder for the JSON figures and the services' logs.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Smaller counts, for a quick look.
    #[arg(long)]
    quick: bool,
    /// Run only these scenarios (e.g. `--only B1,B4`; `A` for the analytics figures); the
    /// table then has only their rows.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Serve task-api over TLS with this certificate (PEM; it must name 127.0.0.1) and
    /// `--api-key`, and connect trusting `--ca-cert`: the figures then include TLS.
    #[arg(long, requires_all = ["api_key", "ca_cert"])]
    api_cert: Option<PathBuf>,
    #[arg(long, requires = "api_cert")]
    api_key: Option<PathBuf>,
    /// The CA that signed `--api-cert`.
    #[arg(long, requires = "api_cert")]
    ca_cert: Option<PathBuf>,
    /// The step queues' type, `quorum` (the default) or `classic`, to compare them.
    #[arg(long, default_value = "quorum")]
    queue_type: String,
    /// The orchestrator's input queues' type, `classic` (the default) or `quorum`.
    #[arg(long, default_value = "classic")]
    orchestrator_queue_type: String,
}

const PREFIX: &str = "bench";

/// The bench's workers: processes, the namespaces they serve, concurrency of each.
const WORKERS: (usize, &str, u16) = (2, "[bench]", 32);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let logs = args.out.join("logs");
    std::fs::create_dir_all(&logs)?;
    reset_database(&args.database_url, args.copy_of.as_deref()).await?;

    eprintln!("bench: measuring the reference points");
    let pg = reference::pg_commits_per_second(&args.database_url, Duration::from_secs(3)).await?;
    let (amqp_one, amqp_pipelined) =
        reference::amqp_confirms_per_second(&args.amqp_url, Duration::from_secs(3)).await?;
    eprintln!("bench: pg {pg:.0} commits/s, amqp {amqp_one:.0}/s one at a time, {amqp_pipelined:.0}/s pipelined");

    let queue_type: tasker_messaging::QueueType =
        args.queue_type.parse().map_err(|e: String| anyhow::anyhow!("--queue-type: {e}"))?;
    let orchestrator_queue_type: tasker_messaging::QueueType =
        args.orchestrator_queue_type.parse().map_err(|e: String| anyhow::anyhow!("--orchestrator-queue-type: {e}"))?;
    let mut services = Services::new(args.bin_dir.clone(), logs, &args.database_url, &args.amqp_url, PREFIX);
    services.set("TASKER_AMQP__QUEUE_TYPE", &args.queue_type);
    services.set("TASKER_AMQP__ORCHESTRATOR_QUEUE_TYPE", &args.orchestrator_queue_type);
    if let (Some(cert), Some(key)) = (&args.api_cert, &args.api_key) {
        services.serve_tls(cert, key);
    }
    services.start_core().await?;
    services.start_workers(WORKERS.0, WORKERS.1, WORKERS.2).await?;
    let floor = floor::Setup {
        database_url: args.database_url.clone(),
        amqp_url: args.amqp_url.clone(),
        step_queues: queue_type,
        orchestrator_queues: orchestrator_queue_type,
    };
    let result = run(&args, &mut services, floor).await;
    services.stop().await;
    let broker = tasker_messaging::Broker::connect(
        &args.amqp_url,
        tasker_messaging::Topology::new(PREFIX, queue_type, orchestrator_queue_type, 10),
        "tasker-bench-cleanup",
    )
    .await?;
    let namespaces = ["bench", "bench_idle", "bench_sleep"].map(String::from);
    broker.delete_topology(&namespaces).await?;
    broker.close().await?;
    if args.keep_database {
        eprintln!("bench: the database is kept: {}", args.database_url);
    } else {
        drop_database(&args.database_url).await?;
    }
    let figures = result?;
    report(&args, &figures, pg, amqp_one, amqp_pipelined)
}

async fn reset_database(url: &str, copy_of: Option<&str>) -> anyhow::Result<()> {
    let (client, name) = drop_database(url).await?;
    let template = copy_of.map(|t| format!(" TEMPLATE \"{}\"", t.replace('"', "\"\""))).unwrap_or_default();
    client.batch_execute(&format!("CREATE DATABASE \"{name}\"{template}")).await?;
    tasker_store::migrate(url).await?;
    Ok(())
}

/// Drops the database `url` names, if it exists; returns a connection to the server's
/// `postgres` database and the name.
async fn drop_database(url: &str) -> anyhow::Result<(tokio_postgres::Client, String)> {
    let config: tokio_postgres::Config = url.parse()?;
    let name = config.get_dbname().context("the database URL names no database")?.to_owned();
    let mut server = config.clone();
    server.dbname("postgres");
    let (client, connection) = server.connect(NoTls).await?;
    tokio::spawn(connection);
    client.batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).await?;
    Ok((client, name))
}

/// The URL of a database on the same server as `url`'s, named as it with `suffix` added.
fn beside(url: &str, suffix: &str) -> anyhow::Result<String> {
    let config: tokio_postgres::Config = url.parse()?;
    let name = config.get_dbname().context("the database URL names no database")?;
    let end = url.find('?').unwrap_or(url.len());
    anyhow::ensure!(
        url[..end].ends_with(&format!("/{name}")),
        "B8 needs the database URL as postgres://…/NAME to name a database beside it"
    );
    Ok(format!("{}{suffix}{}", &url[..end], &url[end..]))
}

/// Registers the bench's templates (again, after task-api restarted: the first calls may
/// find the old connection gone, and are tried again for up to ten seconds).
async fn register_templates(channel: &Channel) -> anyhow::Result<()> {
    let mut client = TemplateServiceClient::new(channel.clone());
    for yaml in templates() {
        let mut tries = 0;
        loop {
            match client.register_template(pb::RegisterTemplateRequest { yaml: yaml.clone() }).await {
                Ok(_) => break,
                Err(status) if status.code() == tonic::Code::Unavailable && tries < 100 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(status) => return Err(status.into()),
            }
        }
    }
    Ok(())
}

/// A `bench` template of `layers` layers of 100 `noop` steps, each after two steps of the
/// layer before.
fn layered(name: &str, prefix: &str, layers: usize) -> String {
    let mut yaml = format!("namespace: bench\nname: {name}\nversion: 1.0.0\nsteps:\n");
    for layer in 0..layers {
        for i in 0..100 {
            let deps = if layer == 0 {
                String::new()
            } else {
                format!("{prefix}{}_{i}, {prefix}{}_{}", layer - 1, layer - 1, (i + 1) % 100)
            };
            yaml.push_str(&format!("  - {{ name: {prefix}{layer}_{i}, handler: noop, depends_on: [{deps}] }}\n"));
        }
    }
    yaml
}

fn templates() -> Vec<String> {
    let mut all = Vec::new();
    let diamond = "  - { name: start, handler: noop }\n  - { name: b1, handler: noop, depends_on: [start] }\n  - { name: b2, handler: noop, depends_on: [start] }\n  - { name: c1, handler: noop, depends_on: [b1] }\n  - { name: c2, handler: noop, depends_on: [b2] }\n  - { name: merge, handler: noop, depends_on: [c1, c2] }\n  - { name: end, handler: noop, depends_on: [merge] }\n";
    for ns in ["bench", "bench_idle"] {
        all.push(format!("namespace: {ns}\nname: diamond7\nversion: 1.0.0\nsteps:\n{diamond}"));
    }
    all.push("namespace: bench\nname: linear4\nversion: 1.0.0\nsteps:\n  - { name: a, handler: noop }\n  - { name: b, handler: noop, depends_on: [a] }\n  - { name: c, handler: noop, depends_on: [b] }\n  - { name: d, handler: noop, depends_on: [c] }\n".into());
    all.push(layered("wide1000", "l", 10));
    // B9: 100 layers of 100 (task-api's limits are raised for it)
    all.push(layered("wide10000", "m", 100));
    let mut sleep = String::from("namespace: bench_sleep\nname: sleep10\nversion: 1.0.0\nsteps:\n");
    for i in 0..10 {
        sleep.push_str(&format!("  - {{ name: s{i}, handler: sleep, config: {{ ms: 50 }} }}\n"));
    }
    all.push(sleep);
    all.push(history::TEMPLATE.into());
    all
}

async fn run(args: &Args, services: &mut Services, floor: floor::Setup) -> anyhow::Result<Vec<Vec<Figure>>> {
    let scheme = if args.api_cert.is_some() { "https" } else { "http" };
    let tls = tasker_runtime::tls::ClientTls { ca_file: args.ca_cert.clone(), ..Default::default() };
    let channel =
        tasker_runtime::tls::endpoint(&format!("{scheme}://127.0.0.1:{}", services::API_PORT), &tls)?.connect().await?;
    register_templates(&channel).await?;
    let mut config = tasker_runtime::Config::default();
    config.amqp.url = args.amqp_url.clone();
    config.amqp.prefix = PREFIX.into();
    let broker = tasker_runtime::connect_broker(&config.amqp, "tasker-bench").await?;
    let completions = scenarios::Completions::listen(broker.subscribe_events(&["*.*.task.completed"]).await?);
    let bench =
        Bench { client: TaskServiceClient::new(channel.clone()), broker, completions, quick: args.quick, floor };
    // warm up: connections, prepared statements, queue declarations
    bench.b1_b2().await?;
    let vacuum = Vacuum::connect(&args.database_url).await?;
    if vacuum.client.is_some() {
        eprintln!("bench: the server has autovacuum off; running VACUUM (ANALYZE) between scenarios in its stead");
    }

    let mut repeats = Vec::new();
    for r in 1..=args.repeats {
        eprintln!("bench: repeat {r}/{}", args.repeats);
        let mut figures = Vec::new();
        for label in ["B1/B2", "B3", "B4", "B5", "B6", "B7", "B9"] {
            if !args.only.is_empty() && !args.only.iter().any(|o| label.split('/').any(|l| l.eq_ignore_ascii_case(o))) {
                continue;
            }
            vacuum.run().await?;
            let cpu_before = cpu::snapshot();
            let result = match label {
                "B1/B2" => bench.b1_b2().await,
                "B3" => bench.b3().await,
                "B4" => bench.b4().await,
                "B5" => bench.b5().await,
                "B6" => bench.b6(services).await,
                "B7" => bench.b7().await,
                _ => bench.b9().await,
            };
            let got = result.with_context(|| format!("scenario {label}"))?;
            eprintln!("  {label}: {}", cpu::used(&cpu_before, &cpu::snapshot()));
            for f in &got {
                eprintln!("  {:<3} {:<48} {:>10.2} {}", f.id, f.name, f.value, f.unit);
            }
            figures.extend(got);
        }
        repeats.push(figures);
    }
    let wanted = |label: &str| args.only.is_empty() || args.only.iter().any(|o| o.eq_ignore_ascii_case(label));
    // the analytics, then B8, last: the history they write would change the figures above.
    // The analytics' history is the first part of B8's, which tops it up to a million tasks
    let mut seeded = 0;
    if wanted("A") {
        eprintln!("bench: analytics (A1–A5) on a history of {} finished tasks", history::TASKS);
        history::seed(&args.database_url, history::TASKS).await?;
        seeded = history::TASKS;
        for (r, figures) in repeats.iter_mut().enumerate() {
            let got = history::measure(channel.clone()).await?;
            for f in &got {
                eprintln!("  repeat {} {:<3} {:<48} {:>10.2} {}", r + 1, f.id, f.name, f.value, f.unit);
            }
            figures.extend(got);
        }
    }
    if wanted("B8") {
        eprintln!("bench: B8, B3 again on a database holding {} finished tasks", history::B8_TASKS);
        history::seed(&args.database_url, history::B8_TASKS - seeded).await?;
        // Side by side: each round times B3 on a new, empty database and then on the
        // history, the services started afresh on each and warmed up alike, so that the
        // ratio compares minutes of the same hour (the machine's speed moves over a run,
        // and B3 above ran long before).
        let empty_url = beside(&args.database_url, "_empty")?;
        for figures in repeats.iter_mut() {
            reset_database(&empty_url, None).await?;
            let empty = b3_on(&bench, services, &channel, &empty_url).await?;
            let full = b3_on(&bench, services, &channel, &args.database_url).await?;
            eprintln!("  B8  {full:.0} steps/s on the long history, {empty:.0} on an empty database just before");
            figures.extend([
                scenarios::figure("B8", "B3 on 1,000,000 finished tasks: steps/s", "steps/s", full, None),
                scenarios::figure("B8", "B3 on an empty database, the same round: steps/s", "steps/s", empty, None),
                scenarios::figure("B8", "B8 ÷ B3 on an empty database", "ratio", full / empty, Some("≥ 0.9")),
            ]);
        }
        drop_database(&empty_url).await?;
    }
    bench.broker.close().await?;
    Ok(repeats)
}

/// B3 with the services started afresh on `database_url` and warmed up: its steps/s.
async fn b3_on(bench: &Bench, services: &mut Services, channel: &Channel, database_url: &str) -> anyhow::Result<f64> {
    services.restart_core_on(database_url).await?;
    services.start_workers(WORKERS.0, WORKERS.1, WORKERS.2).await?;
    register_templates(channel).await?;
    bench.warm_up().await?;
    Vacuum::connect(database_url).await?.run().await?;
    let figures = bench.b3().await?;
    figures.iter().find(|f| f.unit == "steps/s").map(|f| f.value).context("B3 gave no steps/s")
}

/// Stands in for autovacuum when the server has it off (a non-default setting some
/// development servers use): without it every update leaves its dead row versions in the
/// tables and indexes for good, and each scenario would run slower than the one before.
struct Vacuum {
    client: Option<tokio_postgres::Client>,
}

impl Vacuum {
    async fn connect(url: &str) -> anyhow::Result<Vacuum> {
        let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
        tokio::spawn(connection);
        let setting: String = client.query_one("SHOW autovacuum", &[]).await?.get(0);
        Ok(Vacuum { client: (setting != "on").then_some(client) })
    }

    async fn run(&self) -> anyhow::Result<()> {
        if let Some(client) = &self.client {
            client.batch_execute("VACUUM (ANALYZE)").await?;
        }
        Ok(())
    }
}

fn report(args: &Args, repeats: &[Vec<Figure>], pg: f64, amqp_one: f64, amqp_pipelined: f64) -> anyhow::Result<()> {
    let commit_ms = 1000.0 / pg;
    println!();
    println!(
        "references: Postgres single-row commits {pg:.0}/s ({commit_ms:.2} ms each); RabbitMQ persistent publish+confirm \
         {amqp_one:.0}/s one at a time, {amqp_pipelined:.0}/s pipelined"
    );
    println!();
    println!("| id | figure | unit | min | median | max | target | met | vs reference |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for (i, first) in repeats[0].iter().enumerate() {
        let mut values: Vec<f64> = repeats.iter().map(|r| r[i].value).collect();
        values.sort_by(f64::total_cmp);
        let (min, median, max) = (values[0], values[values.len() / 2], values[values.len() - 1]);
        let met = first.target.map(|t| {
            let bound: f64 = t.trim_start_matches(['≤', '≥', ' ']).replace(',', "").parse().unwrap_or(f64::NAN);
            if first.lower_is_better { median <= bound } else { median >= bound }
        });
        let versus = match first.unit {
            "ms" => format!("{:.1} commits", median / commit_ms),
            "s" => format!("{:.0} commits", median * 1000.0 / commit_ms),
            "steps/s" | "req/s" => format!("{:.2} × commit rate", median / pg),
            _ => String::new(),
        };
        println!(
            "| {} | {} | {} | {min:.2} | {median:.2} | {max:.2} | {} | {} | {versus} |",
            first.id,
            first.name,
            first.unit,
            first.target.unwrap_or(""),
            met.map(|m| if m { "yes" } else { "no" }).unwrap_or(""),
        );
        rows.push(json!({
            "id": first.id, "figure": first.name, "unit": first.unit, "target": first.target,
            "met": met, "min": min, "median": median, "max": max, "values": values,
        }));
    }
    let when = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let document = json!({
        "unix_time": when,
        "repeats": repeats.len(),
        "quick": args.quick,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "references": {
            "postgres_single_row_commits_per_second": pg,
            "rabbitmq_confirmed_publishes_per_second_one_at_a_time": amqp_one,
            "rabbitmq_confirmed_publishes_per_second_pipelined": amqp_pipelined,
        },
        "figures": rows,
    });
    let text = serde_json::to_string_pretty(&document)?;
    std::fs::write(args.out.join(format!("bench-{when}.json")), &text)?;
    std::fs::write(args.out.join("latest.json"), &text)?;
    eprintln!("bench: figures written to {}", args.out.join("latest.json").display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use tasker_domain::{Limits, Template};

    #[test]
    fn every_template_is_valid_within_the_limits_the_bench_gives_task_api() {
        let limits = Limits { max_steps: 10_000, max_template_bytes: 2 << 20, ..Limits::default() };
        let steps: Vec<usize> = super::templates()
            .iter()
            .map(|yaml| Template::from_yaml(yaml, &limits).unwrap_or_else(|e| panic!("{e}")).steps.len())
            .collect();
        assert_eq!(steps, [7, 7, 4, 1_000, 10_000, 10, 3]);
    }
}
