//! OCI registries (the distribution API): a model is an artifact as ORAS
//! writes it, a manifest whose layers are the model's files, each titled by
//! `org.opencontainers.image.title`. Authorisation as Docker does it: try
//! anonymously; on 401 answer the challenge, `Basic` with the credentials of
//! the auth file (`~/.docker/config.json`'s `auths`, as `oras login` and
//! `docker login` write it) or `Bearer` with a token from the challenge's
//! realm (anonymous, or with those credentials).

use super::http::{Client, Response};
use super::{Layer, PullError};
use base64::Engine as _;
use http_body_util::BodyExt;
use hyper::header::{AUTHORIZATION, HeaderName, WWW_AUTHENTICATE};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// Largest manifest read (real ones are a few KiB).
const MAX_MANIFEST: usize = 4 << 20;
const TITLE: &str = "org.opencontainers.image.title";
const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// `oci://registry[:port]/repository[:tag|@sha256:…]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub registry: String,
    pub repository: String,
    /// A tag, or `sha256:…`.
    pub reference: String,
}

impl Reference {
    pub fn parse(source: &str) -> Result<Reference, PullError> {
        let rest =
            source.strip_prefix("oci://").ok_or_else(|| PullError::source(format!("'{source}' is not oci://")))?;
        let bad = |why: &str| {
            PullError::source(format!("'{source}': {why} (oci://REGISTRY/REPOSITORY:TAG or @sha256:DIGEST)"))
        };
        let (registry, path) = rest.split_once('/').ok_or_else(|| bad("no repository"))?;
        if registry.is_empty() {
            return Err(bad("no registry"));
        }
        let (repository, reference) = match path.split_once('@') {
            Some((repo, digest)) => {
                let hex = digest.strip_prefix("sha256:").ok_or_else(|| bad("only sha256 digests are read"))?;
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
                    return Err(bad("a sha256 digest is 64 lowercase hex digits"));
                }
                (repo, digest.to_string())
            }
            None => match path.rsplit_once(':') {
                Some((repo, tag)) if !tag.contains('/') => (repo, tag.to_string()),
                _ => (path, "latest".to_string()),
            },
        };
        let component_ok = |c: &str| {
            !c.is_empty() && c.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        };
        if !repository.split('/').all(component_ok) {
            return Err(bad("a repository is lowercase letters, digits, '.', '_', '-' and '/'"));
        }
        let tag_ok = |t: &str| {
            (1..=128).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        };
        if !reference.starts_with("sha256:") && !tag_ok(&reference) {
            return Err(bad("a tag is 1-128 of A-Z a-z 0-9 . _ -"));
        }
        Ok(Reference { registry: registry.to_string(), repository: repository.to_string(), reference })
    }
}

#[derive(Debug, Deserialize)]
struct Manifest {
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct Descriptor {
    digest: String,
    size: u64,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

/// A registry session: the base URL and the authorisation that worked.
pub struct Session<'a> {
    client: &'a Client,
    base: String,
    /// Plain http may be tried when https fails (loopback and `pull.insecure` registries).
    plain_allowed: bool,
    reference: Reference,
    credentials: Option<(String, String)>,
    authorization: Option<String>,
}

impl<'a> Session<'a> {
    pub fn new(client: &'a Client, reference: Reference, credentials: Option<(String, String)>) -> Session<'a> {
        let (host, port) = super::host_port(&reference.registry);
        let plain = client.plain_http_allowed(host, port);
        // As Docker does: https first; for a registry allowed plain http, http when https fails.
        let base = format!("https://{}", reference.registry);
        Session { client, base, plain_allowed: plain, reference, credentials, authorization: None }
    }

    /// The artifact's files (layers with a title) and the manifest's digest.
    pub async fn layers(&mut self) -> Result<(Vec<Layer>, String), PullError> {
        let path = format!("/v2/{}/manifests/{}", self.reference.repository, self.reference.reference);
        let accept = [(hyper::header::ACCEPT, ACCEPT.to_string())];
        let response = match self.get(&format!("{}{path}", self.base), &accept).await {
            Err(e)
                if self.plain_allowed
                    && matches!(e.kind, super::PullErrorKind::Network | super::PullErrorKind::Refused) =>
            {
                let https_failed = e.message;
                self.base = format!("http://{}", self.reference.registry);
                self.get(&format!("{}{path}", self.base), &accept).await.map_err(|mut e| {
                    // Neither spoke: say what https said too.
                    if e.kind == super::PullErrorKind::Network {
                        e.message = format!("{}; over https: {https_failed}", e.message);
                    }
                    e
                })?
            }
            other => other?,
        };
        let body = read_small(response, MAX_MANIFEST, "manifest").await?;
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
        if self.reference.reference.starts_with("sha256:") && digest != self.reference.reference {
            return Err(PullError::digest(format!(
                "the manifest of {} has digest {digest}, not the {} asked for",
                self.reference.repository, self.reference.reference
            )));
        }
        let manifest: Manifest = serde_json::from_slice(&body)
            .map_err(|e| PullError::artifact(format!("the manifest is not an OCI image manifest: {e}")))?;
        let mut layers = Vec::new();
        for (i, d) in manifest.layers.into_iter().enumerate() {
            let Some(title) = d.annotations.get(TITLE).cloned() else {
                return Err(PullError::artifact(format!(
                    "layer {i} ({}) has no {TITLE}: push files with oras (`oras push REG/REPO:TAG model.json *.onnx`)",
                    d.digest
                )));
            };
            let sha256 = d
                .digest
                .strip_prefix("sha256:")
                .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
                .ok_or_else(|| {
                    PullError::artifact(format!("layer '{title}' has digest {}: only sha256 is read", d.digest))
                })?
                .to_ascii_lowercase();
            let url = format!("{}/v2/{}/blobs/{}", self.base, self.reference.repository, d.digest);
            layers.push(Layer { name: title, sha256, size: Some(d.size), url });
        }
        Ok((layers, digest))
    }

    /// The headers a blob download sends (the authorisation that worked for the manifest).
    pub fn headers(&self) -> Vec<(HeaderName, String)> {
        self.authorization.iter().map(|a| (AUTHORIZATION, a.clone())).collect()
    }

    /// GET, answering one authorisation challenge.
    async fn get(&mut self, url: &str, extra: &[(HeaderName, String)]) -> Result<Response, PullError> {
        let mut headers: Vec<(HeaderName, String)> = extra.to_vec();
        headers.extend(self.headers());
        let response = self.client.get(url, &headers).await?;
        if response.status != hyper::StatusCode::UNAUTHORIZED || self.authorization.is_some() {
            return check(response, url);
        }
        let challenge = response.headers.get(WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        drop(response);
        self.authorization = Some(self.answer(&challenge).await?);
        let mut headers: Vec<(HeaderName, String)> = extra.to_vec();
        headers.extend(self.headers());
        check(self.client.get(url, &headers).await?, url)
    }

    /// The Authorization header for a challenge.
    async fn answer(&self, challenge: &str) -> Result<String, PullError> {
        let basic = self
            .credentials
            .as_ref()
            .map(|(u, p)| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))));
        let (scheme, params) = challenge.split_once(' ').unwrap_or((challenge, ""));
        match scheme.to_ascii_lowercase().as_str() {
            "basic" => basic.ok_or_else(|| {
                PullError::auth(format!(
                    "{} needs credentials: `oras login {}` or `docker login {}` writes them to the auth file",
                    self.reference.registry, self.reference.registry, self.reference.registry
                ))
            }),
            "bearer" => {
                let params = challenge_params(params);
                let realm = params.get("realm").ok_or_else(|| PullError::auth("a Bearer challenge without a realm"))?;
                let mut query = Vec::new();
                if let Some(service) = params.get("service") {
                    query.push(format!("service={}", encode(service)));
                }
                let scope = params
                    .get("scope")
                    .cloned()
                    .unwrap_or_else(|| format!("repository:{}:pull", self.reference.repository));
                query.push(format!("scope={}", encode(&scope)));
                let url = format!("{realm}{}{}", if realm.contains('?') { "&" } else { "?" }, query.join("&"));
                let headers: Vec<(HeaderName, String)> = basic.iter().map(|b| (AUTHORIZATION, b.clone())).collect();
                let response = check(self.client.get(&url, &headers).await?, &url)
                    .map_err(|e| PullError::auth(format!("the token service refused: {}", e.message)))?;
                let body = read_small(response, 1 << 20, "token").await?;
                #[derive(Deserialize)]
                struct Token {
                    token: Option<String>,
                    access_token: Option<String>,
                }
                let t: Token = serde_json::from_slice(&body)
                    .map_err(|e| PullError::auth(format!("the token service's answer: {e}")))?;
                let token =
                    t.token.or(t.access_token).ok_or_else(|| PullError::auth("the token service gave no token"))?;
                Ok(format!("Bearer {token}"))
            }
            _ => Err(PullError::auth(format!(
                "{} refused access (401) with the challenge '{challenge}'",
                self.reference.registry
            ))),
        }
    }
}

/// `realm="…",service="…",scope="…"` into a map.
fn challenge_params(params: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = params.trim();
    while let Some((key, after)) = rest.split_once('=') {
        let key = key.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let (value, next) = match after.strip_prefix('"') {
            Some(quoted) => match quoted.find('"') {
                Some(end) => (&quoted[..end], &quoted[end + 1..]),
                None => (quoted, ""),
            },
            None => after.split_once(',').unwrap_or((after, "")),
        };
        out.insert(key, value.to_string());
        rest = next.trim_start_matches(',').trim();
    }
    out
}

/// Percent-encodes a query value.
fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn check(response: Response, url: &str) -> Result<Response, PullError> {
    match response.status {
        s if s.is_success() => Ok(response),
        hyper::StatusCode::NOT_FOUND => Err(PullError::not_found(format!("{url}: not found (404)"))),
        s @ (hyper::StatusCode::UNAUTHORIZED | hyper::StatusCode::FORBIDDEN) => {
            Err(PullError::auth(format!("{url}: access refused ({s}); check the credentials in the auth file")))
        }
        s => Err(PullError::network(format!("{url}: the registry answered {s}"))),
    }
}

/// A small body (manifest, token), at most `max` bytes.
pub(super) async fn read_small(response: Response, max: usize, what: &str) -> Result<Vec<u8>, PullError> {
    let mut body = response.body;
    let mut out = Vec::new();
    // Every read has the connection's timeout: a silent server fails, it does not hang the pull.
    const SILENT: std::time::Duration = std::time::Duration::from_secs(60);
    while let Some(frame) = tokio::time::timeout(SILENT, body.frame())
        .await
        .map_err(|_| PullError::network(format!("reading the {what}: nothing arrived for {} s", SILENT.as_secs())))?
    {
        let frame = frame.map_err(|e| PullError::network(format!("reading the {what}: {e}")))?;
        if let Some(data) = frame.data_ref() {
            if out.len() + data.len() > max {
                return Err(PullError::artifact(format!("the {what} is over {max} bytes")));
            }
            out.extend_from_slice(data);
        }
    }
    Ok(out)
}

/// The credentials for `registry` in a Docker-style auth file (`{"auths": {"host:port": {"auth": base64("user:pass")}}}`).
pub fn credentials(auth_file: &std::path::Path, registry: &str) -> Result<Option<(String, String)>, PullError> {
    let text = match std::fs::read_to_string(auth_file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(PullError::auth(format!("cannot read the auth file {}: {e}", auth_file.display()))),
    };
    #[derive(Deserialize)]
    struct AuthFile {
        #[serde(default)]
        auths: BTreeMap<String, Entry>,
    }
    #[derive(Deserialize)]
    struct Entry {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
    }
    let file: AuthFile = serde_json::from_str(&text)
        .map_err(|e| PullError::auth(format!("the auth file {}: {e}", auth_file.display())))?;
    let key =
        |k: &str| k.trim_start_matches("https://").trim_start_matches("http://").trim_end_matches('/').to_string();
    let Some(entry) = file.auths.iter().find(|(k, _)| key(k) == registry).map(|(_, e)| e) else {
        return Ok(None);
    };
    if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
        return Ok(Some((u.clone(), p.clone())));
    }
    let Some(auth) = &entry.auth else { return Ok(None) };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| {
            PullError::auth(format!("the auth file's entry for {registry} is not base64 of user:password"))
        })?;
    let (u, p) = decoded
        .split_once(':')
        .ok_or_else(|| PullError::auth(format!("the auth file's entry for {registry} is not user:password")))?;
    Ok(Some((u.to_string(), p.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_read_tags_digests_and_ports() {
        let r = Reference::parse("oci://127.0.0.1:5000/models/color:v2").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.reference.as_str()),
            ("127.0.0.1:5000", "models/color", "v2")
        );
        let r = Reference::parse("oci://reg.example/a/b").unwrap();
        assert_eq!(r.reference, "latest");
        let d = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("oci://reg.example/a@{d}")).unwrap();
        assert_eq!(r.reference, d);
        for bad in ["oci://", "oci://reg", "oci://reg/A", "oci://reg/a@md5:00", "oci://reg/a@sha256:12", "http://x/y"] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bearer_challenges_are_read_with_quotes_and_commas() {
        let p = challenge_params(
            r#"realm="https://auth.example/token",service="registry.example",scope="repository:m:pull,push""#,
        );
        assert_eq!(p["realm"], "https://auth.example/token");
        assert_eq!(p["service"], "registry.example");
        assert_eq!(p["scope"], "repository:m:pull,push");
    }
}
