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
//! - [`job`], [`error`], [`tensor`]: the transport-neutral job, its typed errors and tensors.
//! - [`cli`]: the `inferd` command line.

pub mod backend;
pub mod cli;
pub mod config;
pub mod engine;
pub mod error;
pub mod job;
pub mod pipeline;
pub mod registry;
pub mod tensor;

use std::future::Future;

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Registry(#[from] registry::RegistryError),
}

/// Runs the daemon with `config` until `shutdown` completes: loads and
/// validates the registry, plans every model and serves until told to stop.
/// The single entry point: `main` passes the signal future, tests their own.
pub async fn run(
    config: config::Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let registry = registry::Registry::load(&config.registry_path())?;
    let engine = engine::Engine::new(config, registry);
    for model in &engine.registry().models {
        match engine.plan(&model.name, &engine::LoadOptions::default()) {
            Ok(plan) => tracing::info!(
                model = %plan.model,
                variant = %plan.variant,
                backend = %plan.backend.backend,
                "registered ({}; {})",
                plan.variant_reason,
                plan.backend.reason
            ),
            Err(e) => {
                tracing::warn!(model = %model.name, "registered but cannot run: {}", e.message)
            }
        }
    }
    tracing::info!(models = engine.registry().models.len(), "inferd is up");
    shutdown.await;
    tracing::info!("inferd is stopping");
    Ok(())
}
