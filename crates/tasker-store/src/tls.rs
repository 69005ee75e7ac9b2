//! How the store reaches Postgres: plain TCP or a Unix socket, or TLS through rustls when
//! the URL asks for it, in libpq's words: `sslmode=require` (or `verify-ca`,
//! `verify-full`) and, for a private CA, `sslrootcert=/path/ca.pem`. Unlike libpq's
//! `require`, every TLS mode here verifies the server's certificate chain (against the
//! system roots plus `sslrootcert`) and its host name: a connection that is encrypted but
//! unauthenticated protects nothing. `disable`, `prefer` and no `sslmode` connect without
//! TLS, as before. A URL may name several hosts, each tried in turn (libpq's way).

use std::str::FromStr;

use futures::stream::BoxStream;
use tokio_postgres::{AsyncMessage, Client, NoTls, config::SslMode};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::{Error, Result};

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

    /// One connection outside the pool; the returned stream must be polled for the
    /// connection to make progress.
    pub async fn connect(&self) -> Result<(Client, Messages)> {
        use futures::StreamExt;
        Ok(match &self.tls {
            None => {
                let (client, mut connection) = self.config.connect(NoTls).await?;
                (client, futures::stream::poll_fn(move |cx| connection.poll_message(cx)).boxed())
            }
            Some(tls) => {
                let (client, mut connection) = self.config.connect(tls.clone()).await?;
                (client, futures::stream::poll_fn(move |cx| connection.poll_message(cx)).boxed())
            }
        })
    }

    /// A pool manager for this target.
    pub fn manager(&self, config: deadpool_postgres::ManagerConfig) -> deadpool_postgres::Manager {
        match &self.tls {
            None => deadpool_postgres::Manager::from_config(self.config.clone(), NoTls, config),
            Some(tls) => deadpool_postgres::Manager::from_config(self.config.clone(), tls.clone(), config),
        }
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
            let options = PgConnectOptions::from_str(url).map_err(Error::migrate)?;
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
