//! The MQTT client side of the intake: rumqttc's two protocol versions behind
//! one `Client`/`EventLoop`, the options both connections are made with
//! (through a [`super::link`] each), and the results connection (`Outbox`),
//! which tells a job's handler when the broker has its result.

use super::topics::Topics;
use crate::config::MqttConfig;
use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5 as m5;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A connection that the broker closes this soon after it opened counts as short;
/// several in a row mean another client is taking the session.
pub(crate) const SHORT_SESSION: Duration = Duration::from_secs(10);

/// A received job message, whichever protocol version carried it.
pub(crate) struct Message {
    pub(crate) topic: String,
    pub(crate) payload: Bytes,
    pub(super) response_topic: Option<String>,
    pub(super) correlation: Option<Bytes>,
    pub(super) user_properties: Vec<(String, String)>,
    pub(super) dup: bool,
    pub(super) qos0: bool,
    pub(super) pkid: u16,
    pub(super) ack: Ack,
}

/// What acknowledging a message needs.
#[derive(Clone)]
pub(super) enum Ack {
    V5(m5::Publish),
    V4(rumqttc::Publish),
}

/// Where a result goes: topic, plus the MQTT 5 correlation data and user
/// properties of the request, echoed.
#[derive(Debug, Clone, Default)]
pub(crate) struct Reply {
    pub(super) topic: String,
    pub(super) correlation: Option<Bytes>,
    pub(super) user_properties: Vec<(String, String)>,
}

/// The MQTT client of either protocol version.
#[derive(Clone)]
pub(crate) enum Client {
    V5(rumqttc::v5::AsyncClient),
    V4(rumqttc::AsyncClient),
}

pub(crate) enum EventLoop {
    V5(Box<rumqttc::v5::EventLoop>),
    V4(Box<rumqttc::EventLoop>),
}

pub(crate) enum Event {
    Connected,
    Message(Box<Message>),
    /// A publish of ours left with this packet id.
    Sent(u16),
    /// The broker acknowledged our publish with this packet id.
    Acked(u16),
    Other,
}

fn v5_props(reply: Option<&Reply>) -> m5::PublishProperties {
    m5::PublishProperties {
        correlation_data: reply.and_then(|r| r.correlation.clone()),
        user_properties: reply.map(|r| r.user_properties.clone()).unwrap_or_default(),
        content_type: Some("application/json".into()),
        ..Default::default()
    }
}

impl Client {
    /// Publishes at QoS 1 without waiting for room in the request queue.
    pub(crate) fn try_publish(
        &self,
        topic: &str,
        payload: Vec<u8>,
        retain: bool,
        reply: Option<&Reply>,
    ) -> Result<(), String> {
        match self {
            Client::V5(c) => c
                .try_publish_with_properties(
                    topic,
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    retain,
                    payload,
                    v5_props(reply),
                )
                .map_err(|e| e.to_string()),
            Client::V4(c) => {
                c.try_publish(topic, rumqttc::QoS::AtLeastOnce, retain, payload).map_err(|e| e.to_string())
            }
        }
    }

    pub(super) async fn ack(&self, ack: &Ack) -> Result<(), String> {
        match (self, ack) {
            (Client::V5(c), Ack::V5(p)) => c.ack(p).await.map_err(|e| e.to_string()),
            (Client::V4(c), Ack::V4(p)) => c.ack(p).await.map_err(|e| e.to_string()),
            _ => Err("acknowledgement of another protocol version".into()),
        }
    }

    pub(crate) async fn subscribe(&self, filter: &str) -> Result<(), String> {
        match self {
            Client::V5(c) => {
                c.subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce).await.map_err(|e| e.to_string())
            }
            Client::V4(c) => c.subscribe(filter, rumqttc::QoS::AtLeastOnce).await.map_err(|e| e.to_string()),
        }
    }

    pub(crate) async fn disconnect(&self) {
        let _ = match self {
            Client::V5(c) => c.disconnect().await.map_err(|e| e.to_string()),
            Client::V4(c) => c.disconnect().await.map_err(|e| e.to_string()),
        };
    }
}

impl EventLoop {
    pub(crate) async fn poll(&mut self) -> Result<Event, String> {
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
                        qos0: p.qos == rumqttc::v5::mqttbytes::QoS::AtMostOnce,
                        pkid: p.pkid,
                        ack: Ack::V5(ack),
                    })))
                }
                rumqttc::v5::Event::Outgoing(rumqttc::Outgoing::Publish(pkid)) => Ok(Event::Sent(pkid)),
                rumqttc::v5::Event::Incoming(m5::Packet::PubAck(a)) => Ok(Event::Acked(a.pkid)),
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
                        qos0: p.qos == rumqttc::QoS::AtMostOnce,
                        pkid: p.pkid,
                        ack: Ack::V4(ack),
                    })))
                }
                rumqttc::Event::Outgoing(rumqttc::Outgoing::Publish(pkid)) => Ok(Event::Sent(pkid)),
                rumqttc::Event::Incoming(rumqttc::Packet::PubAck(a)) => Ok(Event::Acked(a.pkid)),
                _ => Ok(Event::Other),
            },
        }
    }
}

/// Results and status go out on a connection of their own (client id
/// `{client_id}-results`), which is never throttled: its publishes wait for
/// the broker's PUBACKs, and those must not queue behind a job backlog that
/// the intake connection holds back. A job is acknowledged on the intake
/// connection once the broker has acknowledged its result here.
pub(super) struct Outbox {
    client: Client,
    waiting: Mutex<Waiting>,
}

#[derive(Default)]
struct Waiting {
    /// Publishes queued for the event loop, in order; each wants to hear of its PUBACK (or not).
    queued: VecDeque<Option<tokio::sync::oneshot::Sender<()>>>,
    /// Publishes sent, by packet id.
    sent: std::collections::HashMap<u16, Option<tokio::sync::oneshot::Sender<()>>>,
}

impl Outbox {
    /// The results connection's outbox over `client`.
    pub(super) fn new(client: Client) -> Outbox {
        Outbox { client, waiting: Mutex::default() }
    }

    /// Queues a publish without waiting; the receiver completes when the broker acknowledges it.
    pub(super) fn send(
        &self,
        topic: &str,
        payload: Vec<u8>,
        retain: bool,
        reply: Option<&Reply>,
    ) -> Result<tokio::sync::oneshot::Receiver<()>, String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        // One lock around queueing and noting it, so the notes stay in the loop's order.
        let mut w = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        self.client.try_publish(topic, payload, retain, reply)?;
        w.queued.push_back(Some(tx));
        Ok(rx)
    }

    /// Publishes and waits (up to `wait`) for the broker's acknowledgement.
    pub(super) async fn publish(
        &self,
        topic: &str,
        payload: Vec<u8>,
        retain: bool,
        reply: Option<&Reply>,
        wait: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + wait;
        let acked = loop {
            match self.send(topic, payload.clone(), retain, reply) {
                Ok(rx) => break rx,
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await, // the request queue is full
            }
        };
        match tokio::time::timeout_at(deadline.into(), acked).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err("the results connection lost the publish".into()),
            Err(_) => Err(format!("the broker did not acknowledge the result within {} s", wait.as_secs())),
        }
    }

    /// The event loop sent publish `pkid` (a resend after a reconnect keeps its note).
    fn sent(&self, pkid: u16) {
        let mut w = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if !w.sent.contains_key(&pkid)
            && let Some(note) = w.queued.pop_front()
        {
            w.sent.insert(pkid, note);
        }
    }

    /// The broker acknowledged publish `pkid`.
    fn acked(&self, pkid: u16) {
        let note = self.waiting.lock().unwrap_or_else(|e| e.into_inner()).sent.remove(&pkid);
        if let Some(Some(tx)) = note {
            let _ = tx.send(());
        }
    }
}

/// Serves the results connection until `stop`: reconnects with backoff, notes what was sent and acknowledged.
pub(super) async fn run_outbox(
    outbox: Arc<Outbox>,
    mut events: EventLoop,
    mut stop: tokio::sync::watch::Receiver<bool>,
    max_backoff: Duration,
) {
    let mut backoff = Duration::from_millis(250);
    let mut connected_at: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = until_stopped(&mut stop) => break,
            event = events.poll() => match event {
                Ok(Event::Sent(pkid)) => outbox.sent(pkid),
                Ok(Event::Acked(pkid)) => outbox.acked(pkid),
                Ok(Event::Connected) => connected_at = Some(Instant::now()),
                Ok(_) => {}
                Err(e) => {
                    // As on the intake: only a session that lived a while resets the backoff.
                    if connected_at.take().is_some_and(|t| t.elapsed() >= SHORT_SESSION) {
                        backoff = Duration::from_millis(250);
                    }
                    tracing::debug!("MQTT results connection lost: {e}; retrying in {} ms", backoff.as_millis());
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = until_stopped(&mut stop) => break,
                    }
                    backoff = (backoff * 2).min(max_backoff);
                }
            }
        }
    }
    outbox.client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), async { while events.poll().await.is_ok() {} }).await;
}

/// How long a result may wait for the broker's acknowledgement before its job
/// is left unacknowledged (the broker delivers it again after a reconnect).
pub(super) const RESULT_ACK_WAIT: Duration = Duration::from_secs(30);

/// Completes when `stop` turns true (or its sender is gone), holding no borrow afterwards.
pub(crate) async fn until_stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}

/// How a connection keeps its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Session {
    /// Kept by the broker across reconnects, messages acknowledged by hand (the intake).
    Persistent,
    /// A new session each time, acknowledged as they arrive (the fleet's, a tool's).
    Clean,
}

/// The MQTT client and its event loop, connecting through the link at `link`.
pub(crate) fn connect(
    cfg: &MqttConfig,
    v5: bool,
    link: &std::path::Path,
    client_id: &str,
    will: Option<(&Topics, Vec<u8>)>,
    max_payload: usize,
    session: Session,
) -> Result<(Client, EventLoop), String> {
    let persistent = session == Session::Persistent;
    let password = cfg.password().map_err(|e| e.to_string())?;
    let link = link.to_string_lossy().into_owned();
    let keep_alive = Duration::from_secs(cfg.keep_alive_s.max(5));
    // Payloads up to twice the limit still arrive, so they can be answered
    // with an error; larger packets the broker drops (MQTT 5 maximum packet size).
    let max_packet = max_payload.saturating_mul(2).saturating_add(64 << 10);
    if v5 {
        let mut o = rumqttc::v5::MqttOptions::new(client_id, &link, 0);
        o.set_keep_alive(keep_alive)
            .set_clean_start(!persistent)
            .set_session_expiry_interval(persistent.then_some(cfg.session_expiry_s))
            .set_receive_maximum(Some(cfg.max_in_flight))
            // rumqttc keeps a slot per outgoing packet id up to this limit, filled at
            // connect: the default (65535) costs ~14 MB of RSS for nothing.
            .set_outgoing_inflight_upper_limit(OUTGOING_IN_FLIGHT)
            .set_max_packet_size(Some(u32::try_from(max_packet).unwrap_or(u32::MAX)))
            .set_manual_acks(persistent);
        if let Some((topics, offline)) = will {
            o.set_last_will(m5::LastWill::new(
                topics.status(),
                offline,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                true,
                None,
            ));
        }
        if let Some(user) = &cfg.username {
            o.set_credentials(user.clone(), password.unwrap_or_default());
        }
        o.set_transport(rumqttc::Transport::Unix);
        let (c, l) = rumqttc::v5::AsyncClient::new(o, request_capacity(cfg));
        Ok((Client::V5(c), EventLoop::V5(Box::new(l))))
    } else {
        let mut o = rumqttc::MqttOptions::new(client_id, &link, 0);
        o.set_keep_alive(keep_alive)
            .set_clean_session(!persistent)
            .set_inflight(OUTGOING_IN_FLIGHT)
            .set_max_packet_size(max_packet, max_packet)
            .set_manual_acks(persistent);
        if let Some((topics, offline)) = will {
            o.set_last_will(rumqttc::LastWill::new(topics.status(), offline, rumqttc::QoS::AtLeastOnce, true));
        }
        if let Some(user) = &cfg.username {
            o.set_credentials(user.clone(), password.unwrap_or_default());
        }
        o.set_transport(rumqttc::Transport::Unix);
        let (c, l) = rumqttc::AsyncClient::new(o, request_capacity(cfg));
        Ok((Client::V4(c), EventLoop::V4(Box::new(l))))
    }
}

/// Room in a client's request queue: results, acknowledgements, partial
/// results (dropped when it is full) and status.
fn request_capacity(cfg: &MqttConfig) -> usize {
    usize::from(cfg.max_in_flight) * 16 + 256
}

/// Results (and partial results) published at QoS 1 awaiting the broker's
/// acknowledgement; more wait in the client's queue.
const OUTGOING_IN_FLIGHT: u16 = 256;
