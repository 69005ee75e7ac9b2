//! TLS for tests, made at run time: a throwaway CA ([`TestCa`]) issuing server and client
//! certificates, and a [`TlsTerminator`] that accepts TLS with such a certificate and
//! forwards the plaintext to a server that speaks none (the shared Postgres and RabbitMQ):
//! the services' TLS clients are then tested against a real handshake, a real chain
//! check and the real server behind it, without reconfiguring the shared servers.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};
use tokio_rustls::{TlsAcceptor, rustls};

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// A CA made for one test; its files live in a temporary folder removed on drop.
pub struct TestCa {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    pub ca_file: PathBuf,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let dir = std::env::temp_dir().join(format!("tasker-test-ca-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).expect("create the CA folder");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.distinguished_name.push(DnType::CommonName, format!("{name} test CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, cert.pem()).expect("write the CA certificate");
        TestCa { dir, issuer: Issuer::new(params, key), ca_file }
    }

    /// A server certificate for `localhost` and `127.0.0.1`.
    pub fn server(&self, name: &str) -> CertFiles {
        self.issue(name, vec!["localhost".into(), "127.0.0.1".into()])
    }

    /// A client certificate (for mutual TLS) with `name` as its common name.
    pub fn client(&self, name: &str) -> CertFiles {
        self.issue(name, Vec::new())
    }

    fn issue(&self, name: &str, alt_names: Vec<String>) -> CertFiles {
        let mut params = CertificateParams::new(alt_names).expect("certificate parameters");
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign the certificate");
        let files = CertFiles {
            cert_file: self.dir.join(format!("{name}.pem")),
            key_file: self.dir.join(format!("{name}.key")),
        };
        std::fs::write(&files.cert_file, cert.pem()).expect("write the certificate");
        std::fs::write(&files.key_file, key.serialize_pem()).expect("write the key");
        files
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How a client starts TLS on the terminator's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartTls {
    /// TLS from the first byte (`amqps://`, `https://`).
    Immediately,
    /// Postgres: an `SSLRequest` packet, answered `S`, then the handshake.
    PostgresRequest,
}

/// Accepts TLS on an ephemeral loopback port and forwards the decrypted bytes to
/// `upstream` in plain TCP. Connections that do not complete a handshake are dropped.
pub struct TlsTerminator {
    addr: SocketAddr,
    handshakes: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl TlsTerminator {
    pub async fn start(upstream: SocketAddr, cert: &CertFiles, start: StartTls) -> TlsTerminator {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
        let chain = CertificateDer::pem_file_iter(&cert.cert_file)
            .expect("read the certificate")
            .collect::<Result<Vec<_>, _>>()
            .expect("parse the certificate");
        let key = PrivateKeyDer::from_pem_file(&cert.key_file).expect("read the key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server certificate");
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the TLS terminator");
        let addr = listener.local_addr().expect("terminator address");
        let handshakes = Arc::new(AtomicUsize::new(0));
        let counted = handshakes.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (acceptor, counted) = (acceptor.clone(), counted.clone());
                tokio::spawn(async move {
                    let _ = terminate(client, upstream, acceptor, start, counted).await;
                });
            }
        });
        TlsTerminator { addr, handshakes, accept }
    }

    /// A terminator in front of the server a URL points at.
    pub async fn for_url(url: &str, cert: &CertFiles, start: StartTls) -> TlsTerminator {
        TlsTerminator::start(crate::proxy::upstream_of(url).await, cert, start).await
    }

    /// `url` with its host and port replaced by the terminator's.
    pub fn url(&self, url: &str) -> String {
        crate::proxy::with_addr(url, self.addr)
    }

    /// Handshakes completed so far.
    pub fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::SeqCst)
    }
}

impl Drop for TlsTerminator {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

async fn terminate(
    mut client: TcpStream,
    upstream: SocketAddr,
    acceptor: TlsAcceptor,
    start: StartTls,
    handshakes: Arc<AtomicUsize>,
) -> std::io::Result<()> {
    if start == StartTls::PostgresRequest {
        let mut request = [0u8; 8];
        client.read_exact(&mut request).await?;
        if request != SSL_REQUEST {
            return Ok(()); // a client that does not ask for TLS is not served
        }
        client.write_all(b"S").await?;
    }
    let mut tls = acceptor.accept(client).await?;
    handshakes.fetch_add(1, Ordering::SeqCst);
    let mut server = TcpStream::connect(upstream).await?;
    let _ = server.set_nodelay(true);
    tokio::io::copy_bidirectional(&mut tls, &mut server).await?;
    Ok(())
}
