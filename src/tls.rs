//! TLS for inferd's own HTTPS requests (chat images, model pulls): the
//! system's CA certificates plus a site's own, with ring as the crypto provider.

/// A client's encrypted stream (a plain one where inferd is built without TLS: never handed out).
#[cfg(feature = "tls")]
pub type Stream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;
#[cfg(not(feature = "tls"))]
pub type Stream = tokio::net::TcpStream;

/// Why a client connection could not be made secure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectError {
    /// The settings: the CA file, the host name, or a build without TLS.
    Setup(String),
    /// The handshake with the server.
    Handshake(String),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Setup(m) | ConnectError::Handshake(m) => f.write_str(m),
        }
    }
}

/// TLS over `tcp` to `host`, verified against the system's CAs and `ca_file` (named `setting`).
#[cfg(feature = "tls")]
pub async fn connect(
    host: &str,
    tcp: tokio::net::TcpStream,
    ca_file: Option<&std::path::Path>,
    setting: &str,
) -> Result<Stream, ConnectError> {
    let config = client_config(ca_file, setting).map_err(ConnectError::Setup)?;
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| ConnectError::Setup(format!("{host}: {e}")))?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| ConnectError::Handshake(format!("TLS with {host}: {e}")))
}

#[cfg(not(feature = "tls"))]
pub async fn connect(
    _host: &str,
    _tcp: tokio::net::TcpStream,
    _ca_file: Option<&std::path::Path>,
    _setting: &str,
) -> Result<Stream, ConnectError> {
    Err(ConnectError::Setup("https needs inferd built with its 'tls' feature".into()))
}

/// The system's CA certificates and those of `ca_file` (PEM), named `setting` in errors.
#[cfg(feature = "tls")]
pub fn client_config(
    ca_file: Option<&std::path::Path>,
    setting: &str,
) -> Result<std::sync::Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    let mut count = added;
    if let Some(ca) = ca_file {
        let pem = std::fs::read(ca).map_err(|e| format!("cannot read {setting} {}: {e}", ca.display()))?;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| format!("{setting} {}: {e}", ca.display()))?;
            roots.add(cert).map_err(|e| format!("{setting} {}: {e}", ca.display()))?;
            count += 1;
        }
    }
    if count == 0 {
        return Err(format!("no CA certificates: none in the system store and no {setting}"));
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(std::sync::Arc::new(config))
}
