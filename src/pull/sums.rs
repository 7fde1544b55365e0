//! Sources whose file list is a `SHA256SUMS` file (`sha256sum`'s format, what
//! `inferd pack` writes beside the files): a folder on any web server
//! (`https://host/models/color/`), or a Hugging Face Hub repository at a
//! revision (`hf://org/repo@revision`, the Hub's `resolve` layout). The
//! sums file plays the OCI manifest's part: its own sha256 is the source's
//! digest, and it gives every file's.

use super::{Layer, PullConfig, PullError};
use hyper::header::HeaderName;
use sha2::{Digest, Sha256};

/// The sums file's name.
pub const SUMS: &str = "SHA256SUMS";
/// Largest sums file read.
const MAX_SUMS: usize = 256 << 10;
/// The Hub, unless `pull.hf_endpoint` or `HF_ENDPOINT` names another.
const HF_ENDPOINT: &str = "https://huggingface.co";

/// A folder of files named by a sums file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Folder {
    /// The sums file's URL.
    pub sums: String,
    /// The folder's URL, ending in `/`: files are `base + name`.
    pub base: String,
    /// `host[:port]`, for `pull.registries`.
    pub host: String,
    /// A Hugging Face Hub repository (its token is sent).
    pub hub: bool,
}

impl Folder {
    /// `https://…/` (a folder), `https://…/SHA256SUMS`, or `hf://org/repo[@revision]`.
    pub fn parse(source: &str, cfg: &PullConfig) -> Result<Folder, PullError> {
        if let Some(rest) = source.strip_prefix("hf://") {
            let (repo, revision) = rest.split_once('@').unwrap_or((rest, "main"));
            let ok = |s: &str| {
                !s.is_empty()
                    && !s.starts_with('.')
                    && s.len() <= 96
                    && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            };
            let parts: Vec<&str> = repo.split('/').collect();
            if parts.len() != 2 || !parts.iter().all(|p| ok(p)) || !ok(revision) {
                return Err(PullError::source(format!(
                    "'{source}': a Hub source is hf://ORG/REPO or hf://ORG/REPO@REVISION (a branch, tag or commit)"
                )));
            }
            let endpoint = cfg
                .hf_endpoint
                .clone()
                .or_else(|| std::env::var("HF_ENDPOINT").ok())
                .unwrap_or_else(|| HF_ENDPOINT.to_string());
            let base = format!("{}/{repo}/resolve/{revision}/", endpoint.trim_end_matches('/'));
            let host =
                host_of(&base).ok_or_else(|| PullError::source(format!("hf_endpoint '{endpoint}' is not a URL")))?;
            return Ok(Folder { sums: format!("{base}{SUMS}"), base, host, hub: true });
        }
        if !(source.starts_with("https://") || source.starts_with("http://")) {
            return Err(PullError::source(format!("'{source}' is not an http(s) URL")));
        }
        let (base, sums) = match source.rsplit_once('/') {
            Some((dir, "")) => (format!("{dir}/"), format!("{dir}/{SUMS}")),
            Some((dir, file)) if file == SUMS => (format!("{dir}/"), source.to_string()),
            _ => {
                return Err(PullError::source(format!(
                    "'{source}': an https source is a folder (ending in /) or its {SUMS} file"
                )));
            }
        };
        let host = host_of(&base).ok_or_else(|| PullError::source(format!("'{source}' has no host")))?;
        Ok(Folder { sums, base, host, hub: false })
    }

    /// The headers every request sends: the Hub's token (`HF_TOKEN`, or `pull.hf_token_file`).
    pub fn headers(&self, cfg: &PullConfig) -> Result<Vec<(HeaderName, String)>, PullError> {
        if !self.hub {
            return Ok(Vec::new());
        }
        let token = match (&cfg.hf_token_file, std::env::var("HF_TOKEN")) {
            (Some(file), _) => Some(
                std::fs::read_to_string(file)
                    .map_err(|e| PullError::auth(format!("pull.hf_token_file {}: {e}", file.display())))?
                    .trim()
                    .to_string(),
            ),
            (None, Ok(t)) if !t.trim().is_empty() => Some(t.trim().to_string()),
            _ => None,
        };
        Ok(token.into_iter().map(|t| (hyper::header::AUTHORIZATION, format!("Bearer {t}"))).collect())
    }

    /// The files the sums file names, and its digest.
    pub async fn layers(
        &self,
        client: &super::http::Client,
        headers: &[(HeaderName, String)],
    ) -> Result<(Vec<Layer>, String), PullError> {
        let response = client.get(&self.sums, headers).await?;
        match response.status {
            s if s.is_success() => {}
            hyper::StatusCode::NOT_FOUND => {
                return Err(PullError::not_found(format!(
                    "{}: not found (404): publish the files with their {SUMS} (`inferd pack` writes it)",
                    self.sums
                )));
            }
            s @ (hyper::StatusCode::UNAUTHORIZED | hyper::StatusCode::FORBIDDEN) => {
                let hint = if self.hub {
                    " (set HF_TOKEN or pull.hf_token_file for a gated or private repository)"
                } else {
                    ""
                };
                return Err(PullError::auth(format!("{}: access refused ({s}){hint}", self.sums)));
            }
            s => return Err(PullError::network(format!("{}: the server answered {s}", self.sums))),
        }
        let body = super::oci::read_small(response, MAX_SUMS, SUMS).await?;
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
        let text = String::from_utf8(body).map_err(|_| PullError::artifact(format!("{SUMS} is not UTF-8 text")))?;
        Ok((parse(&text, &self.base)?, digest))
    }
}

/// `host[:port]` of an http(s) URL.
fn host_of(url: &str) -> Option<String> {
    let uri: hyper::Uri = url.parse().ok()?;
    uri.authority().map(|a| a.as_str().to_string()).filter(|a| !a.is_empty())
}

/// The files of a sums file (`HEX  NAME` or `HEX *NAME` a line; blank lines
/// and `#` comments skipped), each at `base + NAME`.
pub fn parse(text: &str, base: &str) -> Result<Vec<Layer>, PullError> {
    let mut layers = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let bad =
            || PullError::artifact(format!("{SUMS} line {}: '{}' is not 'SHA256  NAME'", i + 1, line.escape_debug()));
        let (hex, rest) = line.split_at_checked(64).ok_or_else(bad)?;
        let name = rest.strip_prefix("  ").or_else(|| rest.strip_prefix(" *")).ok_or_else(bad)?;
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        super::check_file_name(name)?;
        layers.push(Layer {
            name: name.to_string(),
            sha256: hex.to_ascii_lowercase(),
            size: None,
            url: format!("{base}{name}"),
        });
    }
    if layers.is_empty() {
        return Err(PullError::artifact(format!("{SUMS} names no file")));
    }
    Ok(layers)
}

/// The sums file of a folder's `files` (what `sha256sum FILE…` prints).
pub fn write(dir: &std::path::Path, files: &[String]) -> Result<String, PullError> {
    let mut out = String::new();
    for f in files {
        let (hex, _, _) = super::sha256_of(&dir.join(f), u64::MAX)?;
        out.push_str(&format!("{hex}  {f}\n"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_name_their_sums_file_and_folder() {
        let cfg = PullConfig::default();
        let f = Folder::parse("https://models.example/color/", &cfg).unwrap();
        assert_eq!(
            (f.sums.as_str(), f.base.as_str(), f.host.as_str()),
            ("https://models.example/color/SHA256SUMS", "https://models.example/color/", "models.example")
        );
        assert_eq!(Folder::parse("http://127.0.0.1:8000/m/SHA256SUMS", &cfg).unwrap().base, "http://127.0.0.1:8000/m/");
        assert!(Folder::parse("https://models.example/color/model.onnx", &cfg).is_err());
        let cfg = PullConfig { hf_endpoint: Some("http://127.0.0.1:9/".into()), ..PullConfig::default() };
        let h = Folder::parse("hf://acme/color-onnx@v1.2", &cfg).unwrap();
        assert_eq!(h.sums, "http://127.0.0.1:9/acme/color-onnx/resolve/v1.2/SHA256SUMS");
        assert!(h.hub && h.host == "127.0.0.1:9");
        assert!(Folder::parse("hf://acme/color-onnx", &cfg).unwrap().base.ends_with("/resolve/main/"));
        for bad in ["hf://acme", "hf://acme/a/b", "hf://acme/../x", "hf://acme/x@"] {
            assert!(Folder::parse(bad, &cfg).is_err(), "{bad}");
        }
    }

    #[test]
    fn sums_files_read_as_sha256sum_writes_them_and_names_stay_in_the_folder() {
        let a = "a".repeat(64);
        let layers = parse(
            &format!("# made by inferd pack\n{a}  model.json\n{} *color.onnx\n\n", "B".repeat(64)),
            "https://x/m/",
        )
        .unwrap();
        assert_eq!(layers.len(), 2);
        assert_eq!(
            (layers[1].name.as_str(), layers[1].sha256.as_str(), layers[1].url.as_str()),
            ("color.onnx", "b".repeat(64).as_str(), "https://x/m/color.onnx")
        );
        for bad in [
            format!("{a} model.json"),
            format!("{a}  ../etc/passwd"),
            format!("{a}  sub/x"),
            "xyz  a".into(),
            String::new(),
        ] {
            assert!(parse(&bad, "https://x/").is_err(), "{bad}");
        }
    }
}
