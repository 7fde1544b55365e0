//! The `inferd` command line: `check`, `models`, `infer`, `serve`. Each
//! command returns its exit code; errors go to stderr in plain words.

use crate::backend::{self, BackendChoice};
use crate::client::Client;
use crate::config::Config;
use crate::engine::{Engine, LoadOptions};
use crate::error::{ErrorKind, InferError};
use crate::job::{self, JobOutput, JobResult};
use crate::registry::Registry;
use clap::{Parser, Subcommand};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Exit codes, stable for scripts.
pub mod exit {
    pub const OK: i32 = 0;
    pub const FAILURE: i32 = 1;
    pub const CONFIG: i32 = 2;
    pub const REGISTRY: i32 = 3;
    pub const BAD_INPUT: i32 = 4;
    pub const UNKNOWN_MODEL: i32 = 5;
    pub const UNAVAILABLE: i32 = 6;
    pub const BACKEND: i32 = 7;
    pub const UNREACHABLE: i32 = 8;
}

/// The exit code for a job error of `kind`.
pub fn exit_code(kind: ErrorKind) -> i32 {
    match kind {
        ErrorKind::BadInput | ErrorKind::PayloadTooLarge | ErrorKind::Poison => exit::BAD_INPUT,
        ErrorKind::UnknownModel => exit::UNKNOWN_MODEL,
        ErrorKind::ModelUnavailable => exit::UNAVAILABLE,
        ErrorKind::Backend | ErrorKind::Timeout | ErrorKind::Overloaded => exit::BACKEND,
        ErrorKind::Internal | ErrorKind::NotFound | ErrorKind::Unauthorized | ErrorKind::Forbidden => exit::FAILURE,
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "inferd",
    version,
    about = "Inference daemon for edge boxes: ONNX models over MQTT and a local socket"
)]
pub struct Cli {
    /// Configuration file (default /etc/inferd/config.toml, if present).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// models.json to use instead of the configured one.
    #[arg(long, global = true, value_name = "PATH")]
    pub models: Option<PathBuf>,
    /// Log progress (info level) for one-shot commands; `serve` logs at the configured level.
    #[arg(short, long, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate models.json: structure, files, sha256, and each spec against its ONNX file.
    Check {
        /// Print the problems as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List registered models with the variant and engine each would use, and why.
    Models {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Also load each model (its planned variant) and report which
        /// execution providers registered and how many graph nodes each took.
        #[arg(long)]
        load: bool,
    },
    /// Run a model on files through the running daemon (or in this process with --local).
    Infer {
        /// The model's name in models.json.
        #[arg(long, short)]
        model: String,
        /// Run the model in this process instead of asking the daemon.
        #[arg(long)]
        local: bool,
        /// The daemon's socket (default: socket.path from the configuration).
        #[arg(long, value_name = "PATH", conflicts_with = "local")]
        socket: Option<PathBuf>,
        /// Engine to use instead of the model's choice (with --local).
        #[arg(long, value_enum, requires = "local")]
        backend: Option<BackendChoice>,
        /// Variant to use instead of the best one (with --local).
        #[arg(long, requires = "local")]
        variant: Option<String>,
        /// Classes to return (classification).
        #[arg(long)]
        top_k: Option<usize>,
        /// Ask this about each file, an image (vision-language models): the
        /// answer is generated text.
        #[arg(long, value_name = "TEXT")]
        prompt: Option<String>,
        /// Most tokens to generate (with --prompt; default the model's).
        #[arg(long, requires = "prompt")]
        max_tokens: Option<usize>,
        /// Sampling temperature (with --prompt); 0 is greedy, the default here.
        #[arg(long, requires = "prompt", default_value_t = 0.0)]
        temperature: f32,
        /// Print one JSON object per file.
        #[arg(long)]
        json: bool,
        /// Input files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Run the daemon until SIGINT or SIGTERM.
    Serve,
    /// Write a model's artifact folder (model.json and its files, flat) for
    /// `oras push` or a model package.
    Pack {
        /// The model, as named in the registry.
        name: String,
        /// The folder to write (created).
        dir: PathBuf,
    },
    /// Fetch a model from an OCI registry, a web server or the Hugging Face Hub
    /// into models.d/NAME/ ([pull] dir), verified file by file, resumed where
    /// an earlier pull stopped.
    Pull {
        /// oci://REGISTRY/REPOSITORY:TAG or oci://REGISTRY/REPOSITORY@sha256:DIGEST
        /// (an artifact of model.json and the files it names, as `oras push` writes it);
        /// https://HOST/FOLDER/ or hf://ORG/REPO@REVISION (model.json and the files
        /// its SHA256SUMS names, as `inferd pack` writes them).
        source: String,
        /// The model's name here (default: the name in the artifact's model.json).
        #[arg(long)]
        name: Option<String>,
        /// The digest the source must have: the OCI manifest's, or the SHA256SUMS file's (sha256:HEX).
        #[arg(long)]
        digest: Option<String>,
        /// Print the result as JSON (progress goes to stderr either way).
        #[arg(long)]
        json: bool,
    },
    /// Fleet rollouts: the nodes' reported state, signing keys and documents.
    Fleet {
        #[command(subcommand)]
        command: FleetCommand,
    },
    /// Measure throughput and latency of one model: N clients over the socket
    /// or MQTT (inferd or a peer speaking its API), or in this process.
    Bench {
        /// The model to drive.
        #[arg(long)]
        model: String,
        /// The job payload: an image, a JSON request, or a .txt text.
        input: PathBuf,
        /// How jobs reach the model.
        #[arg(long, value_enum, default_value = "socket")]
        via: crate::bench::Via,
        /// Concurrent clients (socket and MQTT).
        #[arg(long, default_value_t = 8)]
        clients: usize,
        /// Seconds to measure.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Jobs run first and not counted (loads the model).
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Pace the clients to this many jobs per second in all (steady load
        /// for soak runs); unset: each client sends its next job at once.
        #[arg(long)]
        rate: Option<f64>,
        /// Socket to drive (default: the configured one).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Broker to publish jobs to (`--via mqtt`).
        #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
        mqtt_url: String,
        /// Topic prefix: jobs go to PREFIX/jobs/MODEL.
        #[arg(long, default_value = "inferd")]
        mqtt_prefix: String,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `inferd fleet …`.
#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// Print every node's reported state (the retained `PREFIX/+/reported`
    /// topics of the broker in [mqtt]): generation, state, models, errors.
    Status {
        /// Seconds to collect reports.
        #[arg(long, default_value_t = 2.0)]
        wait: f64,
        /// Print the reports as JSON, by node.
        #[arg(long)]
        json: bool,
    },
    /// Make a signing key: writes NAME.key (secret, mode 0600) and NAME.pub,
    /// and prints the line boxes trust (fleet.trusted_keys).
    Keygen {
        /// The key's name, as documents will carry it.
        name: String,
        /// Folder to write the files in.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Sign a desired-state document: prints it with its signature.
    Sign {
        /// The key file `inferd fleet keygen` wrote.
        #[arg(long)]
        key: PathBuf,
        /// The key's name in the signature (default: the key file's name without .key).
        #[arg(long)]
        name: Option<String>,
        /// The document (JSON).
        document: PathBuf,
    },
}

/// `inferd fleet …`: the tools an operator runs where the broker is.
pub fn fleet(config: &Config, command: &FleetCommand) -> i32 {
    match command {
        FleetCommand::Status { wait, json } => {
            if config.mqtt.url.is_none() {
                eprintln!("inferd fleet status: no broker: set [mqtt] url (or INFERD_MQTT__URL)");
                return exit::CONFIG;
            }
            let runtime = match one_shot_runtime("inferd fleet status") {
                Ok(r) => r,
                Err(code) => return code,
            };
            let wait = std::time::Duration::from_secs_f64(wait.clamp(0.1, 600.0));
            match runtime.block_on(crate::fleet::status::reports(&config.mqtt, wait)) {
                Ok(reports) if *json => {
                    println!("{}", serde_json::to_string_pretty(&reports).unwrap_or_default());
                    exit::OK
                }
                Ok(reports) if reports.is_empty() => {
                    eprintln!("no node has reported under {}/+/reported", config.mqtt.prefix);
                    exit::OK
                }
                Ok(reports) => {
                    print!("{}", crate::fleet::status::table(&reports));
                    exit::OK
                }
                Err(e) => {
                    eprintln!("inferd fleet status: {e}");
                    exit::UNREACHABLE
                }
            }
        }
        FleetCommand::Keygen { name, dir } => match crate::fleet::status::keygen(name, dir) {
            Ok((file, public)) => {
                eprintln!("wrote {} (keep it secret) and {name}.pub; boxes trust it with:", file.display());
                println!("{public}");
                exit::OK
            }
            Err(e) => {
                eprintln!("inferd fleet keygen: {e}");
                exit::FAILURE
            }
        },
        FleetCommand::Sign { key, name, document } => {
            match crate::fleet::status::sign_file(document, key, name.as_deref()) {
                Ok(signed) => {
                    println!("{}", serde_json::to_string_pretty(&signed).unwrap_or_default());
                    exit::OK
                }
                Err(e) => {
                    eprintln!("inferd fleet sign: {e}");
                    exit::BAD_INPUT
                }
            }
        }
    }
}

/// The registry named by `--models` or the configuration.
pub fn load_registry(cli: &Cli, config: &Config) -> Result<Registry, i32> {
    let path = cli.models.clone().unwrap_or_else(|| config.registry_path());
    Registry::load_for(config, &path).map_err(|e| {
        eprintln!("inferd: {e}");
        exit::REGISTRY
    })
}

/// A single-threaded tokio runtime for a one-shot command (`cmd` names it in the error).
fn one_shot_runtime(cmd: &str) -> Result<tokio::runtime::Runtime, i32> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| {
        eprintln!("{cmd}: {e}");
        exit::FAILURE
    })
}

/// `inferd pull`: progress on stderr, the result on stdout; the registry
/// must still read with the new model (else the pull is reported and kept
/// for `inferd check` to explain).
pub fn pull(cli: &Cli, config: &Config, source: &str, want: &crate::pull::Want<'_>, json: bool) -> i32 {
    let path = cli.models.clone().unwrap_or_else(|| config.registry_path());
    let runtime = match one_shot_runtime("inferd pull") {
        Ok(r) => r,
        Err(code) => return code,
    };
    let show = |p: crate::pull::Progress| match p {
        crate::pull::Progress::Manifest { files, bytes: 0 } => eprintln!("{source}: {files} files"),
        crate::pull::Progress::Manifest { files, bytes } => eprintln!("{source}: {files} files, {bytes} bytes"),
        crate::pull::Progress::Present { file } => eprintln!("  {file}: already here, verified"),
        crate::pull::Progress::Bytes { file, done, total } => match total {
            Some(t) if t > 0 => eprintln!("  {file}: {done} of {t} bytes ({}%)", done * 100 / t),
            _ => eprintln!("  {file}: {done} bytes"),
        },
        crate::pull::Progress::Verified { file, sha256 } => eprintln!("  {file}: sha256 {sha256} verified"),
    };
    match runtime.block_on(crate::pull::pull(source, &config.pull_dir(&path), want, &config.pull, &show)) {
        Ok(pulled) => {
            if json {
                println!("{}", serde_json::to_string(&pulled).unwrap_or_default());
            } else {
                println!(
                    "pulled {} ({} files, {} bytes, {} downloaded) into {}; digest {}",
                    pulled.name,
                    pulled.files.len(),
                    pulled.bytes,
                    pulled.downloaded,
                    pulled.dir.display(),
                    pulled.digest
                );
            }
            match Registry::load_for(config, &path) {
                Ok(_) => exit::OK,
                Err(e) => {
                    eprintln!("inferd pull: the registry does not read with the pulled model: {e}");
                    exit::REGISTRY
                }
            }
        }
        Err(e) => {
            if json {
                println!("{}", serde_json::json!({"error": e.message, "kind": e.kind}));
            }
            eprintln!("inferd pull: {e}");
            match e.kind {
                crate::pull::PullErrorKind::Source
                | crate::pull::PullErrorKind::Artifact
                | crate::pull::PullErrorKind::Digest => exit::BAD_INPUT,
                crate::pull::PullErrorKind::NotFound => exit::UNKNOWN_MODEL,
                crate::pull::PullErrorKind::Network => exit::UNREACHABLE,
                _ => exit::FAILURE,
            }
        }
    }
}

/// `inferd pack`.
pub fn pack(registry: &Registry, name: &str, dir: &Path) -> i32 {
    match crate::pull::pack(registry, name, dir) {
        Ok(files) => {
            println!("{}: {} ({})", dir.display(), files.join(", "), name);
            println!("publish it: cd {} && oras push REGISTRY/REPOSITORY:TAG {}", dir.display(), files.join(" "));
            println!(
                "or serve the folder over https: its SHA256SUMS names the files (inferd pull https://HOST/FOLDER/)"
            );
            exit::OK
        }
        Err(e) => {
            eprintln!("inferd pack: {e}");
            if e.kind == crate::pull::PullErrorKind::NotFound { exit::UNKNOWN_MODEL } else { exit::FAILURE }
        }
    }
}

/// `inferd check`.
pub fn check(registry: &Registry, json: bool) -> i32 {
    let problems = registry.check();
    if json {
        println!("{}", serde_json::json!({"file": registry.file, "ok": problems.is_empty(), "problems": problems}));
    } else if problems.is_empty() {
        let variants: usize = registry.models.iter().map(|m| m.variants.len()).sum();
        println!("{}: OK ({} models, {variants} variants checked)", registry.file.display(), registry.models.len());
    } else {
        eprintln!("{}: {} problem(s)", registry.file.display(), problems.len());
        for p in &problems {
            eprintln!("  {p}");
        }
    }
    if problems.is_empty() { exit::OK } else { exit::REGISTRY }
}

/// `inferd models`.
pub fn models(engine: &Engine, config: &Config, json: bool, load: bool) -> i32 {
    let ort = backend::ort::status(&config.runtime);
    let probe = std::sync::Arc::new(crate::memory::SystemProbe::default());
    let manager = crate::manager::Manager::new(config.memory.clone(), probe.clone(), engine.registry_arc());
    let room = manager.room().ok();
    let budget = match config.memory.budget_mb {
        Some(b) => format!("memory.budget_mb = {b} MiB"),
        None => crate::memory::MemoryProbe::describe(probe.as_ref()),
    };
    let rows: Vec<serde_json::Value> = engine
        .registry()
        .models
        .iter()
        .map(|m| {
            let r = crate::report::ModelReport::of(engine, &manager, m, &crate::worker::ModelState::Unloaded, 0);
            let needs: Vec<serde_json::Value> = r
                .needs
                .iter()
                .map(|n| serde_json::json!({"name": n.name, "quality": n.quality, "need_bytes": n.bytes, "need_mib": crate::memory::mib(n.bytes), "source": n.source}))
                .collect();
            let variants: Vec<&str> = r.variants.iter().map(|v| v.name.as_str()).collect();
            let mut row = serde_json::json!({
                "name": r.name, "task": r.task, "variants": variants, "needs": needs, "loaded": false,
            });
            if let (Some(variant), Some(reason)) = (&r.variant, &r.variant_reason) {
                row["variant"] = serde_json::json!(variant);
                row["variant_reason"] = serde_json::json!(reason);
            }
            if let (Some(backend), Some(reason)) = (&r.backend, &r.backend_reason) {
                row["backend"] = serde_json::json!(backend);
                row["backend_reason"] = serde_json::json!(reason);
                row["providers"] = serde_json::json!(r.providers);
            }
            if let Some(e) = r.plan_error.as_ref().or(r.variant_error.as_ref()) {
                row["error"] = serde_json::json!(e);
            }
            if load && row.get("error").is_none() {
                let options = LoadOptions { variant: row["variant"].as_str().map(str::to_string), ..Default::default() };
                match engine.load(&m.name, &options) {
                    Ok(loaded) => {
                        row["loaded"] = serde_json::json!(true);
                        row["provider"] = serde_json::json!(loaded.provider());
                        row["placement"] = serde_json::json!(loaded.placement());
                    }
                    Err(e) => row["load_error"] = serde_json::json!(e),
                }
            }
            row
        })
        .collect();
    if json {
        let runtime = match &ort {
            Ok(desc) => serde_json::json!({"available": true, "onnxruntime": desc}),
            Err(why) => serde_json::json!({"available": false, "reason": why}),
        };
        let memory =
            serde_json::json!({"room_bytes": room, "budget": budget, "headroom_mib": config.memory.headroom_mb});
        println!("{}", serde_json::json!({"runtime": runtime, "memory": memory, "models": rows}));
        return exit::OK;
    }
    match &ort {
        Ok(desc) => println!("runtime: {desc}"),
        Err(why) => {
            println!("runtime: ONNX Runtime is NOT available, models with backend auto run on tract\n  ({why})")
        }
    }
    println!("memory:  {budget}; headroom {} MiB", config.memory.headroom_mb);
    println!("{:<16} {:<22} {:<10} {:<7} WHY", "MODEL", "TASK", "VARIANT", "BACKEND");
    for r in &rows {
        let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
        if let Some(err) = r.get("error") {
            let message = err["message"].as_str().unwrap_or("");
            println!("{:<16} {:<22} {:<10} {:<7} {message}", s("name"), s("task"), "-", "-");
        } else {
            let why = format!("{}; {}", s("variant_reason"), s("backend_reason"));
            println!("{:<16} {:<22} {:<10} {:<7} {why}", s("name"), s("task"), s("variant"), s("backend"));
        }
        if let Some(needs) = r["needs"].as_array().filter(|n| n.len() > 1) {
            let list: Vec<String> = needs
                .iter()
                .map(|n| {
                    format!(
                        "{} (quality {}) {} MiB {}",
                        n["name"].as_str().unwrap_or(""),
                        n["quality"],
                        n["need_mib"],
                        n["source"].as_str().unwrap_or("").replace('_', " ")
                    )
                })
                .collect();
            println!("{:<16} variants: {}", "", list.join(" · "));
        }
        if let Some(p) = r.get("placement").filter(|p| !p.is_null()) {
            let placement: crate::backend::Placement = serde_json::from_value(p.clone()).unwrap_or_default();
            println!("{:<16} loaded on {}: {}", "", s("provider"), placement.summary());
        } else if let Some(e) = r.get("load_error") {
            println!("{:<16} cannot load: {}", "", e["message"].as_str().unwrap_or(""));
        } else if r["loaded"] == true {
            println!("{:<16} loaded on {}", "", s("provider"));
        }
    }
    exit::OK
}

/// Largest input file `inferd infer` reads.
const MAX_FILE_BYTES: u64 = 256 << 20;

/// What `inferd infer` was asked to do.
pub struct InferArgs<'a> {
    pub model: &'a str,
    pub top_k: Option<usize>,
    /// A question about each file (an image), with its generation settings.
    pub prompt: Option<(&'a str, job::GenerationParams)>,
    pub json: bool,
    pub files: &'a [PathBuf],
}

impl InferArgs<'_> {
    /// The chat that asks the prompt about `image`.
    fn question(&self, image: Vec<u8>) -> Option<job::GenerateRequest> {
        let (prompt, params) = self.prompt.as_ref()?;
        let message = job::ChatMessage { role: "user".into(), content: prompt.to_string(), images: vec![(0, image)] };
        Some(job::GenerateRequest { prompt: job::Prompt::Chat(vec![message]), params: params.clone(), stream: None })
    }
}

/// `inferd infer --local`: runs each file in this process; a bad file is
/// reported and the others still run.
pub fn infer_local(engine: &Engine, config: &Config, options: LoadOptions, args: &InferArgs<'_>) -> i32 {
    // The same variant choice as the daemon's: the best that fits the memory free now.
    let loaded = engine.load(args.model, &options);
    let mut loaded = match loaded {
        Ok(m) => m,
        Err(e) => {
            eprintln!("inferd: cannot load model '{}': {}", args.model, e.message);
            return exit_code(e.kind);
        }
    };
    let takes_text =
        engine.registry().get(args.model).is_some_and(|m| m.task.takes().0.contains(&job::InputKind::Text));
    let mut code = exit::OK;
    for file in args.files {
        let outcome = read_file(file).and_then(|bytes| {
            if args.prompt.is_some() {
                let request = args.question(bytes).expect("a prompt was given");
                return loaded.infer(job::JobInput::Generate(request), &job::JobOptions::default());
            }
            let (input, mut options) = job::Payload::sniff(&bytes, None, takes_text).read(bytes, &config.limits)?;
            options.top_k = args.top_k.or(options.top_k);
            loaded.infer(input, &options)
        });
        code = report(file, outcome, args.json).unwrap_or(code);
    }
    code
}

/// `inferd infer`: sends each file to the daemon over its socket.
pub fn infer_remote(client: &Client, args: &InferArgs<'_>) -> i32 {
    let mut code = exit::OK;
    let mut path = format!("/v1/models/{}/infer", args.model);
    if let Some(k) = args.top_k {
        path.push_str(&format!("?top_k={k}"));
    }
    for file in args.files {
        let bytes = match read_file(file) {
            Ok(b) => b,
            Err(e) => {
                code = report(file, Err(e), args.json).unwrap_or(code);
                continue;
            }
        };
        if args.prompt.is_some() {
            match ask_remote(client, args, bytes) {
                Ok(outcome) => code = report(file, outcome, args.json).unwrap_or(code),
                Err(e) => {
                    eprintln!("inferd: {e}");
                    return exit::UNREACHABLE;
                }
            }
            continue;
        }
        let response = match client.post(&path, job::Payload::media_type(&bytes), &bytes) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("inferd: {e}");
                return exit::UNREACHABLE;
            }
        };
        let outcome = if response.status == 200 {
            serde_json::from_slice::<JobOutput>(&response.body)
                .map_err(|e| InferError::internal(format!("unexpected answer from inferd: {e}")))
        } else {
            Err(error_from_body(&response.body, response.status))
        };
        code = report(file, outcome, args.json).unwrap_or(code);
    }
    code
}

/// Asks the prompt about `image` through the daemon's OpenAI-style chat
/// endpoint (the image as a data: URL); the answer as a job's output. Err: the
/// daemon could not be reached.
fn ask_remote(client: &Client, args: &InferArgs<'_>, image: Vec<u8>) -> Result<Result<JobOutput, InferError>, String> {
    use base64::Engine as _;
    let (prompt, params) = args.prompt.as_ref().expect("a prompt was given");
    let url = format!(
        "data:{};base64,{}",
        job::Payload::media_type(&image),
        base64::engine::general_purpose::STANDARD.encode(&image)
    );
    // The settings `inferd infer` has options for.
    let body = serde_json::json!({"model": args.model, "max_tokens": params.max_tokens, "temperature": params.temperature,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}]}]});
    let response = client
        .post("/v1/chat/completions", "application/json", body.to_string().as_bytes())
        .map_err(|e| e.to_string())?;
    if response.status != 200 {
        return Ok(Err(error_from_body(&response.body, response.status)));
    }
    Ok(chat_output(&response.body))
}

/// An OpenAI chat answer (with inferd's extensions: timings and the engine) as a job's output.
fn chat_output(body: &[u8]) -> Result<JobOutput, InferError> {
    let unexpected = |e: String| InferError::internal(format!("unexpected answer from inferd: {e}"));
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| unexpected(e.to_string()))?;
    let choice = &v["choices"][0];
    let text = choice["message"]["content"].as_str().ok_or_else(|| unexpected(v.to_string()))?.to_string();
    let finish_reason =
        serde_json::from_value(choice["finish_reason"].clone()).map_err(|e| unexpected(e.to_string()))?;
    let usage = serde_json::from_value(v["usage"].clone()).map_err(|e| unexpected(e.to_string()))?;
    let text_of = |field: &str| v[field].as_str().unwrap_or_default().to_string();
    Ok(JobOutput {
        model: text_of("model"),
        variant: text_of("variant"),
        backend: serde_json::from_value(v["backend"].clone()).map_err(|e| unexpected(e.to_string()))?,
        provider: text_of("provider"),
        timings: serde_json::from_value(v["timings"].clone()).map_err(|e| unexpected(e.to_string()))?,
        batch: None,
        result: JobResult::Generation { text, finish_reason, usage, tokens: Vec::new(), logprobs: None },
    })
}

/// The error in an API error body (`{"error": {"kind", "message"}}`).
pub fn error_from_body(body: &[u8], status: u16) -> InferError {
    #[derive(serde::Deserialize)]
    struct Body {
        error: InferError,
    }
    serde_json::from_slice::<Body>(body)
        .map(|b| b.error)
        .unwrap_or_else(|_| InferError::internal(format!("HTTP {status}: {}", String::from_utf8_lossy(body))))
}

/// Prints one file's outcome; returns the exit code of a failure.
fn report(file: &Path, outcome: Result<JobOutput, InferError>, json: bool) -> Option<i32> {
    match outcome {
        Ok(out) if json => {
            let mut v = serde_json::to_value(&out).unwrap_or_default();
            v["file"] = serde_json::Value::String(file.display().to_string());
            println!("{v}");
            None
        }
        Ok(out) => {
            println!("{}: {}", file.display(), summary(&out));
            None
        }
        Err(e) => {
            if json {
                println!("{}", serde_json::json!({"file": file, "error": e}));
            }
            eprintln!("inferd: {}: {}: {}", file.display(), e.kind, e.message);
            Some(exit_code(e.kind))
        }
    }
}

fn read_file(file: &Path) -> Result<Vec<u8>, InferError> {
    let f = std::fs::File::open(file).map_err(|e| InferError::bad_input(format!("cannot open: {e}")))?;
    let mut bytes = Vec::new();
    f.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| InferError::bad_input(format!("cannot read: {e}")))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(InferError::bad_input(format!("file is over {} MiB", MAX_FILE_BYTES >> 20)));
    }
    Ok(bytes)
}

fn summary(out: &JobOutput) -> String {
    let body = match &out.result {
        JobResult::Classification { classes } => classes
            .iter()
            .map(|c| format!("{} {:.4}", c.label.clone().unwrap_or_else(|| format!("#{}", c.index)), c.score))
            .collect::<Vec<_>>()
            .join(", "),
        JobResult::Tensors { outputs } => {
            outputs.iter().map(|(name, t)| format!("{name} {} {:?}", t.dtype, t.shape)).collect::<Vec<_>>().join(", ")
        }
        JobResult::Embeddings { embeddings, dimensions } => {
            let head: Vec<String> =
                embeddings.first().map(|e| e.iter().take(4).map(|x| format!("{x:.4}")).collect()).unwrap_or_default();
            format!("{} vector(s) of {dimensions} dims, first [{}, ...]", embeddings.len(), head.join(", "))
        }
        JobResult::Detections { detections } if detections.is_empty() => "no objects".to_string(),
        JobResult::Detections { detections } => detections
            .iter()
            .map(|d| {
                let [x1, y1, x2, y2] = d.bbox;
                let name = d.label.clone().unwrap_or_else(|| format!("#{}", d.index));
                format!("{name} {:.3} at ({x1:.0},{y1:.0})-({x2:.0},{y2:.0})", d.score)
            })
            .collect::<Vec<_>>()
            .join(", "),
        JobResult::Document { fields, .. } => serde_json::to_string(fields).unwrap_or_default(),
        JobResult::Generation { text, finish_reason, usage, .. } => format!(
            "{text:?} ({finish_reason:?}, {} prompt + {} generated tokens)",
            usage.prompt_tokens, usage.completion_tokens
        ),
        JobResult::Ocr { lines } if lines.is_empty() => "no text".to_string(),
        JobResult::Ocr { lines } => lines
            .iter()
            .map(|l| format!("\n  {:?} {:.3} at ({:.0},{:.0})", l.text, l.confidence, l.quad[0][0], l.quad[0][1]))
            .collect::<String>(),
        JobResult::Other(answer) => serde_json::Value::Object(answer.clone()).to_string(),
    };
    format!(
        "{body}  [{} {} on {}/{}, {:.2} ms]",
        out.model,
        out.variant,
        out.backend,
        out.provider,
        out.timings.pre_ms + out.timings.infer_ms + out.timings.post_ms
    )
}
