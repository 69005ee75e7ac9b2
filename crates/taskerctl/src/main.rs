//! `taskerctl`: Tasker's command-line client. Talks to task-api over gRPC, to the broker
//! for `events`, and to the database only for `migrate`.

mod follow;
mod print;

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use follow::NotCompleted;
use tasker_proto::v1::{
    self as pb, analytics_service_client::AnalyticsServiceClient, step_service_client::StepServiceClient,
    task_service_client::TaskServiceClient, template_service_client::TemplateServiceClient,
};
use tasker_runtime::Config;
use tonic::{
    Request,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};

#[derive(Debug, Parser)]
#[command(name = "taskerctl", version, about = "Tasker's command-line client")]
struct Cli {
    /// task-api address (`https://…` for TLS).
    #[arg(long, global = true, env = "TASKER_API", default_value = "http://127.0.0.1:50051")]
    api: String,
    /// Configuration file for `migrate` and `events` (database and broker settings; the
    /// `TASKER_*` environment applies too).
    #[arg(long, global = true, env = "TASKER_CONFIG")]
    config: Option<PathBuf>,
    /// Bearer token (JWT or API key) sent to task-api when it runs with `auth.mode = jwt`.
    #[arg(long, global = true, env = "TASKER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file holding the token (instead of `--token`).
    #[arg(long, global = true, env = "TASKER_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// For an `https://` API: the CA certificate (PEM) to trust instead of the system roots.
    #[arg(long, global = true, env = "TASKER_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// For a task-api that requires client certificates: this client's certificate (PEM).
    #[arg(long, global = true, env = "TASKER_CLIENT_CERT", requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// The private key (PEM) of `--client-cert`.
    #[arg(long, global = true, env = "TASKER_CLIENT_KEY", requires = "client_cert")]
    client_key: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the database if needed and apply the migrations.
    Migrate,
    /// Register, show and list templates.
    #[command(subcommand)]
    Template(TemplateCommand),
    /// List namespaces.
    Namespaces,
    /// Submit, show, list and cancel tasks.
    #[command(subcommand)]
    Task(TaskCommand),
    /// Retry or resolve a failed step.
    #[command(subcommand)]
    Step(StepCommand),
    /// Stream a task's lifecycle events until it is final.
    ///
    /// If task-api goes away meanwhile (a restart, a lost connection), the task is watched
    /// again, for up to 2 minutes of trying, and each event is printed once. Exits 0 when
    /// the task completed, 3 when it ended `error` or `cancelled`, 1 on any other failure
    /// (2: bad arguments).
    Watch { task_id: String },
    /// Development tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Performance, bottlenecks and system health (AnalyticsService).
    Stats {
        /// How far back to look, e.g. `15m`, `1h`, `7d` (at most 30 days).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        window: Duration,
        /// Only this namespace.
        #[arg(long)]
        namespace: Option<String>,
        /// Entries per bottleneck list.
        #[arg(long, default_value_t = 10)]
        limit: u32,
    },
    /// Bind a queue to the events exchange and print events as they arrive.
    ///
    /// A lost broker connection is followed by a new subscription (for up to 2 minutes of
    /// trying); what was published in between is not seen, and that is said.
    Events {
        /// Topic patterns (`#`, `payments.#`, `*.*.step.failed`).
        #[arg(default_value = "#")]
        patterns: Vec<String>,
        /// Print each CloudEvent as JSON.
        #[arg(long)]
        json: bool,
        /// Exit after this many events.
        #[arg(long)]
        count: Option<usize>,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Print an HS256 JWT signed with task-api's `auth.hs256_secret` (for development and
    /// tests; production tokens come from your identity provider).
    Mint {
        #[arg(long, env = "TASKER_AUTH__HS256_SECRET", hide_env_values = true)]
        secret: String,
        #[arg(long)]
        subject: String,
        /// `resource:action`, `resource:*` or `*`; repeat for several.
        #[arg(long = "permission", default_value = "*")]
        permissions: Vec<String>,
        /// Namespaces the token may touch, or `*`; repeat for several.
        #[arg(long = "namespace", default_value = "*")]
        namespaces: Vec<String>,
        /// Lifetime, e.g. `1h`, `30m`.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        #[arg(long, env = "TASKER_AUTH__ISSUER")]
        issuer: Option<String>,
        #[arg(long, env = "TASKER_AUTH__AUDIENCE")]
        audience: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum TemplateCommand {
    /// Register YAML template files.
    Register { files: Vec<PathBuf> },
    /// List templates.
    List {
        #[arg(long)]
        namespace: Option<String>,
    },
    /// Show one template (the latest version unless given).
    Get { namespace: String, name: String, version: Option<String> },
}

#[derive(Debug, Subcommand)]
enum TaskCommand {
    /// Create a task.
    Submit {
        namespace: String,
        name: String,
        #[arg(long)]
        version: Option<String>,
        /// JSON context, or @file.
        #[arg(long, default_value = "{}")]
        context: String,
        #[arg(long)]
        idempotency_key: Option<String>,
        #[arg(long)]
        reason: Option<String>,
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Stream the task's events until it is final, then show it (as `watch` does); exit
        /// 3 when it ended `error` or `cancelled`.
        #[arg(long)]
        wait: bool,
    },
    /// Show a task with its steps.
    Get {
        task_id: String,
        /// Include the transition history.
        #[arg(long)]
        transitions: bool,
    },
    /// List tasks, newest first.
    List {
        #[arg(long)]
        namespace: Option<String>,
        #[arg(long)]
        name: Option<String>,
        /// pending, in_progress, complete, error or cancelled.
        #[arg(long)]
        status: Option<String>,
        /// Only tasks created at or after this instant (RFC 3339, e.g. `2026-12-07T10:00:00Z`).
        #[arg(long, value_parser = instant)]
        created_after: Option<prost_types::Timestamp>,
        /// Only tasks created before this instant (RFC 3339).
        #[arg(long, value_parser = instant)]
        created_before: Option<prost_types::Timestamp>,
        /// Tasks per page (task-api gives at most 500).
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// The page after the one that printed this token (on stderr: `next page: --page-token …`).
        #[arg(long)]
        page_token: Option<String>,
    },
    /// Cancel a task and its unfinished steps.
    Cancel {
        task_id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
enum StepCommand {
    /// Run a failed step again: a new round of max_attempts attempts (their numbers go on).
    Retry {
        step_id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Mark a failed step resolved, with results its children receive.
    Resolve {
        step_id: String,
        #[arg(long, default_value = "{}")]
        results: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) if error.is::<NotCompleted>() => {
            eprintln!("{error}");
            std::process::ExitCode::from(NotCompleted::EXIT_CODE)
        }
        Err(error) => {
            match error.downcast_ref::<tonic::Status>() {
                Some(status) => eprintln!("error: {:?}: {}", status.code(), status.message()),
                None => eprintln!("error: {error:#}"),
            }
            std::process::ExitCode::FAILURE
        }
    }
}

/// An RFC 3339 instant, as a protobuf timestamp.
fn instant(text: &str) -> Result<prost_types::Timestamp, String> {
    let at = chrono::DateTime::parse_from_rfc3339(text).map_err(|e| format!("not an RFC 3339 instant: {e}"))?;
    Ok(prost_types::Timestamp { seconds: at.timestamp(), nanos: at.timestamp_subsec_nanos() as i32 })
}

fn config(cli: &Cli) -> anyhow::Result<Config> {
    Config::load(cli.config.as_deref()).map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))
}

/// What every call carries: the bearer token when there is one, and the user's name (the
/// actor recorded when task-api runs without authentication; with it, the token's subject
/// is recorded instead).
#[derive(Clone)]
struct Credentials {
    bearer: Option<MetadataValue<Ascii>>,
    actor: Option<MetadataValue<Ascii>>,
}

impl Interceptor for Credentials {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, tonic::Status> {
        if let Some(bearer) = &self.bearer {
            request.metadata_mut().insert("authorization", bearer.clone());
        }
        if let Some(actor) = &self.actor {
            request.metadata_mut().insert("x-tasker-actor", actor.clone());
        }
        Ok(request)
    }
}

/// The largest answer taskerctl reads: any. task-api's own limits bound an answer (a task's
/// context and each step's results up to 1 MiB), and gRPC's default of 4 MiB would refuse
/// a task of a few large steps.
const ANSWERS: usize = usize::MAX;

pub(crate) type Api = InterceptedService<Channel, Credentials>;

async fn channel(cli: &Cli) -> anyhow::Result<Api> {
    let api = &cli.api;
    let tls = tasker_runtime::tls::ClientTls {
        ca_file: cli.ca_cert.clone(),
        cert_file: cli.client_cert.clone(),
        key_file: cli.client_key.clone(),
    };
    let channel = tasker_runtime::tls::endpoint(api, &tls)
        .context("--api")?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connecting to task-api at {api}"))?;
    let token = match (&cli.token, &cli.token_file) {
        (Some(token), _) => Some(token.trim().to_owned()),
        (None, Some(path)) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("--token-file {}", path.display()))?
                .trim()
                .to_owned(),
        ),
        (None, None) => None,
    }
    .filter(|t| !t.is_empty());
    let bearer =
        token.map(|t| format!("Bearer {t}").parse()).transpose().context("--token: not a valid header value")?;
    let user = std::env::var("USER").unwrap_or_else(|_| "taskerctl".into());
    let actor = format!("taskerctl:{user}").parse().ok();
    Ok(InterceptedService::new(channel, Credentials { bearer, actor }))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Migrate => {
            let config = config(&cli)?;
            tasker_store::ensure_database(&config.database.url).await?;
            tasker_store::migrate(&config.database.url).await?;
            println!("migrations applied");
        }
        Command::Template(cmd) => {
            let mut client = TemplateServiceClient::new(channel(&cli).await?).max_decoding_message_size(ANSWERS);
            match cmd {
                TemplateCommand::Register { files } => {
                    if files.is_empty() {
                        bail!("name at least one template file");
                    }
                    for file in files {
                        let yaml =
                            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
                        let response =
                            client.register_template(pb::RegisterTemplateRequest { yaml }).await?.into_inner();
                        let t = response.template.unwrap_or_default();
                        let what = if response.created { "registered" } else { "unchanged" };
                        println!("{what}  {}/{} {}  ({} steps)", t.namespace, t.name, t.version, t.steps.len());
                    }
                }
                TemplateCommand::List { namespace } => {
                    let request = pb::ListTemplatesRequest { namespace: namespace.clone().unwrap_or_default() };
                    let templates = client.list_templates(request).await?.into_inner().templates;
                    print::templates(&templates);
                }
                TemplateCommand::Get { namespace, name, version } => {
                    let request = pb::GetTemplateRequest {
                        namespace: namespace.clone(),
                        name: name.clone(),
                        version: version.clone().unwrap_or_default(),
                    };
                    print::template(&client.get_template(request).await?.into_inner());
                }
            }
        }
        Command::Namespaces => {
            let mut client = TemplateServiceClient::new(channel(&cli).await?).max_decoding_message_size(ANSWERS);
            for ns in client.list_namespaces(pb::ListNamespacesRequest {}).await?.into_inner().namespaces {
                println!("{:<24} {} templates", ns.name, ns.template_count);
            }
        }
        Command::Task(cmd) => task(&cli, cmd).await?,
        Command::Stats { window, namespace, limit } => {
            let mut client = AnalyticsServiceClient::new(channel(&cli).await?).max_decoding_message_size(ANSWERS);
            let window_seconds = u32::try_from(window.as_secs()).context("--window is too long")?;
            let namespace = namespace.clone().unwrap_or_default();
            let performance = client
                .get_performance(pb::PerformanceRequest { window_seconds, namespace: namespace.clone() })
                .await?
                .into_inner();
            let bottlenecks = client
                .get_bottlenecks(pb::BottlenecksRequest { window_seconds, namespace: namespace.clone(), limit: *limit })
                .await?
                .into_inner();
            let health = client.get_system_health(pb::SystemHealthRequest { namespace }).await?.into_inner();
            print::stats(&performance, &bottlenecks, &health);
        }
        Command::Step(cmd) => {
            let mut client = StepServiceClient::new(channel(&cli).await?).max_decoding_message_size(ANSWERS);
            let step = match cmd {
                StepCommand::Retry { step_id, reason } => {
                    client.retry_step(pb::RetryStepRequest { step_id: step_id.clone(), reason: reason.clone() }).await?
                }
                StepCommand::Resolve { step_id, results, reason } => {
                    let request = pb::ResolveStepRequest {
                        step_id: step_id.clone(),
                        reason: reason.clone(),
                        results_json: results.clone(),
                    };
                    client.resolve_step(request).await?
                }
            };
            print::step_line(&step.into_inner());
        }
        Command::Watch { task_id } => {
            let mut client = TaskServiceClient::new(channel(&cli).await?).max_decoding_message_size(ANSWERS);
            let last = follow::watch(&mut client, task_id).await?;
            NotCompleted::check(task_id, &last)?;
        }
        Command::Token(TokenCommand::Mint { secret, subject, permissions, namespaces, ttl, issuer, audience }) => {
            let token = tasker_auth::mint(&tasker_auth::Mint {
                secret,
                subject,
                permissions,
                namespaces,
                lifetime: *ttl,
                issuer: issuer.as_deref(),
                audience: audience.as_deref(),
                issued_at: tasker_auth::now(),
            })
            .map_err(anyhow::Error::msg)?;
            println!("{token}");
        }
        Command::Events { patterns, json, count } => {
            let config = config(&cli)?;
            let patterns: Vec<&str> = patterns.iter().map(String::as_str).collect();
            follow::events(&config, &patterns, *json, *count).await?;
        }
    }
    Ok(())
}

async fn task(cli: &Cli, cmd: &TaskCommand) -> anyhow::Result<()> {
    let mut client = TaskServiceClient::new(channel(cli).await?).max_decoding_message_size(ANSWERS);
    match cmd {
        TaskCommand::Submit { namespace, name, version, context, idempotency_key, reason, tags, wait } => {
            let context_json = match context.strip_prefix('@') {
                Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?,
                None => context.clone(),
            };
            let request = pb::CreateTaskRequest {
                namespace: namespace.clone(),
                name: name.clone(),
                version: version.clone().unwrap_or_default(),
                context_json,
                tags: tags.clone(),
                initiator: std::env::var("USER").unwrap_or_default(),
                source_system: "taskerctl".into(),
                reason: reason.clone().unwrap_or_default(),
                priority: 0,
                idempotency_key: idempotency_key.clone().unwrap_or_default(),
            };
            let response = client.create_task(request).await?.into_inner();
            let task = response.task.unwrap_or_default();
            let note = if response.deduplicated { " (deduplicated: the original task)" } else { "" };
            println!("task {} {}/{} {}{note}", task.id, task.namespace, task.name, task.version);
            if *wait {
                let last = follow::watch(&mut client, &task.id).await?;
                let task = follow::final_state(&mut client, &task.id).await?;
                print::task(&task, false);
                NotCompleted::check(&task.id, &last)?;
            }
        }
        TaskCommand::Get { task_id, transitions } => {
            let request = pb::GetTaskRequest { task_id: task_id.clone(), include_transitions: *transitions };
            print::task(&client.get_task(request).await?.into_inner(), *transitions);
        }
        TaskCommand::List { namespace, name, status, created_after, created_before, limit, page_token } => {
            let status = match status.as_deref() {
                None => pb::TaskStatus::Unspecified,
                Some(s) => pb::TaskStatus::from_str_name(&format!("TASK_STATUS_{}", s.to_uppercase()))
                    .with_context(|| format!("--status `{s}`: pending, in_progress, complete, error or cancelled"))?,
            };
            let request = pb::ListTasksRequest {
                namespace: namespace.clone().unwrap_or_default(),
                name: name.clone().unwrap_or_default(),
                status: status as i32,
                created_after: *created_after,
                created_before: *created_before,
                page_size: *limit,
                page_token: page_token.clone().unwrap_or_default(),
            };
            let page = client.list_tasks(request).await?.into_inner();
            print::task_list(&page.tasks);
            if !page.next_page_token.is_empty() {
                eprintln!("next page: --page-token {}", page.next_page_token);
            }
        }
        TaskCommand::Cancel { task_id, reason } => {
            let request = pb::CancelTaskRequest { task_id: task_id.clone(), reason: reason.clone() };
            print::task(&client.cancel_task(request).await?.into_inner(), false);
        }
    }
    Ok(())
}
