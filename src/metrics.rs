//! Prometheus text exposition: job outcomes and latency histograms per
//! model, errors by kind, and gauges (queue depth, loaded models and their
//! memory) read at scrape time.

use crate::error::{ErrorKind, InferError};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the latency histogram buckets, seconds.
const BUCKETS: [f64; 14] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Default)]
struct ModelCounters {
    ok: u64,
    errors: BTreeMap<ErrorKind, u64>,
    buckets: [u64; BUCKETS.len()],
    sum_seconds: f64,
    count: u64,
}

#[derive(Default)]
struct Inner {
    models: BTreeMap<String, ModelCounters>,
    errors: BTreeMap<ErrorKind, u64>,
    /// (model, event) → count: load, load_failed, unload_idle, unload_requested, evict, downgrade, upgrade.
    events: BTreeMap<(String, &'static str), u64>,
    load_seconds: BTreeMap<String, (f64, u64)>,
}

/// Counters shared by every front-end.
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
    /// 0: MQTT not configured, 1: disconnected, 2: connected.
    mqtt: std::sync::atomic::AtomicU8,
    /// What keeps MQTT from working, when known (e.g. another client took the session).
    mqtt_problem: Mutex<Option<String>>,
}

/// A model's gauges at scrape time.
#[derive(Debug, Clone)]
pub struct ModelGauges {
    pub model: String,
    pub queue_depth: usize,
    pub loaded: bool,
    pub memory_bytes: Option<u64>,
    /// Graph nodes per execution provider, where known.
    pub nodes: BTreeMap<String, usize>,
}

impl Metrics {
    /// Records one finished job of a registered `model`.
    pub fn record_job<T>(&self, model: &str, outcome: &Result<T, InferError>, elapsed: Duration) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let m = inner.models.entry(model.to_string()).or_default();
        match outcome {
            Ok(_) => m.ok += 1,
            Err(e) => *m.errors.entry(e.kind).or_default() += 1,
        }
        let secs = elapsed.as_secs_f64();
        for (slot, bound) in m.buckets.iter_mut().zip(BUCKETS) {
            if secs <= bound {
                *slot += 1;
            }
        }
        m.sum_seconds += secs;
        m.count += 1;
        if let Err(e) = outcome {
            *inner.errors.entry(e.kind).or_default() += 1;
        }
    }

    /// Every job answered so far, for the job rate.
    pub fn jobs_total(&self) -> u64 {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.models.values().map(|m| m.count).sum()
    }

    /// Records whether the MQTT connection is up.
    pub fn set_mqtt_connected(&self, up: bool) {
        self.mqtt.store(if up { 2 } else { 1 }, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether MQTT is connected; `None` when it is not configured.
    pub fn mqtt_connected(&self) -> Option<bool> {
        match self.mqtt.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            v => Some(v == 2),
        }
    }

    /// Records (or clears) what keeps MQTT from working.
    pub fn set_mqtt_problem(&self, problem: Option<String>) {
        *self.mqtt_problem.lock().unwrap_or_else(|e| e.into_inner()) = problem;
    }

    /// What keeps MQTT from working, if anything is known.
    pub fn mqtt_problem(&self) -> Option<String> {
        self.mqtt_problem.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Records an error answered before any job existed (bad request, unknown model...).
    pub fn record_error(&self, kind: ErrorKind) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        *inner.errors.entry(kind).or_default() += 1;
    }

    /// Records something the model manager did to `model`.
    pub fn record_event(&self, model: &str, event: &'static str) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        *inner.events.entry((model.to_string(), event)).or_default() += 1;
    }

    /// Records how long a load of `model` took.
    pub fn record_load_time(&self, model: &str, elapsed: Duration) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let entry = inner.load_seconds.entry(model.to_string()).or_default();
        entry.0 += elapsed.as_secs_f64();
        entry.1 += 1;
    }

    /// The Prometheus text for the counters plus `gauges` and the memory `room` left for models.
    pub fn render(&self, gauges: &[ModelGauges], room: Option<u64>) -> String {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        let _ = writeln!(out, "# HELP inferd_model_events_total What the model manager did, by model and event.");
        let _ = writeln!(out, "# TYPE inferd_model_events_total counter");
        for ((model, event), n) in &inner.events {
            let _ = writeln!(out, "inferd_model_events_total{{model=\"{}\",event=\"{event}\"}} {n}", esc(model));
        }
        let _ = writeln!(out, "# HELP inferd_model_load_seconds Time spent loading models.");
        let _ = writeln!(out, "# TYPE inferd_model_load_seconds summary");
        for (model, (sum, count)) in &inner.load_seconds {
            let _ = writeln!(out, "inferd_model_load_seconds_sum{{model=\"{}\"}} {sum}", esc(model));
            let _ = writeln!(out, "inferd_model_load_seconds_count{{model=\"{}\"}} {count}", esc(model));
        }
        if let Some(room) = room {
            let _ = writeln!(
                out,
                "# HELP inferd_memory_room_bytes Memory models may still use (budget left, or free memory)."
            );
            let _ = writeln!(out, "# TYPE inferd_memory_room_bytes gauge");
            let _ = writeln!(out, "inferd_memory_room_bytes {room}");
        }
        if let Some(up) = self.mqtt_connected() {
            let _ = writeln!(out, "# HELP inferd_mqtt_connected Whether the MQTT connection is up.");
            let _ = writeln!(out, "# TYPE inferd_mqtt_connected gauge");
            let _ = writeln!(out, "inferd_mqtt_connected {}", u8::from(up));
            let _ = writeln!(
                out,
                "# HELP inferd_mqtt_session_conflict Whether another client seems to use this daemon's MQTT client id."
            );
            let _ = writeln!(out, "# TYPE inferd_mqtt_session_conflict gauge");
            let _ = writeln!(out, "inferd_mqtt_session_conflict {}", u8::from(self.mqtt_problem().is_some()));
        }
        let _ = writeln!(out, "# HELP inferd_jobs_total Jobs finished, by model and outcome (ok or an error kind).");
        let _ = writeln!(out, "# TYPE inferd_jobs_total counter");
        for (model, m) in &inner.models {
            let _ = writeln!(out, "inferd_jobs_total{{model=\"{}\",outcome=\"ok\"}} {}", esc(model), m.ok);
            for (kind, n) in &m.errors {
                let _ = writeln!(out, "inferd_jobs_total{{model=\"{}\",outcome=\"{kind}\"}} {n}", esc(model));
            }
        }
        let _ = writeln!(out, "# HELP inferd_errors_total Errors answered, by kind, whatever the front-end.");
        let _ = writeln!(out, "# TYPE inferd_errors_total counter");
        for kind in ErrorKind::ALL {
            let _ = writeln!(
                out,
                "inferd_errors_total{{kind=\"{kind}\"}} {}",
                inner.errors.get(&kind).copied().unwrap_or(0)
            );
        }
        let _ = writeln!(out, "# HELP inferd_job_duration_seconds Time from job admission to answer, by model.");
        let _ = writeln!(out, "# TYPE inferd_job_duration_seconds histogram");
        for (model, m) in &inner.models {
            let model = esc(model);
            for (n, bound) in m.buckets.iter().zip(BUCKETS) {
                let _ = writeln!(out, "inferd_job_duration_seconds_bucket{{model=\"{model}\",le=\"{bound}\"}} {n}");
            }
            let _ = writeln!(out, "inferd_job_duration_seconds_bucket{{model=\"{model}\",le=\"+Inf\"}} {}", m.count);
            let _ = writeln!(out, "inferd_job_duration_seconds_sum{{model=\"{model}\"}} {}", m.sum_seconds);
            let _ = writeln!(out, "inferd_job_duration_seconds_count{{model=\"{model}\"}} {}", m.count);
        }
        let _ = writeln!(out, "# HELP inferd_queue_depth Jobs waiting for a model's worker.");
        let _ = writeln!(out, "# TYPE inferd_queue_depth gauge");
        for g in gauges {
            let _ = writeln!(out, "inferd_queue_depth{{model=\"{}\"}} {}", esc(&g.model), g.queue_depth);
        }
        let _ = writeln!(out, "# HELP inferd_model_loaded Whether a model is loaded (1) or not (0).");
        let _ = writeln!(out, "# TYPE inferd_model_loaded gauge");
        for g in gauges {
            let _ = writeln!(out, "inferd_model_loaded{{model=\"{}\"}} {}", esc(&g.model), u8::from(g.loaded));
        }
        let _ = writeln!(out, "# HELP inferd_model_memory_bytes Memory measured when a loaded model was loaded.");
        let _ = writeln!(out, "# TYPE inferd_model_memory_bytes gauge");
        for g in gauges.iter().filter(|g| g.loaded) {
            let _ = writeln!(
                out,
                "inferd_model_memory_bytes{{model=\"{}\"}} {}",
                esc(&g.model),
                g.memory_bytes.unwrap_or(0)
            );
        }
        let _ = writeln!(out, "# HELP inferd_model_nodes Graph nodes of a loaded model each execution provider took.");
        let _ = writeln!(out, "# TYPE inferd_model_nodes gauge");
        for g in gauges.iter().filter(|g| g.loaded) {
            for (provider, n) in &g.nodes {
                let _ = writeln!(
                    out,
                    "inferd_model_nodes{{model=\"{}\",provider=\"{}\"}} {n}",
                    esc(&g.model),
                    esc(provider)
                );
            }
        }
        out
    }
}

/// Escapes a label value (model names are restricted, but be safe).
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_errors_and_histograms_are_counted() {
        let m = Metrics::default();
        m.record_job::<()>("a", &Ok(()), Duration::from_millis(3));
        m.record_job::<()>("a", &Err(InferError::bad_input("x")), Duration::from_millis(30));
        m.record_error(ErrorKind::UnknownModel);
        m.record_event("a", "downgrade");
        m.record_load_time("a", Duration::from_millis(250));
        let text = m.render(
            &[ModelGauges {
                model: "a".into(),
                queue_depth: 2,
                loaded: true,
                memory_bytes: Some(7),
                nodes: [("CPUExecutionProvider".to_string(), 5)].into(),
            }],
            Some(9),
        );
        assert!(text.contains("inferd_model_events_total{model=\"a\",event=\"downgrade\"} 1"), "{text}");
        assert!(text.contains("inferd_model_load_seconds_sum{model=\"a\"} 0.25"), "{text}");
        assert!(text.contains("inferd_memory_room_bytes 9"), "{text}");
        assert!(text.contains("inferd_jobs_total{model=\"a\",outcome=\"ok\"} 1"), "{text}");
        assert!(text.contains("inferd_jobs_total{model=\"a\",outcome=\"bad_input\"} 1"), "{text}");
        assert!(text.contains("inferd_errors_total{kind=\"unknown_model\"} 1"), "{text}");
        assert!(text.contains("inferd_errors_total{kind=\"bad_input\"} 1"), "{text}");
        assert!(text.contains("inferd_job_duration_seconds_bucket{model=\"a\",le=\"0.005\"} 1"), "{text}");
        assert!(text.contains("inferd_job_duration_seconds_bucket{model=\"a\",le=\"0.05\"} 2"), "{text}");
        assert!(text.contains("inferd_job_duration_seconds_count{model=\"a\"} 2"), "{text}");
        assert!(text.contains("inferd_queue_depth{model=\"a\"} 2"), "{text}");
        assert!(text.contains("inferd_model_memory_bytes{model=\"a\"} 7"), "{text}");
        assert!(text.contains("inferd_model_nodes{model=\"a\",provider=\"CPUExecutionProvider\"} 5"), "{text}");
    }
}
