//! The reconcile loop: latest Route snapshot + this node → plan → dataplane → eBPF
//! attachments → report. Level-based: every trigger (a new snapshot, a netlink change,
//! a retry, the periodic resync) runs the same full reconcile.
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::crd::Route;
use crate::dataplane::{Dataplane, Outcome, monitor};
use crate::ebpf::Programs;
use crate::plan::{self, DesiredState, ProblemKind};
use crate::selector::NodeInfo;
use crate::source::Snapshot;

pub struct AgentConfig {
    pub node: NodeInfo,
    pub resync: Duration,
    pub retry_min: Duration,
    pub retry_max: Duration,
    pub status_file: Option<PathBuf>,
}

/// Exponential back-off for retrying what the kernel could not take yet.
struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            next: min,
        }
    }
    fn step(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }
    fn reset(&mut self) {
        self.next = self.min;
    }
}

pub async fn run(
    cfg: AgentConfig,
    mut dataplane: Dataplane,
    mut programs: Option<Programs>,
    mut snapshots: mpsc::Receiver<Snapshot>,
) -> anyhow::Result<()> {
    let (wake_tx, mut wake_rx) = mpsc::channel(1);
    monitor::spawn(wake_tx)?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut resync = tokio::time::interval(cfg.resync);
    let mut backoff = Backoff::new(cfg.retry_min, cfg.retry_max);
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut routes: Option<Vec<Route>> = None;
    let mut last: Option<(DesiredState, Outcome)> = None;
    let mut reconciles: u64 = 0;

    loop {
        let retry = async {
            match retry_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            s = snapshots.recv() => match s {
                Some(s) => routes = Some(s.routes),
                None => anyhow::bail!("the Route source stopped"),
            },
            _ = wake_rx.recv() => {
                // Let a burst of notifications settle, then reconcile once.
                tokio::time::sleep(Duration::from_millis(50)).await;
                while wake_rx.try_recv().is_ok() {}
            }
            _ = retry => retry_at = None,
            _ = resync.tick() => {}
            _ = sigterm.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
        // Until the source has delivered its first complete view, the kernel stays as it
        // is: a restart never removes routes it has not yet been told to remove.
        let Some(routes) = &routes else { continue };
        let desired = plan::plan(routes, &cfg.node);
        let started = Instant::now();
        match dataplane.reconcile(&desired).await {
            Ok(outcome) => {
                reconciles += 1;
                if let Some(p) = &mut programs {
                    p.sync(&outcome.interfaces);
                }
                let retryable = outcome.problems.iter().any(|p| {
                    matches!(
                        p.kind,
                        ProblemKind::GatewayUnreachable { .. } | ProblemKind::Kernel { .. }
                    )
                });
                if retryable {
                    retry_at = Some(tokio::time::Instant::now() + backoff.step());
                } else {
                    backoff.reset();
                    retry_at = None;
                }
                report(&desired, &outcome, last.as_ref(), started.elapsed());
                if let Some(path) = &cfg.status_file {
                    let attached = programs.as_ref().map(|p| p.attached()).unwrap_or_default();
                    if let Err(e) =
                        write_status(path, &cfg.node, &desired, &outcome, &attached, reconciles)
                    {
                        warn!(path = %path.display(), error = %e, "cannot write the status file");
                    }
                }
                last = Some((desired, outcome));
            }
            Err(e) => {
                let wait = backoff.step();
                error!(error = format!("{e:#}"), retry_in = ?wait, "reconcile failed; nothing changed");
                retry_at = Some(tokio::time::Instant::now() + wait);
            }
        }
    }
    info!("stopping; installed routes stay in place (`routing-agent cleanup` removes them)");
    Ok(())
}

/// One log line per change: problems that appear or clear, warnings, and a summary when
/// the kernel was changed.
fn report(
    desired: &DesiredState,
    outcome: &Outcome,
    last: Option<&(DesiredState, Outcome)>,
    took: Duration,
) {
    let (old_problems, old_warnings) = match last {
        Some((d, o)) => (o.problems.as_slice(), d.warnings.as_slice()),
        None => (&[][..], &[][..]),
    };
    for p in outcome
        .problems
        .iter()
        .filter(|p| !old_problems.contains(p))
    {
        warn!(route = %p.route, "{}", p.message);
    }
    for p in old_problems
        .iter()
        .filter(|p| !outcome.problems.contains(p))
    {
        info!(route = %p.route, "resolved: {}", p.message);
    }
    for w in desired
        .warnings
        .iter()
        .filter(|w| !old_warnings.contains(w))
    {
        warn!("{w}");
    }
    if outcome.changes > 0 || last.is_none() {
        info!(
            changes = outcome.changes,
            installed = outcome.installed.len(),
            problems = outcome.problems.len(),
            took_ms = took.as_millis() as u64,
            "reconciled"
        );
    }
}

fn write_status(
    path: &std::path::Path,
    node: &NodeInfo,
    desired: &DesiredState,
    outcome: &Outcome,
    attached: &[String],
    reconciles: u64,
) -> std::io::Result<()> {
    let routes: Vec<_> = outcome
        .installed
        .iter()
        .map(|(dst, gws)| {
            serde_json::json!({
                "destination": dst.to_string(),
                "gateways": gws.iter().map(|g| g.to_string()).collect::<Vec<_>>(),
                "owner": desired.routes.get(dst).map(|r| r.owner.clone()),
            })
        })
        .collect();
    let problems: Vec<_> = outcome
        .problems
        .iter()
        .map(|p| {
            let kind = match &p.kind {
                ProblemKind::Invalid => "Invalid",
                ProblemKind::Conflict { .. } => "Conflict",
                ProblemKind::GatewayUnreachable { .. } => "GatewayUnreachable",
                ProblemKind::Kernel { .. } => "Kernel",
            };
            serde_json::json!({"route": p.route, "kind": kind, "message": p.message})
        })
        .collect();
    let doc = serde_json::json!({
        "node": node.name,
        "reconciles": reconciles,
        "lastChanges": outcome.changes,
        "selected": desired.selected,
        "routes": routes,
        "problems": problems,
        "warnings": desired.warnings,
        "attached": attached,
    });
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&doc)?)?;
    std::fs::rename(tmp, path)
}
