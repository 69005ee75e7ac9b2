//! How the store reaches Postgres: plain TCP or a Unix socket, or TLS through rustls when
//! the URL asks for it, in libpq's words: `sslmode=require` (or `verify-ca`,
//! `verify-full`) and, for a private CA, `sslrootcert=/path/ca.pem`. Unlike libpq's
//! `require`, every TLS mode here verifies the server's certificate chain (against the
//! system roots plus `sslrootcert`) and its host name: a connection that is encrypted but
//! unauthenticated protects nothing. `disable`, `prefer` and no `sslmode` connect without
//! TLS, as before. A URL may name several hosts, each tried in turn (libpq's way). The
//! store opens each socket itself (as tokio-postgres would) so that it can watch it for a
//! silent server (`watchdog.rs`): over TLS the watchdog sits above the encryption.

use std::{str::FromStr, sync::Arc};

use futures::stream::BoxStream;
use tokio_postgres::{
    AsyncMessage, Client, NoTls,
    config::{Host, SslMode},
    tls::MakeTlsConnect,
};
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_util::either::Either;

use crate::{
    Error, Result,
    watchdog::{Silence, Watchdog, Watched},
};

/// A parsed database URL and the TLS connector it needs (none for plain TCP).
#[derive(Clone)]
pub(crate) struct Target {
    pub config: tokio_postgres::Config,
    pub tls: Option<MakeRustlsConnect>,
}

/// The messages a connection delivers besides query results (notifications, notices).
pub(crate) type Messages = BoxStream<'static, std::result::Result<AsyncMessage, tokio_postgres::Error>>;

impl Target {
    pub fn parse(url: &str) -> Result<Target> {
        let (url, root_cert, verify) = split_tls_params(url);
        let mut config = tokio_postgres::Config::from_str(&url).map_err(Error::config)?;
        if verify {
            config.ssl_mode(SslMode::Require);
        }
        let tls = match config.get_ssl_mode() {
            SslMode::Require => Some(MakeRustlsConnect::new(client_config(root_cert.as_deref())?)),
            _ => None,
        };
        Ok(Target { config, tls })
    }

    /// The same server, another database.
    pub fn with_dbname(&self, name: &str) -> Target {
        let mut target = self.clone();
        target.config.dbname(name);
        target
    }

    /// One connection: each host the URL names in turn (libpq's way), until one accepts
    /// the connection and the session starts. Its socket is watched for a silent server
    /// (`watchdog.rs`) and the session runs with that `statement_timeout`. The returned
    /// stream must be polled for the connection to make progress.
    pub async fn connect(&self, silence: &Arc<Silence>) -> Result<(Client, Messages)> {
        let mut config = self.config.clone();
        // the server cancels a statement before the watchdog would give up on it, and ends
        // a session left idle inside a transaction as long (its client went silent: its
        // row locks would otherwise hold every other writer of those rows until the
        // server's TCP keepalive, two hours by default, noticed)
        let options = config.get_options().map(|o| format!("{o} ")).unwrap_or_default();
        let limit = silence.statement_timeout().as_millis();
        config.options(format!("{options}-c statement_timeout={limit} -c idle_in_transaction_session_timeout={limit}"));
        let mut last = None;
        for host in 0..self.config.get_hosts().len().max(self.config.get_hostaddrs().len()) {
            match self.connect_host(&config, host, silence).await {
                Ok(connected) => return Ok(connected),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::Config("the database URL names no host".into())))
    }

    async fn connect_host(
        &self,
        config: &tokio_postgres::Config,
        host: usize,
        silence: &Arc<Silence>,
    ) -> Result<(Client, Messages)> {
        use futures::StreamExt;
        let port = config.get_ports().get(host).or(config.get_ports().first()).copied().unwrap_or(5432);
        let name = config.get_hosts().get(host);
        let socket = async {
            match (config.get_hostaddrs().get(host), name) {
                (Some(addr), _) => tcp(&[std::net::SocketAddr::new(*addr, port)], config).await,
                (None, Some(Host::Tcp(name))) => {
                    tcp(&tokio::net::lookup_host((name.as_str(), port)).await?.collect::<Vec<_>>(), config).await
                }
                (None, Some(Host::Unix(dir))) => {
                    tokio::net::UnixStream::connect(dir.join(format!(".s.PGSQL.{port}"))).await.map(Either::Right)
                }
                (None, None) => Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "no host")),
            }
        };
        let socket = match config.get_connect_timeout() {
            Some(limit) => tokio::time::timeout(*limit, socket)
                .await
                .unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timeout"))),
            None => socket.await,
        }
        .map_err(|e| Error::Connect(format!("{}: {e}", describe_host(name, port))))?;
        Ok(match &self.tls {
            None => {
                let (client, mut connection) =
                    config.connect_raw(Watchdog::new(socket, silence.clone()), NoTls).await?;
                (client, futures::stream::poll_fn(move |cx| connection.poll_message(cx)).boxed())
            }
            Some(tls) => {
                let domain = match name {
                    Some(Host::Tcp(name)) => name.as_str(),
                    _ => "",
                };
                let tls =
                    MakeTlsConnect::<Socket>::make_tls_connect(&mut tls.clone(), domain).map_err(Error::config)?;
                let tls = Watched { tls, silence: silence.clone() };
                let (client, mut connection) = config.connect_raw(socket, tls).await?;
                (client, futures::stream::poll_fn(move |cx| connection.poll_message(cx)).boxed())
            }
        })
    }

    /// A pool manager for this target: its connections made by [`Target::connect`].
    pub fn manager(
        &self,
        silence: Arc<Silence>,
        config: deadpool_postgres::ManagerConfig,
    ) -> deadpool_postgres::Manager {
        deadpool_postgres::Manager::from_connect(
            self.config.clone(),
            PoolConnect { target: self.clone(), silence },
            config,
        )
    }
}

/// How the pool opens a connection: as [`Target::connect`] does, its messages (nothing
/// but notices, on a pool's connections) drained by a task of its own.
struct PoolConnect {
    target: Target,
    silence: Arc<Silence>,
}

impl deadpool_postgres::Connect for PoolConnect {
    fn connect(
        &self,
        _: &tokio_postgres::Config,
    ) -> futures::future::BoxFuture<'_, std::result::Result<(Client, tokio::task::JoinHandle<()>), tokio_postgres::Error>>
    {
        Box::pin(async move {
            use futures::StreamExt;
            let (client, mut messages) = match self.target.connect(&self.silence).await {
                Ok(connected) => connected,
                Err(Error::Database(e)) => return Err(e),
                Err(other) => return Err(as_postgres_error(other.to_string()).await),
            };
            let task = tokio::spawn(async move {
                while let Some(message) = messages.next().await {
                    if let Err(error) = message {
                        tracing::warn!(%error, "database connection lost");
                        break;
                    }
                }
            });
            Ok((client, task))
        })
    }
}

/// A socket to the server: TCP, or a Unix socket.
type Socket = Either<tokio::net::TcpStream, tokio::net::UnixStream>;

/// The first of `addrs` that accepts, without Nagle's delay (each statement's messages go
/// out as one write), with the URL's TCP keepalive and user timeout (libpq's
/// `keepalives*` and `tcp_user_timeout`), as tokio-postgres would set them.
async fn tcp(addrs: &[std::net::SocketAddr], config: &tokio_postgres::Config) -> std::io::Result<Socket> {
    let mut last = std::io::Error::new(std::io::ErrorKind::InvalidInput, "could not resolve any addresses");
    for addr in addrs {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(stream) => {
                stream.set_nodelay(true)?;
                let socket = socket2::SockRef::from(&stream);
                socket.set_tcp_user_timeout(config.get_tcp_user_timeout().copied())?;
                if config.get_keepalives() {
                    let mut keepalive = socket2::TcpKeepalive::new().with_time(config.get_keepalives_idle());
                    if let Some(interval) = config.get_keepalives_interval() {
                        keepalive = keepalive.with_interval(interval);
                    }
                    if let Some(retries) = config.get_keepalives_retries() {
                        keepalive = keepalive.with_retries(retries);
                    }
                    socket.set_tcp_keepalive(&keepalive)?;
                }
                return Ok(Either::Left(stream));
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn describe_host(host: Option<&Host>, port: u16) -> String {
    match host {
        Some(Host::Tcp(name)) => format!("{name}:{port}"),
        Some(Host::Unix(dir)) => format!("{}/.s.PGSQL.{port}", dir.display()),
        None => format!("port {port}"),
    }
}

/// The pool's connector must fail with tokio-postgres's own error type, which has no
/// public constructor: a session started on a socket that fails at once yields one,
/// carrying `why`.
async fn as_postgres_error(why: String) -> tokio_postgres::Error {
    struct Refused(Option<String>);
    impl tokio::io::AsyncRead for Refused {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Err(std::io::Error::other(self.0.take().unwrap_or_default())))
        }
    }
    impl tokio::io::AsyncWrite for Refused {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::task::Poll::Ready(Err(std::io::Error::other(self.0.take().unwrap_or_default())))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }
    match tokio_postgres::Config::new().user("tasker").connect_raw(Refused(Some(why)), NoTls).await {
        Err(e) => e,
        Ok(_) => unreachable!("a session cannot start on a socket that fails"),
    }
}

/// Connects sqlx (the migrator) the same way: TLS modes verify the chain and host name,
/// and a URL naming several hosts gives one set of options per host, to try in order
/// (sqlx takes one host a URL; tokio-postgres tries each in turn).
pub(crate) fn sqlx_options(url: &str) -> Result<Vec<sqlx::postgres::PgConnectOptions>> {
    use sqlx::postgres::{PgConnectOptions, PgSslMode};
    each_host(url)
        .iter()
        .map(|url| {
            let options = PgConnectOptions::from_str(url).map_err(Error::config)?;
            Ok(match options.get_ssl_mode() {
                PgSslMode::Require | PgSslMode::VerifyCa => options.ssl_mode(PgSslMode::VerifyFull),
                _ => options,
            })
        })
        .collect()
}

/// The URL once per host it names (`postgres://u@h1,h2:5433/db` gives `postgres://u@h1/db`
/// and `postgres://u@h2:5433/db`), in order; a URL naming one host, or none, as it is.
fn each_host(url: &str) -> Vec<String> {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else { return vec![url.to_owned()] };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let hosts_start = rest[..authority_end].rfind('@').map_or(0, |i| i + 1);
    let hosts = &rest[hosts_start..authority_end];
    if !hosts.contains(',') {
        return vec![url.to_owned()];
    }
    let (before, after) = (&url[..scheme_end + hosts_start], &rest[authority_end..]);
    hosts.split(',').map(|host| format!("{before}{host}{after}")).collect()
}

/// Takes `sslrootcert` out of the URL's query (tokio-postgres does not know it) and maps
/// `sslmode=verify-ca|verify-full` to `require`; says whether a verifying mode was asked.
fn split_tls_params(url: &str) -> (String, Option<String>, bool) {
    let Some((base, query)) = url.split_once('?') else { return (url.to_owned(), None, false) };
    let mut root_cert = None;
    let mut verify = false;
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("sslrootcert", value)) => root_cert = Some(value.to_owned()),
            Some(("sslmode", "verify-ca" | "verify-full")) => verify = true,
            _ => kept.push(pair),
        }
    }
    let url = if kept.is_empty() { base.to_owned() } else { format!("{base}?{}", kept.join("&")) };
    (url, root_cert, verify)
}

fn client_config(root_cert: Option<&str>) -> Result<rustls::ClientConfig> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    // the system's roots, when it has any (a container may have none)
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = root_cert {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<std::result::Result<Vec<_>, _>>())
            .map_err(|e| Error::Config(format!("sslrootcert {path}: {e}")))?;
        if certs.is_empty() {
            return Err(Error::Config(format!("sslrootcert {path}: no certificate in the file")));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| Error::Config(format!("sslrootcert {path}: {e}")))?;
        }
    }
    if roots.is_empty() {
        return Err(Error::Config(
            "sslmode asks for TLS but there is no CA to verify the server with (no system roots, no sslrootcert)"
                .into(),
        ));
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(Error::config)?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_taken_out_of_the_url() {
        let (url, root, verify) =
            split_tls_params("postgres://u@h:5432/db?sslmode=verify-full&sslrootcert=/etc/ca.pem&application_name=x");
        assert_eq!(url, "postgres://u@h:5432/db?application_name=x");
        assert_eq!(root.as_deref(), Some("/etc/ca.pem"));
        assert!(verify);
        assert_eq!(split_tls_params("postgres://u@h/db"), ("postgres://u@h/db".into(), None, false));
        let (url, root, verify) = split_tls_params("postgres://u@h/db?sslmode=require&sslrootcert=ca.pem");
        assert_eq!(
            (url.as_str(), root.as_deref(), verify),
            ("postgres://u@h/db?sslmode=require", Some("ca.pem"), false)
        );
    }

    #[test]
    fn a_url_naming_several_hosts_is_tried_host_by_host() {
        assert_eq!(
            each_host("postgres://postgres@%2Fvar%2Frun%2Fpostgresql,127.0.0.1:5432/tasker?sslmode=disable"),
            [
                "postgres://postgres@%2Fvar%2Frun%2Fpostgresql/tasker?sslmode=disable",
                "postgres://postgres@127.0.0.1:5432/tasker?sslmode=disable"
            ]
        );
        assert_eq!(each_host("postgres://u:p@a,b:5433"), ["postgres://u:p@a", "postgres://u:p@b:5433"]);
        assert_eq!(each_host("postgres://h1,h2/db"), ["postgres://h1/db", "postgres://h2/db"]);
        for one in ["postgres://u@h:5432/db", "postgres://u@h/db?options=-c%20a%3Db,c", "not a url"] {
            assert_eq!(each_host(one), [one]);
        }
        let options = sqlx_options("postgres://u@%2Ftmp%2Fsock,db.example.com:6432/x").unwrap();
        assert_eq!(options.len(), 2);
        assert_eq!(options[0].get_socket().and_then(|p| p.to_str()), Some("/tmp/sock"));
        assert_eq!((options[1].get_host(), options[1].get_port()), ("db.example.com", 6432));
        assert!(options.iter().all(|o| o.get_database() == Some("x") && o.get_username() == "u"));
    }

    #[test]
    fn plain_modes_need_no_connector_and_tls_modes_get_one() {
        for url in ["postgres://u@h/db", "postgres://u@h/db?sslmode=disable", "postgres://u@h/db?sslmode=prefer"] {
            assert!(Target::parse(url).unwrap().tls.is_none(), "{url}");
        }
        let missing = Target::parse("postgres://u@h/db?sslmode=require&sslrootcert=/nonexistent/ca.pem");
        let error = missing.err().expect("a missing CA file is an error").to_string();
        assert!(error.contains("/nonexistent/ca.pem"), "{error}");
    }
}
