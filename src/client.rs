//! A small blocking HTTP/1.1 client for the daemon's Unix socket, used by
//! `inferd infer` and the tests. One request per connection
//! (`Connection: close`).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a request did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot connect to inferd at {path}: {source} (is `inferd serve` running? `--local` runs the model in this process)"
    )]
    Connect { path: PathBuf, source: std::io::Error },
    #[error("the connection to inferd failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("inferd sent a response that is not HTTP: {0}")]
    Protocol(String),
}

/// An HTTP response: status and body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

impl Response {
    /// The body parsed as JSON.
    pub fn json(&self) -> Result<serde_json::Value, ClientError> {
        serde_json::from_slice(&self.body).map_err(|e| ClientError::Protocol(format!("body is not JSON: {e}")))
    }
}

/// Talks to the daemon at a socket path.
#[derive(Debug, Clone)]
pub struct Client {
    path: PathBuf,
    timeout: Option<Duration>,
}

impl Client {
    /// A client for the socket at `path`, with no read timeout.
    pub fn new(path: impl Into<PathBuf>) -> Client {
        Client { path: path.into(), timeout: None }
    }

    /// Gives up reading an answer after `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = Some(timeout);
        self
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> Result<Response, ClientError> {
        self.request("GET", path, None, &[])
    }

    /// `POST path` with `body` of `content_type`.
    pub fn post(&self, path: &str, content_type: &str, body: &[u8]) -> Result<Response, ClientError> {
        self.request("POST", path, Some(content_type), body)
    }

    /// Sends one request and reads the whole response.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<Response, ClientError> {
        let mut stream = UnixStream::connect(&self.path)
            .map_err(|source| ClientError::Connect { path: self.path.clone(), source })?;
        stream.set_read_timeout(self.timeout)?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: inferd\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        if let Some(ct) = content_type {
            head.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        head.push_str("\r\n");
        let sent = stream.write_all(head.as_bytes()).and_then(|()| stream.write_all(body));
        // The daemon may answer (413, 404...) and close before the whole body
        // is sent: read its answer before reporting the broken write. Closing
        // with our unread body in its queue makes the kernel report a reset
        // to us after the answer's bytes, so an answer read before an error counts.
        let mut raw = Vec::new();
        let read = stream.read_to_end(&mut raw);
        if !raw.is_empty()
            && let Ok(response) = parse_response(&raw)
        {
            return Ok(response);
        }
        match (sent, read) {
            (_, Ok(_)) if !raw.is_empty() => parse_response(&raw),
            (Err(e), _) | (Ok(()), Err(e)) => Err(ClientError::Io(e)),
            (Ok(()), Ok(_)) => Err(ClientError::Protocol("the connection closed without an answer".into())),
        }
    }
}

fn parse_response(raw: &[u8]) -> Result<Response, ClientError> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| ClientError::Protocol("no end of headers".into()))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| ClientError::Protocol("headers are not UTF-8".into()))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ClientError::Protocol(format!("bad status line '{status_line}'")))?;
    let mut content_type = None;
    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        let Some((k, v)) = line.split_once(':') else { continue };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        match k.as_str() {
            "content-type" => content_type = Some(v.to_string()),
            "content-length" => content_length = v.parse::<usize>().ok(),
            "transfer-encoding" => chunked = v.eq_ignore_ascii_case("chunked"),
            _ => {}
        }
    }
    let rest = &raw[end + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = content_length {
        rest.get(..n).ok_or_else(|| ClientError::Protocol("body shorter than Content-Length".into()))?.to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Response { status, content_type, body })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, ClientError> {
    let bad = || ClientError::Protocol("bad chunked body".into());
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n").ok_or_else(bad)?;
        let size_text = std::str::from_utf8(&data[..line_end]).map_err(|_| bad())?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16).map_err(|_| bad())?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(data.get(..size).ok_or_else(bad)?);
        data = data.get(size + 2..).ok_or_else(bad)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_with_length_or_chunks_are_read() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
            .unwrap();
        assert_eq!(
            (r.status, r.body.as_slice(), r.content_type.as_deref()),
            (200, &b"{}"[..], Some("application/json"))
        );
        let r = parse_response(
            b"HTTP/1.1 429 Too Many\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (429, &b"abcde"[..]));
        assert!(parse_response(b"garbage").is_err());
    }
}
