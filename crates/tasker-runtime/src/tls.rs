//! TLS for task-api's gRPC: the server's configuration from `api.tls`, and the endpoint
//! a client (taskerctl, the benchmark, tests) opens, trusting a given CA and presenting
//! a certificate when the server asks for one. rustls underneath (no OpenSSL).

use std::path::{Path, PathBuf};

use anyhow::Context;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

use crate::ServerTls;

/// The listener's TLS configuration, or `None` when `api.tls.cert_file` is not set.
pub fn server_config(tls: &ServerTls) -> anyhow::Result<Option<ServerTlsConfig>> {
    let (cert, key) = match (&tls.cert_file, &tls.key_file) {
        (None, None) if tls.client_ca_file.is_none() => return Ok(None),
        (Some(cert), Some(key)) => (cert, key),
        (None, _) => anyhow::bail!("api.tls: cert_file is required when key_file or client_ca_file is set"),
        (Some(_), None) => anyhow::bail!("api.tls: key_file is required with cert_file"),
    };
    let identity = Identity::from_pem(read("api.tls.cert_file", cert)?, read("api.tls.key_file", key)?);
    let mut config = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &tls.client_ca_file {
        config = config.client_ca_root(Certificate::from_pem(read("api.tls.client_ca_file", ca)?));
    }
    Ok(Some(config))
}

/// How a client reaches task-api over TLS: the CA to trust (the system roots when none)
/// and the client's own certificate and key for servers that require one.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// An endpoint for `url`: `https://` speaks TLS as `tls` says, `http://` plain HTTP/2.
pub fn endpoint(url: &str, tls: &ClientTls) -> anyhow::Result<Endpoint> {
    let endpoint = Endpoint::from_shared(url.to_owned()).with_context(|| format!("not an endpoint URL: {url}"))?;
    let https = url.starts_with("https://");
    if !https {
        anyhow::ensure!(
            tls.ca_file.is_none() && tls.cert_file.is_none(),
            "TLS files were given but the endpoint {url} is not https://"
        );
        return Ok(endpoint);
    }
    let mut config = ClientTlsConfig::new();
    config = match &tls.ca_file {
        Some(ca) => config.ca_certificate(Certificate::from_pem(read("the CA file", ca)?)),
        None => config.with_native_roots(),
    };
    match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => {
            config =
                config.identity(Identity::from_pem(read("the client certificate", cert)?, read("the client key", key)?))
        }
        (None, None) => {}
        _ => anyhow::bail!("a client certificate needs both its certificate and its key"),
    }
    endpoint.tls_config(config).context("TLS configuration")
}

/// The CA certificates in a PEM file, for the broker connection.
pub fn read_pem(what: &str, path: &Path) -> anyhow::Result<String> {
    String::from_utf8(read(what, path)?).with_context(|| format!("{what} {}: not PEM text", path.display()))
}

fn read(what: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{what}: reading {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_is_off_without_files_and_half_a_pair_is_an_error() {
        assert!(server_config(&ServerTls::default()).unwrap().is_none());
        let half = ServerTls { cert_file: Some("c.pem".into()), ..Default::default() };
        assert!(server_config(&half).unwrap_err().to_string().contains("key_file"));
        let missing = ServerTls {
            cert_file: Some("/nonexistent/c.pem".into()),
            key_file: Some("/nonexistent/k.pem".into()),
            client_ca_file: None,
        };
        assert!(format!("{:#}", server_config(&missing).unwrap_err()).contains("api.tls.cert_file"));
    }

    #[test]
    fn plain_endpoints_refuse_tls_files() {
        assert!(endpoint("http://127.0.0.1:50051", &ClientTls::default()).is_ok());
        let tls = ClientTls { ca_file: Some("ca.pem".into()), ..Default::default() };
        assert!(endpoint("http://127.0.0.1:50051", &tls).unwrap_err().to_string().contains("https://"));
    }
}
