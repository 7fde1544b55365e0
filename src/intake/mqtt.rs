//! Jobs over MQTT. Devices publish images (or JSON envelopes) to job topics;
//! inferd answers on the request's MQTT 5 response topic (echoing its
//! correlation data and user properties), else the envelope's `reply_to`,
//! else `{prefix}/{node}/results/{model}`.
//!
//! At-least-once: jobs are taken at QoS 1 on a persistent session, and a job
//! is acknowledged only after its result has been handed to the broker, so a
//! job in flight when the daemon dies is redelivered. Redeliveries of a job
//! still running, or of a job id answered recently, are not computed twice.
//! At most `max_in_flight` jobs run at once (advertised as MQTT 5
//! receive-maximum, so the broker holds the rest); a job for a model whose
//! queue is full gets an `overloaded` error result. The broker being down
//! never stops the daemon: the loop reconnects with capped exponential backoff.

use super::topics::{Topics, valid_reply_topic};
use crate::config::{Limits, MqttConfig};
use crate::error::{ErrorKind, InferError};
use crate::job::{self, InferRequest, JobInput, JobOptions};
use crate::scheduler::Scheduler;
use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5 as m5;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;

/// Where the broker is and how to reach it, parsed from the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broker {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    pub v5: bool,
}

impl Broker {
    /// Parses `mqtt.url` (`mqtt://host[:port]`, `mqtts://host[:port]`) and `mqtt.protocol`.
    pub fn parse(cfg: &MqttConfig) -> Result<Broker, String> {
        let url = cfg.url.as_deref().ok_or("mqtt.url is not set")?;
        let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("mqtt://") {
            (false, r)
        } else {
            return Err(format!("mqtt.url '{url}' must start with mqtt:// or mqtts://"));
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || rest.starts_with('[') => {
                (h, p.parse().map_err(|_| format!("mqtt.url '{url}': bad port '{p}'"))?)
            }
            _ => (rest, if tls { 8883 } else { 1883 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("mqtt.url '{url}' has no host"));
        }
        let v5 = match cfg.protocol.as_str() {
            "5" | "5.0" | "v5" => true,
            "3.1.1" | "4" | "v3.1.1" => false,
            other => return Err(format!("mqtt.protocol '{other}' is not 5 or 3.1.1")),
        };
        if tls && cfg.ca_file.is_none() {
            return Err("mqtt.url is mqtts:// but mqtt.ca_file is not set".into());
        }
        if cfg.client_cert.is_some() != cfg.client_key.is_some() {
            return Err("mqtt.client_cert and mqtt.client_key go together".into());
        }
        if cfg.max_in_flight == 0 || cfg.max_payload_mb == 0 {
            return Err("mqtt.max_in_flight and mqtt.max_payload_mb must be above 0".into());
        }
        Ok(Broker { host: host.to_string(), port, tls, v5 })
    }
}

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
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<Vec<String>>,
    /// Publish the text as it is generated, before the result (`"partial": true`
    /// messages); read by the lenient first pass.
    #[serde(default)]
    #[allow(dead_code)]
    stream: bool,
}

impl Envelope {
    /// The generation request, when the envelope carries a prompt or messages.
    fn generation(&mut self) -> Option<Result<job::GenerateRequest, InferError>> {
        let prompt = match (self.prompt.take(), self.messages.take()) {
            (None, None) => return None,
            (Some(p), None) => job::Prompt::Text(p),
            (None, Some(m)) => job::Prompt::Chat(m),
            (Some(_), Some(_)) => return Some(Err(InferError::bad_input("give prompt or messages, not both"))),
        };
        if self.image_base64.is_some() || self.inputs.is_some() || self.text.is_some() {
            return Some(Err(InferError::bad_input("a prompt comes alone, without image_base64, inputs or text")));
        }
        Some(Ok(job::GenerateRequest {
            prompt,
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_k: self.params.as_ref().and_then(|p| p.top_k),
            top_p: self.top_p,
            seed: self.seed,
            stop: self.stop.take().unwrap_or_default(),
            stream: None,
        }))
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
}

/// The job in an MQTT payload (raw image bytes or a JSON envelope), or why
/// not: what the daemon does with every message, for tools and fuzzing.
pub fn parse_job(payload: &[u8], limits: &Limits, max_payload: usize) -> Result<(JobInput, JobOptions), InferError> {
    parse_payload(payload, limits, max_payload).job
}

fn parse_payload(payload: &[u8], limits: &Limits, max_payload: usize) -> ParsedJob {
    if payload.len() > max_payload {
        let e = InferError::new(
            ErrorKind::PayloadTooLarge,
            format!("the payload is {} bytes, over mqtt.max_payload_mb ({} MiB)", payload.len(), max_payload >> 20),
        );
        return ParsedJob { id: None, reply_to: None, job: Err(e), partials: false };
    }
    if !job::looks_like_json(payload) {
        return ParsedJob {
            id: None,
            reply_to: None,
            job: Ok((JobInput::Image(payload.to_vec()), JobOptions::default())),
            partials: false,
        };
    }
    // Read id and reply_to leniently first, so even a bad envelope is answered where it asked.
    let loose: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
    let id = loose.get("id").and_then(id_text);
    let reply_to = loose.get("reply_to").and_then(Value::as_str).map(str::to_string);
    let partials = loose.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let job = serde_json::from_slice::<Envelope>(payload)
        .map_err(|e| {
            InferError::bad_input(format!(
                "invalid job envelope ({e}); expected {{\"id\", \"image_base64\" | \"inputs\" | \"text\" | \"prompt\" | \"messages\", \"reply_to\", \"params\"}}"
            ))
        })
        .and_then(|mut env| {
            if let Some(generation) = env.generation() {
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
    ParsedJob { id, reply_to, job, partials }
}

fn id_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() && s.len() <= 256 => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A received job message, whichever protocol version carried it.
struct Message {
    topic: String,
    payload: Bytes,
    response_topic: Option<String>,
    correlation: Option<Bytes>,
    user_properties: Vec<(String, String)>,
    dup: bool,
    pkid: u16,
    ack: Ack,
}

/// What acknowledging a message needs.
#[derive(Clone)]
enum Ack {
    V5(m5::Publish),
    V4(rumqttc::Publish),
}

/// Where a result goes: topic, plus the MQTT 5 correlation data and user
/// properties of the request, echoed.
#[derive(Debug, Clone, Default)]
struct Reply {
    topic: String,
    correlation: Option<Bytes>,
    user_properties: Vec<(String, String)>,
}

/// The MQTT client of either protocol version.
#[derive(Clone)]
enum Client {
    V5(rumqttc::v5::AsyncClient),
    V4(rumqttc::AsyncClient),
}

enum EventLoop {
    V5(Box<rumqttc::v5::EventLoop>),
    V4(Box<rumqttc::EventLoop>),
}

enum Event {
    Connected,
    Message(Box<Message>),
    Other,
}

impl Client {
    async fn publish(&self, topic: &str, payload: Vec<u8>, retain: bool, reply: Option<&Reply>) -> Result<(), String> {
        match self {
            Client::V5(c) => {
                let props = m5::PublishProperties {
                    correlation_data: reply.and_then(|r| r.correlation.clone()),
                    user_properties: reply.map(|r| r.user_properties.clone()).unwrap_or_default(),
                    content_type: Some("application/json".into()),
                    ..Default::default()
                };
                c.publish_with_properties(topic, rumqttc::v5::mqttbytes::QoS::AtLeastOnce, retain, payload, props)
                    .await
                    .map_err(|e| e.to_string())
            }
            Client::V4(c) => {
                c.publish(topic, rumqttc::QoS::AtLeastOnce, retain, payload).await.map_err(|e| e.to_string())
            }
        }
    }

    async fn ack(&self, ack: &Ack) -> Result<(), String> {
        match (self, ack) {
            (Client::V5(c), Ack::V5(p)) => c.ack(p).await.map_err(|e| e.to_string()),
            (Client::V4(c), Ack::V4(p)) => c.ack(p).await.map_err(|e| e.to_string()),
            _ => Err("acknowledgement of another protocol version".into()),
        }
    }

    async fn subscribe(&self, filter: &str) -> Result<(), String> {
        match self {
            Client::V5(c) => {
                c.subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce).await.map_err(|e| e.to_string())
            }
            Client::V4(c) => c.subscribe(filter, rumqttc::QoS::AtLeastOnce).await.map_err(|e| e.to_string()),
        }
    }

    async fn disconnect(&self) {
        let _ = match self {
            Client::V5(c) => c.disconnect().await.map_err(|e| e.to_string()),
            Client::V4(c) => c.disconnect().await.map_err(|e| e.to_string()),
        };
    }
}

impl EventLoop {
    async fn poll(&mut self) -> Result<Event, String> {
        match self {
            EventLoop::V5(l) => match l.poll().await.map_err(|e| e.to_string())? {
                rumqttc::v5::Event::Incoming(m5::Packet::ConnAck(_)) => Ok(Event::Connected),
                rumqttc::v5::Event::Incoming(m5::Packet::Publish(p)) => {
                    let props = p.properties.clone().unwrap_or_default();
                    let mut ack = p.clone();
                    ack.payload = Bytes::new();
                    Ok(Event::Message(Box::new(Message {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: p.payload,
                        response_topic: props.response_topic,
                        correlation: props.correlation_data,
                        user_properties: props.user_properties,
                        dup: p.dup,
                        pkid: p.pkid,
                        ack: Ack::V5(ack),
                    })))
                }
                _ => Ok(Event::Other),
            },
            EventLoop::V4(l) => match l.poll().await.map_err(|e| e.to_string())? {
                rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)) => Ok(Event::Connected),
                rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => {
                    let mut ack = p.clone();
                    ack.payload = Bytes::new();
                    Ok(Event::Message(Box::new(Message {
                        topic: p.topic.clone(),
                        payload: p.payload,
                        response_topic: None,
                        correlation: None,
                        user_properties: Vec::new(),
                        dup: p.dup,
                        pkid: p.pkid,
                        ack: Ack::V4(ack),
                    })))
                }
                _ => Ok(Event::Other),
            },
        }
    }
}

/// Remembers jobs in flight and recently answered, by envelope id, so a
/// redelivery is neither computed twice nor lost.
#[derive(Default)]
struct Dedup {
    window: usize,
    /// id → acknowledgements waiting for the running job (the first is the job's own).
    running: HashMap<String, Vec<Ack>>,
    /// Packet ids of messages still unacknowledged (a DUP redelivery of one of these is the same job).
    running_pkids: HashMap<u16, Vec<Ack>>,
    /// id → (reply route, result payload) of recent answers.
    answered: HashMap<String, (Reply, Vec<u8>)>,
    order: VecDeque<String>,
}

enum Seen {
    /// A new job: run it.
    New,
    /// The same job is running: its acknowledgement will be sent when it finishes.
    Running,
    /// Answered recently: publish this again and acknowledge.
    Answered(Reply, Vec<u8>),
}

impl Dedup {
    fn check(&mut self, id: Option<&str>, msg: &Message) -> Seen {
        if let Some(id) = id {
            if let Some((reply, payload)) = self.answered.get(id) {
                return Seen::Answered(reply.clone(), payload.clone());
            }
            if let Some(waiting) = self.running.get_mut(id) {
                waiting.push(msg.ack.clone());
                return Seen::Running;
            }
            self.running.insert(id.to_string(), vec![msg.ack.clone()]);
            return Seen::New;
        }
        if msg.dup
            && let Some(waiting) = self.running_pkids.get_mut(&msg.pkid)
        {
            waiting.push(msg.ack.clone());
            return Seen::Running;
        }
        self.running_pkids.insert(msg.pkid, vec![msg.ack.clone()]);
        Seen::New
    }

    /// The job finished: remember its answer; returns every acknowledgement to send.
    fn finish(&mut self, id: Option<&str>, pkid: u16, answer: (Reply, Vec<u8>)) -> Vec<Ack> {
        match id {
            Some(id) => {
                let acks = self.running.remove(id).unwrap_or_default();
                if self.window > 0 {
                    self.answered.insert(id.to_string(), answer);
                    self.order.push_back(id.to_string());
                    while self.order.len() > self.window {
                        if let Some(old) = self.order.pop_front() {
                            self.answered.remove(&old);
                        }
                    }
                }
                acks
            }
            None => self
                .running_pkids
                .remove(&pkid)
                .map(|mut acks| {
                    acks.truncate(1); // redeliveries share the packet id: one PUBACK answers them all
                    acks
                })
                .unwrap_or_default(),
        }
    }
}

struct Ctx {
    client: Client,
    topics: Topics,
    scheduler: Arc<Scheduler>,
    limits: Limits,
    max_payload: usize,
    in_flight: Arc<Semaphore>,
    dedup: Mutex<Dedup>,
}

/// Connects and serves MQTT jobs until `stop` fires; then waits for jobs in
/// flight (up to `drain`), publishes the offline status and disconnects.
/// Never returns an error for the broker being away: it keeps retrying.
pub async fn serve(
    cfg: MqttConfig,
    limits: Limits,
    scheduler: Arc<Scheduler>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    drain: Duration,
) -> Result<(), String> {
    let broker = Broker::parse(&cfg)?;
    let node = cfg.node();
    let topics = Topics { prefix: cfg.prefix.clone(), node: node.clone(), group: cfg.group.clone() };
    let client_id = cfg.client_id.clone().unwrap_or_else(|| node.clone());
    let max_payload = (cfg.max_payload_mb as usize).saturating_mul(1 << 20);
    let offline = serde_json::to_vec(&json!({"online": false, "node": node})).unwrap_or_default();
    let (client, mut events) = connect(&cfg, &broker, &client_id, &topics, offline.clone(), max_payload)?;
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        topics,
        scheduler,
        limits,
        max_payload,
        in_flight: Arc::new(Semaphore::new(cfg.max_in_flight as usize)),
        dedup: Mutex::new(Dedup { window: cfg.dedup_window, ..Default::default() }),
    });
    ctx.scheduler.metrics().set_mqtt_connected(false);
    tracing::info!(broker = %format!("{}:{}", broker.host, broker.port), client_id, node, v5 = broker.v5, "MQTT starting");
    let mut backoff = Duration::from_millis(250);
    let max_backoff = Duration::from_secs(cfg.reconnect_max_s.max(1));
    let mut status_every = tokio::time::interval(Duration::from_secs(30));
    let mut jobs = tokio::task::JoinSet::new();
    let mut stop_while_waiting = stop.clone();
    loop {
        tokio::select! {
            _ = until_stopped(&mut stop) => break,
            _ = status_every.tick() => publish_status(&ctx, true).await,
            Some(_) = jobs.join_next(), if !jobs.is_empty() => {}
            event = events.poll() => match event {
                Ok(Event::Connected) => {
                    backoff = Duration::from_millis(250);
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
                    jobs.spawn(async move { handle(ctx, *msg).await });
                }
                Ok(Event::Other) => {}
                Err(e) => {
                    ctx.scheduler.metrics().set_mqtt_connected(false);
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
    let _ = ctx.client.publish(&ctx.topics.status(), offline, true, None).await;
    ctx.client.disconnect().await;
    // Let the offline status and the DISCONNECT reach the broker.
    let _ = tokio::time::timeout(Duration::from_secs(2), async { while events.poll().await.is_ok() {} }).await;
    tracing::info!("MQTT stopped");
    Ok(())
}

/// Completes when `stop` turns true (or its sender is gone), holding no borrow afterwards.
async fn until_stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}

fn connect(
    cfg: &MqttConfig,
    broker: &Broker,
    client_id: &str,
    topics: &Topics,
    offline: Vec<u8>,
    max_payload: usize,
) -> Result<(Client, EventLoop), String> {
    let password = cfg.password().map_err(|e| e.to_string())?;
    let transport = if broker.tls { Some(tls_transport(cfg)?) } else { None };
    let keep_alive = Duration::from_secs(cfg.keep_alive_s.max(5));
    // Payloads up to twice the limit still arrive, so they can be answered
    // with an error; larger packets the broker drops (MQTT 5 maximum packet size).
    let max_packet = max_payload.saturating_mul(2).saturating_add(64 << 10);
    if broker.v5 {
        let mut o = rumqttc::v5::MqttOptions::new(client_id, &broker.host, broker.port);
        o.set_keep_alive(keep_alive)
            .set_clean_start(false)
            .set_session_expiry_interval(Some(cfg.session_expiry_s))
            .set_receive_maximum(Some(cfg.max_in_flight))
            // rumqttc keeps a slot per outgoing packet id up to this limit, filled at
            // connect: the default (65535) costs ~14 MB of RSS for nothing.
            .set_outgoing_inflight_upper_limit(OUTGOING_IN_FLIGHT)
            .set_max_packet_size(Some(u32::try_from(max_packet).unwrap_or(u32::MAX)))
            .set_manual_acks(true)
            .set_last_will(m5::LastWill::new(
                topics.status(),
                offline,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                true,
                None,
            ));
        if let Some(user) = &cfg.username {
            o.set_credentials(user.clone(), password.unwrap_or_default());
        }
        if let Some(t) = transport {
            o.set_transport(t);
        }
        o.set_network_options(no_delay());
        let (c, l) = rumqttc::v5::AsyncClient::new(o, 64);
        Ok((Client::V5(c), EventLoop::V5(Box::new(l))))
    } else {
        let mut o = rumqttc::MqttOptions::new(client_id, &broker.host, broker.port);
        o.set_keep_alive(keep_alive)
            .set_clean_session(false)
            .set_inflight(OUTGOING_IN_FLIGHT)
            .set_max_packet_size(max_packet, max_packet)
            .set_manual_acks(true)
            .set_last_will(rumqttc::LastWill::new(topics.status(), offline, rumqttc::QoS::AtLeastOnce, true));
        if let Some(user) = &cfg.username {
            o.set_credentials(user.clone(), password.unwrap_or_default());
        }
        if let Some(t) = transport {
            o.set_transport(t);
        }
        let (c, mut l) = rumqttc::AsyncClient::new(o, 64);
        l.set_network_options(no_delay());
        Ok((Client::V4(c), EventLoop::V4(Box::new(l))))
    }
}

/// TCP without Nagle's algorithm: a result is one small write that must leave at
/// once (with Nagle and delayed ACKs every reply waited ~40 ms).
/// Results (and partial results) published at QoS 1 awaiting the broker's
/// acknowledgement; more wait in the client's queue.
const OUTGOING_IN_FLIGHT: u16 = 256;

fn no_delay() -> rumqttc::NetworkOptions {
    let mut n = rumqttc::NetworkOptions::new();
    n.set_tcp_nodelay(true);
    n
}

#[cfg(not(feature = "tls"))]
fn tls_transport(_cfg: &MqttConfig) -> Result<rumqttc::Transport, String> {
    Err("this inferd was built without the `tls` feature; mqtts:// is not available".into())
}

#[cfg(feature = "tls")]
fn tls_transport(cfg: &MqttConfig) -> Result<rumqttc::Transport, String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    let ca = read(cfg.ca_file.as_deref().ok_or("mqtt.ca_file is required for mqtts://")?)?;
    let client_auth = match (&cfg.client_cert, &cfg.client_key) {
        (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
        _ => None,
    };
    Ok(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Simple { ca, alpn: None, client_auth }))
}

async fn publish_status(ctx: &Ctx, online: bool) {
    let models: Vec<Value> = ctx
        .scheduler
        .engine()
        .registry()
        .models
        .iter()
        .map(|m| {
            let info = super::http::model_info(&ctx.scheduler, &m.name).unwrap_or_default();
            json!({"name": m.name, "task": m.task, "state": info["state"], "variant": info["variant"],
                   "backend": info["backend"], "provider": info["provider"], "placement": info["placement"]})
        })
        .collect();
    let status = json!({
        "online": online,
        "node": ctx.topics.node,
        "version": env!("CARGO_PKG_VERSION"),
        "models": models,
    });
    if let Err(e) = ctx.client.publish(&ctx.topics.status(), status.to_string().into_bytes(), true, None).await {
        tracing::warn!("cannot publish status: {e}");
    }
}

async fn handle(ctx: Arc<Ctx>, msg: Message) {
    let Some(model) = ctx.topics.job_model(&msg.topic).map(str::to_string) else {
        tracing::debug!(topic = msg.topic, "message on a topic that is not a job topic; acknowledged and ignored");
        let _ = ctx.client.ack(&msg.ack).await;
        return;
    };
    let parsed = parse_payload(&msg.payload, &ctx.limits, ctx.max_payload);
    let id = parsed.id.clone();
    // The reply route: MQTT 5 response topic, else the envelope's reply_to, else the default.
    let topic = match (&msg.response_topic, &parsed.reply_to) {
        (Some(t), _) if valid_reply_topic(t) => t.clone(),
        (_, Some(t)) if valid_reply_topic(t) => t.clone(),
        _ => ctx.topics.result(&model),
    };
    let reply = Reply { topic, correlation: msg.correlation.clone(), user_properties: msg.user_properties.clone() };
    tracing::debug!(id, model, pkid = msg.pkid, dup = msg.dup, bytes = msg.payload.len(), "MQTT job received");
    let seen = ctx.dedup.lock().unwrap_or_else(|e| e.into_inner()).check(id.as_deref(), &msg);
    match seen {
        Seen::Running => return,
        Seen::Answered(reply, payload) => {
            tracing::debug!(id, "redelivered job already answered; publishing its result again");
            if ctx.client.publish(&reply.topic, payload, false, Some(&reply)).await.is_ok() {
                let _ = ctx.client.ack(&msg.ack).await;
            }
            return;
        }
        Seen::New => {}
    }
    // At most max_in_flight jobs run at once; the broker's in-flight window
    // (receive-maximum in MQTT 5) bounds how many can wait here.
    let _permit = ctx.in_flight.clone().acquire_owned().await;
    let outcome = match parsed.job {
        Err(e) => {
            ctx.scheduler.metrics().record_error(e.kind);
            Err(e)
        }
        Ok((mut input, options)) => {
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
    let payload = answer.to_string().into_bytes();
    if let Err(e) = ctx.client.publish(&reply.topic, payload.clone(), false, Some(&reply)).await {
        // Not acknowledged: the broker will deliver the job again.
        tracing::warn!(id, "cannot publish the result: {e}");
        return;
    }
    let acks = ctx.dedup.lock().unwrap_or_else(|e| e.into_inner()).finish(id.as_deref(), msg.pkid, (reply, payload));
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
        if let Err(e) = ctx.client.publish(&reply.topic, message.to_string().into_bytes(), false, Some(&reply)).await {
            tracing::debug!(id, "cannot publish a partial result: {e}");
        }
        index += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(url: &str) -> MqttConfig {
        MqttConfig { url: Some(url.into()), ..Default::default() }
    }

    #[test]
    fn broker_urls_parse_with_default_ports() {
        assert_eq!(
            Broker::parse(&cfg("mqtt://broker")).unwrap(),
            Broker { host: "broker".into(), port: 1883, tls: false, v5: true }
        );
        assert_eq!(Broker::parse(&cfg("mqtt://10.0.0.2:1884")).unwrap().port, 1884);
        let mut tls = cfg("mqtts://b.example");
        assert!(Broker::parse(&tls).unwrap_err().contains("ca_file"));
        tls.ca_file = Some("/etc/ca.pem".into());
        assert_eq!(Broker::parse(&tls).unwrap().port, 8883);
        assert!(Broker::parse(&cfg("http://x")).is_err());
        assert!(Broker::parse(&cfg("mqtt://x:port")).is_err());
        let mut v3 = cfg("mqtt://x");
        v3.protocol = "3.1.1".into();
        assert!(!Broker::parse(&v3).unwrap().v5);
        v3.protocol = "6".into();
        assert!(Broker::parse(&v3).is_err());
    }

    #[test]
    fn payloads_become_jobs_or_errors_that_keep_their_id_and_route() {
        let limits = Limits::default();
        let p = parse_payload(b"\xFF\xD8\xFFjpeg bytes", &limits, 1 << 20);
        assert!(matches!(p.job, Ok((JobInput::Image(_), _))));
        let p = parse_payload(
            br#"{"id": 7, "reply_to": "a/b", "image_base64": "!!", "params": {"top_k": 2}}"#,
            &limits,
            1 << 20,
        );
        assert_eq!((p.id.as_deref(), p.reply_to.as_deref()), (Some("7"), Some("a/b")));
        assert!(p.job.unwrap_err().message.contains("base64"));
        let p = parse_payload(br#"{"id": "x", "colour": 1}"#, &limits, 1 << 20);
        assert_eq!(p.id.as_deref(), Some("x"));
        assert!(p.job.unwrap_err().message.contains("invalid job envelope"));
        let p = parse_payload(&[0u8; 2048], &limits, 1024);
        assert_eq!(p.job.unwrap_err().kind, ErrorKind::PayloadTooLarge);
    }
}
