//! inferd: an inference daemon for edge boxes. ONNX models run on ONNX
//! Runtime (CUDA, TensorRT, CoreML or CPU) or on tract where ONNX Runtime is
//! absent; jobs come over MQTT and a local Unix socket.
//!
//! Map of the modules (docs/DESIGN.md has the layers and the rules):
//! - [`daemon`]: the daemon assembled (front-ends, scheduler, reloads, watchdog); [`run_with`].
//! - [`config`]: defaults → TOML file → `INFERD_*` environment; knows no front-end.
//! - [`registry`]: models.json, validated, with JSON paths in every error; a
//!   model's task section is read by its task.
//! - [`pipeline`]: the task interface (`TaskSpec`, `Prepare`, `Pipeline`,
//!   `Stepper`) and one private module per task (classification, detection,
//!   embeddings, OCR, document fields, text generation, raw tensors), listed in `pipeline::TASKS`.
//! - [`backend`]: the [`backend::InferenceBackend`] seam, ONNX Runtime and tract; knows no task.
//! - [`engine`]: loading (the variant from the [`manager`]) and loaded models that run jobs.
//! - `scheduler`, `worker` (crate-private): admission, bounded per-model queues,
//!   preparation on the decode threads, and the threads that own sessions;
//!   `quarantine` (crate-private): poison jobs, refused after two deaths in a row.
//! - [`report`]: the one description of a model that every front-end renders.
//! - [`manager`], [`memory`]: which variant fits, evictions, swaps; what the process really uses.
//! - [`intake`]: front-ends — the HTTP/JSON and OpenAI-style API on the Unix socket (and
//!   TCP) with its connection limits, MQTT (topics, the broker link, redeliveries);
//!   [`client`]: the socket API's client.
//! - [`pull`]: a model's files from an OCI registry into `models.d/`, verified and resumable;
//!   [`fleet`]: desired state over MQTT (signed documents, merged layers), applied with
//!   checks, smoke tests, a journaled swap and rollback, and the state reported.
//! - [`job`], [`error`], [`tensor`]: the transport-neutral job (inputs, generation
//!   settings, the payload sniffer, results), its typed errors and tensors.
//! - `metrics` (crate-private): Prometheus text; [`systemd`]: readiness, status,
//!   watchdog and socket activation.
//! - [`cli`], [`bench`]: the `inferd` command line and its benchmark.

pub mod backend;
pub mod bench;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod error;
pub mod fleet;
pub mod intake;
pub mod job;
pub mod manager;
pub mod memory;
pub(crate) mod metrics;
pub mod pipeline;
pub mod pull;
pub(crate) mod quarantine;
pub mod registry;
pub mod report;
pub(crate) mod scheduler;
pub mod systemd;
pub mod tensor;
pub mod tls;
pub(crate) mod worker;

pub use daemon::{Reload, RunError, run, run_with, run_with_probe};
