//! Process level: the real `taskerctl` binary against a task-api with `auth.mode = jwt`.

use tasker_test_support::{System, TestEnv};

const SECRET: &str = "a-cli-test-secret-of-at-least-32-bytes";

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
