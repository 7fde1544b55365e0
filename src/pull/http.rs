//! A small HTTP/1.1 client for pulls: GET with headers, redirects followed
//! (authorisation dropped when the host changes), https verified against the
//! system's CA certificates plus `pull.ca_file`, plain http only where the
//! caller allows it.

use super::PullError;
use bytes::Bytes;
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper_util::rt::TokioIo;
use std::path::PathBuf;
use std::time::Duration;

/// Redirects followed before giving up.
const MAX_REDIRECTS: usize = 5;

/// How to connect: which hosts may be reached over plain http, and the extra CA.
#[derive(Debug, Clone, Default)]
pub struct Client {
    /// Hosts (`host` or `host:port`) reached over plain http.
    pub plain_http: Vec<String>,
    pub ca_file: Option<PathBuf>,
    /// Connect and response-header timeout.
    pub timeout: Duration,
}

/// An answer: status, headers, and the body still to read.
pub struct Response {
    pub status: hyper::StatusCode,
    pub headers: HeaderMap,
    pub body: Incoming,
    /// The URL that answered (after redirects).
    pub url: hyper::Uri,
    _driver: DropAbort,
}

/// Stops the connection's task when the response is dropped.
struct DropAbort(tokio::task::JoinHandle<()>);

impl Drop for DropAbort {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Client {
    /// GET `url` with `headers`, following redirects.
    pub async fn get(&self, url: &str, headers: &[(HeaderName, String)]) -> Result<Response, PullError> {
        let mut uri: hyper::Uri = url.parse().map_err(|e| PullError::source(format!("'{url}' is not a URL: {e}")))?;
        let first_host = uri.authority().map(|a| a.as_str().to_string());
        for _ in 0..=MAX_REDIRECTS {
            let same_host = uri.authority().map(|a| a.as_str().to_string()) == first_host;
            // Credentials go to the host they were meant for, not to where it redirects.
            let sent: Vec<&(HeaderName, String)> =
                headers.iter().filter(|(name, _)| same_host || name != hyper::header::AUTHORIZATION).collect();
            let response = self.once(&uri, &sent).await?;
            if response.status.is_redirection() {
                let to = response
                    .headers
                    .get(hyper::header::LOCATION)
                    .and_then(|l| l.to_str().ok())
                    .ok_or_else(|| PullError::network(format!("{uri} redirects without a Location")))?;
                uri = join(&uri, to)?;
                continue;
            }
            return Ok(response);
        }
        Err(PullError::network(format!("{url}: more than {MAX_REDIRECTS} redirects")))
    }

    async fn once(&self, uri: &hyper::Uri, headers: &[&(HeaderName, String)]) -> Result<Response, PullError> {
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(PullError::source(format!("{uri}: only http(s) is fetched"))),
        };
        let host =
            uri.host().filter(|h| !h.is_empty()).ok_or_else(|| PullError::source(format!("{uri} has no host")))?;
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        if !https && !self.plain_http_allowed(host, Some(port)) {
            return Err(PullError::refused(format!(
                "{uri}: plain http is used only for loopback hosts and those in pull.insecure (as Docker does); use https"
            )));
        }
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let connect = tokio::net::TcpStream::connect((bare, port));
        let tcp = tokio::time::timeout(self.timeout, connect)
            .await
            .map_err(|_| PullError::network(format!("connecting to {bare}:{port} took over {:?}", self.timeout)))?
            .map_err(|e| PullError::network(format!("cannot connect to {bare}:{port}: {e}")))?;
        let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default().to_string();
        let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_string();
        let mut request = hyper::Request::get(path)
            .header(hyper::header::HOST, authority)
            .header(hyper::header::USER_AGENT, concat!("inferd/", env!("CARGO_PKG_VERSION")));
        for (name, value) in headers {
            let value = HeaderValue::from_str(value).map_err(|e| PullError::source(format!("header {name}: {e}")))?;
            request = request.header(name.clone(), value);
        }
        let request = request.body(Empty::<Bytes>::new()).map_err(|e| PullError::source(e.to_string()))?;
        let failed = |e: hyper::Error| PullError::network(format!("{uri}: {e}"));
        let (response, driver) = if https {
            let handshake = crate::tls::connect(bare, tcp, self.ca_file.as_deref(), "pull.ca_file");
            let tls = tokio::time::timeout(self.timeout, handshake)
                .await
                .map_err(|_| {
                    PullError::network(format!("the TLS handshake with {bare}:{port} took over {:?}", self.timeout))
                })?
                .map_err(|e| match e {
                    crate::tls::ConnectError::Setup(m) => PullError::refused(m),
                    crate::tls::ConnectError::Handshake(m) => PullError::network(m),
                })?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(failed)?;
            let driver = tokio::spawn(async move {
                let _ = conn.await;
            });
            (tokio::time::timeout(self.timeout, sender.send_request(request)).await, driver)
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.map_err(failed)?;
            let driver = tokio::spawn(async move {
                let _ = conn.await;
            });
            (tokio::time::timeout(self.timeout, sender.send_request(request)).await, driver)
        };
        let driver = DropAbort(driver);
        let response = response
            .map_err(|_| PullError::network(format!("{uri}: no answer within {:?}", self.timeout)))?
            .map_err(failed)?;
        let (parts, body) = response.into_parts();
        Ok(Response { status: parts.status, headers: parts.headers, body, url: uri.clone(), _driver: driver })
    }

    /// Loopback hosts and those in `pull.insecure` (`host` or `host:port`).
    pub fn plain_http_allowed(&self, host: &str, port: Option<u16>) -> bool {
        let bare = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        let loopback = bare == "localhost" || bare.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
        loopback || crate::config::host_listed(&self.plain_http, &bare, port)
    }
}

/// `to` (absolute, or a path on the same host) against `base`.
fn join(base: &hyper::Uri, to: &str) -> Result<hyper::Uri, PullError> {
    let bad = |e: String| PullError::network(format!("a redirect to '{to}': {e}"));
    if to.starts_with("http://") || to.starts_with("https://") {
        return to.parse().map_err(|e: hyper::http::uri::InvalidUri| bad(e.to_string()));
    }
    let scheme = base.scheme_str().unwrap_or("https");
    let authority = base.authority().map(|a| a.as_str()).unwrap_or_default();
    let path = if to.starts_with('/') {
        to.to_string()
    } else {
        let dir = base.path().rsplit_once('/').map(|(d, _)| d).unwrap_or("");
        format!("{dir}/{to}")
    };
    format!("{scheme}://{authority}{path}").parse().map_err(|e: hyper::http::uri::InvalidUri| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_join_absolute_and_relative_locations() {
        let base: hyper::Uri = "https://reg.example/v2/m/blobs/sha256:ab".parse().unwrap();
        assert_eq!(join(&base, "https://cdn.example/x?sig=1").unwrap().to_string(), "https://cdn.example/x?sig=1");
        assert_eq!(join(&base, "/other").unwrap().to_string(), "https://reg.example/other");
        assert_eq!(join(&base, "next").unwrap().to_string(), "https://reg.example/v2/m/blobs/next");
    }

    #[test]
    fn plain_http_is_for_loopback_and_named_hosts_only() {
        let c = Client { plain_http: vec!["reg.lan:5000".into()], ..Default::default() };
        assert!(c.plain_http_allowed("127.0.0.1", Some(5000)));
        assert!(c.plain_http_allowed("[::1]", Some(80)));
        assert!(c.plain_http_allowed("localhost", Some(1)));
        assert!(c.plain_http_allowed("reg.lan", Some(5000)));
        assert!(!c.plain_http_allowed("reg.lan", Some(5001)));
        assert!(!c.plain_http_allowed("registry.example", Some(80)));
    }
}
