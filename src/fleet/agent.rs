//! The fleet's MQTT connection (client id `{client_id}-fleet`, a clean
//! session of its own beside the job intake's, so desired state is never
//! held back behind a job backlog): subscribes to the box's desired topics,
//! hands each document to [`Fleet::accept`], and publishes the reported
//! state, retained, whenever it changes (at most once a second while a pull
//! progresses) and every 30 s.

use super::apply::Fleet;
use crate::config::{Broker, MqttConfig};
use crate::intake::mqtt_client::{Event, Session, connect, until_stopped};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Serves the fleet's connection until `stop`; the broker being away never stops it.
pub async fn serve(
    fleet: Arc<Fleet>,
    broker: Broker,
    cfg: MqttConfig,
    max_document: usize,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), String> {
    let link = crate::intake::link::start(&broker, &cfg)?;
    let client_id = format!("{}-fleet", cfg.client_id.clone().unwrap_or_else(|| cfg.node()));
    // Packets well over the document limit still arrive, so an oversized
    // document is refused and reported (`too_large`) instead of the
    // connection failing on it again at every reconnect (MQTT 3.1.1).
    let max_packet = max_document.saturating_mul(4).max(16 << 20);
    let (client, mut events) = connect(&cfg, broker.v5, &link.path, &client_id, None, max_packet, Session::Clean)?;
    let topic = fleet.topics().reported();
    let mut reports = fleet.reports();
    let max_backoff = Duration::from_secs(cfg.reconnect_max_s.max(1));
    let mut backoff = Duration::from_millis(250);
    let mut connected = false;
    let mut last_sent: Option<(Instant, String)> = None;
    let mut pending = false;
    let mut every = tokio::time::interval(Duration::from_secs(30));
    let publish = |last: &mut Option<(Instant, String)>| {
        let text = serde_json::to_string(&fleet.snapshot()).expect("JSON");
        if last.as_ref().is_some_and(|(_, t)| *t == text) {
            return;
        }
        match client.try_publish(&topic, text.clone().into_bytes(), true, None) {
            Ok(()) => *last = Some((Instant::now(), text)),
            Err(e) => tracing::debug!("fleet: cannot publish the report yet: {e}"),
        }
    };
    loop {
        let throttle = match (&last_sent, pending) {
            (Some((at, _)), true) => Some(*at + Duration::from_secs(1)),
            (None, true) => Some(Instant::now()),
            _ => None,
        };
        tokio::select! {
            _ = until_stopped(&mut stop) => break,
            changed = reports.changed() => {
                if changed.is_err() { break }
                pending = true;
            }
            _ = async { match throttle { Some(t) => tokio::time::sleep_until(t.into()).await, None => std::future::pending().await } } => {
                if connected {
                    publish(&mut last_sent);
                }
                pending = false;
            }
            _ = every.tick() => if connected {
                last_sent = None;
                publish(&mut last_sent);
            },
            event = events.poll() => match event {
                Ok(Event::Connected) => {
                    connected = true;
                    backoff = Duration::from_millis(250);
                    tracing::info!(node = %fleet.topics().node, "fleet: connected; desired state from {}", fleet.topics().subscriptions().join(", "));
                    for t in fleet.topics().subscriptions() {
                        if let Err(e) = client.subscribe(&t).await {
                            tracing::warn!("fleet: cannot subscribe to {t}: {e}");
                        }
                    }
                    last_sent = None;
                    publish(&mut last_sent);
                }
                Ok(Event::Message(m)) => {
                    // The apply loop runs apart; reading and verifying a document is quick.
                    let (fleet, topic, payload) = (fleet.clone(), m.topic.clone(), m.payload.clone());
                    let _ = tokio::task::spawn_blocking(move || fleet.accept(&topic, &payload)).await;
                }
                Ok(_) => {}
                Err(e) => {
                    if connected {
                        tracing::warn!("fleet: MQTT connection lost: {e}");
                    }
                    connected = false;
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = until_stopped(&mut stop) => break,
                    }
                    backoff = (backoff * 2).min(max_backoff);
                }
            }
        }
    }
    client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), async { while events.poll().await.is_ok() {} }).await;
    Ok(())
}
