//! TLS for inferd's own HTTPS requests (chat images, model pulls): the
//! system's CA certificates plus a site's own, with ring as the crypto provider.
#![cfg(feature = "tls")]

/// The system's CA certificates and those of `ca_file` (PEM), named `setting` in errors.
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
