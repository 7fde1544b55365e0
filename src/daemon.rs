//! The daemon, assembled: registry, engine, memory manager and scheduler;
//! the socket (and TCP) front-end and MQTT; readiness, status and the
//! watchdog under systemd; reloads on SIGHUP; an orderly stop. `main` (and the
//! tests) call [`run_with`]; everything here is wiring, the parts live in
//! their modules.

use crate::{config, engine, intake, manager, memory, metrics, registry, scheduler, systemd};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Registry(#[from] registry::RegistryError),
    #[error(transparent)]
    Socket(#[from] intake::unix::SocketError),
    #[error("cannot listen on TCP {addr}: {message}")]
    Tcp { addr: String, message: String },
    #[error("MQTT: {0}")]
    Mqtt(String),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
}

/// Runs the daemon with `config` until `shutdown` completes: loads and
/// validates the registry, listens on the Unix socket (and TCP if
/// configured), and serves. On shutdown it stops accepting, lets in-flight
/// jobs finish within `jobs.drain_timeout_ms` and removes the socket file.
/// The single entry point: `main` passes the signal future, tests their own.
pub async fn run(config: config::Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    run_with_probe(config, shutdown, Arc::new(memory::SystemProbe::default())).await
}

/// [`run`] with the memory probe given (tests pass a fake one to create memory pressure).
pub async fn run_with_probe(
    config: config::Config,
    shutdown: impl Future<Output = ()>,
    probe: Arc<dyn memory::MemoryProbe>,
) -> Result<(), RunError> {
    run_with(config, shutdown, probe, None).await
}

/// How a running daemon is asked to reload and how it reads its settings anew.
pub struct Reload {
    /// One message per reload request (`main` sends one per SIGHUP).
    pub requests: tokio::sync::mpsc::Receiver<()>,
    /// Reads the configuration again (file and environment); the models.json it names is read after it.
    pub reread: Box<dyn Fn() -> Result<config::Config, String> + Send + Sync>,
}

/// [`run_with_probe`] that also reloads on request: the configuration and
/// models.json are read again and validated; a bad file is refused with its
/// reason logged and the running set keeps serving; changed models are
/// swapped once the jobs queued for them have run.
pub async fn run_with(
    config: config::Config,
    shutdown: impl Future<Output = ()>,
    probe: Arc<dyn memory::MemoryProbe>,
    reload: Option<Reload>,
) -> Result<(), RunError> {
    config.validate()?;
    memory::tune_allocator();
    for warning in config.readable_secret_files() {
        tracing::warn!("{warning}");
    }
    // A fleet swap the box died in is undone before the registry is read: the last good set serves.
    let fleet_state =
        config.fleet.enabled.then(|| crate::fleet::store::recover(&config.pull_dir(&config.registry_path())));
    let registry = registry::Registry::load_for(&config, &config.registry_path())?;
    let engine = engine::Engine::new(config.clone(), registry);
    let metrics = Arc::new(metrics::Metrics::default());
    let manager = Arc::new(manager::Manager::new(config.memory.clone(), probe, engine.registry_arc()));
    tracing::info!("memory: {}", manager.probe().describe());
    for model in &engine.registry().models {
        let backend = engine.plan(&model.name, None);
        match (manager.plan_load(model, None), backend) {
            (Ok(plan), Ok(b)) => tracing::info!(
                model = %model.name,
                variant = %plan.variant,
                backend = %b.backend.backend,
                "registered: {}; {}",
                plan.reason,
                b.backend.reason
            ),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(model = %model.name, "registered but cannot run now: {}", e.message)
            }
        }
    }
    let quarantine = Arc::new(crate::quarantine::Quarantine::open(&config.memory.resolved_state_dir()));
    let scheduler =
        Arc::new(scheduler::Scheduler::new(engine, config.jobs.clone(), metrics, manager).with_quarantine(quarantine));
    let (listener, socket_path, socket_lock) = intake::unix::bind_or_inherit(&config.socket)?;
    let inherited = socket_lock.is_none();
    let tcp = match &config.socket.tcp {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| RunError::Tcp { addr: addr.clone(), message: e.to_string() })?,
        ),
        None => None,
    };
    let tcp_token = config.socket.tcp_token()?;
    if tcp.is_some() && tcp_token.is_none() {
        return Err(config::ConfigError::Invalid(
            "socket.tcp needs a bearer token: set socket.tcp_token_file (or tcp_token_env)".into(),
        )
        .into());
    }
    let ready = Arc::new(AtomicBool::new(false));
    let app = intake::http::router(intake::http::AppState {
        scheduler: scheduler.clone(),
        ready: ready.clone(),
        max_body_bytes: config.socket.max_body_bytes(),
        bodies: intake::room::BodyRoom::new(config.socket.max_bodies_mb.saturating_mul(1024)),
        body_timeout: Duration::from_secs(config.socket.body_timeout_s),
        min_body_rate: config.socket.min_body_rate_kib_s.saturating_mul(1024),
        limits: config.limits.clone(),
        admin_uids: config.socket.admin_uids.clone(),
        tcp_token,
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut servers = tokio::task::JoinSet::new();
    let limits = intake::conn::ConnLimits::from_config(&config.socket);
    // One cap over every listener, fitted to the open-file limit.
    let conns = intake::conn::ConnTable::sized(&limits);
    servers.spawn(intake::conn::serve(listener, app.clone(), limits, conns.clone(), stop_rx.clone()));
    if let Some(tcp) = tcp {
        tracing::info!(addr = ?tcp.local_addr().ok(), "listening on TCP (bearer token required)");
        servers.spawn(intake::conn::serve(tcp, app, limits, conns, stop_rx.clone()));
    }
    let drain = Duration::from_millis(config.jobs.drain_timeout_ms);
    let mqtt = match &config.mqtt.url {
        Some(_) => {
            let broker = config::Broker::parse(&config.mqtt).map_err(RunError::Mqtt)?;
            let task = intake::mqtt::serve(
                broker,
                config.mqtt.clone(),
                config.limits.clone(),
                scheduler.clone(),
                stop_rx.clone(),
                drain,
                Some(config.memory.resolved_state_dir()),
            );
            Some(tokio::spawn(task))
        }
        None => None,
    };
    let fleet = match fleet_state {
        Some(state) => {
            let broker = config::Broker::parse(&config.mqtt).map_err(RunError::Mqtt)?;
            let fleet = crate::fleet::apply::Fleet::new(config.clone(), scheduler.clone(), state)
                .map_err(|e| RunError::Config(config::ConfigError::Invalid(e)))?;
            tokio::spawn(fleet.clone().run(stop_rx.clone()));
            let max_document = config.fleet.max_document_kib.saturating_mul(1024);
            Some(tokio::spawn(crate::fleet::agent::serve(
                fleet,
                broker,
                config.mqtt.clone(),
                max_document,
                stop_rx.clone(),
            )))
        }
        None => None,
    };
    scheduler.start_background(stop_rx.clone());
    ready.store(true, Ordering::SeqCst);
    tracing::info!(socket = %socket_path.display(), models = scheduler.engine().registry().models.len(), "inferd is ready");
    systemd::ready(&status_line(&scheduler, 0.0));
    tokio::spawn(report_status(scheduler.clone(), stop_rx.clone()));
    if let Some(every) = systemd::watchdog_interval() {
        tokio::spawn(watchdog(scheduler.clone(), every, Duration::from_secs(config.jobs.stuck_job_s), stop_rx.clone()));
    }
    if let Some(reload) = reload {
        tokio::spawn(reloads(scheduler.clone(), config.clone(), reload, stop_rx.clone()));
    }

    shutdown.await;
    tracing::info!("inferd is stopping: no new requests, finishing those in flight");
    systemd::stopping();
    ready.store(false, Ordering::SeqCst);
    if !inherited {
        // A socket systemd passed stays systemd's: it keeps listening and starts inferd again on demand.
        intake::unix::remove(&socket_path);
    }
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(drain, async {
        while let Some(done) = servers.join_next().await {
            if let Ok(Err(e)) = done {
                tracing::warn!("a listener failed: {e}");
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("requests still in flight after {} ms; closing them", drain.as_millis());
        servers.abort_all();
    }
    if let Some(mqtt) = mqtt {
        match tokio::time::timeout(drain + Duration::from_secs(3), mqtt).await {
            Ok(Ok(Err(e))) => tracing::warn!("MQTT: {e}"),
            Err(_) => tracing::warn!("MQTT did not stop in time"),
            _ => {}
        }
    }
    if let Some(fleet) = fleet {
        let _ = tokio::time::timeout(Duration::from_secs(3), fleet).await;
    }
    scheduler.shutdown(drain).await;
    drop(socket_lock);
    tracing::info!("inferd stopped");
    Ok(())
}

fn status_line(scheduler: &scheduler::Scheduler, jobs_per_s: f64) -> String {
    let line = systemd::status_line(&scheduler.loaded_models(), jobs_per_s, scheduler.metrics().mqtt_connected());
    match scheduler.metrics().mqtt_problem() {
        Some(problem) => format!("{line} ({problem})"),
        None => line,
    }
}

/// Keeps systemd's `STATUS=` current: loaded models, job rate, MQTT.
async fn report_status(scheduler: Arc<scheduler::Scheduler>, mut stop: tokio::sync::watch::Receiver<bool>) {
    const EVERY: Duration = Duration::from_secs(5);
    let mut last = (scheduler.metrics().jobs_total(), std::time::Instant::now());
    let mut said = String::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        memory::trim_heap();
        let now = (scheduler.metrics().jobs_total(), std::time::Instant::now());
        let rate = now.0.saturating_sub(last.0) as f64 / (now.1 - last.1).as_secs_f64().max(1e-3);
        last = now;
        let line = status_line(&scheduler, rate);
        if line != said {
            systemd::status(&line);
            said = line;
        }
    }
}

/// Pings systemd's watchdog every `every` while the scheduler and its
/// workers are healthy; stops pinging (so systemd restarts inferd) when not.
async fn watchdog(
    scheduler: Arc<scheduler::Scheduler>,
    every: Duration,
    stuck_after: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    tracing::info!(interval_ms = every.as_millis() as u64, "pinging the systemd watchdog");
    let mut failing = false;
    loop {
        let s = scheduler.clone();
        let health = tokio::task::spawn_blocking(move || s.health(stuck_after)).await;
        match health.unwrap_or_else(|e| Err(format!("the health check failed: {e}"))) {
            Ok(()) => {
                if failing {
                    tracing::info!("healthy again; watchdog pings resume");
                }
                failing = false;
                systemd::watchdog_ping();
            }
            Err(why) if !failing => {
                tracing::error!("unhealthy: {why}; no more watchdog pings, so systemd restarts inferd");
                failing = true;
            }
            _ => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Serves reload requests until `stop`.
async fn reloads(
    scheduler: Arc<scheduler::Scheduler>,
    mut current: config::Config,
    mut reload: Reload,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            request = reload.requests.recv() => if request.is_none() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
        systemd::reloading();
        tracing::info!("reloading the configuration and models.json");
        match apply_reload(&scheduler, &current, &reload).await {
            Ok(config) => current = config,
            Err(why) => tracing::error!("reload refused: {why}; the running configuration keeps serving"),
        }
        systemd::ready(&status_line(&scheduler, 0.0));
    }
}

async fn apply_reload(
    scheduler: &scheduler::Scheduler,
    current: &config::Config,
    reload: &Reload,
) -> Result<config::Config, String> {
    let config = (reload.reread)()?;
    let registry = registry::Registry::load_for(&config, &config.registry_path()).map_err(|e| e.to_string())?;
    let engine_changed = config.runtime != current.runtime || config.limits != current.limits;
    let restart_only: Vec<&str> = [
        ("socket", config.socket != current.socket),
        ("mqtt", config.mqtt != current.mqtt),
        ("jobs", config.jobs != current.jobs),
        ("memory", config.memory != current.memory),
        ("log", config.log != current.log),
    ]
    .into_iter()
    .filter_map(|(name, differs)| differs.then_some(name))
    .collect();
    if !restart_only.is_empty() {
        tracing::warn!("changes to [{}] take effect at the next restart", restart_only.join("], ["));
    }
    scheduler.swap_registry(config.clone(), registry, engine_changed).await?;
    Ok(config)
}
