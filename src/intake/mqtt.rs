//! Jobs over MQTT. Devices publish images (or JSON envelopes) to job topics;
//! inferd answers on the request's MQTT 5 response topic (echoing its
//! correlation data and user properties), else the envelope's `reply_to`,
//! else `{prefix}/{node}/results/{model}`.
//!
//! At-least-once: jobs are taken at QoS 1 on a persistent session, and a job
//! is acknowledged only after its result has been handed to the broker, so a
//! job in flight when the daemon dies is redelivered. Redeliveries (see
//! [`super::redelivery`] for what makes a message one) of a job still running
//! or answered recently are not computed twice.
//!
//! Intake is bounded: at most `max_in_flight` jobs and `max_held_mb` of their
//! payloads are held at once; while full, inferd stops reading from the broker
//! (TCP backpressure) instead of buffering. A job for a model whose queue is
//! full gets an `overloaded` error result. A reply route is never a topic
//! inferd consumes, and a result is never taken as a job. The broker being down
//! never stops the daemon: the loop reconnects with capped exponential backoff.

use super::mqtt_client::{
    Ack, Client, Event, Message, Outbox, RESULT_ACK_WAIT, Reply, SHORT_SESSION, Session, connect, run_outbox,
    until_stopped,
};
use super::redelivery::{Answer, Key, Redelivery, Seen};
use super::topics::Topics;
use crate::config::{Broker, Limits, MqttConfig};
use crate::error::{ErrorKind, InferError};
use crate::job::{self, InferRequest, JobInput, JobOptions};
use crate::scheduler::Scheduler;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A job envelope: `{"id", "image_base64" | "inputs", "reply_to", "params"}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    // `id` and `reply_to` are read by the lenient first pass (so even a bad
    // envelope is answered where it asked); listed here so the strict pass accepts them.
    #[serde(default)]
    #[allow(dead_code)]
    id: Option<Value>,
    #[serde(default)]
    image_base64: Option<String>,
    #[serde(default)]
    inputs: Option<BTreeMap<String, crate::tensor::TensorJson>>,
    #[serde(default)]
    text: Option<job::TextInput>,
    #[serde(default)]
    #[allow(dead_code)]
    reply_to: Option<String>,
    #[serde(default)]
    params: Option<JobOptions>,
    /// Text generation: a prompt, or chat messages.
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    messages: Option<Vec<job::ChatMessage>>,
    #[serde(flatten)]
    generation: job::GenerationParams,
    /// Publish the text as it is generated, before the result (`"partial": true`
    /// messages); read by the lenient first pass.
    #[serde(default)]
    #[allow(dead_code)]
    stream: bool,
}

impl Envelope {
    /// The generation request, when the envelope carries a prompt or messages
    /// (with `image_base64`: a camera's question about its picture — the image
    /// goes before the text of the last user message, as in a chat with images).
    fn generation(
        &mut self,
        limits: &Limits,
        raw_image: Option<Vec<u8>>,
    ) -> Option<Result<job::GenerateRequest, InferError>> {
        let mut prompt = match (self.prompt.take(), self.messages.take()) {
            (None, None) => return None,
            (Some(p), None) => job::Prompt::Text(p),
            (None, Some(m)) => job::Prompt::Chat(m),
            (Some(_), Some(_)) => return Some(Err(InferError::bad_input("give prompt or messages, not both"))),
        };
        if self.inputs.is_some() || self.text.is_some() {
            return Some(Err(InferError::bad_input("a prompt comes without inputs or text (an image may come along)")));
        }
        let image = match (raw_image, self.image_base64.take()) {
            (Some(bytes), _) => Some(bytes),
            (None, Some(b64)) => match job::decode_image_base64(&b64, limits) {
                Ok(bytes) => Some(bytes),
                Err(e) => return Some(Err(e)),
            },
            (None, None) => None,
        };
        if let Some(image) = image {
            let mut messages = match prompt {
                job::Prompt::Text(content) => {
                    vec![job::ChatMessage { role: "user".into(), content, images: Vec::new() }]
                }
                job::Prompt::Chat(m) => m,
            };
            match messages.iter_mut().rev().find(|m| m.role == "user") {
                Some(m) => m.images.insert(0, (0, image)),
                None => {
                    return Some(Err(InferError::bad_input("image_base64 goes with a user message; there is none")));
                }
            }
            prompt = job::Prompt::Chat(messages);
        }
        let mut params = std::mem::take(&mut self.generation);
        params.top_k = params.top_k.or(self.params.as_ref().and_then(|p| p.top_k));
        Some(Ok(job::GenerateRequest { prompt, params, stream: None }))
    }
}

/// A job as read from a message: its id and reply route (known even when
/// the payload is bad, so the error can be answered) and the job or why not.
struct ParsedJob {
    id: Option<String>,
    reply_to: Option<String>,
    job: Result<(JobInput, JobOptions), InferError>,
    /// Publish generated text as it comes.
    partials: bool,
    /// The payload is an inferd result (`node` with `result`, `error` or
    /// `partial`), not a job: it is never run or answered.
    is_result: bool,
}

/// The job in an MQTT payload (raw image bytes or a JSON envelope), or why
/// not: what the daemon does with every message, for tools and fuzzing.
pub fn parse_job(payload: &[u8], limits: &Limits, max_payload: usize) -> Result<(JobInput, JobOptions), InferError> {
    parse_payload(payload, &[], limits, max_payload).job
}

/// The MQTT 5 user properties a raw image's question may come in: a
/// camera publishes its JPEG as it is, with `prompt` (or `messages`, JSON)
/// and the generation settings beside it.
const PROMPT_PROPERTIES: &[&str] = &[
    "id",
    "prompt",
    "messages",
    "max_tokens",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "stop",
    "response_format",
    "stream",
];

/// A raw image with a question in its user properties, as a prompt envelope:
/// text properties as they are, the others read as JSON (`max_tokens` `8`,
/// `response_format` `{"type":"json_object"}`, `stream` `true`).
fn prompt_properties(properties: &[(String, String)]) -> Option<Result<Value, InferError>> {
    if !properties.iter().any(|(k, _)| k == "prompt" || k == "messages") {
        return None;
    }
    let mut envelope = serde_json::Map::new();
    for (key, value) in properties.iter().filter(|(k, _)| PROMPT_PROPERTIES.contains(&k.as_str())) {
        let value = match key.as_str() {
            "id" | "prompt" | "stop" => Value::String(value.clone()),
            _ => match serde_json::from_str(value) {
                Ok(v) => v,
                Err(e) => {
                    return Some(Err(InferError::bad_input(format!(
                        "user property '{key}' is not JSON ({e}): {value:?}"
                    ))));
                }
            },
        };
        envelope.insert(key.clone(), value);
    }
    Some(Ok(Value::Object(envelope)))
}

fn parse_payload(payload: &[u8], properties: &[(String, String)], limits: &Limits, max_payload: usize) -> ParsedJob {
    if payload.len() > max_payload {
        let e = InferError::new(
            ErrorKind::PayloadTooLarge,
            format!("the payload is {} bytes, over mqtt.max_payload_mb ({} MiB)", payload.len(), max_payload >> 20),
        );
        return ParsedJob { id: None, reply_to: None, job: Err(e), partials: false, is_result: false };
    }
    if job::Payload::sniff(payload, None, false) != job::Payload::Json {
        if let Some(question) = prompt_properties(properties) {
            return raw_image_with_prompt(payload, question, limits);
        }
        return ParsedJob {
            id: None,
            reply_to: None,
            job: Ok((JobInput::Image(payload.to_vec()), JobOptions::default())),
            partials: false,
            is_result: false,
        };
    }
    // Read id and reply_to leniently first, so even a bad envelope is answered where it asked.
    let loose: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
    let id = loose.get("id").and_then(id_text);
    let reply_to = loose.get("reply_to").and_then(Value::as_str).map(str::to_string);
    let partials = loose.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let is_result = loose.get("node").is_some_and(Value::is_string)
        && ["result", "error", "partial"].iter().any(|k| loose.get(k).is_some());
    let job = serde_json::from_slice::<Envelope>(payload)
        .map_err(|e| {
            InferError::bad_input(format!(
                "invalid job envelope ({e}); expected {{\"id\", \"image_base64\" | \"inputs\" | \"text\" | \"prompt\" | \"messages\", \"reply_to\", \"params\"}}"
            ))
        })
        .and_then(|mut env| {
            if let Some(generation) = env.generation(limits, None) {
                return generation.map(|r| (JobInput::Generate(r), JobOptions::default()));
            }
            let request = InferRequest {
                image_base64: env.image_base64,
                inputs: env.inputs,
                text: env.text,
                top_k: env.params.and_then(|p| p.top_k),
            };
            request.into_job(limits)
        });
    ParsedJob { id, reply_to, job, partials, is_result }
}

/// A raw image whose question came in user properties (see [`prompt_properties`]).
fn raw_image_with_prompt(payload: &[u8], question: Result<Value, InferError>, limits: &Limits) -> ParsedJob {
    let loose = question.as_ref().ok();
    let id = loose.and_then(|q| q.get("id")).and_then(id_text);
    let partials = loose.and_then(|q| q.get("stream")).and_then(Value::as_bool).unwrap_or(false);
    let job = question
        .and_then(|q| {
            serde_json::from_value::<Envelope>(q)
                .map_err(|e| InferError::bad_input(format!("invalid prompt in the user properties ({e})")))
        })
        .and_then(|mut env| match env.generation(limits, Some(payload.to_vec())) {
            Some(r) => r.map(|r| (JobInput::Generate(r), JobOptions::default())),
            None => Err(InferError::internal("a prompt property without a prompt")),
        });
    ParsedJob { id, reply_to: None, job, partials, is_result: false }
}

fn id_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() && s.len() <= 256 => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

struct Ctx {
    /// The intake connection: subscriptions and acknowledgements.
    client: Client,
    outbox: Arc<Outbox>,
    topics: Topics,
    scheduler: Arc<Scheduler>,
    limits: Limits,
    max_payload: usize,
    redelivery: Mutex<Redelivery<Ack>>,
    /// Jobs submitted at once (`max_in_flight`); small jobs read past the gate wait here.
    running: tokio::sync::Semaphore,
}

/// Bytes of answers kept for redeliveries, at most.
const ANSWERS_MAX_BYTES: usize = 16 << 20;

/// Several short sessions in a row mean another client is taking the session.
const SHORT_SESSIONS_FOR_CONFLICT: u32 = 3;
const CONFLICT_CLEARS: Duration = Duration::from_secs(60);

/// Where the answers of a client id are kept across restarts.
fn answers_file(state_dir: Option<&std::path::Path>, client_id: &str) -> Option<std::path::PathBuf> {
    let dir = state_dir?;
    if let Err(e) = std::fs::create_dir_all(dir) {
        tracing::warn!(dir = %dir.display(), "cannot keep MQTT answers across restarts: {e}");
        return None;
    }
    let safe: String = client_id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    Some(dir.join(format!("mqtt-answers-{safe}.jsonl")))
}

/// Connects and serves MQTT jobs until `stop` fires; then waits for jobs in
/// flight (up to `drain`), publishes the offline status and disconnects.
/// Never returns an error for the broker being away: it keeps retrying.
/// Answers for redeliveries are kept in `state_dir` across restarts.
pub async fn serve(
    broker: Broker,
    cfg: MqttConfig,
    limits: Limits,
    scheduler: Arc<Scheduler>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    drain: Duration,
    state_dir: Option<std::path::PathBuf>,
) -> Result<(), String> {
    let node = cfg.node();
    let topics = Topics { prefix: cfg.prefix.clone(), node: node.clone(), group: cfg.group.clone() };
    let client_id = cfg.client_id.clone().unwrap_or_else(|| node.clone());
    let max_payload = (cfg.max_payload_mb as usize).saturating_mul(1 << 20);
    let max_held_jobs = usize::from(cfg.max_in_flight);
    let max_held_bytes = (cfg.max_held_mb as usize).saturating_mul(1 << 20);
    let offline = serde_json::to_vec(&json!({"online": false, "node": node})).unwrap_or_default();
    let link = super::link::start(&broker, &cfg).inspect_err(|e| tracing::error!("MQTT cannot start: {e}"))?;
    let results_link = super::link::start(&broker, &cfg)?;
    let (client, mut events) = connect(
        &cfg,
        broker.v5,
        &link.path,
        &client_id,
        Some((&topics, offline.clone())),
        max_payload,
        Session::Persistent,
    )?;
    let (results, results_events) = connect(
        &cfg,
        broker.v5,
        &results_link.path,
        &format!("{client_id}-results"),
        None,
        max_payload,
        Session::Persistent,
    )?;
    let outbox = Arc::new(Outbox::new(results));
    let max_backoff = Duration::from_secs(cfg.reconnect_max_s.max(1));
    // The results connection outlives the intake: it carries the last results and the offline status.
    let (outbox_stop, outbox_stopped) = tokio::sync::watch::channel(false);
    let outbox_task = tokio::spawn(run_outbox(outbox.clone(), results_events, outbox_stopped, max_backoff));
    let answers = answers_file(state_dir.as_deref(), &client_id);
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        outbox,
        topics,
        scheduler,
        limits,
        max_payload,
        redelivery: Mutex::new(Redelivery::new(cfg.dedup_window, ANSWERS_MAX_BYTES, answers)),
        running: tokio::sync::Semaphore::new(max_held_jobs),
    });
    ctx.scheduler.metrics().set_mqtt_connected(false);
    tracing::info!(broker = %format!("{}:{}", broker.host, broker.port), client_id, node, v5 = broker.v5, "MQTT starting");
    let mut backoff = Duration::from_millis(250);
    let mut status_every = tokio::time::interval(Duration::from_secs(30));
    // The jobs held, and the payload bytes of each.
    let mut jobs = tokio::task::JoinSet::new();
    let mut held: std::collections::HashMap<tokio::task::Id, usize> = std::collections::HashMap::new();
    let mut held_bytes = 0usize;
    let mut connected_at: Option<Instant> = None;
    let mut short_sessions = 0u32;
    let mut stop_while_waiting = stop.clone();
    loop {
        // Full: the link reads nothing more from the broker until a job finishes
        // (TCP backpressure keeps the backlog there, not in this process), while
        // results and acknowledgements still go out.
        let room = jobs.len() < max_held_jobs && held_bytes < max_held_bytes;
        link.set_open(room);
        tokio::select! {
            _ = until_stopped(&mut stop) => break,
            _ = status_every.tick() => {
                // A session that holds a minute ends a suspected conflict.
                if connected_at.is_some_and(|t| t.elapsed() >= CONFLICT_CLEARS) {
                    short_sessions = 0;
                    ctx.scheduler.metrics().set_mqtt_problem(None);
                }
                publish_status(&ctx, true).await
            }
            Some(done) = jobs.join_next_with_id(), if !jobs.is_empty() => {
                let id = done.map_or_else(|e| e.id(), |(id, ())| id);
                held_bytes -= held.remove(&id).unwrap_or(0);
            }
            event = events.poll() => match event {
                Ok(Event::Connected) => {
                    connected_at = Some(Instant::now());
                    ctx.scheduler.metrics().set_mqtt_connected(true);
                    tracing::info!("MQTT connected");
                    for filter in ctx.topics.subscriptions() {
                        if let Err(e) = ctx.client.subscribe(&filter).await {
                            tracing::warn!(filter, "cannot subscribe: {e}");
                        }
                    }
                    publish_status(&ctx, true).await;
                }
                Ok(Event::Message(msg)) => {
                    let ctx = ctx.clone();
                    let bytes = msg.payload.len();
                    held_bytes += bytes;
                    let task = jobs.spawn(handle(ctx, *msg));
                    held.insert(task.id(), bytes);
                }
                Ok(Event::Other | Event::Sent(_) | Event::Acked(_)) => {}
                Err(e) => {
                    ctx.scheduler.metrics().set_mqtt_connected(false);
                    // A session that lived a while resets the backoff; one the broker
                    // keeps closing at once, or hands to another client, does not.
                    let lived = connected_at.take().map(|t| t.elapsed());
                    let taken_over = e.contains("SessionTakenOver");
                    if taken_over || lived.is_some_and(|l| l < SHORT_SESSION) {
                        short_sessions += 1;
                    } else if lived.is_some() {
                        short_sessions = 0;
                        backoff = Duration::from_millis(250);
                    }
                    if taken_over || short_sessions >= SHORT_SESSIONS_FOR_CONFLICT {
                        let problem = format!(
                            "MQTT session conflict: the broker keeps closing client id '{client_id}' soon after it \
                             connects; another client (a second inferd with the same node id?) uses it"
                        );
                        if ctx.scheduler.metrics().mqtt_problem().is_none() {
                            tracing::error!("{problem}; set a unique mqtt.node_id (or mqtt.client_id)");
                        }
                        ctx.scheduler.metrics().set_mqtt_problem(Some(problem));
                        backoff = backoff.max(Duration::from_secs(2));
                    }
                    tracing::warn!("MQTT connection lost: {e}; retrying in {} ms", backoff.as_millis());
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = until_stopped(&mut stop_while_waiting) => break,
                    }
                    backoff = (backoff * 2).min(max_backoff);
                }
            }
        }
    }
    // Finish what was taken (their results and acks still need the event loop to flow).
    let finishing = async {
        while !jobs.is_empty() {
            tokio::select! {
                _ = jobs.join_next() => {}
                r = events.poll() => if r.is_err() { tokio::time::sleep(Duration::from_millis(100)).await },
            }
        }
    };
    if tokio::time::timeout(drain, finishing).await.is_err() {
        tracing::warn!("MQTT jobs still running after {} ms; they will be redelivered", drain.as_millis());
    }
    let _ = ctx.outbox.publish(&ctx.topics.status(), offline, true, None, Duration::from_secs(2)).await;
    ctx.client.disconnect().await;
    let _ = outbox_stop.send(true);
    let _ = outbox_task.await;
    // Let the offline status and the DISCONNECT reach the broker.
    let _ = tokio::time::timeout(Duration::from_secs(2), async { while events.poll().await.is_ok() {} }).await;
    tracing::info!("MQTT stopped");
    Ok(())
}

async fn publish_status(ctx: &Ctx, online: bool) {
    let models: Vec<Value> = ctx
        .scheduler
        .reports()
        .iter()
        .map(|r| {
            json!({"name": r.name, "task": r.task, "state": r.state, "variant": r.variant,
                   "backend": r.backend, "provider": r.provider(), "placement": r.placement()})
        })
        .collect();
    let status = json!({
        "online": online,
        "node": ctx.topics.node,
        "version": env!("CARGO_PKG_VERSION"),
        "models": models,
    });
    if let Err(e) = ctx.outbox.send(&ctx.topics.status(), status.to_string().into_bytes(), true, None) {
        tracing::warn!("cannot publish status: {e}");
    }
}

async fn handle(ctx: Arc<Ctx>, msg: Message) {
    let Some(model) = ctx.topics.job_model(&msg.topic).map(str::to_string) else {
        tracing::debug!(topic = msg.topic, "message on a topic that is not a job topic; acknowledged and ignored");
        let _ = ctx.client.ack(&msg.ack).await;
        return;
    };
    let parsed = parse_payload(&msg.payload, &msg.user_properties, &ctx.limits, ctx.max_payload);
    let id = parsed.id.clone();
    if parsed.is_result {
        tracing::warn!(topic = msg.topic, id, "an inferd result arrived on a job topic; acknowledged and ignored");
        let _ = ctx.client.ack(&msg.ack).await;
        return;
    }
    // The reply route: MQTT 5 response topic, else the envelope's reply_to, else
    // the default; a route inferd may not publish to is answered there with the reason.
    let asked = msg.response_topic.as_ref().or(parsed.reply_to.as_ref());
    let refusal = asked.and_then(|t| ctx.topics.reply_route_refusal(t));
    let topic = match asked {
        Some(t) if refusal.is_none() => t.clone(),
        _ => ctx.topics.result(&model),
    };
    let reply = Reply { topic, correlation: msg.correlation.clone(), user_properties: msg.user_properties.clone() };
    tracing::debug!(id, model, pkid = msg.pkid, dup = msg.dup, bytes = msg.payload.len(), "MQTT job received");
    let key = Key::of(
        id.is_some(),
        msg.qos0,
        msg.pkid,
        &model,
        &reply.topic,
        reply.correlation.as_deref().unwrap_or_default(),
        &msg.payload,
    );
    let seen = ctx.redelivery.lock().unwrap_or_else(|e| e.into_inner()).check(&key, msg.dup, msg.ack.clone());
    match seen {
        Seen::Running => return,
        Seen::Answered(answer) => {
            tracing::debug!(id, "redelivered job already answered; publishing its result again");
            let again = Reply {
                topic: answer.topic,
                correlation: answer.correlation.map(Bytes::from),
                user_properties: answer.user_properties,
            };
            let published =
                ctx.outbox.publish(&again.topic, answer.payload.into_bytes(), false, Some(&again), RESULT_ACK_WAIT);
            if published.await.is_ok() {
                let _ = ctx.client.ack(&msg.ack).await;
            }
            return;
        }
        Seen::New => {}
    }
    let job = match refusal {
        Some(why) => Err(InferError::bad_input(why)),
        None => parsed.job,
    };
    let _running = ctx.running.acquire().await;
    let outcome = match job {
        Err(e) => {
            ctx.scheduler.metrics().record_error(e.kind);
            Err(e)
        }
        Ok((mut input, mut options)) => {
            // The content digest marks the job running for the poison-job quarantine.
            crate::quarantine::Tag::of(&model, &msg.payload, &msg.user_properties).apply(&mut options);
            let partials = match &mut input {
                JobInput::Generate(request) if parsed.partials => {
                    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                    request.stream = Some(tx);
                    Some(tokio::spawn(publish_partials(ctx.clone(), reply.clone(), id.clone(), rx)))
                }
                _ => None,
            };
            let outcome = ctx.scheduler.submit(&model, input, options).await;
            if let Some(p) = partials {
                let _ = p.await; // every partial goes out before the result
            }
            outcome
        }
    };
    let mut answer = match &outcome {
        Ok(out) => serde_json::to_value(out).unwrap_or_default(),
        Err(e) => json!({"model": model, "error": e}),
    };
    answer["id"] = id.clone().map_or(Value::Null, Value::String);
    answer["node"] = Value::String(ctx.topics.node.clone());
    let payload = answer.to_string();
    let published =
        ctx.outbox.publish(&reply.topic, payload.clone().into_bytes(), false, Some(&reply), RESULT_ACK_WAIT).await;
    let kept = match published {
        Ok(()) => Some(Answer {
            topic: reply.topic,
            correlation: reply.correlation.map(|c| c.to_vec()),
            user_properties: reply.user_properties,
            payload,
        }),
        Err(e) => {
            // Not acknowledged: the broker will deliver the job again.
            tracing::warn!(id, "cannot publish the result: {e}");
            None
        }
    };
    let acks = ctx.redelivery.lock().unwrap_or_else(|e| e.into_inner()).finish(&key, kept);
    tracing::debug!(id, acks = acks.len(), "MQTT job answered");
    for ack in acks {
        if let Err(e) = ctx.client.ack(&ack).await {
            tracing::warn!("cannot acknowledge a job: {e}");
        }
    }
}

/// Publishes generated text to the reply topic as it comes, each piece as
/// `{"id", "node", "partial": true, "index", "text"}`, until the sequence ends.
async fn publish_partials(
    ctx: Arc<Ctx>,
    reply: Reply,
    id: Option<String>,
    mut pieces: tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let mut index = 0;
    while let Some(text) = pieces.recv().await {
        let message = json!({"id": id, "node": ctx.topics.node, "partial": true, "index": index, "text": text});
        // Never waits: a partial that finds the request queue full is dropped (the result is not).
        if let Err(e) = ctx.outbox.send(&reply.topic, message.to_string().into_bytes(), false, Some(&reply)) {
            tracing::debug!(id, "partial result dropped: {e}");
        }
        index += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_plain(payload: &[u8], limits: &Limits, max_payload: usize) -> ParsedJob {
        parse_payload(payload, &[], limits, max_payload)
    }

    #[test]
    fn a_raw_image_with_a_prompt_in_its_user_properties_is_a_chat_about_it() {
        let limits = Limits::default();
        let props = |kv: &[(&str, &str)]| kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>();
        let jpeg = b"\xFF\xD8\xFFjpeg bytes";
        let p = parse_payload(
            jpeg,
            &props(&[
                ("prompt", "Is the gate open?"),
                ("max_tokens", "8"),
                ("stream", "true"),
                ("id", "cam-1"),
                ("camera", "7"),
            ]),
            &limits,
            1 << 20,
        );
        assert_eq!((p.id.as_deref(), p.partials), (Some("cam-1"), true));
        let Ok((JobInput::Generate(r), _)) = p.job else { panic!("not a generation job") };
        assert_eq!(r.params.max_tokens, Some(8));
        let job::Prompt::Chat(m) = r.prompt else { panic!("not a chat") };
        assert_eq!((m[0].content.as_str(), m[0].images[0].1.as_slice()), ("Is the gate open?", &jpeg[..]));
        let p = parse_payload(
            jpeg,
            &props(&[("prompt", "Gate?"), ("response_format", r#"{"type":"json_object"}"#)]),
            &limits,
            1 << 20,
        );
        let Ok((JobInput::Generate(r), _)) = p.job else { panic!("not a generation job") };
        assert_eq!(r.params.response_format.as_deref(), Some(&json!({"type": "json_object"})));
        // Without a prompt property the image is an image job, as before.
        assert!(matches!(
            parse_payload(jpeg, &props(&[("camera", "7")]), &limits, 1 << 20).job,
            Ok((JobInput::Image(_), _))
        ));
        let e =
            parse_payload(jpeg, &props(&[("prompt", "x"), ("max_tokens", "many")]), &limits, 1 << 20).job.unwrap_err();
        assert!(e.message.contains("user property 'max_tokens' is not JSON"), "{e}");
    }

    #[test]
    fn payloads_become_jobs_or_errors_that_keep_their_id_and_route() {
        let limits = Limits::default();
        let p = parse_plain(b"\xFF\xD8\xFFjpeg bytes", &limits, 1 << 20);
        assert!(matches!(p.job, Ok((JobInput::Image(_), _))));
        let p = parse_plain(
            br#"{"id": 7, "reply_to": "a/b", "image_base64": "!!", "params": {"top_k": 2}}"#,
            &limits,
            1 << 20,
        );
        assert_eq!((p.id.as_deref(), p.reply_to.as_deref()), (Some("7"), Some("a/b")));
        assert!(p.job.unwrap_err().message.contains("base64"));
        let p = parse_plain(br#"{"id": "x", "colour": 1}"#, &limits, 1 << 20);
        assert_eq!(p.id.as_deref(), Some("x"));
        assert!(p.job.unwrap_err().message.contains("invalid job envelope"));
        let p = parse_plain(&[0u8; 2048], &limits, 1024);
        assert_eq!(p.job.unwrap_err().kind, ErrorKind::PayloadTooLarge);
    }

    #[test]
    fn a_prompt_envelope_carries_the_shared_generation_params_and_unknown_fields_are_refused() {
        let limits = Limits::default();
        let p = parse_plain(
            br#"{"prompt": "hi", "max_tokens": 3, "temperature": 0, "stop": ["x"], "params": {"top_k": 2}}"#,
            &limits,
            1 << 20,
        );
        let Ok((JobInput::Generate(r), _)) = p.job else { panic!("not a generation job") };
        assert_eq!(
            r.params,
            job::GenerationParams {
                max_tokens: Some(3),
                temperature: Some(0.0),
                top_k: Some(2),
                stop: vec!["x".into()],
                ..Default::default()
            }
        );
        let p = parse_plain(br#"{"prompt": "hi", "max_tokenz": 3}"#, &limits, 1 << 20);
        let e = p.job.unwrap_err();
        assert!(e.message.contains("unknown field `max_tokenz`"), "{e}");
    }

    #[test]
    fn a_prompt_with_an_image_becomes_a_user_message_with_the_image_first() {
        let limits = Limits::default();
        // "aGVsbG8=" is b"hello": the bytes are carried as sent (the model's task reads them).
        let p = parse_plain(br#"{"prompt": "Is the gate open?", "image_base64": "aGVsbG8="}"#, &limits, 1 << 20);
        let Ok((JobInput::Generate(r), _)) = p.job else { panic!("not a generation job") };
        let job::Prompt::Chat(m) = r.prompt else { panic!("not a chat") };
        assert_eq!((m.len(), m[0].role.as_str(), m[0].content.as_str()), (1, "user", "Is the gate open?"));
        assert_eq!(m[0].images, vec![(0, b"hello".to_vec())]);
        let p = parse_plain(
            br#"{"messages": [{"role": "system", "content": "Answer yes or no."}, {"role": "user", "content": "Gate?"}], "image_base64": "aGVsbG8="}"#,
            &limits,
            1 << 20,
        );
        let Ok((JobInput::Generate(r), _)) = p.job else { panic!("not a generation job") };
        let job::Prompt::Chat(m) = r.prompt else { panic!("not a chat") };
        assert!(m[0].images.is_empty() && m[1].images.len() == 1);
        for (payload, words) in [
            (&br#"{"prompt": "x", "image_base64": "!!"}"#[..], "image_base64 is not valid base64"),
            (br#"{"messages": [{"role": "system", "content": "x"}], "image_base64": "aGVsbG8="}"#, "there is none"),
            (br#"{"prompt": "x", "text": "y"}"#, "a prompt comes without inputs or text"),
        ] {
            let e = parse_plain(payload, &limits, 1 << 20).job.unwrap_err();
            assert!(e.message.contains(words), "{e}");
        }
    }
}
