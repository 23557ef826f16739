//! The HTTP port (`--health-addr`): `/healthz` for the kubelet's liveness probe (the main
//! loop is turning), `/readyz` for its readiness probe (the first reconcile from a complete
//! view of the Routes is done and the TC programs are attached; the controller: its caches
//! are filled), `/metrics` for Prometheus.
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tracing::info;

/// What the probes report, updated by the process.
pub struct Probes {
    started: Instant,
    /// Milliseconds after `started` of the last heartbeat.
    beat_ms: AtomicU64,
    ready: AtomicBool,
    /// Live while the last heartbeat is at most this old.
    stale_after: Duration,
    /// `/status`: the agent's last summary (JSON), when it has one.
    status: std::sync::Mutex<Option<String>>,
}

impl Probes {
    pub fn new(stale_after: Duration) -> Arc<Self> {
        Arc::new(Probes {
            started: Instant::now(),
            beat_ms: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            stale_after,
            status: std::sync::Mutex::new(None),
        })
    }

    /// The main loop went round.
    pub fn beat(&self) {
        self.beat_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// What `/status` answers from now on.
    pub fn set_status(&self, json: String) {
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = Some(json);
    }

    fn status(&self) -> Option<String> {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// `Err(why)` when the last heartbeat is too old.
    pub fn live(&self) -> Result<(), String> {
        let last = Duration::from_millis(self.beat_ms.load(Ordering::Relaxed));
        let age = self.started.elapsed().saturating_sub(last);
        if age > self.stale_after {
            return Err(format!(
                "the main loop has not turned for {}s",
                age.as_secs()
            ));
        }
        Ok(())
    }

    pub fn ready(&self) -> Result<(), String> {
        self.live()?;
        if !self.ready.load(Ordering::Relaxed) {
            return Err("no reconcile from a complete view of the Routes yet".into());
        }
        Ok(())
    }
}

fn answer(r: Result<(), String>) -> (StatusCode, String) {
    match r {
        Ok(()) => (StatusCode::OK, "ok\n".into()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

#[derive(Clone)]
struct AppState {
    probes: Arc<Probes>,
    metrics: Option<Arc<crate::ops::metrics::Metrics>>,
}

impl axum::extract::FromRef<AppState> for Arc<Probes> {
    fn from_ref(s: &AppState) -> Self {
        s.probes.clone()
    }
}

/// Serves the probes (and `metrics`, when given) on `addr` until the process ends.
pub async fn spawn(
    addr: SocketAddr,
    probes: Arc<Probes>,
    metrics: Option<Arc<crate::ops::metrics::Metrics>>,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route(
            "/healthz",
            get(|State(p): State<Arc<Probes>>| async move { answer(p.live()) }),
        )
        .route(
            "/readyz",
            get(|State(p): State<Arc<Probes>>| async move { answer(p.ready()) }),
        )
        .route(
            "/status",
            get(|State(p): State<Arc<Probes>>| async move {
                match p.status() {
                    Some(s) => (
                        StatusCode::OK,
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        s,
                    ),
                    None => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        [(axum::http::header::CONTENT_TYPE, "text/plain")],
                        "no reconcile yet\n".to_string(),
                    ),
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(s): State<AppState>| async move {
                match &s.metrics {
                    Some(m) => (
                        StatusCode::OK,
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.encode(),
                    ),
                    None => (
                        StatusCode::NOT_FOUND,
                        [(axum::http::header::CONTENT_TYPE, "text/plain")],
                        String::new(),
                    ),
                }
            }),
        )
        .with_state(AppState { probes, metrics });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    info!(%addr, "HTTP endpoints listening (/healthz, /readyz, /status, /metrics)");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "health endpoint stopped");
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_needs_a_reconcile_and_a_recent_beat() {
        let p = Probes::new(Duration::from_secs(3600));
        p.beat();
        assert!(p.live().is_ok());
        assert!(p.ready().unwrap_err().contains("no reconcile"));
        p.set_ready();
        assert!(p.ready().is_ok());
    }

    #[test]
    fn a_stale_loop_is_not_live() {
        let p = Probes::new(Duration::ZERO);
        std::thread::sleep(Duration::from_millis(5));
        assert!(p.live().unwrap_err().contains("has not turned"));
        assert!(p.ready().is_err());
    }
}
