//! `cargo xtask bench <dataplane|failover|link-flap|loss|tc-cost>`: the benchmarks (release
//! build). `dataplane` is in `scale.rs`.

use anyhow::Result;

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Which {
    Dataplane,
    Failover,
    /// Fail-closed egress across link flaps of the gateways' interface.
    LinkFlap,
    /// False withdrawals of a healthy gateway with 2 % random loss both ways.
    Loss,
    /// Recovery after the API server was killed for 60 s (Kubernetes mode).
    ApiOutage,
    TcCost,
}

/// Percentile `p` (0..=1) of `sorted`, nearest rank.
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

pub fn run(
    which: Which,
    trials: usize,
    baseline_trials: usize,
    prefixes: usize,
    mode: crate::scale::Modes,
) -> Result<()> {
    crate::setup::setup()?;
    crate::cmd("cargo", &["build", "--release", "-p", "routing-agent"])?;
    // An agent binary given in `ROUTING_AGENT_BIN` is kept: a wrapper that runs the release
    // build under a profiler (docs/benchmarks.md: where the memory goes).
    if std::env::var_os("ROUTING_AGENT_BIN").is_none() {
        // SAFETY: single-threaded at this point; the lab library reads it when starting agents.
        unsafe {
            std::env::set_var(
                "ROUTING_AGENT_BIN",
                crate::workspace().join("target/release/routing-agent"),
            )
        };
    }
    match which {
        Which::Dataplane => crate::scale::run(prefixes, mode),
        Which::Failover => crate::failover::run(trials, baseline_trials, prefixes),
        Which::LinkFlap => crate::failover::link_flaps(trials),
        Which::Loss => crate::failover::loss(trials),
        Which::ApiOutage => crate::scale::api_outage(trials.min(5)),
        Which::TcCost => crate::tccost::run(),
    }
}
