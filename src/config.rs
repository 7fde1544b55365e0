//! Daemon configuration: built-in defaults, then a TOML file
//! (`/etc/inferd/config.toml` or `--config PATH`), then `INFERD_*` environment
//! variables (`INFERD_RUNTIME__ONNXRUNTIME=/opt/ort/libonnxruntime.so`).
//! Unknown keys are errors, so a typo never silently falls back to a default.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The file read when no `--config` is given (a missing one is not an error).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/inferd/config.toml";
/// The registry used when `models` is unset and `./models.json` does not exist.
pub const DEFAULT_REGISTRY_PATH: &str = "/etc/inferd/models.json";

/// Everything the daemon and the CLI read from configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Path of models.json; default `./models.json` if present, else `/etc/inferd/models.json`.
    pub models: Option<PathBuf>,
    /// Allow paths in models.json (model files, tokenizers, labels) outside its
    /// folder: absolute, or climbing out with `..`. Off: such a registry is refused.
    pub models_outside: bool,
    /// More drop-in folders (`NAME/model.json` each), read after the
    /// `models.d/` beside models.json: model packages install into one.
    pub models_d: Vec<PathBuf>,
    pub runtime: RuntimeConfig,
    pub limits: Limits,
    pub socket: SocketConfig,
    pub jobs: JobsConfig,
    pub mqtt: MqttConfig,
    pub memory: MemoryConfig,
    pub log: LogConfig,
    /// `inferd pull`: plain-http registries, the CA and the credentials file.
    pub pull: crate::pull::PullConfig,
    /// Desired state over MQTT: groups, trusted keys, rollback depth.
    pub fleet: crate::fleet::FleetConfig,
}

/// How models share memory: budget, headroom, lifecycle and pressure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryConfig {
    /// Memory all loaded models may use together, MiB; unset: what the probe reports free.
    pub budget_mb: Option<u64>,
    /// Kept free on top of a variant's need when choosing it, MiB.
    pub headroom_mb: u64,
    /// Models loaded at start (others load on their first job).
    pub preload: Vec<String>,
    /// Unload a model idle this long, seconds; 0 keeps models loaded. models.json `keep_alive_s` overrides.
    pub keep_alive_s: Option<u64>,
    /// How often free memory is probed, milliseconds.
    pub probe_interval_ms: u64,
    /// Below this much free memory, a loaded model is downgraded to a smaller variant, MiB.
    pub low_watermark_mb: u64,
    /// Above this much free memory, a downgraded model may upgrade again, MiB.
    pub high_watermark_mb: u64,
    /// A model stays at least this long on a variant before it upgrades, seconds.
    pub min_residency_s: u64,
    /// Where measured footprints are kept; default `/var/lib/inferd` as root,
    /// else `$XDG_STATE_HOME/inferd` (or `~/.local/state/inferd`).
    pub state_dir: Option<PathBuf>,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            budget_mb: None,
            headroom_mb: 64,
            preload: Vec::new(),
            keep_alive_s: None,
            probe_interval_ms: 2000,
            low_watermark_mb: 128,
            high_watermark_mb: 512,
            min_residency_s: 60,
            state_dir: None,
        }
    }
}

impl MemoryConfig {
    /// The state directory in force.
    pub fn resolved_state_dir(&self) -> PathBuf {
        if let Some(d) = &self.state_dir {
            return d.clone();
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            return PathBuf::from("/var/lib/inferd");
        }
        match (std::env::var_os("XDG_STATE_HOME"), std::env::var_os("HOME")) {
            (Some(d), _) if !d.is_empty() => PathBuf::from(d).join("inferd"),
            (_, Some(h)) => PathBuf::from(h).join(".local/state/inferd"),
            _ => std::env::temp_dir().join("inferd-state"),
        }
    }
}

/// Jobs over MQTT. Off unless `url` is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// Broker: `mqtt://host:1883` or `mqtts://host:8883`. Unset: MQTT is off.
    pub url: Option<String>,
    /// `5` (default) or `3.1.1`.
    pub protocol: String,
    /// This box's name in topics; default the hostname.
    pub node_id: Option<String>,
    /// MQTT client id; default the node id.
    pub client_id: Option<String>,
    /// Topic prefix.
    pub prefix: String,
    /// Shared-subscription group for fleet-wide jobs.
    pub group: String,
    pub keep_alive_s: u64,
    pub username: Option<String>,
    /// File holding the password (first line); preferred over `password_env`.
    pub password_file: Option<PathBuf>,
    /// Environment variable holding the password.
    pub password_env: Option<String>,
    /// CA certificate (PEM) for `mqtts://`; default: the system's roots are not used, a CA is required.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// Jobs taken from MQTT at once (advertised as MQTT 5 receive-maximum); while
    /// this many are held, inferd reads nothing more from the broker.
    pub max_in_flight: u16,
    /// Payload bytes of the jobs held at once, MiB; while over it, inferd reads
    /// nothing more from the broker (the broker keeps the backlog).
    pub max_held_mb: u64,
    /// Largest job payload, MiB; larger ones get an error result.
    pub max_payload_mb: u64,
    /// How long the broker keeps this daemon's session (and its unacknowledged jobs) while it is away.
    pub session_expiry_s: u32,
    /// Answers remembered (also across restarts, in the state directory) to
    /// answer redeliveries without computing twice.
    pub dedup_window: usize,
    /// Longest wait between reconnection attempts.
    pub reconnect_max_s: u64,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            url: None,
            protocol: "5".into(),
            node_id: None,
            client_id: None,
            prefix: "inferd".into(),
            group: "inferd".into(),
            keep_alive_s: 30,
            username: None,
            password_file: None,
            password_env: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
            max_in_flight: 16,
            max_held_mb: 64,
            max_payload_mb: 16,
            session_expiry_s: 3600,
            dedup_window: 4096,
            reconnect_max_s: 30,
        }
    }
}

impl MqttConfig {
    /// The node id in force: configured, else the hostname.
    pub fn node(&self) -> String {
        self.node_id.clone().unwrap_or_else(hostname)
    }

    /// The password from `password_file` or `password_env`, if any.
    pub fn password(&self) -> Result<Option<String>, ConfigError> {
        if let Some(file) = &self.password_file {
            let text = std::fs::read_to_string(file)
                .map_err(|e| ConfigError::Invalid(format!("mqtt.password_file {}: {e}", file.display())))?;
            return Ok(Some(text.lines().next().unwrap_or("").to_string()));
        }
        match &self.password_env {
            Some(var) => std::env::var(var)
                .map(Some)
                .map_err(|_| ConfigError::Invalid(format!("mqtt.password_env: ${var} is not set"))),
            None => Ok(None),
        }
    }
}

/// A list of uids, or one uid (what a single value in the environment parses
/// as); numbers or their text (the environment's list items are text).
fn one_or_many_uids<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Uid {
        Number(u32),
        Text(String),
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Uids {
        One(Uid),
        Many(Vec<Uid>),
    }
    let uids = match Uids::deserialize(d)? {
        Uids::One(uid) => vec![uid],
        Uids::Many(uids) => uids,
    };
    uids.into_iter()
        .map(|u| match u {
            Uid::Number(n) => Ok(n),
            Uid::Text(t) => t.trim().parse().map_err(|_| serde::de::Error::custom(format!("'{t}' is not a uid"))),
        })
        .collect()
}

/// `/tmp/inferd-<uid>`: a user's own folder for the default socket without `$XDG_RUNTIME_DIR`.
fn private_socket_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    std::env::temp_dir().join(format!("inferd-{}", unsafe { libc::geteuid() }))
}

/// Checks that `dir` is a real folder (not a link), owned by this user and closed to everyone else.
pub fn check_private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if !meta.is_dir() || meta.uid() != me || meta.mode() & 0o077 != 0 {
        return Err(format!(
            "{} is not a private folder of this user (owner uid {}, mode {:o}, {}); another user may have \
             made it: remove it, or set socket.path or XDG_RUNTIME_DIR",
            dir.display(),
            meta.uid(),
            meta.mode() & 0o777,
            if meta.file_type().is_symlink() {
                "a symbolic link"
            } else if meta.is_dir() {
                "a folder"
            } else {
                "a file"
            }
        ));
    }
    Ok(())
}

/// Where the broker is and how to reach it, parsed from the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broker {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    pub v5: bool,
}

impl Broker {
    /// Parses `mqtt.url` (`mqtt://host[:port]`, `mqtts://host[:port]`) and `mqtt.protocol`.
    pub fn parse(cfg: &MqttConfig) -> Result<Broker, String> {
        let url = cfg.url.as_deref().ok_or("mqtt.url is not set")?;
        let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("mqtt://") {
            (false, r)
        } else {
            return Err(format!("mqtt.url '{url}' must start with mqtt:// or mqtts://"));
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || rest.starts_with('[') => {
                (h, p.parse().map_err(|_| format!("mqtt.url '{url}': bad port '{p}'"))?)
            }
            _ => (rest, if tls { 8883 } else { 1883 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("mqtt.url '{url}' has no host"));
        }
        let v5 = match cfg.protocol.as_str() {
            "5" | "5.0" | "v5" => true,
            "3.1.1" | "4" | "v3.1.1" => false,
            other => return Err(format!("mqtt.protocol '{other}' is not 5 or 3.1.1")),
        };
        if tls && cfg.ca_file.is_none() {
            return Err("mqtt.url is mqtts:// but mqtt.ca_file is not set".into());
        }
        if cfg.client_cert.is_some() != cfg.client_key.is_some() {
            return Err("mqtt.client_cert and mqtt.client_key go together".into());
        }
        if cfg.max_in_flight == 0 || cfg.max_payload_mb == 0 || cfg.max_held_mb == 0 {
            return Err("mqtt.max_in_flight, mqtt.max_payload_mb and mqtt.max_held_mb must be above 0".into());
        }
        Ok(Broker { host: host.to_string(), port, tls, v5 })
    }
}

/// This machine's hostname, or `inferd` when it has none.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is valid for its length; gethostname NUL-terminates within it on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let name = if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    if name.is_empty() { "inferd".into() } else { name }
}

/// The local HTTP/JSON API: a Unix socket, and optionally TCP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SocketConfig {
    /// Socket path; default `/run/inferd/inferd.sock` as root, else `$XDG_RUNTIME_DIR/inferd.sock`.
    pub path: Option<PathBuf>,
    /// Permissions of the socket file, octal digits as a string.
    pub mode: String,
    /// Group that owns the socket (name or number); unset keeps the daemon's group.
    pub group: Option<String>,
    /// Largest request body, MiB; larger ones get 413.
    pub max_body_mb: u64,
    /// Also listen on TCP at this address (`127.0.0.1:8080`); off when unset.
    /// Needs a bearer token (`tcp_token_file` or `tcp_token_env`).
    pub tcp: Option<String>,
    /// Allow `tcp` on a non-loopback address (there is no TLS: put a proxy in front).
    pub tcp_allow_remote: bool,
    /// File holding the bearer token TCP clients must send (first line).
    pub tcp_token_file: Option<PathBuf>,
    /// Environment variable holding the bearer token.
    pub tcp_token_env: Option<String>,
    /// Users (uids) allowed to load and unload models over the socket; empty: anyone who can reach it.
    /// (`INFERD_SOCKET__ADMIN_UIDS=0,1000` in the environment; one uid alone is a list of one.)
    #[serde(deserialize_with = "one_or_many_uids")]
    pub admin_uids: Vec<u32>,
    /// Connections open at once, over every listener together (Unix socket and
    /// TCP share one cap), lowered at start to fit `RLIMIT_NOFILE` with room
    /// kept for model files, the broker, fetches and logs. At the cap a new
    /// connection closes the one idle the longest (or sending its headers, or
    /// its body below `min_body_rate_kib_s`), or gets 503 if every one is busy.
    pub max_connections: usize,
    /// A connection with no request running closes after this long without bytes, seconds.
    pub idle_timeout_s: u64,
    /// A request's headers must be complete this long after its first byte, seconds.
    pub header_timeout_s: u64,
    /// A request body must arrive, and a response be read by the client, within this, seconds.
    pub body_timeout_s: u64,
    /// A request body slower than this on average after its first 5 s is cut
    /// (400), KiB/s; 0: only `body_timeout_s` applies. A body that sends
    /// nothing is cut after 5 s, one at half the rate after 10 s.
    pub min_body_rate_kib_s: u64,
    /// Request bodies held at once (being read, or waiting for their job), MiB.
    /// Room is taken as the bytes arrive, never for a declared length; when
    /// full, bodies wait for room oldest first (up to `body_timeout_s`, then
    /// 429), and when every body holding room waits for more, the youngest
    /// is refused (429) so the oldest goes on.
    pub max_bodies_mb: u64,
}

impl Default for SocketConfig {
    fn default() -> Self {
        SocketConfig {
            path: None,
            mode: "0660".into(),
            group: None,
            max_body_mb: 16,
            tcp: None,
            tcp_allow_remote: false,
            tcp_token_file: None,
            tcp_token_env: None,
            admin_uids: Vec::new(),
            max_connections: 512,
            idle_timeout_s: 60,
            header_timeout_s: 10,
            body_timeout_s: 30,
            min_body_rate_kib_s: 4,
            max_bodies_mb: 256,
        }
    }
}

impl SocketConfig {
    /// The socket path in force: configured, else the default for this user.
    pub fn resolved_path(&self) -> PathBuf {
        if let Some(p) = &self.path {
            return p.clone();
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            return PathBuf::from("/run/inferd/inferd.sock");
        }
        match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
            Some(dir) => PathBuf::from(dir).join("inferd.sock"),
            None => private_socket_dir().join("inferd.sock"),
        }
    }

    /// The private folder the default socket lives in when there is no
    /// `$XDG_RUNTIME_DIR` (`/tmp/inferd-<uid>`), if that is the socket in force.
    pub fn private_default_dir(&self) -> Option<PathBuf> {
        let dir = private_socket_dir();
        (self.resolved_path().parent() == Some(dir.as_path())).then_some(dir)
    }

    /// The socket path a client should use: the resolved one, after checking
    /// that a private default folder really is this user's (not another's, squatted).
    pub fn client_path(&self) -> Result<PathBuf, ConfigError> {
        if let Some(dir) = self.private_default_dir()
            && dir.exists()
        {
            check_private_dir(&dir).map_err(ConfigError::Invalid)?;
        }
        Ok(self.resolved_path())
    }

    /// The socket file mode parsed from its octal string.
    pub fn mode_bits(&self) -> Result<u32, ConfigError> {
        u32::from_str_radix(self.mode.trim_start_matches("0o"), 8).ok().filter(|m| *m <= 0o777).ok_or_else(|| {
            ConfigError::Invalid(format!("socket.mode: '{}' is not an octal mode like \"0660\"", self.mode))
        })
    }

    /// The TCP bearer token from `tcp_token_file` or `tcp_token_env`, if any.
    /// (Never logged: the error names the file or variable, not the value.)
    pub fn tcp_token(&self) -> Result<Option<String>, ConfigError> {
        let token =
            if let Some(file) = &self.tcp_token_file {
                let text = std::fs::read_to_string(file)
                    .map_err(|e| ConfigError::Invalid(format!("socket.tcp_token_file {}: {e}", file.display())))?;
                Some(text.lines().next().unwrap_or("").trim().to_string())
            } else if let Some(var) = &self.tcp_token_env {
                Some(std::env::var(var).map_err(|_| {
                    ConfigError::Invalid(format!("socket.tcp_token_env: the variable {var} is not set"))
                })?)
            } else {
                None
            };
        match token {
            Some(t) if t.len() < 16 => Err(ConfigError::Invalid(
                "socket.tcp token: must be at least 16 characters (e.g. `openssl rand -hex 32`)".into(),
            )),
            other => Ok(other),
        }
    }

    /// The body limit in bytes.
    pub fn max_body_bytes(&self) -> usize {
        (self.max_body_mb as usize).saturating_mul(1 << 20)
    }
}

/// How jobs are queued and timed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobsConfig {
    /// Jobs waiting per model; when full, new jobs are refused at once (HTTP 429).
    pub queue_capacity: usize,
    /// A job not answered within this time gets a timeout error (HTTP 504).
    pub timeout_ms: u64,
    /// How long a load may take before the request that waits for it gives up.
    pub load_timeout_ms: u64,
    /// On shutdown, how long in-flight jobs may take to finish.
    pub drain_timeout_ms: u64,
    /// Under a systemd watchdog, a worker running one job longer than this
    /// counts as wedged: inferd stops pinging and systemd restarts it.
    pub stuck_job_s: u64,
}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig {
            queue_capacity: 64,
            timeout_ms: 30_000,
            load_timeout_ms: 120_000,
            drain_timeout_ms: 30_000,
            stuck_job_s: 300,
        }
    }
}

/// How inference engines are found and set up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Path of ONNX Runtime's shared library; tried before `ORT_DYLIB_PATH`,
    /// the folder `scripts/setup.sh` fills, and the system's library paths.
    pub onnxruntime: Option<PathBuf>,
    /// Execution providers tried in order for models that name none: names
    /// (`"cuda"`) or tables with options (`{ name = "tensorrt", fp16 = true }`).
    pub providers: Vec<crate::backend::providers::ProviderSpec>,
    /// Refuse to load a model whose first listed provider does not register or
    /// takes no node, instead of falling back (models may override it).
    pub strict_providers: bool,
    /// Threads ONNX Runtime uses inside one operator; 0: this box's cores, at most 4
    /// (an edge box runs several models; more threads mostly contend).
    pub intra_threads: usize,
    /// Threads running independent parts of a graph at once; 1 runs it in order.
    pub inter_threads: usize,
    /// ONNX Runtime's graph optimisations: `disable`, `basic`, `extended` or `all`.
    pub graph_optimization: GraphOptimization,
    /// Plan memory from the first run's shapes and reuse it (best with fixed shapes).
    pub memory_pattern: bool,
    /// ONNX Runtime's CPU memory arena (fast reuse; holds on to its peak).
    pub cpu_arena: bool,
    /// Let ONNX Runtime's threads spin between operators while a run is in
    /// progress instead of sleeping and being woken (they sleep once idle
    /// either way). Unset: on for tasks whose job is many short runs (a
    /// decoder's steps, where waking costs a fifth of each step), off otherwise.
    pub spinning: Option<bool>,
    /// Save each CPU-only model's optimised graph under the state directory and
    /// load that next time (faster start; keyed by file and ONNX Runtime version).
    pub optimized_model_cache: bool,
}

/// How much ONNX Runtime rewrites a graph before running it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GraphOptimization {
    Disable,
    Basic,
    Extended,
    #[default]
    All,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            onnxruntime: None,
            providers: vec![crate::backend::Provider::Cpu.into()],
            strict_providers: false,
            intra_threads: 0,
            inter_threads: 1,
            graph_optimization: GraphOptimization::All,
            memory_pattern: true,
            cpu_arena: true,
            spinning: None,
            optimized_model_cache: false,
        }
    }
}

/// Hard limits on what one request may make the daemon do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest encoded image accepted, in bytes.
    pub max_image_bytes: usize,
    /// Largest decoded image, in pixels (width × height); checked from the header, before decoding.
    pub max_image_pixels: u64,
    /// Largest image side, in pixels.
    pub max_image_side: u32,
    /// Most elements in one client-supplied tensor.
    pub max_tensor_elements: usize,
    /// Longest single text, in bytes.
    pub max_text_bytes: usize,
    /// Most images one chat request may carry (`image_url` content parts).
    pub max_images_per_request: usize,
    /// Directories a chat request's `file://` images may be read from (none: no files are read).
    pub image_dirs: Vec<PathBuf>,
    /// Fetching a chat request's http(s) images: off unless hosts are listed.
    pub image_fetch: ImageFetch,
    /// Turn images upright by their EXIF orientation tag before anything else
    /// reads them (as Pillow's `ImageOps.exif_transpose`, transformers'
    /// `load_image` and OpenCV's `imread` do); off for cameras that write a wrong tag.
    pub exif_orientation: bool,
}

/// `limits.image_fetch`: which hosts a chat request's `http(s)://` images
/// may be fetched from, how many bytes and how long.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageFetch {
    /// `cams.example.com` (that host), `.example.com` (it and its subdomains)
    /// or `127.0.0.1`; none: nothing is fetched.
    pub hosts: Vec<String>,
    /// Largest image fetched, in bytes (checked as it arrives).
    pub max_bytes: usize,
    /// The whole fetch (connect, TLS, headers, body), in milliseconds.
    pub timeout_ms: u64,
    /// CA certificates (PEM) trusted for https besides the system's (a site's own CA).
    pub ca_file: Option<PathBuf>,
}

impl Default for ImageFetch {
    fn default() -> Self {
        ImageFetch { hosts: Vec::new(), max_bytes: 8 << 20, timeout_ms: 5000, ca_file: None }
    }
}

impl ImageFetch {
    /// Whether `host` is on the allow-list (case-insensitive).
    pub fn allows(&self, host: &str) -> bool {
        host_listed(&self.hosts, host, None)
    }
}

/// Whether `host` (with `port`, when known) is on an allow-list of `host`,
/// `host:port` and `.domain` (it and its subdomains) entries, case-insensitive.
pub fn host_listed(list: &[String], host: &str, port: Option<u16>) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
    let with_port = port.map(|p| format!("{host}:{p}"));
    list.iter().any(|entry| {
        let entry = entry.to_ascii_lowercase();
        match entry.strip_prefix('.') {
            Some(domain) => host == domain || host.ends_with(&entry),
            None => entry == host || with_port.as_ref() == Some(&entry),
        }
    })
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_image_bytes: 16 << 20,
            max_image_pixels: 40_000_000,
            max_image_side: 16_384,
            max_tensor_elements: 16 << 20,
            max_text_bytes: 64 << 10,
            max_images_per_request: 8,
            image_dirs: Vec::new(),
            image_fetch: ImageFetch::default(),
            exif_orientation: true,
        }
    }
}

/// Logging: plain lines on stderr (no colour unless a terminal).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter: `info`, `debug`, `inferd=debug,ort=warn`...
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { level: "info,ort=warn".into() }
    }
}

/// Why configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    Missing(PathBuf),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads defaults → `explicit` file (must exist) or `/etc/inferd/config.toml`
    /// (may be missing) → `INFERD_*` environment.
    pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_from(explicit, Path::new(DEFAULT_CONFIG_PATH), std::env::vars())
    }

    /// [`Config::load`] with the default path and the environment given, for tests.
    pub fn load_from(
        explicit: Option<&Path>,
        default_path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        // Every section is `serde(default)`: what no layer sets keeps its
        // default without a defaults layer (which cost more than the parse).
        let mut builder = config::Config::builder();
        match explicit {
            Some(path) if !path.exists() => return Err(ConfigError::Missing(path.to_path_buf())),
            Some(path) => builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml)),
            None => {
                builder = builder
                    .add_source(config::File::from(default_path).format(config::FileFormat::Toml).required(false))
            }
        }
        let env: config::Map<String, String> = env.into_iter().filter(|(k, _)| k.starts_with("INFERD_")).collect();
        builder = builder.add_source(
            config::Environment::with_prefix("INFERD")
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("runtime.providers")
                .with_list_parse_key("memory.preload")
                .with_list_parse_key("socket.admin_uids")
                .with_list_parse_key("limits.image_dirs")
                .with_list_parse_key("limits.image_fetch.hosts")
                .with_list_parse_key("pull.insecure")
                .with_list_parse_key("pull.registries")
                .with_list_parse_key("models_d")
                .with_list_parse_key("fleet.groups")
                .with_list_parse_key("fleet.trusted_keys")
                .source(Some(env)),
        );
        Self::finish(builder)
    }

    fn finish(builder: config::ConfigBuilder<config::builder::DefaultState>) -> Result<Config, ConfigError> {
        let invalid = |e: config::ConfigError| ConfigError::Invalid(e.to_string());
        let config: Config = builder.build().map_err(invalid)?.try_deserialize().map_err(invalid)?;
        config.validate()?;
        Ok(config)
    }

    /// A configuration from TOML text over the defaults, validated (no file, no environment).
    /// Secret files that other users can read (a token or password file should be 0600 or 0640).
    pub fn readable_secret_files(&self) -> Vec<String> {
        use std::os::unix::fs::PermissionsExt;
        [("socket.tcp_token_file", &self.socket.tcp_token_file), ("mqtt.password_file", &self.mqtt.password_file)]
            .into_iter()
            .filter_map(|(key, file)| {
                let file = file.as_ref()?;
                let mode = std::fs::metadata(file).ok()?.permissions().mode();
                (mode & 0o004 != 0).then(|| {
                    format!(
                        "{key} {} is readable by every user (mode {:o}); chmod 600 it",
                        file.display(),
                        mode & 0o777
                    )
                })
            })
            .collect()
    }

    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        Self::finish(config::Config::builder().add_source(config::File::from_str(text, config::FileFormat::Toml)))
    }

    /// Checks values serde cannot: ranges and known names.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.limits.max_image_pixels == 0 || self.limits.max_image_side == 0 || self.limits.max_tensor_elements == 0
        {
            return Err(ConfigError::Invalid("limits: every limit must be above 0".into()));
        }
        self.socket.mode_bits()?;
        if self.socket.max_body_mb == 0 {
            return Err(ConfigError::Invalid("socket.max_body_mb must be above 0".into()));
        }
        if self.socket.max_bodies_mb < self.socket.max_body_mb {
            return Err(ConfigError::Invalid(format!(
                "socket.max_bodies_mb ({}) must be at least socket.max_body_mb ({})",
                self.socket.max_bodies_mb, self.socket.max_body_mb
            )));
        }
        if self.socket.max_connections == 0
            || self.socket.idle_timeout_s == 0
            || self.socket.header_timeout_s == 0
            || self.socket.body_timeout_s == 0
        {
            return Err(ConfigError::Invalid("socket.max_connections and the socket timeouts must be above 0".into()));
        }
        if let Some(tcp) = &self.socket.tcp {
            let addr: std::net::SocketAddr = tcp.parse().map_err(|e| {
                ConfigError::Invalid(format!("socket.tcp: '{tcp}' is not an address like 127.0.0.1:8080: {e}"))
            })?;
            if !addr.ip().is_loopback() && !self.socket.tcp_allow_remote {
                return Err(ConfigError::Invalid(format!(
                    "socket.tcp: {addr} is not a loopback address; the API has no TLS, set socket.tcp_allow_remote = true to allow it"
                )));
            }
            if self.socket.tcp_token()?.is_none() {
                return Err(ConfigError::Invalid(
                    "socket.tcp needs a bearer token: set socket.tcp_token_file (or tcp_token_env)".into(),
                ));
            }
        }
        if self.mqtt.url.is_some() {
            Broker::parse(&self.mqtt).map_err(ConfigError::Invalid)?;
            // Secrets and certificates are read now, so a missing or unreadable
            // file stops the start (or the reload) instead of MQTT silently never connecting.
            self.mqtt.password()?;
            for (key, file) in [
                ("mqtt.ca_file", &self.mqtt.ca_file),
                ("mqtt.client_cert", &self.mqtt.client_cert),
                ("mqtt.client_key", &self.mqtt.client_key),
            ] {
                if let Some(file) = file {
                    let text = std::fs::read(file)
                        .map_err(|e| ConfigError::Invalid(format!("{key} {}: {e}", file.display())))?;
                    if !text.windows(11).any(|w| w == b"-----BEGIN ") {
                        return Err(ConfigError::Invalid(format!("{key} {}: not a PEM file", file.display())));
                    }
                }
            }
        }
        if self.memory.low_watermark_mb > self.memory.high_watermark_mb {
            return Err(ConfigError::Invalid(
                "memory.low_watermark_mb must not be above memory.high_watermark_mb".into(),
            ));
        }
        if self.memory.probe_interval_ms == 0 {
            return Err(ConfigError::Invalid("memory.probe_interval_ms must be above 0".into()));
        }
        if self.jobs.queue_capacity == 0 || self.jobs.timeout_ms == 0 {
            return Err(ConfigError::Invalid("jobs.queue_capacity and jobs.timeout_ms must be above 0".into()));
        }
        self.fleet.validate(&self.mqtt).map_err(ConfigError::Invalid)?;
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| ConfigError::Invalid(format!("log.level: '{}': {e}", self.log.level)))?;
        Ok(())
    }

    /// Where `inferd pull` and the fleet put models: `[pull] dir`, else
    /// `models.d/` beside the registry at `registry`.
    pub fn pull_dir(&self, registry: &Path) -> PathBuf {
        self.pull.dir.clone().unwrap_or_else(|| crate::pull::models_d(registry))
    }

    /// The drop-in folders read besides the one beside models.json: `models_d`, then `[pull] dir`.
    pub fn dropins(&self) -> Vec<PathBuf> {
        self.models_d.iter().cloned().chain(self.pull.dir.clone()).collect()
    }

    /// The registry path this configuration points at.
    pub fn registry_path(&self) -> PathBuf {
        match &self.models {
            Some(p) => p.clone(),
            None if Path::new("models.json").exists() => PathBuf::from("models.json"),
            None => PathBuf::from(DEFAULT_REGISTRY_PATH),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_fetch_hosts_match_exactly_or_as_a_domain() {
        let f = ImageFetch {
            hosts: vec!["cams.example.com".into(), ".corp.lan".into(), "127.0.0.1".into()],
            ..Default::default()
        };
        assert!(f.allows("cams.example.com") && f.allows("CAMS.example.com"));
        assert!(!f.allows("evil-cams.example.com") && !f.allows("example.com"));
        assert!(f.allows("corp.lan") && f.allows("a.b.corp.lan") && !f.allows("xcorp.lan"));
        assert!(f.allows("127.0.0.1") && !f.allows("127.0.0.2"));
        assert!(!ImageFetch::default().allows("localhost"), "nothing by default");
    }

    #[test]
    fn the_documented_example_with_the_defaults_parses_and_is_the_default() {
        let doc = include_str!("../docs/configuration.md");
        let start = doc.find("## Full example with the defaults").expect("the section");
        let block = &doc[start..];
        let block = &block[block.find("```toml\n").expect("a toml block") + 8..];
        let block = &block[..block.find("```").expect("its end")];
        let parsed = Config::from_toml_str(block).unwrap_or_else(|e| panic!("docs/configuration.md: {e}"));
        assert_eq!(parsed, Config::default(), "the example states the defaults");
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn mqtt_cfg(url: &str) -> MqttConfig {
        MqttConfig { url: Some(url.into()), ..Default::default() }
    }

    #[test]
    fn broker_urls_parse_with_default_ports() {
        assert_eq!(
            Broker::parse(&mqtt_cfg("mqtt://broker")).unwrap(),
            Broker { host: "broker".into(), port: 1883, tls: false, v5: true }
        );
        assert_eq!(Broker::parse(&mqtt_cfg("mqtt://10.0.0.2:1884")).unwrap().port, 1884);
        let mut tls = mqtt_cfg("mqtts://b.example");
        assert!(Broker::parse(&tls).unwrap_err().contains("ca_file"));
        tls.ca_file = Some("/etc/ca.pem".into());
        assert_eq!(Broker::parse(&tls).unwrap().port, 8883);
        assert!(Broker::parse(&mqtt_cfg("http://x")).is_err());
        assert!(Broker::parse(&mqtt_cfg("mqtt://x:port")).is_err());
        let mut v3 = mqtt_cfg("mqtt://x");
        v3.protocol = "3.1.1".into();
        assert!(!Broker::parse(&v3).unwrap().v5);
        v3.protocol = "6".into();
        assert!(Broker::parse(&v3).is_err());
    }

    #[test]
    fn admin_uids_come_from_the_environment_too() {
        let c = Config::load_from(None, Path::new("/x"), env(&[("INFERD_SOCKET__ADMIN_UIDS", "0,1000")])).unwrap();
        assert_eq!(c.socket.admin_uids, [0, 1000]);
        let c = Config::load_from(None, Path::new("/x"), env(&[("INFERD_SOCKET__ADMIN_UIDS", "1000")])).unwrap();
        assert_eq!(c.socket.admin_uids, [1000]);
    }

    #[test]
    fn every_list_setting_reads_comma_separated_from_the_environment() {
        let c = Config::load_from(
            None,
            Path::new("/x"),
            env(&[
                ("INFERD_LIMITS__IMAGE_DIRS", "/srv/cam,/var/lib/frames"),
                ("INFERD_LIMITS__IMAGE_FETCH__HOSTS", "cams.example.com,.corp.lan"),
                ("INFERD_MEMORY__PRELOAD", "color,minilm"),
                ("INFERD_RUNTIME__PROVIDERS", "cpu"),
            ]),
        )
        .unwrap();
        assert_eq!(c.limits.image_dirs, [PathBuf::from("/srv/cam"), PathBuf::from("/var/lib/frames")]);
        assert_eq!(c.limits.image_fetch.hosts, ["cams.example.com", ".corp.lan"]);
        assert_eq!(c.memory.preload, ["color", "minilm"]);
        // One item alone is a list of one.
        let c = Config::load_from(None, Path::new("/x"), env(&[("INFERD_LIMITS__IMAGE_DIRS", "/srv/cam")])).unwrap();
        assert_eq!(c.limits.image_dirs, [PathBuf::from("/srv/cam")]);
        let c = Config::load_from(None, Path::new("/x"), env(&[("INFERD_LIMITS__IMAGE_FETCH__HOSTS", "127.0.0.1")]))
            .unwrap();
        assert_eq!(c.limits.image_fetch.hosts, ["127.0.0.1"]);
    }

    #[test]
    fn a_private_socket_folder_must_be_this_users_and_closed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("inferd-me");
        std::fs::create_dir(&private).unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(check_private_dir(&private), Ok(()));
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(check_private_dir(&private).unwrap_err().contains("mode 755"));
        let link = dir.path().join("inferd-link");
        std::os::unix::fs::symlink(&private, &link).unwrap();
        assert!(check_private_dir(&link).unwrap_err().contains("symbolic link"));
        // Another user's folder (making one needs root).
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let other = dir.path().join("inferd-other");
            std::fs::create_dir(&other).unwrap();
            std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o700)).unwrap();
            std::os::unix::fs::chown(&other, Some(65534), None).unwrap();
            assert!(check_private_dir(&other).unwrap_err().contains("owner uid 65534"));
        }
    }

    #[test]
    fn socket_mode_is_octal_from_file_and_environment() {
        let c = Config::load_from(None, Path::new("/x"), env(&[("INFERD_SOCKET__MODE", "0600")])).unwrap();
        assert_eq!(c.socket.mode_bits().unwrap(), 0o600);
        assert_eq!(SocketConfig::default().mode_bits().unwrap(), 0o660);
    }

    #[test]
    fn defaults_apply_when_nothing_is_given() {
        let c = Config::load_from(None, Path::new("/nonexistent/inferd.toml"), env(&[])).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn file_then_environment_override_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "[runtime]\nonnxruntime = \"/from/file.so\"\nintra_threads = 2\n[log]\nlevel = \"debug\"\n",
        )
        .unwrap();
        let c = Config::load_from(
            Some(&file),
            Path::new("/nonexistent"),
            env(&[("INFERD_RUNTIME__ONNXRUNTIME", "/from/env.so"), ("INFERD_RUNTIME__PROVIDERS", "cuda,cpu")]),
        )
        .unwrap();
        assert_eq!(c.runtime.onnxruntime.as_deref(), Some(Path::new("/from/env.so")));
        assert_eq!(c.runtime.intra_threads, 2);
        let names: Vec<&str> = c.runtime.providers.iter().map(|p| p.name()).collect();
        assert_eq!(names, vec!["cuda", "cpu"]);
        assert_eq!(c.log.level, "debug");
    }

    #[test]
    fn unknown_keys_missing_files_and_bad_values_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "[runtime]\nonxruntime = \"typo\"\n").unwrap();
        let err = Config::load_from(Some(&file), Path::new("/x"), env(&[])).unwrap_err();
        assert!(err.to_string().contains("onxruntime"), "{err}");

        let err = Config::load_from(Some(&dir.path().join("nope.toml")), Path::new("/x"), env(&[])).unwrap_err();
        assert!(matches!(err, ConfigError::Missing(_)));

        let err = Config::load_from(None, Path::new("/x"), env(&[("INFERD_RUNTIME__PROVIDERS", "gpu")])).unwrap_err();
        assert!(err.to_string().contains("unknown provider 'gpu'"), "{err}");
    }
}
