//! The `inferd` binary: parse the command line, read configuration, set up
//! logging, run the command, turn errors into exit codes.

use clap::Parser;
use inferd::cli::{self, Cli, Command, exit};
use inferd::client::Client;
use inferd::config::Config;
use inferd::engine::{Engine, LoadOptions};
use std::io::IsTerminal;

fn main() {
    std::process::exit(real_main());
}

fn real_main() -> i32 {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("inferd: {e}");
            return exit::CONFIG;
        }
    };
    let serving = matches!(cli.command, Command::Serve);
    let level = if serving || cli.verbose { config.log.level.as_str() } else { "warn" };
    init_logging(level, serving && inferd::systemd::stderr_is_journal());

    if let Command::Infer { local: false, ref model, ref socket, top_k, json, ref files, .. } = cli.command {
        let prompt = question(&cli.command);
        let path = match socket.clone().map_or_else(|| config.socket.client_path(), Ok) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("inferd: {e}");
                return exit::CONFIG;
            }
        };
        return cli::infer_remote(&Client::new(path), &cli::InferArgs { model, top_k, prompt, json, files });
    }
    if let Command::Bench {
        ref model,
        ref input,
        via,
        clients,
        duration,
        warmup,
        rate,
        ref socket,
        ref mqtt_url,
        ref mqtt_prefix,
        json,
    } = cli.command
    {
        let engine = match via {
            inferd::bench::Via::Local => match cli::load_registry(&cli, &config) {
                Ok(r) => Some(Engine::new(config.clone(), r)),
                Err(code) => return code,
            },
            _ => None,
        };
        let args = inferd::bench::BenchArgs {
            model: model.clone(),
            input: input.clone(),
            via,
            clients: clients.max(1),
            duration: std::time::Duration::from_secs_f64(duration.max(0.1)),
            warmup,
            rate: rate.filter(|r| *r > 0.0),
            socket: socket.clone().unwrap_or_else(|| config.socket.resolved_path()),
            mqtt_url: mqtt_url.clone(),
            mqtt_prefix: mqtt_prefix.clone(),
        };
        return match inferd::bench::run(&args, engine.as_ref()) {
            Ok(r) if json => {
                println!("{}", serde_json::to_string(&r).unwrap_or_default());
                exit::OK
            }
            Ok(r) => {
                println!(
                    "{} via {:?}, {} client(s): {} jobs in {:.1} s = {:.1} jobs/s; latency p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms{}{}; {} errors",
                    r.model,
                    r.via,
                    r.clients,
                    r.jobs,
                    r.seconds,
                    r.jobs_per_s,
                    r.p50_ms,
                    r.p95_ms,
                    r.p99_ms,
                    r.engine_p50_ms.map(|e| format!("; engine p50 {e:.2} ms")).unwrap_or_default(),
                    r.overhead_p50_ms.map(|e| format!(", overhead p50 {e:.2} ms")).unwrap_or_default(),
                    r.errors
                );
                exit::OK
            }
            Err(e) => {
                eprintln!("inferd bench: {e}");
                exit::FAILURE
            }
        };
    }
    if let Command::Fleet { ref command } = cli.command {
        return cli::fleet(&config, command);
    }
    if let Command::Pull { ref source, ref name, ref digest, json } = cli.command {
        let want = inferd::pull::Want { name: name.as_deref(), digest: digest.as_deref(), reuse: Vec::new() };
        return cli::pull(&cli, &config, source, &want, json);
    }
    let registry = match cli::load_registry(&cli, &config) {
        Ok(r) => r,
        Err(code) => return code,
    };
    match cli.command {
        Command::Check { json } => cli::check(&registry, json),
        Command::Pack { ref name, ref dir } => cli::pack(&registry, name, dir),
        Command::Models { json, load } => cli::models(&Engine::new(config.clone(), registry), &config, json, load),
        Command::Infer { ref model, backend, ref variant, top_k, json, ref files, .. } => {
            let engine = Engine::new(config.clone(), registry);
            let options = LoadOptions { backend, variant: variant.clone() };
            let prompt = question(&cli.command);
            cli::infer_local(&engine, &config, options, &cli::InferArgs { model, top_k, prompt, json, files })
        }
        Command::Serve => serve(config, cli.config.clone(), cli.models),
        Command::Bench { .. } | Command::Pull { .. } | Command::Fleet { .. } => unreachable!("handled above"),
    }
}

/// `inferd infer --prompt`'s question and its generation settings.
fn question(command: &Command) -> Option<(&str, inferd::job::GenerationParams)> {
    let Command::Infer { prompt: Some(prompt), max_tokens, temperature, .. } = command else { return None };
    let params = inferd::job::GenerationParams {
        max_tokens: *max_tokens,
        temperature: Some(*temperature),
        ..Default::default()
    };
    Some((prompt.as_str(), params))
}

/// Plain lines on stderr, or structured records to the journal when
/// stderr is the journal (a systemd service), with the fields searchable
/// (`journalctl -u inferd MODEL=ocr`).
fn init_logging(level: &str, journal: bool) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::new(level);
    if journal {
        match tracing_journald::layer() {
            Ok(layer) => {
                tracing_subscriber::registry().with(filter).with(layer.with_syslog_identifier("inferd".into())).init();
                return;
            }
            Err(e) => eprintln!("inferd: cannot log to the journal ({e}); logging to stderr"),
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

fn serve(mut config: Config, config_file: Option<std::path::PathBuf>, models: Option<std::path::PathBuf>) -> i32 {
    if models.is_some() {
        config.models = models.clone();
    }
    // The blocking pool (large JSON bodies, joining worker threads) stays small
    // and steady: an edge daemon's thread count should not drift with load.
    let runtime = match tokio::runtime::Builder::new_multi_thread().max_blocking_threads(16).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("inferd: cannot start the async runtime: {e}");
            return exit::FAILURE;
        }
    };
    let reread = move || {
        let mut c = Config::load(config_file.as_deref()).map_err(|e| e.to_string())?;
        if models.is_some() {
            c.models = models.clone();
        }
        Ok(c)
    };
    let probe = std::sync::Arc::new(inferd::memory::SystemProbe::default());
    let run = async {
        let shutdown = shutdown_signal();
        let (tx, requests) = tokio::sync::mpsc::channel(1);
        forward_sighup(tx);
        let reload = inferd::Reload { requests, reread: Box::new(reread) };
        inferd::run_with(config, shutdown, probe, Some(reload)).await
    };
    match runtime.block_on(run) {
        Ok(()) => exit::OK,
        Err(e) => {
            tracing::error!("{e}");
            match e {
                inferd::RunError::Registry(_) => exit::REGISTRY,
                _ => exit::FAILURE,
            }
        }
    }
}

/// One reload request per SIGHUP (requests while one is pending fold into
/// it). The handler is installed before this returns, so a SIGHUP that comes
/// early is a reload, never the default action (exit).
fn forward_sighup(tx: tokio::sync::mpsc::Sender<()>) {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::hangup()) {
        Ok(mut hup) => {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    let _ = tx.try_send(());
                }
            });
        }
        Err(e) => tracing::warn!("cannot watch SIGHUP: {e}; reload is unavailable"),
    }
}

/// Completes on SIGTERM or SIGINT. The handlers are installed before this
/// returns (not when the future is first polled), so a SIGTERM right after
/// READY=1 is a graceful stop.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            (term, int) => {
                if let Err(e) = term.as_ref().and(int.as_ref()) {
                    tracing::warn!("cannot watch SIGTERM/SIGINT: {e}; stopping on Ctrl-C only");
                }
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
