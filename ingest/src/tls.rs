//! TLS for the gateway: the development CA made on first start, the rustls
//! configurations of the QUIC server and client, and device certificates.
//!
//! Files, under `<data-dir>/tls/`: `ca.pem` (give it to clients), `ca.key`
//! (kept for issuing more certificates), `server.pem` and `server.key`. The
//! server certificate is valid for `localhost`, `127.0.0.1` and `::1`.
//!
//! Devices may also authenticate with an X.509 client certificate (mutual
//! TLS). The server asks for one but does not require it: a certificate
//! must chain to the development CA or to one of [`TlsFiles::client_ca`],
//! else the handshake fails; which device it belongs to is the registry's
//! business (by thumbprint). [`issue_device_certificate`] has the
//! development CA issue one.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
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
    /// More CA certificates (PEM files, each may hold several) whose client
    /// certificates the gateway accepts, besides the development CA's.
    pub client_ca: Vec<PathBuf>,
}

impl TlsFiles {
    /// The files under `<dir>` (usually `<data-dir>/tls`).
    pub fn in_dir(dir: &Path) -> Self {
        TlsFiles {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_ca: Vec::new(),
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
/// How often the server sends keep-alives to a quiet device by default.
pub const SERVER_KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The server's QUIC timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransportLimits {
    /// Silence after which a connection is dropped.
    pub idle_timeout: Duration,
    /// Keep-alives sent to a quiet peer; `None`: none.
    pub keep_alive: Option<Duration>,
    /// Bytes a peer may send ahead of what the server has read, on the
    /// whole connection, until the connection is given another window
    /// ([`quinn::Connection::set_receive_window`]).
    pub receive_window: u64,
}

impl Default for TransportLimits {
    fn default() -> Self {
        TransportLimits {
            idle_timeout: IDLE_TIMEOUT,
            keep_alive: Some(SERVER_KEEP_ALIVE),
            receive_window: crate::limits::InFlightBudget::MAX_WINDOW,
        }
    }
}

/// The QUIC server configuration from a certificate and key. Client
/// certificates are asked for, not required; one that does not chain to the
/// development CA or a [`TlsFiles::client_ca`] fails the handshake.
pub fn server_config(files: &TlsFiles) -> Result<quinn::ServerConfig> {
    server_config_with(files, TransportLimits::default())
}

/// [`server_config`] with these timers.
pub fn server_config_with(
    files: &TlsFiles,
    limits: TransportLimits,
) -> Result<quinn::ServerConfig> {
    let certs = load_certs(&files.server_cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.server_key)
        .map_err(|e| Error::Tls(format!("reading {}: {e}", files.server_key.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    for path in std::iter::once(&files.ca_cert).chain(&files.client_ca) {
        for cert in load_certs(path)? {
            roots
                .add(cert)
                .map_err(|e| Error::Tls(format!("CA certificate {}: {e}", path.display())))?;
        }
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| Error::Tls(format!("client certificate verifier: {e}")))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| Error::Tls(format!("server certificate: {e}")))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| Error::Tls(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(limits.idle_timeout.try_into().map_err(|e| {
            Error::Tls(format!("idle timeout {:?}: {e}", limits.idle_timeout))
        })?))
        .keep_alive_interval(limits.keep_alive)
        .receive_window(
            quinn::VarInt::from_u64(limits.receive_window).unwrap_or(quinn::VarInt::MAX),
        )
        // One session stream per connection; refuse more.
        .max_concurrent_bidi_streams(1u32.into())
        .max_concurrent_uni_streams(0u32.into());
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// The QUIC client configuration trusting the CA certificate(s) at `ca`.
pub fn client_config(ca: &Path) -> Result<quinn::ClientConfig> {
    client_config_with_identity(ca, None)
}

/// [`client_config`], presenting a client certificate if `identity` is
/// given.
pub fn client_config_with_identity(
    ca: &Path,
    identity: Option<&ClientIdentity>,
) -> Result<quinn::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots
            .add(cert)
            .map_err(|e| Error::Tls(format!("CA certificate {}: {e}", ca.display())))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(roots);
    let mut tls = match identity {
        None => builder.with_no_client_auth(),
        Some(identity) => {
            let (chain, key) = identity.parse()?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| Error::Tls(format!("client certificate: {e}")))?
        }
    };
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

/// A client certificate (its chain, leaf first) and its private key, PEM.
/// Its `Debug` output leaves the key out.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("cert_pem", &String::from_utf8_lossy(&self.cert_pem))
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl ClientIdentity {
    /// From PEM text already in memory.
    pub fn from_pem(cert_pem: impl Into<Vec<u8>>, key_pem: impl Into<Vec<u8>>) -> Self {
        ClientIdentity {
            cert_pem: cert_pem.into(),
            key_pem: key_pem.into(),
        }
    }

    /// From a certificate file and a key file (PEM).
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self> {
        Ok(ClientIdentity {
            cert_pem: std::fs::read(cert).map_err(|e| Error::io(cert, e))?,
            key_pem: std::fs::read(key).map_err(|e| Error::io(key, e))?,
        })
    }

    fn parse(&self) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        let chain = CertificateDer::pem_slice_iter(&self.cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Tls(format!("client certificate: {e}")))?;
        if chain.is_empty() {
            return Err(Error::Tls(
                "client certificate: no PEM certificate (-----BEGIN CERTIFICATE-----) found".into(),
            ));
        }
        // No detail from the key's parser: it could quote key material.
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem).map_err(|_| {
            Error::Tls(
                "client certificate key: no PEM private key (PKCS#8, PKCS#1 or SEC1) found".into(),
            )
        })?;
        Ok((chain, key))
    }
}

/// A certificate the development CA issued to a device, with its private
/// key (shown once; not kept anywhere).
#[derive(Clone)]
pub struct IssuedCertificate {
    pub cert_pem: String,
    /// PKCS#8, PEM.
    pub key_pem: String,
    /// SHA-256 of the certificate's DER, lowercase hex, as the registry
    /// knows certificates ([`tributary_registry::thumbprint`]).
    pub thumbprint: String,
    /// The certificate's `notAfter`, milliseconds since the Unix epoch.
    pub not_after_ms: i64,
}

impl std::fmt::Debug for IssuedCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCertificate")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .field("thumbprint", &self.thumbprint)
            .field("not_after_ms", &self.not_after_ms)
            .finish()
    }
}

/// Has the CA of `files` (`ca.pem` / `ca.key`) issue a client certificate
/// for `device_id`: a fresh ECDSA P-256 key pair, common name the device id,
/// usable for client authentication, valid from an hour ago (clocks drift)
/// for `valid_days` days.
///
/// The certificate is not registered to the device: that is the
/// registry's ([`tributary_registry::Registry::add_certificate`]).
pub fn issue_device_certificate(
    files: &TlsFiles,
    device_id: &str,
    valid_days: u32,
) -> Result<IssuedCertificate> {
    let tls = |e: rcgen::Error| Error::Tls(format!("issuing a certificate for '{device_id}': {e}"));
    if valid_days == 0 {
        return Err(Error::Tls(format!(
            "issuing a certificate for '{device_id}': valid_days must be at least 1"
        )));
    }
    let ca_pem =
        std::fs::read_to_string(&files.ca_cert).map_err(|e| Error::io(&files.ca_cert, e))?;
    let ca_key_pem =
        std::fs::read_to_string(&files.ca_key).map_err(|e| Error::io(&files.ca_key, e))?;
    // No detail from the parser: it could quote the CA's key.
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|_| {
        Error::Tls(format!(
            "{} is not a PEM private key the CA can sign with",
            files.ca_key.display()
        ))
    })?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|e| {
        Error::Tls(format!(
            "{} is not a CA certificate: {e}",
            files.ca_cert.display()
        ))
    })?;

    let now_secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| Error::Tls(format!("the system clock is before 1970: {e}")))?
        .as_secs();
    let valid_secs = u64::from(valid_days) * 86_400;
    let not_after_secs = now_secs + valid_secs;
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(tls)?;
    params
        .distinguished_name
        .push(DnType::CommonName, device_id);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = epoch + Duration::from_secs(now_secs.saturating_sub(3600));
    params.not_after = epoch + Duration::from_secs(not_after_secs);
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().map_err(tls)?;
    let cert = params.signed_by(&key, &issuer).map_err(tls)?;
    Ok(IssuedCertificate {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        thumbprint: tributary_registry::thumbprint(cert.der()),
        not_after_ms: i64::try_from(not_after_secs)
            .unwrap_or(i64::MAX / 1000)
            .saturating_mul(1000),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_chain_to_the_ca_and_keep_keys_out_of_debug() {
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles::in_dir(dir.path());
        files.ensure().unwrap();
        let issued = issue_device_certificate(&files, "sensor-1", 30).unwrap();
        assert!(issued.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(issued.key_pem.contains("PRIVATE KEY"));
        assert_eq!(issued.thumbprint.len(), 64);
        let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        assert_eq!(issued.thumbprint, tributary_registry::thumbprint(&der));
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let left = issued.not_after_ms - now_ms;
        assert!(
            (29 * 86_400_000..=30 * 86_400_000).contains(&left),
            "{left}"
        );
        assert!(!format!("{issued:?}").contains(&issued.key_pem));

        // A client can present it, and the server's verifier takes it.
        let identity = ClientIdentity::from_pem(issued.cert_pem.clone(), issued.key_pem.clone());
        assert!(!format!("{identity:?}").contains("PRIVATE KEY"));
        client_config_with_identity(&files.ca_cert, Some(&identity)).unwrap();
        server_config(&files).unwrap();

        assert!(issue_device_certificate(&files, "sensor-1", 0).is_err());
        let broken = ClientIdentity::from_pem(issued.cert_pem, "not a key");
        let err = client_config_with_identity(&files.ca_cert, Some(&broken)).unwrap_err();
        assert!(err.to_string().contains("private key"), "{err}");
    }
}
