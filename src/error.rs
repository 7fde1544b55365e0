//! The wire-level error every front-end speaks: a kind (what went wrong, as a
//! client can act on it) and a message (why, in words). Engine- and
//! layer-specific errors are converted into this where they leave their module.

use serde::{Deserialize, Serialize};
use std::fmt;

/// What went wrong, as a client can act on it. Front-ends map each kind to
/// their own wire format (HTTP status, MQTT error reply, CLI exit code).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request itself is wrong (undecodable image, wrong tensor shape...).
    BadInput,
    /// No model of that name is registered.
    UnknownModel,
    /// The request body is over the configured limit.
    PayloadTooLarge,
    /// No such endpoint (or method) in the API.
    NotFound,
    /// The request lacks the credentials the endpoint needs (TCP bearer token).
    Unauthorized,
    /// The caller may not do this (admin endpoints limited to `socket.admin_uids`).
    Forbidden,
    /// A queue is full; try again later.
    Overloaded,
    /// The model exists but cannot be loaded or run here (file, runtime, memory).
    ModelUnavailable,
    /// The inference engine failed while running a valid request.
    Backend,
    /// The job did not finish in time.
    Timeout,
    /// The job was running at two deaths of the daemon in a row: it is never run again.
    Poison,
    /// A bug in inferd.
    Internal,
}

impl ErrorKind {
    /// Every kind, for metrics that list them all.
    pub const ALL: [ErrorKind; 12] = [
        ErrorKind::BadInput,
        ErrorKind::UnknownModel,
        ErrorKind::PayloadTooLarge,
        ErrorKind::NotFound,
        ErrorKind::Unauthorized,
        ErrorKind::Forbidden,
        ErrorKind::Overloaded,
        ErrorKind::ModelUnavailable,
        ErrorKind::Backend,
        ErrorKind::Timeout,
        ErrorKind::Poison,
        ErrorKind::Internal,
    ];

    /// The snake_case name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::BadInput => "bad_input",
            ErrorKind::UnknownModel => "unknown_model",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::ModelUnavailable => "model_unavailable",
            ErrorKind::Backend => "backend",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Poison => "poison",
            ErrorKind::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A typed failure of one job: the kind plus a human-readable reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct InferError {
    pub kind: ErrorKind,
    pub message: String,
}

impl InferError {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        InferError { kind, message: message.into() }
    }

    /// The request is wrong: `message` says how.
    pub fn bad_input(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadInput, message)
    }

    /// No model called `name` is registered.
    pub fn unknown_model(name: &str) -> Self {
        Self::new(ErrorKind::UnknownModel, format!("no model named '{name}' is registered"))
    }

    /// The model cannot be loaded or run here.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::ModelUnavailable, message)
    }

    /// The job was not answered in time.
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Timeout, message)
    }

    /// A queue is full.
    pub fn overloaded(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Overloaded, message)
    }

    /// A bug or a broken invariant in inferd.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    /// The job killed the daemon twice in a row: refused for good.
    pub fn poison(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Poison, message)
    }

    /// The engine failed on a valid request.
    pub fn backend(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Backend, message)
    }
}
