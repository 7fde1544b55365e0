//! `inferd bench`: throughput and latency of one model, driven the way
//! clients drive it — N concurrent clients over the Unix socket or over MQTT
//! (against inferd or any server speaking the same API, such as the Python
//! peers in scripts/peers/), or in this process (`local`, which also reports
//! the engine's own session time: the limit any server can reach).

use crate::client::Client;
use crate::engine::{Engine, LoadOptions};
use crate::job::JobOptions;
use serde::Serialize;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How jobs reach the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// HTTP/JSON over the Unix socket (`--socket`).
    Socket,
    /// MQTT 5 jobs with a response topic (`--mqtt-url`).
    Mqtt,
    /// In this process, no transport: the pipeline and engine only.
    Local,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchArgs {
    pub model: String,
    pub input: PathBuf,
    pub via: Via,
    pub clients: usize,
    pub duration: Duration,
    pub warmup: usize,
    /// Jobs per second across all clients (paced); none: as fast as answered.
    pub rate: Option<f64>,
    pub socket: PathBuf,
    pub mqtt_url: String,
    pub mqtt_prefix: String,
}

/// Spaces one client's jobs `clients / rate` seconds apart (a late job does
/// not make the next ones bunch up: the schedule moves on).
#[derive(Debug, Clone, Copy)]
struct Pacer {
    interval: Option<Duration>,
    next: Instant,
}

impl Pacer {
    fn new(args: &BenchArgs) -> Pacer {
        let interval = args.rate.map(|r| Duration::from_secs_f64(args.clients as f64 / r));
        Pacer { interval, next: Instant::now() }
    }

    /// How long to wait before the next job.
    fn delay(&mut self) -> Duration {
        let Some(interval) = self.interval else { return Duration::ZERO };
        let now = Instant::now();
        let wait = self.next.saturating_duration_since(now);
        self.next = self.next.max(now) + interval;
        wait
    }
}

/// What came out.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub model: String,
    pub via: Via,
    pub clients: usize,
    pub jobs: usize,
    pub errors: usize,
    pub seconds: f64,
    pub jobs_per_s: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    /// The engine's own time per job (`timings.infer_ms`), median: the floor for this model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine_p50_ms: Option<f64>,
    /// Median time a job spends in inferd outside the engine (decode, pre/post, queue, transport).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overhead_p50_ms: Option<f64>,
}

/// The `q` quantile (0..1) of sorted `v`, milliseconds.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// One client's record: latency (ms) of each answered job, engine ms where reported, errors.
#[derive(Default)]
struct Record {
    latencies: Vec<f64>,
    engine: Vec<f64>,
    overhead: Vec<f64>,
    errors: usize,
}

impl Record {
    /// Records one answered job: its latency and, where reported, the engine's share.
    fn add(&mut self, ms: f64, engine: Option<f64>) {
        self.latencies.push(ms);
        if let Some(e) = engine {
            self.engine.push(e);
            self.overhead.push(ms - e);
        }
    }

    /// Records one job's outcome.
    fn record<E>(&mut self, outcome: Result<(f64, Option<f64>), E>) {
        match outcome {
            Ok((ms, engine)) => self.add(ms, engine),
            Err(_) => self.errors += 1,
        }
    }
}

fn engine_ms(v: &serde_json::Value) -> Option<f64> {
    v["timings"]["infer_ms"].as_f64()
}

/// Runs the benchmark and returns its report.
pub fn run(args: &BenchArgs, engine: Option<&Engine>) -> Result<Report, String> {
    let payload = std::fs::read(&args.input).map_err(|e| format!("cannot read {}: {e}", args.input.display()))?;
    let content_type = match args.input.extension().and_then(|e| e.to_str()) {
        Some("json") => "application/json",
        Some("png") => "image/png",
        Some("txt") => "text/plain",
        _ => "image/jpeg",
    };
    let started = Instant::now();
    let records: Vec<Record> = match args.via {
        Via::Socket => {
            let path = format!("/v1/models/{}/infer", args.model);
            let one = |c: &Client| -> Result<(f64, Option<f64>), String> {
                let t = Instant::now();
                let r = c.post(&path, content_type, &payload).map_err(|e| e.to_string())?;
                let ms = t.elapsed().as_secs_f64() * 1000.0;
                if r.status != 200 {
                    return Err(format!("HTTP {}: {}", r.status, String::from_utf8_lossy(&r.body)));
                }
                Ok((ms, r.json().ok().as_ref().and_then(engine_ms)))
            };
            let c = Client::new(&args.socket).with_timeout(Duration::from_secs(120));
            for _ in 0..args.warmup {
                one(&c)?;
            }
            let started = Instant::now();
            std::thread::scope(|s| {
                let handles: Vec<_> = (0..args.clients)
                    .map(|_| {
                        let c = c.clone();
                        s.spawn(move || {
                            let mut rec = Record::default();
                            let mut pacer = Pacer::new(args);
                            while started.elapsed() < args.duration {
                                std::thread::sleep(pacer.delay());
                                rec.record(one(&c));
                            }
                            rec
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap_or_default()).collect()
            })
        }
        Via::Mqtt => mqtt(args, payload)?,
        Via::Local => {
            let engine = engine.ok_or("local needs the registry")?;
            // The daemon decodes images on its rayon decode threads, where the JPEG
            // decoder's row work stays on the thread that decodes. Run the loop on
            // such a thread too, not hand every image's rows to rayon's global pool.
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .thread_name(|_| "inferd-bench".into())
                .build()
                .map_err(|e| e.to_string())?;
            pool.install(|| -> Result<Vec<Record>, String> {
                // The variant the daemon would load here (memory decides), not simply the best one.
                let mut m = engine.load(&args.model, &LoadOptions::default()).map_err(|e| e.to_string())?;
                let payload_kind = crate::job::Payload::sniff(&payload, Some(content_type), false);
                let input = |bytes: &[u8]| payload_kind.read(bytes.to_vec(), &engine.config().limits).map(|(i, _)| i);
                for _ in 0..args.warmup {
                    m.infer(input(&payload).map_err(|e| e.to_string())?, &JobOptions::default())
                        .map_err(|e| e.to_string())?;
                }
                let mut rec = Record::default();
                let started = Instant::now();
                while started.elapsed() < args.duration {
                    let t = Instant::now();
                    let outcome = input(&payload).and_then(|i| m.infer(i, &JobOptions::default()));
                    rec.record(outcome.map(|out| (t.elapsed().as_secs_f64() * 1000.0, Some(out.timings.infer_ms))));
                }
                Ok(vec![rec])
            })?
        }
    };
    let seconds = started.elapsed().as_secs_f64().min(args.duration.as_secs_f64() + 60.0).max(1e-9);
    let mut all: Vec<f64> = records.iter().flat_map(|r| r.latencies.iter().copied()).collect();
    let mut engine: Vec<f64> = records.iter().flat_map(|r| r.engine.iter().copied()).collect();
    let mut overhead: Vec<f64> = records.iter().flat_map(|r| r.overhead.iter().copied()).collect();
    for v in [&mut all, &mut engine, &mut overhead] {
        v.sort_by(f64::total_cmp);
    }
    let measured = args.duration.as_secs_f64().max(1e-9);
    Ok(Report {
        model: args.model.clone(),
        via: args.via,
        clients: if args.via == Via::Local { 1 } else { args.clients },
        jobs: all.len(),
        errors: records.iter().map(|r| r.errors).sum(),
        seconds,
        jobs_per_s: all.len() as f64 / measured,
        p50_ms: quantile(&all, 0.50),
        p95_ms: quantile(&all, 0.95),
        p99_ms: quantile(&all, 0.99),
        engine_p50_ms: (!engine.is_empty()).then(|| quantile(&engine, 0.5)),
        overhead_p50_ms: (!overhead.is_empty()).then(|| quantile(&overhead, 0.5)),
    })
}

/// N MQTT 5 clients in one connection, each publishing a job and waiting for
/// its answer (matched by correlation data) before the next.
fn mqtt(args: &BenchArgs, payload: Vec<u8>) -> Result<Vec<Record>, String> {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let url = args.mqtt_url.trim_start_matches("mqtt://");
    let (host, port) = url.rsplit_once(':').ok_or("--mqtt-url must be mqtt://host:port")?;
    let port: u16 = port.parse().map_err(|_| "bad MQTT port")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let id = format!("inferd-bench-{}", std::process::id());
        let mut o = MqttOptions::new(&id, host, port);
        o.set_max_packet_size(Some(64 << 20)).set_keep_alive(Duration::from_secs(30));
        let mut network = rumqttc::NetworkOptions::new();
        network.set_tcp_nodelay(true);
        o.set_network_options(network);
        let (client, mut events) = AsyncClient::new(o, 1024);
        let reply = format!("bench/{id}/replies");
        type Waiters =
            std::sync::Arc<std::sync::Mutex<std::collections::HashMap<Vec<u8>, tokio::sync::oneshot::Sender<Vec<u8>>>>>;
        let waiters: Waiters = Default::default();
        let w = waiters.clone();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let key = p.properties.as_ref().and_then(|pr| pr.correlation_data.clone()).map(|c| c.to_vec());
                        if let Some(key) = key
                            && let Some(tx) = w.lock().unwrap_or_else(|e| e.into_inner()).remove(&key)
                        {
                            let _ = tx.send(p.payload.to_vec());
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!("bench MQTT: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
        client.subscribe(reply.clone(), QoS::AtLeastOnce).await.map_err(|e| e.to_string())?;
        tokio::time::timeout(Duration::from_secs(10), ready_rx).await.map_err(|_| "no SUBACK from the broker")?.ok();
        let topic = format!("{}/jobs/{}", args.mqtt_prefix, args.model);
        let seq = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let one = move |client: AsyncClient,
                        waiters: Waiters,
                        seq: std::sync::Arc<std::sync::atomic::AtomicU64>,
                        payload: std::sync::Arc<Vec<u8>>| {
            let (topic, reply) = (topic.clone(), reply.clone());
            async move {
                let key = seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed).to_be_bytes().to_vec();
                let (tx, rx) = tokio::sync::oneshot::channel();
                waiters.lock().unwrap_or_else(|e| e.into_inner()).insert(key.clone(), tx);
                let props = PublishProperties {
                    response_topic: Some(reply),
                    correlation_data: Some(key.into()),
                    ..Default::default()
                };
                let t = Instant::now();
                client
                    .publish_with_properties(topic, QoS::AtLeastOnce, false, (*payload).clone(), props)
                    .await
                    .map_err(|e| e.to_string())?;
                let answer = tokio::time::timeout(Duration::from_secs(120), rx)
                    .await
                    .map_err(|_| "no answer in 120 s")?
                    .map_err(|e| e.to_string())?;
                let ms = t.elapsed().as_secs_f64() * 1000.0;
                let v: serde_json::Value = serde_json::from_slice(&answer).map_err(|e| e.to_string())?;
                if v.get("error").is_some_and(|e| !e.is_null()) {
                    return Err(v["error"].to_string());
                }
                Ok::<_, String>((ms, engine_ms(&v)))
            }
        };
        let payload = std::sync::Arc::new(payload);
        for _ in 0..args.warmup {
            one(client.clone(), waiters.clone(), seq.clone(), payload.clone()).await?;
        }
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..args.clients {
            let (client, waiters, seq, payload) = (client.clone(), waiters.clone(), seq.clone(), payload.clone());
            let job = one.clone();
            let duration = args.duration;
            let mut pacer = Pacer::new(args);
            tasks.spawn(async move {
                let mut rec = Record::default();
                while started.elapsed() < duration {
                    tokio::time::sleep(pacer.delay()).await;
                    rec.record(job(client.clone(), waiters.clone(), seq.clone(), payload.clone()).await);
                }
                rec
            });
        }
        let mut records = Vec::new();
        while let Some(r) = tasks.join_next().await {
            records.push(r.unwrap_or_default());
        }
        let _ = client.disconnect().await;
        Ok(records)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_paced_client_keeps_its_schedule() {
        let args = BenchArgs {
            model: "m".into(),
            input: "x".into(),
            via: Via::Socket,
            clients: 4,
            duration: Duration::from_secs(1),
            warmup: 0,
            rate: Some(100.0),
            socket: "s".into(),
            mqtt_url: String::new(),
            mqtt_prefix: String::new(),
        };
        let mut p = Pacer::new(&args);
        assert_eq!(p.delay(), Duration::ZERO, "the first job goes at once");
        let second = p.delay();
        assert!(
            second > Duration::from_millis(35) && second <= Duration::from_millis(40),
            "{second:?}: 4 clients at 100/s"
        );
        assert_eq!(Pacer::new(&BenchArgs { rate: None, ..args }).delay(), Duration::ZERO);
    }

    #[test]
    fn quantiles_pick_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 51.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 0.0), 1.0);
        assert!(quantile(&[], 0.5).is_nan());
    }
}
