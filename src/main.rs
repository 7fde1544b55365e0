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
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(level))
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();

    if let Command::Infer { local: false, ref model, ref socket, top_k, json, ref files, .. } = cli.command {
        let path = socket.clone().unwrap_or_else(|| config.socket.resolved_path());
        return cli::infer_remote(&Client::new(path), &cli::InferArgs { model, top_k, json, files });
    }
    let registry = match cli::load_registry(&cli, &config) {
        Ok(r) => r,
        Err(code) => return code,
    };
    match cli.command {
        Command::Check { json } => cli::check(&registry, json),
        Command::Models { json } => cli::models(&Engine::new(config.clone(), registry), &config, json),
        Command::Infer { ref model, backend, ref variant, top_k, json, ref files, .. } => {
            let engine = Engine::new(config.clone(), registry);
            let options = LoadOptions { backend, variant: variant.clone() };
            cli::infer_local(&engine, &config, options, &cli::InferArgs { model, top_k, json, files })
        }
        Command::Serve => serve(config, cli.models),
    }
}

fn serve(mut config: Config, models: Option<std::path::PathBuf>) -> i32 {
    if models.is_some() {
        config.models = models;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("inferd: cannot start the async runtime: {e}");
            return exit::FAILURE;
        }
    };
    match runtime.block_on(inferd::run(config, shutdown_signal())) {
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

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot watch SIGTERM: {e}; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
