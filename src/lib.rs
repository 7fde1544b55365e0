//! inferd: an inference daemon for edge boxes. ONNX models run on ONNX
//! Runtime (CUDA, TensorRT, CoreML or CPU) or on tract where ONNX Runtime is
//! absent; jobs come over MQTT and a local Unix socket.
//!
//! Map of the modules:
//! - [`config`]: defaults → TOML file → `INFERD_*` environment.
//! - [`registry`]: models.json, validated, with JSON paths in every error.
//! - [`backend`]: the [`backend::InferenceBackend`] seam, ONNX Runtime and tract.
//! - [`pipeline`]: pre/post-processing per task (image classification, raw tensors).
//! - [`engine`]: variant/engine planning and loaded models that run jobs.
//! - [`scheduler`], [`worker`]: bounded per-model queues and the threads that own sessions.
//! - [`intake`]: front-ends (the HTTP/JSON API on a Unix socket); [`client`]: its client.
//! - [`metrics`], [`memory`]: Prometheus text; what the process really uses.
//! - [`job`], [`error`], [`tensor`]: the transport-neutral job, its typed errors and tensors.
//! - [`cli`]: the `inferd` command line.

pub mod backend;
pub mod cli;
pub mod client;
pub mod config;
pub mod engine;
pub mod error;
pub mod intake;
pub mod job;
pub mod manager;
pub mod memory;
pub mod metrics;
pub mod pipeline;
pub mod registry;
pub mod scheduler;
pub mod tensor;
pub mod worker;

use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Registry(#[from] registry::RegistryError),
    #[error(transparent)]
    Socket(#[from] intake::unix::SocketError),
    #[error("cannot listen on TCP {addr}: {message}")]
    Tcp { addr: String, message: String },
    #[error("MQTT: {0}")]
    Mqtt(String),
}

/// Runs the daemon with `config` until `shutdown` completes: loads and
/// validates the registry, listens on the Unix socket (and TCP if
/// configured), and serves. On shutdown it stops accepting, lets in-flight
/// jobs finish within `jobs.drain_timeout_ms` and removes the socket file.
/// The single entry point: `main` passes the signal future, tests their own.
pub async fn run(config: config::Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    run_with_probe(config, shutdown, Arc::new(memory::SystemProbe::default())).await
}

/// [`run`] with the memory probe given (tests pass a fake one to create memory pressure).
pub async fn run_with_probe(
    config: config::Config,
    shutdown: impl Future<Output = ()>,
    probe: Arc<dyn memory::MemoryProbe>,
) -> Result<(), RunError> {
    let registry = registry::Registry::load(&config.registry_path())?;
    let engine = engine::Engine::new(config.clone(), registry);
    let metrics = Arc::new(metrics::Metrics::default());
    let manager = Arc::new(manager::Manager::new(config.memory.clone(), probe, engine.registry_arc()));
    tracing::info!("memory: {}", manager.probe().describe());
    for model in &engine.registry().models {
        let backend = engine.plan(&model.name, &engine::LoadOptions::default());
        match (manager.plan_load(model, None), backend) {
            (Ok(plan), Ok(b)) => tracing::info!(
                model = %model.name,
                variant = %plan.variant,
                backend = %b.backend.backend,
                "registered: {}; {}",
                plan.reason,
                b.backend.reason
            ),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(model = %model.name, "registered but cannot run now: {}", e.message)
            }
        }
    }
    let scheduler = Arc::new(scheduler::Scheduler::new(engine, config.jobs.clone(), metrics, manager));
    let (listener, socket_path) = intake::unix::bind(&config.socket)?;
    let tcp = match &config.socket.tcp {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| RunError::Tcp { addr: addr.clone(), message: e.to_string() })?,
        ),
        None => None,
    };
    let ready = Arc::new(AtomicBool::new(false));
    let app = intake::http::router(intake::http::AppState {
        scheduler: scheduler.clone(),
        ready: ready.clone(),
        max_body_bytes: config.socket.max_body_bytes(),
        limits: config.limits.clone(),
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let mut servers = tokio::task::JoinSet::new();
    servers.spawn(axum::serve(listener, app.clone()).with_graceful_shutdown(stopped(stop_rx.clone())).into_future());
    if let Some(tcp) = tcp {
        tracing::info!(addr = ?tcp.local_addr().ok(), "listening on TCP");
        servers.spawn(axum::serve(tcp, app).with_graceful_shutdown(stopped(stop_rx.clone())).into_future());
    }
    let drain = Duration::from_millis(config.jobs.drain_timeout_ms);
    let mqtt = match &config.mqtt.url {
        Some(_) => {
            intake::mqtt::Broker::parse(&config.mqtt).map_err(RunError::Mqtt)?;
            let task = intake::mqtt::serve(
                config.mqtt.clone(),
                config.limits.clone(),
                scheduler.clone(),
                stop_rx.clone(),
                drain,
            );
            Some(tokio::spawn(task))
        }
        None => None,
    };
    scheduler.start_background(stop_rx.clone());
    ready.store(true, Ordering::SeqCst);
    tracing::info!(socket = %socket_path.display(), models = scheduler.engine().registry().models.len(), "inferd is ready");

    shutdown.await;
    tracing::info!("inferd is stopping: no new requests, finishing those in flight");
    ready.store(false, Ordering::SeqCst);
    intake::unix::remove(&socket_path);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(drain, async {
        while let Some(done) = servers.join_next().await {
            if let Ok(Err(e)) = done {
                tracing::warn!("a listener failed: {e}");
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("requests still in flight after {} ms; closing them", drain.as_millis());
        servers.abort_all();
    }
    if let Some(mqtt) = mqtt {
        match tokio::time::timeout(drain + Duration::from_secs(3), mqtt).await {
            Ok(Ok(Err(e))) => tracing::warn!("MQTT: {e}"),
            Err(_) => tracing::warn!("MQTT did not stop in time"),
            _ => {}
        }
    }
    scheduler.shutdown(drain).await;
    tracing::info!("inferd stopped");
    Ok(())
}
