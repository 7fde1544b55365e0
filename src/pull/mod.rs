//! `inferd pull`: a model's files from an OCI registry into the registry's
//! `models.d/NAME/` folder, with its entry (`model.json`) and every file's
//! sha256, never a partial file in use.
//!
//! Every file is downloaded into `models.d/.pull/NAME/FILE.part`, resumed
//! with an HTTP Range request after an interruption or a `kill -9` (the part
//! already there is hashed first), verified against its digest, then renamed
//! to `FILE` in that staging folder. When every file is there and the entry
//! reads as a valid registry entry, the folder replaces `models.d/NAME` by
//! rename: the registry sees the old model or the new one, never a mix.

pub mod http;
pub mod oci;
pub mod sums;

use http_body_util::BodyExt;
use hyper::header::{HeaderName, RANGE};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where pulled models go, beside models.json.
pub const MODELS_D: &str = "models.d";
/// Largest model.json an artifact may carry.
const MAX_ENTRY: u64 = 1 << 20;
/// Free space kept beyond what a pull needs.
const DISK_MARGIN: u64 = 64 << 20;

/// Why a pull failed, in words, with the kind of failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullError {
    pub kind: PullErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PullErrorKind {
    /// The source string is wrong.
    Source,
    /// Not allowed by the configuration (plain http, host not listed).
    Refused,
    /// Connecting or reading failed (retrying may help).
    Network,
    /// The registry refused the credentials, or there are none.
    Auth,
    NotFound,
    /// A file's bytes are not what its digest says.
    Digest,
    /// The artifact is not a model (no model.json, bad names, a bad entry).
    Artifact,
    /// Not enough disk, or the models folder cannot be written.
    Disk,
}

impl PullError {
    fn new(kind: PullErrorKind, message: impl Into<String>) -> Self {
        PullError { kind, message: message.into() }
    }
    pub fn source(m: impl Into<String>) -> Self {
        Self::new(PullErrorKind::Source, m)
    }
    pub fn refused(m: impl Into<String>) -> Self {
        Self::new(PullErrorKind::Refused, m)
    }
    pub fn network(m: impl Into<String>) -> Self {
        Self::new(PullErrorKind::Network, m)
    }
    pub fn auth(m: impl Into<String>) -> Self {
        Self::new(PullErrorKind::Auth, m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(PullErrorKind::NotFound, m)
    }
    pub fn digest(m: impl Into<String>) -> Self {
        Self::new(PullErrorKind::Digest, m)
    }
    pub fn artifact(m: impl Into<String>) -> Self {
        Self::new(PullErrorKind::Artifact, m)
    }
    pub fn disk(m: impl Into<String>) -> Self {
        Self::new(PullErrorKind::Disk, m)
    }
}

impl std::fmt::Display for PullError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.message)
    }
}

/// One file of a model: its name in the artifact, its sha256 and where to fetch it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    pub name: String,
    pub sha256: String,
    pub size: Option<u64>,
    pub url: String,
}

/// `[pull]`: how pulls connect.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PullConfig {
    /// Where pulled models go (and the fleet keeps its state); default
    /// `models.d/` beside models.json. Read as a drop-in folder of the registry.
    pub dir: Option<PathBuf>,
    /// Registries and hosts (`host` or `host:port`) reached over plain http
    /// besides loopback ones, as Docker's `insecure-registries`.
    pub insecure: Vec<String>,
    /// CA certificates (PEM) trusted for https besides the system's.
    pub ca_file: Option<PathBuf>,
    /// Registry credentials, Docker's format (`oras login`/`docker login` write it);
    /// default `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`.
    pub auth_file: Option<PathBuf>,
    /// Files downloaded at once.
    pub parallel: usize,
    /// Connect and response timeout, seconds (the body may take longer).
    pub timeout_s: u64,
    /// Registries a pull may fetch from (`host` or `host:port`; `.example.com`
    /// for a domain and its subdomains); empty: any.
    pub registries: Vec<String>,
    /// Download rate over all of a pull's files, KiB/s; 0: no limit (a box on a
    /// metered or shared uplink keeps room for its cameras' traffic).
    pub max_kib_s: u64,
    /// The Hugging Face Hub for `hf://` sources (default `$HF_ENDPOINT`, else https://huggingface.co).
    pub hf_endpoint: Option<String>,
    /// A file holding the Hub token for gated or private repositories (default `$HF_TOKEN`).
    pub hf_token_file: Option<PathBuf>,
}

impl Default for PullConfig {
    fn default() -> Self {
        PullConfig {
            dir: None,
            insecure: Vec::new(),
            ca_file: None,
            auth_file: None,
            parallel: 3,
            timeout_s: 30,
            registries: Vec::new(),
            max_kib_s: 0,
            hf_endpoint: None,
            hf_token_file: None,
        }
    }
}

impl PullConfig {
    /// Whether a pull may fetch from `registry` (`host[:port]` of a registry or web server).
    pub fn allows(&self, registry: &str) -> bool {
        let (host, port) = host_port(registry);
        self.registries.is_empty() || crate::config::host_listed(&self.registries, host, port)
    }

    fn client(&self) -> http::Client {
        http::Client {
            plain_http: self.insecure.clone(),
            ca_file: self.ca_file.clone(),
            timeout: Duration::from_secs(self.timeout_s.max(1)),
        }
    }

    fn auth_file(&self) -> Option<PathBuf> {
        self.auth_file.clone().or_else(|| {
            let dir = std::env::var_os("DOCKER_CONFIG")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")))?;
            Some(dir.join("config.json"))
        })
    }
}

/// Progress of a pull, for a caller to show.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Progress {
    /// The artifact's file list is read.
    Manifest { files: usize, bytes: u64 },
    /// A file is already here, verified.
    Present { file: String },
    /// Bytes of a file so far (sent every few MiB and at the end).
    Bytes { file: String, done: u64, total: Option<u64> },
    /// A file is downloaded and verified.
    Verified { file: String, sha256: String },
}

/// What a pull did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Pulled {
    pub name: String,
    /// The folder the model now lives in.
    pub dir: PathBuf,
    /// The manifest's digest (`sha256:…`): pull by it for exactly these files.
    pub digest: String,
    pub files: Vec<String>,
    pub bytes: u64,
    /// Bytes fetched over the network (less than `bytes` when files were there or resumed).
    pub downloaded: u64,
}

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `oci://REGISTRY/REPOSITORY:TAG` or `@sha256:…`: an ORAS artifact.
    Oci(oci::Reference),
    /// `https://…/` or `hf://ORG/REPO@REVISION`: files named by a `SHA256SUMS`.
    Folder(sums::Folder),
}

impl Source {
    /// Reads a source string (no network).
    pub fn parse(source: &str, cfg: &PullConfig) -> Result<Source, PullError> {
        if source.starts_with("oci://") {
            oci::Reference::parse(source).map(Source::Oci)
        } else if ["https://", "http://", "hf://"].iter().any(|p| source.starts_with(p)) {
            sums::Folder::parse(source, cfg).map(Source::Folder)
        } else {
            Err(PullError::source(format!(
                "'{source}': a source is oci://REGISTRY/REPOSITORY:TAG (or @sha256:DIGEST), \
                 https://HOST/FOLDER/ (files named by its SHA256SUMS) or hf://ORG/REPO@REVISION"
            )))
        }
    }

    /// The digest the source string itself names (`oci://…@sha256:…`).
    pub fn pinned(&self) -> Option<&str> {
        match self {
            Source::Oci(r) if r.reference.starts_with("sha256:") => Some(&r.reference),
            _ => None,
        }
    }
}

/// A model's files downloaded and verified in its staging folder
/// (`models.d/.pull/NAME`), its entry written with the sums and checked:
/// ready to be put in place.
#[derive(Debug, Clone)]
pub struct Staged {
    pub name: String,
    /// The staging folder.
    pub dir: PathBuf,
    /// The manifest's digest (`sha256:…`).
    pub digest: String,
    pub files: Vec<String>,
    /// Bytes fetched over the network.
    pub downloaded: u64,
}

/// What a fetch is asked for besides its source.
#[derive(Debug, Clone, Default)]
pub struct Want<'a> {
    /// Renames the model.
    pub name: Option<&'a str>,
    /// The manifest digest the artifact must have (`sha256:…`).
    pub digest: Option<&'a str>,
    /// Other folders whose files of the same name are reused when they verify
    /// (earlier versions of the model kept on disk).
    pub reuse: Vec<PathBuf>,
}

/// Pulls `source` into the drop-in folder `root` (`models.d/`), as `want`
/// says (a name, a digest). `progress` sees every step.
pub async fn pull(
    source: &str,
    root: &Path,
    want: &Want<'_>,
    cfg: &PullConfig,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<Pulled, PullError> {
    let staged = fetch(source, root, want, cfg, progress).await?;
    install(&staged, root)
}

/// The `models.d/` folder beside `models_json`.
pub fn models_d(models_json: &Path) -> PathBuf {
    models_json.parent().map(Path::to_path_buf).unwrap_or_default().join(MODELS_D)
}

/// Downloads `source` into `root/.pull/NAME`, verified, with its entry
/// checked as the registry will read it; nothing in `root/NAME` changes.
pub async fn fetch(
    source: &str,
    root: &Path,
    want: &Want<'_>,
    cfg: &PullConfig,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<Staged, PullError> {
    let client = cfg.client();
    let refuse =
        |host: &str| PullError::refused(format!("{host} is not in pull.registries ({})", cfg.registries.join(", ")));
    let (layers, digest, headers) = match Source::parse(source, cfg)? {
        Source::Oci(reference) => {
            if !cfg.allows(&reference.registry) {
                return Err(refuse(&reference.registry));
            }
            let credentials = match cfg.auth_file() {
                Some(file) => oci::credentials(&file, &reference.registry)?,
                None => None,
            };
            let mut session = oci::Session::new(&client, reference, credentials);
            let (layers, digest) = session.layers().await?;
            (layers, digest, session.headers())
        }
        Source::Folder(folder) => {
            if !cfg.allows(&folder.host) {
                return Err(refuse(&folder.host));
            }
            let headers = folder.headers(cfg)?;
            let (layers, digest) = folder.layers(&client, &headers).await?;
            (layers, digest, headers)
        }
    };
    if let Some(expected) = want.digest
        && !expected.eq_ignore_ascii_case(&digest)
    {
        if !expected.starts_with("sha256:") {
            return Err(PullError::source(format!("digest '{expected}': a digest is sha256:HEX")));
        }
        return Err(PullError::digest(format!("{source} has manifest digest {digest}, not the {expected} asked for")));
    }
    for layer in &layers {
        check_file_name(&layer.name)?;
    }
    let mut names: Vec<&str> = layers.iter().map(|l| l.name.as_str()).collect();
    names.sort();
    if names.windows(2).any(|w| w[0] == w[1]) {
        return Err(PullError::artifact("two files of the artifact have the same name"));
    }
    let entry_layer = layers
        .iter()
        .find(|l| l.name == "model.json")
        .ok_or_else(|| PullError::artifact("the artifact has no model.json (the model's models.json entry)"))?;
    let bytes: u64 = layers.iter().filter_map(|l| l.size).sum();
    progress(Progress::Manifest { files: layers.len(), bytes });

    // The entry first (small): it names the model, so the staging folder.
    let scratch = root.join(".pull");
    std::fs::create_dir_all(&scratch)
        .map_err(|e| PullError::disk(format!("cannot create {}: {e}", scratch.display())))?;
    let entry_file = scratch.join(format!("{}.model.json", &entry_layer.sha256[..16]));
    let rate = Rate::new(cfg.max_kib_s.saturating_mul(1024));
    let downloaded_entry =
        download(&client, entry_layer, &headers, &entry_file, Some(MAX_ENTRY), &rate, progress).await?;
    let mut entry = read_entry(&entry_file)?;
    let name = match want.name {
        Some(n) => n.to_string(),
        None => entry
            .get("name")
            .and_then(|n| n.as_str())
            .map(str::to_string)
            .ok_or_else(|| PullError::artifact("model.json has no \"name\" (or pass --name)"))?,
    };
    if !crate::registry::valid_name(&name) {
        return Err(PullError::artifact(format!("'{name}' is not a valid model name")));
    }
    entry.insert("name".into(), serde_json::Value::String(name.clone()));
    let staging = scratch.join(&name);
    std::fs::create_dir_all(&staging)
        .map_err(|e| PullError::disk(format!("cannot create {}: {e}", staging.display())))?;
    // Files the model already has are taken from its folder (or the folders
    // given), not fetched again; each is verified before it counts.
    let reuse: Vec<PathBuf> = std::iter::once(root.join(&name)).chain(want.reuse.iter().cloned()).collect();
    for layer in &layers {
        let staged = staging.join(&layer.name);
        for have in reuse.iter().map(|d| d.join(&layer.name)) {
            if have.is_file() && !staged.exists() {
                let _ = std::fs::hard_link(&have, &staged).or_else(|_| std::fs::copy(&have, &staged).map(|_| ()));
            }
            if staged.exists() && layer.size.is_some_and(|s| std::fs::metadata(&staged).map_or(0, |m| m.len()) != s) {
                let _ = std::fs::remove_file(&staged);
            }
        }
    }
    check_disk(&staging, &layers)?;

    // The files, a few at once.
    let files: Vec<&Layer> = layers.iter().filter(|l| l.name != "model.json").collect();
    let turns = tokio::sync::Semaphore::new(cfg.parallel.max(1));
    let results = futures_util::future::join_all(files.iter().map(|layer| {
        let (client, headers, staging, turns, rate) = (&client, &headers, &staging, &turns, &rate);
        async move {
            let _turn = turns.acquire().await.map_err(|_| PullError::network("the pull was stopped"))?;
            download(client, layer, headers, &staging.join(&layer.name), None, rate, progress).await
        }
    }))
    .await;
    let mut downloaded = downloaded_entry;
    for r in results {
        downloaded += r?;
    }

    // The entry with each variant's sum, checked as the registry will read it.
    fill_sums(&mut entry, &layers)?;
    let text = serde_json::to_string_pretty(&serde_json::Value::Object(entry)).expect("a JSON object");
    write_atomic(&staging.join("model.json"), text.as_bytes())?;
    let check = entry_registry(&staging)?;
    let referenced = check.models[0].files();
    for f in &referenced {
        if !layers.iter().any(|l| Path::new(&l.name) == f.as_path()) {
            return Err(PullError::artifact(format!(
                "model.json names {}, which the artifact does not carry",
                f.display()
            )));
        }
    }
    let files = layers.iter().map(|l| l.name.clone()).collect();
    Ok(Staged { name, dir: staging, digest, files, downloaded })
}

/// The registry of the one model whose folder is `dir` (its `model.json`),
/// validated as a models.d entry is: its paths may not leave the folder.
pub fn entry_registry(dir: &Path) -> Result<crate::registry::Registry, PullError> {
    let file = dir.join("model.json");
    let text = std::fs::read_to_string(&file).map_err(|e| PullError::artifact(format!("model.json: {e}")))?;
    let registry_text = format!("{{\"version\": 1, \"models\": [{text}]}}");
    let check = crate::registry::Registry::from_json(&registry_text, &file)
        .map_err(|e| PullError::artifact(format!("model.json is not a valid entry: {e}")))?;
    if let Some(p) = check.escaping_paths().first() {
        return Err(PullError::artifact(format!("model.json: {}: {}", p.path, p.message)));
    }
    Ok(check)
}

/// Removes the entries (`.pull/HASH.model.json`) downloaded by pulls (kept
/// by `inferd pull`, so pulling an unchanged model again fetches nothing; the
/// fleet drops them with its other leftovers once a generation is applied).
pub fn remove_entry_downloads(root: &Path) {
    if let Ok(r) = std::fs::read_dir(root.join(".pull")) {
        for e in r.filter_map(|e| e.ok()) {
            if e.file_name().to_string_lossy().ends_with(".model.json") && e.path().is_file() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Puts a staged model in place as `root/NAME`: the old folder aside, the new
/// one in by rename, the old one gone.
pub fn install(staged: &Staged, root: &Path) -> Result<Pulled, PullError> {
    let (name, target) = (&staged.name, root.join(&staged.name));
    let old = root.join(".pull").join(format!("{name}.old"));
    let _ = std::fs::remove_dir_all(&old);
    if target.exists() {
        std::fs::rename(&target, &old)
            .map_err(|e| PullError::disk(format!("cannot move {} aside: {e}", target.display())))?;
    }
    std::fs::rename(&staged.dir, &target)
        .map_err(|e| PullError::disk(format!("cannot put {} in place: {e}", target.display())))?;
    let _ = std::fs::remove_dir_all(&old);
    let bytes = staged.files.iter().map(|f| std::fs::metadata(target.join(f)).map_or(0, |m| m.len())).sum();
    Ok(Pulled {
        name: name.clone(),
        dir: target,
        digest: staged.digest.clone(),
        files: staged.files.clone(),
        bytes,
        downloaded: staged.downloaded,
    })
}

/// Writes `model`'s artifact folder into `out`: its files side by side, flat,
/// and `model.json` naming them by those names (a name two files share gets
/// its folder's name before it), with their sums; what `oras push` publishes
/// and `inferd pull` reads. Returns the file names written.
pub fn pack(registry: &crate::registry::Registry, name: &str, out: &Path) -> Result<Vec<String>, PullError> {
    let model = registry.get(name).ok_or_else(|| PullError::not_found(format!("no model '{name}' in the registry")))?;
    let mut entry = model.to_json();
    let mut files = model.files();
    // A file two variants share is one file.
    let mut seen = std::collections::HashSet::new();
    files.retain(|f| seen.insert(f.clone()));
    let mut names: Vec<(PathBuf, String)> = Vec::new();
    for f in &files {
        let base = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let parent = f.parent().and_then(|p| p.file_name()).map(|p| p.to_string_lossy().into_owned());
        let flat = match names.iter().any(|(_, n)| *n == base)
            || files.iter().filter(|g| g.file_name() == f.file_name()).count() > 1
        {
            true => format!("{}-{base}", parent.unwrap_or_else(|| "file".into())),
            false => base,
        };
        check_file_name(&flat)?;
        names.push((f.clone(), flat));
    }
    std::fs::create_dir_all(out).map_err(|e| PullError::disk(format!("cannot create {}: {e}", out.display())))?;
    for (from, to) in &names {
        let src = registry.resolve(model, from);
        std::fs::copy(&src, out.join(to))
            .map_err(|e| PullError::disk(format!("cannot copy {} to {}: {e}", src.display(), out.display())))?;
    }
    rename_paths(&mut entry, &names);
    let text = serde_json::to_string_pretty(&entry).expect("a JSON object");
    write_atomic(&out.join("model.json"), text.as_bytes())?;
    let files: Vec<String> =
        std::iter::once("model.json".to_string()).chain(names.into_iter().map(|(_, n)| n)).collect();
    // For web servers and the Hub: the file list with sums (`inferd pull https://…/` reads it).
    write_atomic(&out.join(sums::SUMS), sums::write(out, &files)?.as_bytes())?;
    Ok(files)
}

/// Every string of `value` that is one of the paths becomes its flat name.
fn rename_paths(value: &mut serde_json::Value, names: &[(PathBuf, String)]) {
    match value {
        serde_json::Value::String(s) => {
            if let Some((_, n)) = names.iter().find(|(p, _)| p.as_os_str() == s.as_str()) {
                *s = n.clone();
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|v| rename_paths(v, names)),
        serde_json::Value::Object(map) => map.values_mut().for_each(|v| rename_paths(v, names)),
        _ => {}
    }
}

/// `host[:port]` split (`[::1]:5000` too).
pub fn host_port(registry: &str) -> (&str, Option<u16>) {
    match registry.rsplit_once(':') {
        Some((h, p)) if !p.ends_with(']') => (h, p.parse().ok()),
        _ => (registry, None),
    }
}

/// A file name from an artifact: one plain name that stays in its folder.
pub fn check_file_name(name: &str) -> Result<(), PullError> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && !name.ends_with(".part")
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(PullError::artifact(format!(
            "'{}' is not a plain file name (A-Z a-z 0-9 . _ - +, not starting with '.'): a file never leaves the model's folder",
            name.escape_debug()
        )))
    }
}

fn read_entry(file: &Path) -> Result<serde_json::Map<String, serde_json::Value>, PullError> {
    let mut text = String::new();
    std::fs::File::open(file)
        .and_then(|f| f.take(MAX_ENTRY + 1).read_to_string(&mut text))
        .map_err(|e| PullError::artifact(format!("model.json: {e}")))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| PullError::artifact(format!("model.json is not JSON: {e}")))?;
    match value {
        serde_json::Value::Object(m) => Ok(m),
        _ => Err(PullError::artifact("model.json is one model's entry, a JSON object")),
    }
}

/// Each variant's (and part's) `sha256` from the artifact's digests; one the entry states must agree.
fn fill_sums(entry: &mut serde_json::Map<String, serde_json::Value>, layers: &[Layer]) -> Result<(), PullError> {
    let sum_of = |file: &str| layers.iter().find(|l| l.name == file).map(|l| l.sha256.clone());
    let fill = |obj: &mut serde_json::Map<String, serde_json::Value>| -> Result<(), PullError> {
        let Some(file) = obj.get("file").and_then(|f| f.as_str()).map(str::to_string) else { return Ok(()) };
        let Some(sum) = sum_of(&file) else {
            return Err(PullError::artifact(format!("model.json names {file}, which the artifact does not carry")));
        };
        match obj.get("sha256").and_then(|s| s.as_str()) {
            Some(stated) if !stated.eq_ignore_ascii_case(&sum) => Err(PullError::digest(format!(
                "model.json says {file} has sha256 {stated}, the artifact's layer has {sum}"
            ))),
            _ => {
                obj.insert("sha256".into(), serde_json::Value::String(sum));
                Ok(())
            }
        }
    };
    if let Some(variants) = entry.get_mut("variants").and_then(|v| v.as_array_mut()) {
        for v in variants.iter_mut().filter_map(|v| v.as_object_mut()) {
            fill(v)?;
            if let Some(parts) = v.get_mut("parts").and_then(|p| p.as_object_mut()) {
                for part in parts.values_mut().filter_map(|p| p.as_object_mut()) {
                    fill(part)?;
                }
            }
        }
    }
    Ok(())
}

/// Refuses a pull that would not fit, with the numbers.
fn check_disk(dir: &Path, layers: &[Layer]) -> Result<(), PullError> {
    let have = |name: &str| {
        let done = std::fs::metadata(dir.join(name)).map_or(0, |m| m.len());
        let part = std::fs::metadata(dir.join(format!("{name}.part"))).map_or(0, |m| m.len());
        done.max(part)
    };
    let need: u64 = layers.iter().map(|l| l.size.unwrap_or(0).saturating_sub(have(&l.name))).sum();
    ensure_room(dir, need, "the pull needs")
}

/// Refuses `need` more bytes in `dir` unless they fit with the margin kept, with the numbers.
fn ensure_room(dir: &Path, need: u64, what: &str) -> Result<(), PullError> {
    let free = free_bytes(dir)?;
    if need.saturating_add(DISK_MARGIN) > free {
        return Err(PullError::disk(format!(
            "{what} {} MiB more and {} has {} MiB free (keeping {} MiB spare)",
            need.div_ceil(1 << 20),
            dir.display(),
            free >> 20,
            DISK_MARGIN >> 20
        )));
    }
    Ok(())
}

fn free_bytes(dir: &Path) -> Result<u64, PullError> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|_| PullError::disk("a NUL in the path"))?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a statvfs to fill.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(PullError::disk(format!("cannot read the free space of {}", dir.display())));
    }
    // u64 on Linux; narrower on macOS.
    #[allow(clippy::useless_conversion)]
    Ok(u64::from(s.f_bavail).saturating_mul(u64::from(s.f_frsize)))
}

/// Downloads `layer` to `dest` (through `dest.part`, resumed), verified; returns the bytes fetched.
/// A resumed download whose bytes do not verify (the part on disk was not
/// the start of this file) is fetched again whole, once.
async fn download(
    client: &http::Client,
    layer: &Layer,
    headers: &[(HeaderName, String)],
    dest: &Path,
    max: Option<u64>,
    rate: &Rate,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<u64, PullError> {
    if dest.is_file() && sha256_of(dest, u64::MAX)?.0 == layer.sha256 {
        progress(Progress::Present { file: layer.name.clone() });
        return Ok(0);
    }
    let part = dest.with_file_name(format!("{}.part", layer.name));
    let resuming = std::fs::metadata(&part).is_ok_and(|m| m.len() > 0);
    match fetch_file(client, layer, headers, dest, max, rate, progress).await {
        Err(e) if e.kind == PullErrorKind::Digest && resuming => {
            fetch_file(client, layer, headers, dest, max, rate, progress).await
        }
        other => other,
    }
}

async fn fetch_file(
    client: &http::Client,
    layer: &Layer,
    headers: &[(HeaderName, String)],
    dest: &Path,
    max: Option<u64>,
    rate: &Rate,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<u64, PullError> {
    let file = layer.name.clone();
    let limit = match (layer.size, max) {
        (Some(s), Some(m)) if s > m => {
            return Err(PullError::artifact(format!("{file} is {s} bytes, over the {m} allowed")));
        }
        (Some(s), _) => s,
        (None, Some(m)) => m,
        (None, None) => u64::MAX,
    };
    let part = dest.with_file_name(format!("{}.part", layer.name));
    // What is already there: hashed, then asked for from where it ends.
    let (mut hasher, mut have) = match std::fs::metadata(&part) {
        Ok(m) if m.len() > 0 && m.len() <= limit => {
            let (_, hasher, len) = sha256_of(&part, limit)?;
            (hasher, len)
        }
        _ => (Sha256::new(), 0),
    };
    let mut sent: Vec<(HeaderName, String)> = headers.to_vec();
    if have > 0 {
        sent.push((RANGE, format!("bytes={have}-")));
    }
    let response = client.get(&layer.url, &sent).await?;
    let resumed = have > 0 && response.status == hyper::StatusCode::PARTIAL_CONTENT;
    if !response.status.is_success() {
        let status = response.status;
        return Err(if status == hyper::StatusCode::NOT_FOUND {
            PullError::not_found(format!("{}: not found (404)", layer.url))
        } else if status == hyper::StatusCode::UNAUTHORIZED || status == hyper::StatusCode::FORBIDDEN {
            PullError::auth(format!("{}: access refused ({status})", layer.url))
        } else {
            PullError::network(format!("{}: the server answered {status}", layer.url))
        });
    }
    // A source whose list has no sizes (a SHA256SUMS): the disk is checked for
    // each file as its length arrives, before any of it is written.
    if layer.size.is_none()
        && let Some(len) = response
            .headers
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit {
            return Err(PullError::artifact(format!("{file} is {len} bytes, over the {limit} allowed")));
        }
        ensure_room(part.parent().unwrap_or(Path::new(".")), len, &format!("{file} needs"))?;
    }
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(resumed)
        .truncate(!resumed)
        .open(&part)
        .map_err(|e| PullError::disk(format!("cannot write {}: {e}", part.display())))?;
    if !resumed {
        hasher = Sha256::new();
        have = 0;
    }
    let mut body = response.body;
    let mut fetched = 0u64;
    let mut reported = have;
    // A connection that goes silent (a NAT dropping it) fails after the timeout;
    // the part on disk is resumed by the next try.
    let silent = || PullError::network(format!("downloading {file}: nothing arrived for {:?}", client.timeout));
    while let Some(frame) = tokio::time::timeout(client.timeout, body.frame()).await.map_err(|_| silent())? {
        let frame = frame.map_err(|e| PullError::network(format!("downloading {file}: {e}")))?;
        let Some(data) = frame.data_ref() else { continue };
        if have + data.len() as u64 > limit {
            drop(out);
            let _ = std::fs::remove_file(&part);
            return Err(PullError::digest(format!("{file} is longer than its {limit} bytes")));
        }
        out.write_all(data).map_err(|e| PullError::disk(format!("writing {}: {e}", part.display())))?;
        rate.take(data.len() as u64).await;
        hasher.update(data);
        have += data.len() as u64;
        fetched += data.len() as u64;
        if have - reported >= 4 << 20 {
            reported = have;
            progress(Progress::Bytes { file: file.clone(), done: have, total: layer.size });
        }
    }
    out.sync_all().map_err(|e| PullError::disk(format!("writing {}: {e}", part.display())))?;
    drop(out);
    progress(Progress::Bytes { file: file.clone(), done: have, total: layer.size });
    let got = hex::encode(hasher.finalize());
    if got != layer.sha256 {
        let _ = std::fs::remove_file(&part);
        return Err(PullError::digest(format!(
            "{file}: the bytes{} have sha256 {got}, not the {} the source names; nothing was kept",
            if resumed { " (resumed)" } else { "" },
            layer.sha256
        )));
    }
    std::fs::rename(&part, dest).map_err(|e| PullError::disk(format!("cannot rename {}: {e}", part.display())))?;
    progress(Progress::Verified { file, sha256: got });
    Ok(fetched)
}

/// A download rate shared by a pull's files: each chunk waits until the bytes
/// so far fit under `bytes_per_s` since the pull began.
struct Rate {
    bytes_per_s: u64,
    start: tokio::time::Instant,
    taken: std::sync::atomic::AtomicU64,
}

impl Rate {
    fn new(bytes_per_s: u64) -> Rate {
        Rate { bytes_per_s, start: tokio::time::Instant::now(), taken: std::sync::atomic::AtomicU64::new(0) }
    }

    async fn take(&self, bytes: u64) {
        if self.bytes_per_s == 0 {
            return;
        }
        let total = self.taken.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed) + bytes;
        let due = self.start + Duration::from_secs_f64(total as f64 / self.bytes_per_s as f64);
        tokio::time::sleep_until(due).await;
    }
}

/// The sha256 (hex) of a file's first `limit` bytes, the hasher, and how many bytes were read.
fn sha256_of(path: &Path, limit: u64) -> Result<(String, Sha256, u64), PullError> {
    let f = std::fs::File::open(path).map_err(|e| PullError::disk(format!("cannot read {}: {e}", path.display())))?;
    let mut reader = f.take(limit);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let read = reader.read(&mut buf).map_err(|e| PullError::disk(format!("reading {}: {e}", path.display())))?;
        if read == 0 {
            break;
        }
        hasher.update(&buf[..read]);
        n += read as u64;
    }
    Ok((hex::encode(hasher.clone().finalize()), hasher, n))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), PullError> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| PullError::disk(format!("cannot write {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registries_are_allowed_by_host_port_and_domain() {
        let any = PullConfig::default();
        assert!(any.allows("anything.example:5000"));
        let some =
            PullConfig { registries: vec!["127.0.0.1:5000".into(), ".corp.example".into()], ..Default::default() };
        assert!(some.allows("127.0.0.1:5000"));
        assert!(!some.allows("127.0.0.1:5001"));
        assert!(some.allows("reg.corp.example") && some.allows("corp.example:443"));
        assert!(!some.allows("corp.example.evil") && !some.allows("evilcorp.example"));
    }

    #[test]
    fn file_names_never_leave_the_folder() {
        for ok in ["model.json", "fp32.onnx", "labels.txt", "tokenizer.json", "a-b_c+1.onnx"] {
            assert!(check_file_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "../x", "a/b", "/etc/passwd", ".hidden", "..", "x.part", "a\\b", "sp ace", "ü.onnx"] {
            assert_eq!(check_file_name(bad).unwrap_err().kind, PullErrorKind::Artifact, "{bad:?}");
        }
    }

    #[test]
    fn sums_are_filled_from_the_artifact_and_a_wrong_stated_one_is_refused() {
        let layers = vec![Layer { name: "a.onnx".into(), sha256: "ab".repeat(32), size: Some(1), url: String::new() }];
        let mut entry = serde_json::json!({"name": "m", "variants": [{"name": "v", "file": "a.onnx"}]});
        fill_sums(entry.as_object_mut().unwrap(), &layers).unwrap();
        assert_eq!(entry["variants"][0]["sha256"], "ab".repeat(32));
        let mut wrong = serde_json::json!({"variants": [{"name": "v", "file": "a.onnx", "sha256": "cd".repeat(32)}]});
        assert_eq!(fill_sums(wrong.as_object_mut().unwrap(), &layers).unwrap_err().kind, PullErrorKind::Digest);
        let mut missing = serde_json::json!({"variants": [{"name": "v", "file": "b.onnx"}]});
        assert_eq!(fill_sums(missing.as_object_mut().unwrap(), &layers).unwrap_err().kind, PullErrorKind::Artifact);
    }
}
