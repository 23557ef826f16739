//! What an operator scrapes and probes: Prometheus [`metrics`] and the [`http`] port
//! (`/healthz`, `/readyz`, `/metrics`).
pub mod http;
pub mod metrics;
