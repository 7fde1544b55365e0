//! inferd: an inference daemon for edge boxes. ONNX models run on ONNX
//! Runtime (CUDA, TensorRT, CoreML or CPU) or on tract where ONNX Runtime is
//! absent; jobs come over MQTT and a local Unix socket.
//!
//! Map of the modules:
//! - [`daemon`]: the daemon assembled (front-ends, scheduler, reloads, watchdog); [`run_with`].
//! - [`config`]: defaults → TOML file → `INFERD_*` environment.
//! - [`registry`]: models.json, validated, with JSON paths in every error.
//! - [`backend`]: the [`backend::InferenceBackend`] seam, ONNX Runtime and tract.
//! - [`pipeline`]: one module per task (classification, detection, OCR, document
//!   fields, embeddings, text generation, raw tensors): spec checks, preparation, pipeline.
//! - [`engine`]: variant/engine planning and loaded models that run jobs.
//! - [`scheduler`], [`worker`]: bounded per-model queues and the threads that own sessions.
//! - [`intake`]: front-ends — the HTTP/JSON and OpenAI-style API on the Unix socket (and
//!   TCP) with its connection limits, MQTT (topics, the broker link, redeliveries);
//!   [`client`]: the socket API's client.
//! - [`metrics`], [`memory`]: Prometheus text; what the process really uses.
//! - [`job`], [`error`], [`tensor`]: the transport-neutral job, its typed errors and tensors.
//! - [`systemd`]: readiness, status, watchdog and socket activation under systemd.
//! - [`cli`], [`bench`]: the `inferd` command line and its benchmark.

pub mod backend;
pub mod bench;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod error;
pub mod intake;
pub mod job;
pub mod manager;
pub mod memory;
pub(crate) mod metrics;
pub mod pipeline;
pub mod registry;
pub mod report;
pub(crate) mod scheduler;
pub mod systemd;
pub mod tensor;
pub(crate) mod worker;

pub use daemon::{Reload, RunError, run, run_with, run_with_probe};
