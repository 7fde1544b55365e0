//! Fetching a chat request's `http(s)://` images (`limits.image_fetch`):
//! only from the hosts listed, within a byte cap (checked against the
//! announced length and again as the body arrives) and a timeout over the
//! whole fetch. One GET over HTTP/1.1; redirects are not followed (a camera
//! or image store is named by its real address); https checks the server
//! against the system's CA certificates plus `image_fetch.ca_file`. At most
//! [`MAX_FETCHES`] fetches run at once (their sockets are among the
//! descriptors the connection cap keeps room for); more wait their turn
//! within their timeout.

use crate::config::ImageFetch;
use crate::error::InferError;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use std::time::Duration;

/// Fetches running at once, over every request.
pub const MAX_FETCHES: usize = 32;

static FETCHES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_FETCHES);

/// The bytes at `url` (http or https), or why not.
pub async fn fetch(url: &str, cfg: &ImageFetch) -> Result<Vec<u8>, InferError> {
    let uri: hyper::Uri = url.parse().map_err(|e| InferError::bad_input(format!("'{url}' is not a URL: {e}")))?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(InferError::bad_input(format!("'{url}' is not an http(s) URL"))),
    };
    let host = uri.host().filter(|h| !h.is_empty()).ok_or_else(|| InferError::bad_input("the URL has no host"))?;
    if cfg.hosts.is_empty() {
        return Err(InferError::bad_input(
            "http(s) image URLs are fetched only from the hosts in limits.image_fetch.hosts, and none is configured: \
             send the image as a data: URL, or list the host",
        ));
    }
    if !cfg.allows(host) {
        return Err(InferError::bad_input(format!("{host} is not in limits.image_fetch.hosts")));
    }
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let timeout = Duration::from_millis(cfg.timeout_ms);
    let work = async {
        let _turn = FETCHES.acquire().await.map_err(|_| InferError::internal("image fetches are closed"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let tcp = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| InferError::bad_input(format!("cannot connect to {host}:{port}: {e}")))?;
        if https {
            let tls = crate::tls::connect(host, tcp, cfg.ca_file.as_deref(), "limits.image_fetch.ca_file")
                .await
                .map_err(|e| InferError::bad_input(e.to_string()))?;
            get(TokioIo::new(tls), &uri, cfg.max_bytes).await
        } else {
            get(TokioIo::new(tcp), &uri, cfg.max_bytes).await
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r.map_err(|e| InferError::bad_input(format!("fetching {url}: {}", e.message))),
        Err(_) => Err(InferError::bad_input(format!(
            "fetching {url} took over {} ms (limits.image_fetch.timeout_ms)",
            cfg.timeout_ms
        ))),
    }
}

/// One GET on a connected stream, the body read up to `max` bytes.
async fn get<T>(io: T, uri: &hyper::Uri, max: usize) -> Result<Vec<u8>, InferError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let failed = |e: hyper::Error| InferError::bad_input(e.to_string());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.map_err(failed)?;
    let driver = tokio::spawn(conn);
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::USER_AGENT, concat!("inferd/", env!("CARGO_PKG_VERSION")))
        .body(Empty::<Bytes>::new())
        .map_err(|e| InferError::bad_input(e.to_string()))?;
    let outcome = async {
        let response = sender.send_request(request).await.map_err(failed)?;
        let status = response.status();
        if status.is_redirection() {
            let to = response.headers().get(hyper::header::LOCATION).and_then(|l| l.to_str().ok()).unwrap_or("?");
            return Err(InferError::bad_input(format!(
                "the server redirects ({status}) to {to}; redirects are not followed"
            )));
        }
        if !status.is_success() {
            return Err(InferError::bad_input(format!("the server answered {status}")));
        }
        let announced =
            response.headers().get(hyper::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
        let over = |n: usize| {
            InferError::bad_input(format!("the image is {n} bytes, over limits.image_fetch.max_bytes ({max})"))
        };
        if let Some(n) = announced.filter(|&n| n > max) {
            return Err(over(n));
        }
        let mut body = response.into_body();
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            if let Some(data) = frame.map_err(failed)?.data_ref() {
                if out.len() + data.len() > max {
                    return Err(over(out.len() + data.len()));
                }
                out.extend_from_slice(data);
            }
        }
        Ok(out)
    }
    .await;
    driver.abort();
    outcome
}
