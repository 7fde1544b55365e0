//! The byte pipe between inferd's MQTT client and the broker, which stops
//! reading from the broker while the intake is full.
//!
//! The MQTT client (rumqttc) reads everything the broker sends whenever it is
//! polled, and it must be polled to send results and acknowledgements. So the
//! client talks to the broker through this link: a Unix socket in a private
//! folder (mode 0700) on one side, the broker's TCP (or TLS) connection on the
//! other. While the gate is closed the link reads nothing from the broker, so
//! a backlog stays in the broker (TCP backpressure) whatever the broker's
//! receive-maximum discipline, at QoS 0 as at QoS 1; results and
//! acknowledgements still flow out. What is in flight when the gate closes is
//! bounded by the socket buffers (a few hundred KiB) and one read.

use crate::config::{Broker, MqttConfig};
use std::path::PathBuf;
#[cfg(feature = "tls")]
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

/// A running link: where the MQTT client connects, and the gate.
pub(crate) struct Link {
    /// The Unix socket the MQTT client connects to.
    pub path: PathBuf,
    dir: PathBuf,
    gate: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Link {
    /// Opens (true) or closes (false) the flow from the broker.
    pub fn set_open(&self, open: bool) {
        self.gate.send_if_modified(|g| std::mem::replace(g, open) != open);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// How to reach the broker.
#[derive(Clone)]
struct Target {
    host: String,
    port: u16,
    #[cfg(feature = "tls")]
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Target {
    async fn connect(&self) -> Result<Box<dyn Stream>, String> {
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("cannot connect to {}:{}: {e}", self.host, self.port))?;
        let _ = tcp.set_nodelay(true); // a result is one small write that must leave at once
        #[cfg(feature = "tls")]
        if let Some(config) = &self.tls {
            let name = rustls::pki_types::ServerName::try_from(self.host.clone())
                .map_err(|e| format!("'{}' is not a TLS server name: {e}", self.host))?;
            let tls = tokio_rustls::TlsConnector::from(config.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS with {}:{}: {e}", self.host, self.port))?;
            return Ok(Box::new(tls));
        }
        Ok(Box::new(tcp))
    }
}

/// Starts the link for `broker`: a private folder with the client's socket, and the task serving it.
pub(crate) fn start(broker: &Broker, cfg: &MqttConfig) -> Result<Link, String> {
    let target = Target {
        host: broker.host.clone(),
        port: broker.port,
        #[cfg(feature = "tls")]
        tls: if broker.tls { Some(tls_config(cfg)?) } else { None },
    };
    #[cfg(not(feature = "tls"))]
    if broker.tls {
        let _ = cfg;
        return Err("this inferd was built without the `tls` feature; mqtts:// is not available".into());
    }
    let dir = private_dir()?;
    let path = dir.join("broker.sock");
    let listener =
        tokio::net::UnixListener::bind(&path).map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    let (gate, open) = watch::channel(true);
    let task = tokio::spawn(serve(listener, target, open));
    Ok(Link { path, dir, gate, task })
}

/// A fresh folder only this user can enter, for the link's socket.
fn private_dir() -> Result<PathBuf, String> {
    use std::os::unix::fs::DirBuilderExt;
    let base = std::env::temp_dir();
    for attempt in 0..16u32 {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let dir = base.join(format!("inferd-mqtt-{}-{nanos:08x}{attempt}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("cannot create {}: {e}", dir.display())),
        }
    }
    Err(format!("cannot create a private folder in {}", base.display()))
}

async fn serve(listener: tokio::net::UnixListener, target: Target, open: watch::Receiver<bool>) {
    loop {
        let Ok((client, _)) = listener.accept().await else { continue };
        // One connection at a time is what the client makes; each gets its own broker connection.
        let (target, open) = (target.clone(), open.clone());
        tokio::spawn(async move {
            match target.connect().await {
                Ok(broker) => pipe(client, broker, open).await,
                // The client sees the connection close and retries with its backoff.
                Err(e) => tracing::warn!("MQTT: {e}"),
            }
        });
    }
}

/// Copies both ways until either side closes; reads from the broker only while `open`.
async fn pipe(client: tokio::net::UnixStream, broker: Box<dyn Stream>, mut open: watch::Receiver<bool>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut broker_read, mut broker_write) = tokio::io::split(broker);
    let outbound = async {
        let _ = tokio::io::copy(&mut client_read, &mut broker_write).await;
        let _ = broker_write.shutdown().await;
    };
    let inbound = async {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            if open.wait_for(|o| *o).await.is_err() {
                return;
            }
            match broker_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if client_write.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    tokio::select! {
        _ = outbound => {}
        _ = inbound => {}
    }
}

/// The TLS client configuration: the CA in `mqtt.ca_file`, and the client
/// certificate and key for mutual TLS when given.
#[cfg(feature = "tls")]
fn tls_config(cfg: &MqttConfig) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    let ca_file = cfg.ca_file.as_deref().ok_or("mqtt.ca_file is required for mqtts://")?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&read(ca_file)?) {
        let cert = cert.map_err(|e| format!("mqtt.ca_file {}: {e}", ca_file.display()))?;
        roots.add(cert).map_err(|e| format!("mqtt.ca_file {}: {e}", ca_file.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("mqtt.ca_file {}: no certificate in it", ca_file.display()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let config = match (&cfg.client_cert, &cfg.client_key) {
        (Some(cert), Some(key)) => {
            let certs = CertificateDer::pem_slice_iter(&read(cert)?)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("mqtt.client_cert {}: {e}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_slice(&read(key)?)
                .map_err(|e| format!("mqtt.client_key {}: {e}", key.display()))?;
            builder.with_client_auth_cert(certs, key).map_err(|e| format!("mqtt.client_cert/client_key: {e}"))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}
