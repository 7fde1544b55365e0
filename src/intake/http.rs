//! The HTTP/1.1 JSON API, served on the Unix socket (and optionally TCP).
//! Handlers only translate: bodies become jobs for the scheduler, answers
//! and typed errors become JSON. One error shape for every failure:
//! `{"error": {"kind": "...", "message": "..."}}`.

use super::room::NoRoom;
use crate::error::{ErrorKind, InferError};
use crate::job::{JobInput, JobOptions, Payload};
use crate::scheduler::Scheduler;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub scheduler: Arc<Scheduler>,
    /// True once every front-end listens (GET /v1/ready).
    pub ready: Arc<AtomicBool>,
    pub max_body_bytes: usize,
    /// Room for the request bodies held at once (being read, or waiting for
    /// their job), in KiB, taken as the bytes arrive: `socket.max_bodies_mb`.
    pub bodies: Arc<super::room::BodyRoom>,
    /// A request body must arrive within this (`socket.body_timeout_s`).
    pub body_timeout: Duration,
    /// Slowest average a request body may come at after [`BODY_GRACE`], bytes
    /// per second (`socket.min_body_rate_kib_s`; 0: no minimum).
    pub min_body_rate: u64,
    pub limits: crate::config::Limits,
    /// Users allowed to load and unload (empty: anyone on the socket).
    pub admin_uids: Vec<u32>,
    /// The bearer token TCP clients must send.
    pub tcp_token: Option<String>,
}

/// The API's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/ready", get(ready))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{name}", get(get_model))
        // A model may be called "pull": GET still describes it; POST pulls.
        .route("/v1/models/pull", post(pull).get(|app: State<AppState>| get_model(app, Path("pull".to_string()))))
        .route("/v1/models/{name}/infer", post(infer))
        .route("/v1/models/{name}/load", post(load))
        .route("/v1/models/{name}/unload", post(unload))
        .route("/v1/completions", post(super::openai::completions))
        .route("/v1/chat/completions", post(super::openai::chat))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), super::peer::guard))
        .with_state(state)
}

/// The HTTP status that carries an error kind (the API's wire mapping; docs/api.md lists it).
pub fn http_status(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::BadInput => StatusCode::BAD_REQUEST,
        ErrorKind::UnknownModel | ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorKind::Forbidden => StatusCode::FORBIDDEN,
        ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorKind::Overloaded => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::Backend | ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorKind::ModelUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::Poison => StatusCode::UNPROCESSABLE_ENTITY,
    }
}

/// The JSON error response for `e`.
pub fn error_response(e: &InferError) -> Response {
    let status = http_status(e.kind);
    (status, axum::Json(json!({"error": e}))).into_response()
}

fn respond(result: Result<Value, InferError>) -> Response {
    match result {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => error_response(&e),
    }
}

async fn health(State(app): State<AppState>) -> Response {
    let mut v = json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")});
    let metrics = app.scheduler.metrics();
    if let Some(connected) = metrics.mqtt_connected() {
        v["mqtt"] = json!({"connected": connected, "problem": metrics.mqtt_problem()});
    }
    axum::Json(v).into_response()
}

async fn ready(State(app): State<AppState>) -> Response {
    if app.ready.load(Ordering::SeqCst) {
        // Ready while engines build: those models serve on their next provider meanwhile.
        let building = app.scheduler.building_engines();
        let mut v = json!({"ready": true});
        if !building.is_empty() {
            v["building_engines"] = json!(building);
        }
        // Models whose last load failed (they are tried again on their next job),
        // and ONNX Runtime when it failed to load (tried again 10 s later).
        let failed: Vec<Value> = app
            .scheduler
            .reports()
            .into_iter()
            .filter_map(|r| r.error.map(|error| json!({"model": r.name, "error": error})))
            .collect();
        if !failed.is_empty() {
            v["cannot_load"] = json!(failed);
        }
        if let Some(why) = crate::backend::ort::load_failure() {
            v["onnxruntime_error"] = json!(why);
        }
        axum::Json(v).into_response()
    } else {
        error_response(&InferError::unavailable("inferd is starting or stopping"))
    }
}

/// A model as the API shows it: its report (spec, plans, state and queue).
fn model_info(scheduler: &Scheduler, name: &str) -> Result<Value, InferError> {
    scheduler.report(name).map(|r| json!(r))
}

async fn list_models(State(app): State<AppState>) -> Response {
    let models = app.scheduler.reports();
    // `object`/`data` as OpenAI's model list, so its clients can list the models too.
    let data: Vec<Value> =
        models.iter().map(|r| json!({"id": r.name, "object": "model", "owned_by": "inferd", "task": r.task})).collect();
    axum::Json(json!({"models": models, "object": "list", "data": data})).into_response()
}

async fn get_model(State(app): State<AppState>, Path(name): Path<String>) -> Response {
    respond(model_info(&app.scheduler, &name))
}

async fn load(State(app): State<AppState>, Path(name): Path<String>) -> Response {
    let result = app.scheduler.load(&name).await;
    respond(result.and_then(|()| model_info(&app.scheduler, &name)))
}

/// `POST /v1/models/pull` `{"source": "oci://…", "name": "…"}` (admin): the pull's progress as
/// NDJSON lines, then `{"event": "done", "pulled": {…}}` once the model is in the registry the
/// daemon serves, or `{"event": "error", "error": {"kind", "message"}}`.
async fn pull(State(app): State<AppState>, body: Body) -> Response {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct PullRequest {
        source: String,
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        digest: Option<String>,
    }
    let request = match axum::body::to_bytes(body, 64 << 10).await {
        Ok(bytes) => serde_json::from_slice::<PullRequest>(&bytes)
            .map_err(|e| InferError::bad_input(format!("a pull is {{\"source\": \"oci://…\", \"name\": …}}: {e}"))),
        Err(e) => Err(InferError::bad_input(format!("the request body: {e}"))),
    };
    let request = match request {
        Ok(r) => r,
        Err(e) => return error_response(&e),
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let scheduler = app.scheduler.clone();
    tokio::spawn(async move {
        let engine = scheduler.engine();
        let (root, cfg) = (engine.config().pull_dir(&engine.registry().file), engine.config().pull.clone());
        drop(engine);
        let progress = |p: crate::pull::Progress| {
            let _ = tx.send(format!("{}\n", serde_json::to_string(&p).unwrap_or_default()));
        };
        let result = crate::pull::pull(
            &request.source,
            &root,
            &crate::pull::Want { name: request.name.as_deref(), digest: request.digest.as_deref(), reuse: Vec::new() },
            &cfg,
            &progress,
        )
        .await;
        let last = match result {
            Ok(pulled) => match scheduler.reload_registry().await {
                Ok(_) => serde_json::json!({"event": "done", "pulled": pulled}),
                Err(why) => {
                    serde_json::json!({"event": "error", "error": {"kind": "model_unavailable", "message": why}})
                }
            },
            Err(e) => serde_json::json!({"event": "error", "error": {"kind": e.kind, "message": e.message}}),
        };
        let _ = tx.send(format!("{last}\n"));
    });
    let lines = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|line| (Ok::<_, std::convert::Infallible>(bytes::Bytes::from(line)), rx))
    });
    ([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(lines)).into_response()
}

async fn unload(State(app): State<AppState>, Path(name): Path<String>) -> Response {
    let result = app.scheduler.unload(&name).await;
    respond(result.and_then(|()| model_info(&app.scheduler, &name)))
}

async fn metrics(State(app): State<AppState>) -> Response {
    let text = app.scheduler.metrics().render(&app.scheduler.gauges(), app.scheduler.manager().room().ok());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

#[derive(Debug, Deserialize)]
struct InferQuery {
    top_k: Option<usize>,
}

async fn infer(
    State(app): State<AppState>,
    Path(name): Path<String>,
    query: Result<Query<InferQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // Model, queue room and Content-Length are checked before a byte of the body is read.
    let body = match admit(&app, &name, &headers) {
        Ok(()) => read_body(&app, body, &headers).await,
        Err(e) => Err(e),
    };
    let (bytes, _held) = match body {
        Ok(b) => b,
        Err(e) => {
            // Refused before it became a job: counted as the model's outcome all the same.
            let metrics = app.scheduler.metrics();
            match app.scheduler.engine().registry().get(&name) {
                Some(_) => metrics.record_job(&name, &Err::<(), _>(e.clone()), std::time::Duration::ZERO),
                None => metrics.record_error(e.kind),
            }
            return error_response(&e);
        }
    };
    // The content digest marks the job running for the poison-job quarantine: a request
    // that killed the daemon twice in a row, sent again, is answered `poison`.
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let top_k = query.as_ref().ok().and_then(|q| q.top_k).map(|k| k.to_string()).unwrap_or_default();
    let tag = crate::quarantine::Tag::of(
        &name,
        &bytes,
        &[("content-type".into(), content_type.into()), ("top_k".into(), top_k)],
    );
    let prepared = prepare(&app, query, &headers, bytes).await;
    let result = match prepared {
        Ok((input, mut options)) => {
            tag.apply(&mut options);
            app.scheduler.submit(&name, input, options).await
        }
        Err(e) => {
            app.scheduler.metrics().record_error(e.kind);
            Err(e)
        }
    };
    match result {
        Ok(out) => axum::Json(out).into_response(),
        Err(e) => error_response(&e),
    }
}

/// Refuses a request before its body is read: unknown model, full queue, or a
/// `Content-Length` over the limit.
fn admit(app: &AppState, name: &str, headers: &HeaderMap) -> Result<(), InferError> {
    if app.scheduler.engine().registry().get(name).is_none() {
        return Err(InferError::unknown_model(name));
    }
    if declared_length(headers).is_some_and(|n| n > app.max_body_bytes as u64) {
        return Err(body_too_large(app.max_body_bytes));
    }
    app.scheduler.admit(name)
}

/// Turns a request body into a job without touching the engine: content decoded by type.
async fn prepare(
    app: &AppState,
    query: Result<Query<InferQuery>, axum::extract::rejection::QueryRejection>,
    headers: &HeaderMap,
    bytes: axum::body::Bytes,
) -> Result<(JobInput, JobOptions), InferError> {
    let Query(query) = query.map_err(|e| InferError::bad_input(format!("bad query string: {e}")))?;
    let declared = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let (input, mut options) = match Payload::sniff(&bytes, declared, false) {
        Payload::Json => {
            let limits = app.limits.clone();
            tokio::task::spawn_blocking(move || Payload::Json.read(Vec::from(bytes), &limits))
                .await
                .map_err(|e| InferError::internal(format!("request parser failed: {e}")))??
        }
        other => other.read(Vec::from(bytes), &app.limits)?,
    };
    if query.top_k.is_some() {
        options.top_k = query.top_k;
    }
    Ok((input, options))
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok())
}

fn body_too_large(max: usize) -> InferError {
    InferError::new(
        ErrorKind::PayloadTooLarge,
        format!("the request body is over the limit of {} MiB (socket.max_body_mb)", max >> 20),
    )
}

/// Room taken for one request body in `socket.max_bodies_mb`; given back when dropped.
pub(super) type BodyRoom = super::room::BodyShare;

/// A body's first seconds, in which `socket.min_body_rate_kib_s` does not apply yet.
pub(crate) const BODY_GRACE: Duration = Duration::from_secs(5);

/// Which limit ends a body's time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyLimit {
    /// `socket.min_body_rate_kib_s`: too few bytes for the time.
    Rate,
    /// `socket.body_timeout_s`.
    Timeout,
}

/// How long a body that has `received` bytes so far may take in all (time
/// spent waiting for room not counted): [`BODY_GRACE`], plus a second for
/// each `rate` bytes received, never more than `timeout`.
fn body_allowance(received: u64, rate: u64, timeout: Duration) -> (Duration, BodyLimit) {
    if rate == 0 {
        return (timeout, BodyLimit::Timeout);
    }
    let earned = BODY_GRACE.saturating_add(Duration::from_secs_f64(received as f64 / rate as f64));
    if earned < timeout { (earned, BodyLimit::Rate) } else { (timeout, BodyLimit::Timeout) }
}

/// Reads a request body within the limits: a `Content-Length` over the limit
/// is refused before a byte is read; room in `socket.max_bodies_mb` is taken
/// as the bytes arrive (a client that announces a body and sends nothing
/// holds none); the body is cut when it comes slower than
/// `socket.min_body_rate_kib_s` after [`BODY_GRACE`], or takes over
/// `socket.body_timeout_s`. The room is held while the returned guard lives
/// (the caller keeps it until its job ends).
pub(super) async fn read_body(
    app: &AppState,
    mut body: Body,
    headers: &HeaderMap,
) -> Result<(axum::body::Bytes, BodyRoom), InferError> {
    let max = app.max_body_bytes;
    if declared_length(headers).is_some_and(|n| n > max as u64) {
        return Err(body_too_large(max));
    }
    let started = Instant::now();
    let mut waited = Duration::ZERO;
    let room = app.bodies.open();
    let mut held = 0u64;
    let mut parts: Vec<axum::body::Bytes> = Vec::new();
    let mut received = 0usize;
    loop {
        let (allowed, limit) = body_allowance(received as u64, app.min_body_rate, app.body_timeout);
        let deadline = started + waited + allowed;
        let frame = match tokio::time::timeout_at(deadline.into(), body.frame()).await {
            Ok(None) => break,
            Ok(Some(Ok(frame))) => frame,
            Ok(Some(Err(e))) => {
                return Err(InferError::bad_input(format!("the request body could not be read: {e}")));
            }
            Err(_) if limit == BodyLimit::Rate => {
                return Err(InferError::bad_input(format!(
                    "the request body came slower than {} KiB/s (socket.min_body_rate_kib_s): {received} bytes in {:.1} s",
                    app.min_body_rate / 1024,
                    started.elapsed().saturating_sub(waited).as_secs_f64()
                )));
            }
            Err(_) => {
                return Err(InferError::bad_input(format!(
                    "the request body did not arrive within {} s (socket.body_timeout_s)",
                    app.body_timeout.as_secs()
                )));
            }
        };
        let Ok(data) = frame.into_data() else { continue }; // trailers
        if data.is_empty() {
            continue;
        }
        received += data.len();
        if received > max {
            return Err(body_too_large(max));
        }
        let need = (received as u64).div_ceil(1024);
        if need > held {
            let asked = Instant::now();
            let taken = room.take(need - held, started + waited + app.body_timeout).await;
            waited += asked.elapsed();
            match taken {
                Ok(()) => held = need,
                Err(NoRoom::TimedOut) => {
                    return Err(InferError::overloaded(
                        "too many request bodies held at once (socket.max_bodies_mb); try again later",
                    ));
                }
                Err(NoRoom::Evicted) => {
                    return Err(InferError::overloaded(
                        "too many request bodies at once (socket.max_bodies_mb): the room went to uploads \
                         that started earlier; try again later",
                    ));
                }
            }
        }
        parts.push(data);
    }
    room.done();
    let bytes = match parts.len() {
        0 => axum::body::Bytes::new(),
        1 => parts.pop().unwrap_or_default(),
        _ => {
            let mut all = Vec::with_capacity(received);
            for p in &parts {
                all.extend_from_slice(p);
            }
            axum::body::Bytes::from(all)
        }
    };
    Ok((bytes, room))
}

async fn not_found() -> Response {
    error_response(&InferError::new(ErrorKind::NotFound, "no such endpoint; see docs/api.md"))
}

async fn method_not_allowed() -> Response {
    let e = InferError::new(ErrorKind::NotFound, "method not allowed on this endpoint; see docs/api.md");
    (StatusCode::METHOD_NOT_ALLOWED, axum::Json(json!({"error": e}))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_earns_time_by_its_bytes_after_the_grace() {
        let timeout = Duration::from_secs(30);
        let rate = 4 * 1024;
        // Nothing sent: cut when the grace ends.
        assert_eq!(body_allowance(0, rate, timeout), (BODY_GRACE, BodyLimit::Rate));
        // 8 KiB at 4 KiB/s: two more seconds.
        assert_eq!(body_allowance(8 * 1024, rate, timeout), (BODY_GRACE + Duration::from_secs(2), BodyLimit::Rate));
        // Never past the body timeout, however fast.
        assert_eq!(body_allowance(16 << 20, rate, timeout), (timeout, BodyLimit::Timeout));
        // No minimum: only the timeout.
        assert_eq!(body_allowance(0, 0, timeout), (timeout, BodyLimit::Timeout));
        // A timeout shorter than the grace wins.
        assert_eq!(body_allowance(0, rate, Duration::from_secs(2)), (Duration::from_secs(2), BodyLimit::Timeout));
    }
}
