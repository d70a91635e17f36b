//! TLS for the gateway: the development CA made on first start, and the
//! rustls configurations of the QUIC server and client.
//!
//! Files, under `<data-dir>/tls/`: `ca.pem` (give it to clients), `ca.key`
//! (kept for issuing more certificates), `server.pem` and `server.key`. The
//! server certificate is valid for `localhost`, `127.0.0.1` and `::1`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::protocol::ALPN;
use crate::{Error, Result};

/// Paths of the development PKI inside a data directory.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl TlsFiles {
    /// The files under `<dir>` (usually `<data-dir>/tls`).
    pub fn in_dir(dir: &Path) -> Self {
        TlsFiles {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
        }
    }

    /// Creates the development CA and a server certificate signed by it,
    /// unless they exist already. Returns true when it created them.
    pub fn ensure(&self) -> Result<bool> {
        if self.server_cert.exists() && self.server_key.exists() && self.ca_cert.exists() {
            return Ok(false);
        }
        let tls =
            |e: rcgen::Error| Error::Tls(format!("creating the development certificates: {e}"));
        let ca_key = KeyPair::generate().map_err(tls)?;
        let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(tls)?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "Tributary development CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        ca.not_before = rcgen::date_time_ymd(2024, 1, 1);
        ca.not_after = rcgen::date_time_ymd(2099, 12, 31);
        let ca_cert = ca.self_signed(&ca_key).map_err(tls)?;

        let server_key = KeyPair::generate().map_err(tls)?;
        let mut server = CertificateParams::new(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ])
        .map_err(tls)?;
        server
            .distinguished_name
            .push(DnType::CommonName, "Tributary server");
        server.not_before = rcgen::date_time_ymd(2024, 1, 1);
        server.not_after = rcgen::date_time_ymd(2099, 12, 31);
        let ca_key_pem = ca_key.serialize_pem();
        let issuer = Issuer::new(ca, ca_key);
        let server_cert = server.signed_by(&server_key, &issuer).map_err(tls)?;

        write_file(&self.ca_key, ca_key_pem.as_bytes(), true)?;
        write_file(
            &self.server_key,
            server_key.serialize_pem().as_bytes(),
            true,
        )?;
        write_file(&self.server_cert, server_cert.pem().as_bytes(), false)?;
        // The CA certificate goes last: its presence marks the set complete.
        write_file(&self.ca_cert, ca_cert.pem().as_bytes(), false)?;
        Ok(true)
    }
}

fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if secret {
        options.mode(0o600);
    }
    let mut f = options.open(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| Error::Tls(format!("reading {}: {e}", path.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("reading {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::Tls(format!(
            "{} holds no certificate",
            path.display()
        )));
    }
    Ok(certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// How long a connection may stay silent before it is dropped.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often clients send QUIC keep-alives, well inside the idle timeout and
/// short enough to keep NAT bindings open.
pub const KEEP_ALIVE: Duration = Duration::from_secs(10);

/// The QUIC server configuration from a certificate and key.
pub fn server_config(files: &TlsFiles) -> Result<quinn::ServerConfig> {
    let certs = load_certs(&files.server_cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.server_key)
        .map_err(|e| Error::Tls(format!("reading {}: {e}", files.server_key.display())))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| Error::Tls(format!("server certificate: {e}")))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| Error::Tls(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(
            IDLE_TIMEOUT
                .try_into()
                .map_err(|e| Error::Tls(format!("{e}")))?,
        ))
        // One session stream per connection; refuse more.
        .max_concurrent_bidi_streams(1u32.into())
        .max_concurrent_uni_streams(0u32.into());
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// The QUIC client configuration trusting the CA certificate(s) at `ca`.
pub fn client_config(ca: &Path) -> Result<quinn::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots
            .add(cert)
            .map_err(|e| Error::Tls(format!("CA certificate {}: {e}", ca.display())))?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| Error::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(KEEP_ALIVE))
        .max_idle_timeout(Some(
            IDLE_TIMEOUT
                .try_into()
                .map_err(|e| Error::Tls(format!("{e}")))?,
        ));
    config.transport_config(Arc::new(transport));
    Ok(config)
}
