//! Where the tests' Postgres and RabbitMQ come from: `TASKER_TEST_DATABASE_URL` /
//! `TASKER_TEST_AMQP_URL`, else the local defaults when they answer, else (with the
//! `containers` feature and a Docker engine) throwaway containers, else a panic that says
//! how to provide them.

use std::time::Duration;

use tokio::{net::TcpStream, sync::OnceCell};

/// Server-level URLs: the database URL names a maintenance database (`postgres`).
#[derive(Debug, Clone)]
pub struct Infra {
    pub database_url: String,
    pub amqp_url: String,
}

const LOCAL_DATABASE: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const LOCAL_AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

static INFRA: OnceCell<Infra> = OnceCell::const_new();

/// The shared infrastructure, found once per test binary.
pub async fn infra() -> &'static Infra {
    INFRA.get_or_init(find).await
}

async fn reachable(host_port: &str) -> bool {
    matches!(tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(host_port)).await, Ok(Ok(_)))
}

async fn find() -> Infra {
    let database = std::env::var("TASKER_TEST_DATABASE_URL").ok();
    let amqp = std::env::var("TASKER_TEST_AMQP_URL").ok();
    if let (Some(database_url), Some(amqp_url)) = (database.clone(), amqp.clone()) {
        return Infra { database_url, amqp_url };
    }
    if reachable("127.0.0.1:5432").await && reachable("127.0.0.1:5672").await {
        return Infra {
            database_url: database.unwrap_or_else(|| LOCAL_DATABASE.into()),
            amqp_url: amqp.unwrap_or_else(|| LOCAL_AMQP.into()),
        };
    }
    #[cfg(feature = "containers")]
    {
        if let Some(infra) = containers::start().await {
            return infra;
        }
    }
    panic!(
        "no Postgres and RabbitMQ for the tests: set TASKER_TEST_DATABASE_URL and TASKER_TEST_AMQP_URL, \
         or run them locally on 127.0.0.1:5432 (user postgres, trust auth) and 127.0.0.1:5672 (guest/guest) \
         — `scripts/infra.sh` starts or installs them — or run with `--features tasker-test-support/containers` \
         where a Docker engine is available"
    )
}

#[cfg(feature = "containers")]
mod containers {
    use testcontainers::{
        GenericImage, ImageExt,
        core::{IntoContainerPort, WaitFor},
        runners::AsyncRunner,
    };

    use super::Infra;

    /// Starts one Postgres and one RabbitMQ container for the whole test binary; they are
    /// kept for its lifetime (leaked on purpose) and removed by Docker with it.
    pub(super) async fn start() -> Option<Infra> {
        let postgres = GenericImage::new("postgres", "16-alpine")
            .with_exposed_port(5432.tcp())
            .with_wait_for(WaitFor::message_on_stderr("database system is ready to accept connections"))
            .with_env_var("POSTGRES_HOST_AUTH_METHOD", "trust")
            .start()
            .await
            .ok()?;
        let rabbit = GenericImage::new("rabbitmq", "3.13-alpine")
            .with_exposed_port(5672.tcp())
            .with_wait_for(WaitFor::message_on_stdout("Server startup complete"))
            .start()
            .await
            .ok()?;
        let pg_port = postgres.get_host_port_ipv4(5432).await.ok()?;
        let amqp_port = rabbit.get_host_port_ipv4(5672).await.ok()?;
        let infra = Infra {
            database_url: format!("postgres://postgres@127.0.0.1:{pg_port}/postgres"),
            amqp_url: format!("amqp://guest:guest@127.0.0.1:{amqp_port}/%2f"),
        };
        std::mem::forget(postgres);
        std::mem::forget(rabbit);
        Some(infra)
    }
}
