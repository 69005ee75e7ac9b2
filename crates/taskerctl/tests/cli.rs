//! Process level: the real `taskerctl` binary against a task-api with `auth.mode = jwt`.

use tasker_proto::v1 as pb;
use tasker_test_support::{FaultProxy, Service, System, TestEnv, WorkerSpec};

const SECRET: &str = "a-cli-test-secret-of-at-least-32-bytes";

const QUICK: &str = "namespace: rewatch\nname: quick\nversion: 1.0.0\nsteps:\n  - { name: a, handler: echo }\n";

/// One step that fails for good on its first attempt.
const FAILING: &str = "namespace: rewatch\nname: failing\nversion: 1.0.0\nsteps:\n  - { name: a, handler: fail, config: { permanent: true, message: refused } }\n";

/// Two steps, one after the other: 1.5 s, then 3 s.
const SLOW: &str = "namespace: rewatch\nname: slow\nversion: 1.0.0\nsteps:\n  - { name: a, handler: sleep, config: { ms: 1500 } }\n  - { name: b, handler: sleep, config: { ms: 3000 }, depends_on: [a] }\n";

async fn taskerctl(args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_taskerctl"))
        .args(args)
        .env_remove("TASKER_TOKEN")
        .env_remove("TASKER_TOKEN_FILE")
        .env_remove("TASKER_AUTH__HS256_SECRET")
        .output()
        .await
        .expect("run taskerctl")
}

/// `token mint` makes a token task-api accepts, with exactly the rights asked for, and
/// `--token` / `--token-file` send it.
#[tokio::test]
async fn minted_tokens_open_what_they_name_and_nothing_else() {
    let env = TestEnv::new().await;
    let mut config = env.config.clone();
    config.auth.mode = tasker_auth::Mode::Jwt;
    config.auth.hs256_secret = Some(SECRET.into());
    let system = System::start_with(&env, config, vec![]).await;
    let api = format!("http://{}", system.api_addr);

    let minted = taskerctl(&[
        "token",
        "mint",
        "--secret",
        SECRET,
        "--subject",
        "carol",
        "--permission",
        "templates:read",
        "--ttl",
        "10m",
    ])
    .await;
    assert!(minted.status.success(), "{}", String::from_utf8_lossy(&minted.stderr));
    let token = String::from_utf8(minted.stdout).unwrap().trim().to_owned();
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");

    let listed = taskerctl(&["--api", &api, "--token", &token, "namespaces"]).await;
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));

    let file = std::env::temp_dir().join(format!("taskerctl-token-{}", std::process::id()));
    std::fs::write(&file, format!("{token}\n")).unwrap();
    let from_file = taskerctl(&["--api", &api, "--token-file", file.to_str().unwrap(), "namespaces"]).await;
    std::fs::remove_file(&file).unwrap();
    assert!(from_file.status.success(), "{}", String::from_utf8_lossy(&from_file.stderr));

    let anonymous = taskerctl(&["--api", &api, "namespaces"]).await;
    assert!(!anonymous.status.success());
    assert!(String::from_utf8_lossy(&anonymous.stderr).contains("credentials required"), "{anonymous:?}");

    let beyond = taskerctl(&["--api", &api, "--token", &token, "task", "list"]).await;
    assert!(!beyond.status.success(), "templates:read does not list tasks");
    assert!(String::from_utf8_lossy(&beyond.stderr).contains("tasks:list"), "{beyond:?}");
    system.stop().await;
    env.cleanup().await;
}

/// `--ca-cert` makes taskerctl trust a private CA for an `https://` task-api, and the
/// client certificate flags satisfy one that requires client certificates.
#[tokio::test]
async fn talks_tls_to_a_task_api_with_a_private_ca() {
    let env = TestEnv::new().await;
    let ca = tasker_test_support::TestCa::new("cli");
    let server = ca.server("task-api");
    let client = ca.client("taskerctl");
    let mut config = env.config.clone();
    config.api.tls.cert_file = Some(server.cert_file.clone());
    config.api.tls.key_file = Some(server.key_file.clone());
    config.api.tls.client_ca_file = Some(ca.ca_file.clone());
    let tls = tasker_runtime::tls::ClientTls {
        ca_file: Some(ca.ca_file.clone()),
        cert_file: Some(client.cert_file.clone()),
        key_file: Some(client.key_file.clone()),
    };
    let system = System::start_with_client(&env, config, vec![], &tls).await;
    let api = format!("https://{}", system.api_addr);
    let (ca_file, cert, key) =
        (ca.ca_file.to_str().unwrap(), client.cert_file.to_str().unwrap(), client.key_file.to_str().unwrap());

    let listed =
        taskerctl(&["--api", &api, "--ca-cert", ca_file, "--client-cert", cert, "--client-key", key, "namespaces"])
            .await;
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));

    let no_client_cert = taskerctl(&["--api", &api, "--ca-cert", ca_file, "namespaces"]).await;
    assert!(!no_client_cert.status.success(), "the server requires a client certificate");
    let untrusted = taskerctl(&["--api", &api, "--client-cert", cert, "--client-key", key, "namespaces"]).await;
    assert!(!untrusted.status.success(), "the system roots do not hold the test CA");

    system.stop().await;
    env.cleanup().await;
}

/// `taskerctl watch` rides out task-api going away: when its stream ends with UNAVAILABLE
/// (task-api stopping for a restart, or the connection lost) it watches again, and prints
/// each event once, with none missed, through to the task's end.
#[tokio::test]
async fn watch_goes_on_through_a_task_api_restart_and_a_lost_connection() {
    let env = TestEnv::new().await;
    let mut system = System::start(&env, vec![WorkerSpec::new("w1", &["rewatch"])]).await;
    system.register(&env, SLOW).await;
    let task = system.submit("rewatch", "slow", serde_json::json!({})).await;
    let proxy = FaultProxy::start(system.api_addr).await;
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_taskerctl"));
    command.args(["--api", &format!("http://{}", proxy.addr()), "watch", &task.id]);
    let watch = Service::spawn(command, "task.created").await;

    system.restart_api().await;
    watch.wait_for_line("watching again").await;
    // the new stream is live: a's completion, after the restart, comes through it
    watch.wait_for_line("step.completed").await;
    proxy.cut();
    let (status, lines) = watch.exited().await;
    assert!(status.success(), "{lines:#?}");
    // watched again once task-api said it was stopping, and again after the cut
    let rewatched = |l: &String| l.contains("watching again");
    assert!(lines.iter().any(|l| rewatched(l) && l.contains("shutting down")), "{lines:#?}");
    let cut_at = lines.iter().position(|l| l.contains("step.completed")).unwrap();
    assert!(lines[cut_at..].iter().any(rewatched), "{lines:#?}");

    // every event of the task, as a fresh watch replays them, printed once each
    let mut history =
        system.tasks().watch_task(pb::WatchTaskRequest { task_id: task.id.clone() }).await.unwrap().into_inner();
    let mut expected = Vec::new();
    while let Some(event) = history.message().await.unwrap() {
        expected.push(event.routing_key);
    }
    assert!(expected.last().is_some_and(|k| k.ends_with("task.completed")), "{expected:?}");
    let printed: Vec<&str> =
        lines.iter().filter(|l| l.contains(" → ")).filter_map(|l| l.split_whitespace().nth(1)).collect();
    assert_eq!(printed, expected, "each event once, in order: {lines:#?}");
    system.stop().await;
    env.cleanup().await;
}

/// `taskerctl events` subscribes again when its broker connection is lost, says that what
/// was published meanwhile was not seen, and goes on printing what is published after.
#[tokio::test]
async fn events_subscribes_again_after_losing_the_broker() {
    let env = TestEnv::new().await;
    let system = System::start(&env, vec![WorkerSpec::new("w1", &["rewatch"])]).await;
    system.register(&env, QUICK).await;
    let proxy = FaultProxy::for_url(&env.config.amqp.url).await;
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_taskerctl"));
    command
        .args(["events", "rewatch.#.task.completed", "--count", "2"])
        .env("TASKER_AMQP__URL", proxy.url(&env.config.amqp.url))
        .env("TASKER_AMQP__PREFIX", &env.config.amqp.prefix);
    let events = Service::spawn(command, "listening on").await;

    let first = system.submit("rewatch", "quick", serde_json::json!({})).await;
    events.wait_for_line("rewatch.quick.task.completed").await;
    proxy.cut();
    events.wait_for_line("listening again").await;
    let second = system.submit("rewatch", "quick", serde_json::json!({})).await;
    let (status, lines) = events.exited().await;
    assert!(status.success(), "{lines:#?}");
    assert!(lines.iter().any(|l| l.starts_with("lost the broker")), "{lines:#?}");
    let completed = lines.iter().filter(|l| l.contains("rewatch.quick.task.completed")).count();
    assert_eq!(completed, 2, "{} and {}: {lines:#?}", first.id, second.id);
    system.stop().await;
    env.cleanup().await;
}

/// `task submit --wait` prints the task's events as they happen, then the task as it
/// ended.
#[tokio::test]
async fn submit_wait_prints_the_events_then_the_final_task() {
    let env = TestEnv::new().await;
    let system = System::start(&env, vec![WorkerSpec::new("w1", &["rewatch"])]).await;
    system.register(&env, QUICK).await;
    let api = format!("http://{}", system.api_addr);
    let submitted = taskerctl(&["--api", &api, "task", "submit", "rewatch", "quick", "--wait"]).await;
    let out = String::from_utf8_lossy(&submitted.stdout);
    assert!(submitted.status.success(), "{out}{}", String::from_utf8_lossy(&submitted.stderr));
    let completed = out.find("rewatch.quick.task.completed").expect("the completion event");
    let id = out.split_whitespace().nth(1).expect("task <id> first");
    let final_line = out.lines().find(|l| l.starts_with(&format!("task {id}")) && l.ends_with("complete"));
    assert!(final_line.is_some_and(|l| out.find(l).unwrap() > completed), "the final task after the events: {out}");
    system.stop().await;
    env.cleanup().await;
}

/// `task submit --wait` and `watch` exit 3 for a task that ended `error` or `cancelled`
/// (after printing it), so a script tells it from a completed task (0), from
/// taskerctl's own failure (1) and from bad arguments (2, clap's).
#[tokio::test]
async fn waiting_exits_3_for_a_task_that_did_not_complete() {
    let env = TestEnv::new().await;
    let system = System::start(&env, vec![WorkerSpec::new("w1", &["rewatch"])]).await;
    system.register(&env, FAILING).await;
    system.register(&env, SLOW).await;
    let api = format!("http://{}", system.api_addr);

    let failed = taskerctl(&["--api", &api, "task", "submit", "rewatch", "failing", "--wait"]).await;
    let (out, err) = (String::from_utf8_lossy(&failed.stdout), String::from_utf8_lossy(&failed.stderr));
    assert_eq!(failed.status.code(), Some(3), "{out}{err}");
    let id = out.split_whitespace().nth(1).expect("task <id> first");
    assert!(out.lines().any(|l| l.starts_with(&format!("task {id}")) && l.ends_with("error")), "{out}");
    assert!(err.contains(&format!("task {id} ended error (task.failed)")), "{err}");
    // watching it afterwards: the replayed history, and the same answer
    let watched = taskerctl(&["--api", &api, "watch", id]).await;
    assert_eq!(watched.status.code(), Some(3), "{}", String::from_utf8_lossy(&watched.stderr));
    assert!(String::from_utf8_lossy(&watched.stdout).contains("rewatch.failing.task.failed"));

    let slow = system.submit("rewatch", "slow", serde_json::json!({})).await;
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_taskerctl"));
    command.args(["--api", &api, "watch", &slow.id]);
    let watch = Service::spawn(command, "task.created").await;
    let cancelled = taskerctl(&["--api", &api, "task", "cancel", &slow.id]).await;
    assert!(cancelled.status.success(), "{}", String::from_utf8_lossy(&cancelled.stderr));
    let (status, lines) = watch.exited().await;
    assert_eq!(status.code(), Some(3), "{lines:#?}");
    assert!(
        lines.iter().any(|l| l.contains(&format!("task {} ended cancelled (task.cancelled)", slow.id))),
        "{lines:#?}"
    );

    // a task that does not exist is taskerctl's own failure
    let unknown = taskerctl(&["--api", &api, "watch", "00000000-0000-0000-0000-000000000000"]).await;
    assert_eq!(unknown.status.code(), Some(1), "{}", String::from_utf8_lossy(&unknown.stderr));
    system.stop().await;
    env.cleanup().await;
}

/// `task list` pages with the token it prints on stderr, and filters by creation time with
/// the instants it prints.
#[tokio::test]
async fn task_list_pages_with_the_token_it_prints() {
    let env = TestEnv::new().await;
    let system = System::start(&env, vec![]).await;
    system.register(&env, QUICK).await;
    let api = format!("http://{}", system.api_addr);
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(system.submit("rewatch", "quick", serde_json::json!({})).await.id);
    }
    ids.reverse(); // newest first, as listed
    let list = async |extra: &[&str]| {
        let args = [&["--api", api.as_str(), "task", "list", "--namespace", "rewatch", "--limit", "2"], extra].concat();
        let out = taskerctl(&args).await;
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };
    let listed_ids =
        |stdout: &str| stdout.lines().map(|l| l.split_whitespace().next().unwrap().to_owned()).collect::<Vec<_>>();

    let (code, first, err) = list(&[]).await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(listed_ids(&first), ids[..2]);
    let token = err.trim().strip_prefix("next page: --page-token ").expect("the next page's token on stderr");
    let (code, second, err) = list(&["--page-token", token]).await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(listed_ids(&second), ids[2..], "the rest");
    assert!(err.is_empty(), "no page after the last: {err}");

    // each line ends with its creation instant, which the filters take back
    let second_newest = first.lines().nth(1).unwrap().rsplit(' ').next().unwrap().to_owned();
    let (code, after, err) = list(&["--created-after", &second_newest]).await;
    assert_eq!((code, listed_ids(&after)), (Some(0), ids[..2].to_vec()), "{err}");
    let (code, before, err) = list(&["--created-before", &second_newest]).await;
    assert_eq!((code, listed_ids(&before)), (Some(0), ids[2..].to_vec()), "{err}");
    let (code, _, err) = list(&["--created-after", "yesterday"]).await;
    assert_eq!(code, Some(2), "a bad argument, clap's exit: {err}");
    assert!(err.contains("RFC 3339"), "{err}");
    system.stop().await;
    env.cleanup().await;
}

/// A task's context and each step's results may each be up to 1 MiB, so GetTask's answer
/// can pass the 4 MiB that gRPC clients accept by default: `task get` and `--wait` read
/// it all the same.
#[tokio::test]
async fn task_get_reads_a_task_larger_than_grpcs_default_message_limit() {
    let env = TestEnv::new().await;
    let system = System::start(&env, vec![WorkerSpec::new("w1", &["rewatch"])]).await;
    let steps: String = (1..=5).map(|i| format!("  - {{ name: s{i}, handler: echo }}\n")).collect();
    system.register(&env, &format!("namespace: rewatch\nname: wide\nversion: 1.0.0\nsteps:\n{steps}")).await;
    let api = format!("http://{}", system.api_addr);
    // from a file: one argument may not be that long
    let file = std::env::temp_dir().join(format!("taskerctl-context-{}", std::process::id()));
    std::fs::write(&file, serde_json::json!({ "blob": "x".repeat(900_000) }).to_string()).unwrap();
    let context = format!("@{}", file.display());
    let submitted =
        taskerctl(&["--api", &api, "task", "submit", "rewatch", "wide", "--context", &context, "--wait"]).await;
    std::fs::remove_file(&file).unwrap();
    let (out, err) = (String::from_utf8_lossy(&submitted.stdout), String::from_utf8_lossy(&submitted.stderr));
    assert_eq!(submitted.status.code(), Some(0), "{err}");
    let id = out.split_whitespace().nth(1).expect("task <id> first").to_owned();
    let got = taskerctl(&["--api", &api, "task", "get", &id, "--transitions"]).await;
    let (out, err) = (String::from_utf8_lossy(&got.stdout), String::from_utf8_lossy(&got.stderr));
    assert_eq!(got.status.code(), Some(0), "{err}");
    assert_eq!(out.lines().filter(|l| l.trim_start().starts_with('s') && l.contains("complete")).count(), 5, "{out}");
    system.stop().await;
    env.cleanup().await;
}
