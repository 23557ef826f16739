//! The reconcile loop: latest Route snapshot + this node → plan → dataplane → eBPF
//! attachments → report. Level-based: every trigger (a new snapshot, a netlink change,
//! a retry, the periodic resync) runs the same full reconcile.
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;
use tracing::{error, info, warn};

use ipnet::IpNet;

use crate::crd::Route;
use crate::dataplane::{Dataplane, Outcome, monitor};
use crate::default_route;
use crate::ebpf::Programs;
use crate::health::{self, Health, Transition};
use crate::plan::{self, DesiredState, ProblemKind};
use crate::probe::Prober;
use crate::publish;
use crate::report::{self, GatewayState};
use crate::selector::NodeInfo;
use crate::source::Snapshot;

pub struct AgentConfig {
    pub node: NodeInfo,
    pub resync: Duration,
    pub retry_min: Duration,
    pub retry_max: Duration,
    pub status_file: Option<PathBuf>,
    pub health: health::Config,
    /// How often the eBPF counters and the neighbour table are read.
    pub health_tick: Duration,
    /// Kubernetes mode: where this node's status and Events go.
    pub publisher: Option<mpsc::Sender<publish::Report>>,
    /// Liveness / readiness, served on the health port.
    pub probes: std::sync::Arc<crate::serve::Probes>,
    /// What a default-route override must not cut off.
    pub protect: ProtectConfig,
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
}

/// Protected destinations and symmetric routing, as configured.
#[derive(Clone, Debug, Default)]
pub struct ProtectConfig {
    /// Always protected: metadata, `--protected-cidr`, the configured API server host.
    pub fixed: Vec<IpNet>,
    /// Its nameservers are protected (read at every reconcile).
    pub resolv_conf: Option<PathBuf>,
    /// Nameservers inside these are cluster-internal: not protected.
    pub in_cluster: Vec<IpNet>,
    pub symmetric: Option<SymmetricConfig>,
}

#[derive(Clone, Debug)]
pub struct SymmetricConfig {
    pub table: u32,
    pub priority: u32,
    /// The public interface by name (`None`: the one of the node's own default route).
    pub interface: Option<String>,
}

/// The index of interface `name` in this network namespace.
fn if_index(name: &str) -> Result<u32, String> {
    let c = std::ffi::CString::new(name).map_err(|_| format!("bad interface name {name:?}"))?;
    // SAFETY: a valid NUL-terminated string; if_nametoindex only reads it.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(format!(
            "--public-interface {name}: {}",
            std::io::Error::last_os_error()
        )),
        i => Ok(i),
    }
}

impl ProtectConfig {
    /// The protection for this reconcile: fixed candidates, the nameservers of the
    /// resolv.conf as it is now, the control-plane endpoints from the source.
    fn protection(&self, endpoints: &[IpAddr]) -> Result<default_route::Protection, String> {
        let mut candidates: BTreeSet<IpNet> = self.fixed.iter().copied().collect();
        candidates.extend(endpoints.iter().map(|a| IpNet::from(*a)));
        if let Some(path) = &self.resolv_conf {
            match std::fs::read_to_string(path) {
                Ok(text) => candidates.extend(
                    default_route::nameservers(&text, &self.in_cluster)
                        .into_iter()
                        .map(IpNet::from),
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("reading {}: {e}", path.display())),
            }
        }
        let symmetric = match &self.symmetric {
            None => None,
            Some(s) => Some(default_route::Symmetric {
                table: s.table,
                priority: s.priority,
                interface: match &s.interface {
                    None => None,
                    Some(name) => Some(if_index(name)?),
                },
            }),
        };
        Ok(default_route::Protection {
            candidates,
            symmetric,
        })
    }
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

/// What the health side needs to know of the last reconcile.
#[derive(Default)]
struct Watch {
    /// Every gateway of the selected routes (withdrawn included) → its interface.
    oifs: BTreeMap<IpAddr, u32>,
    /// Gateway → gateways it shares a route with.
    peers: BTreeMap<IpAddr, BTreeSet<IpAddr>>,
    /// Route destinations whose gateways are all down, kept (fail-closed).
    kept_down: BTreeMap<ipnet::IpNet, Vec<IpAddr>>,
    /// Gateways' MAC addresses as last read from the neighbour table.
    macs: BTreeMap<IpAddr, [u8; 6]>,
    /// When an unresolved gateway was last pinged to make the kernel resolve it.
    warmed: BTreeMap<IpAddr, Instant>,
}

/// How often an unresolved gateway is pinged so that its MAC is known (and its traffic
/// attributed) before the first connection through it.
const WARM_UP_EVERY: Duration = Duration::from_secs(5);

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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
    let mut tick = tokio::time::interval(cfg.health_tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut backoff = Backoff::new(cfg.retry_min, cfg.retry_max);
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut routes: Option<Vec<Route>> = None;
    let mut last: Option<(DesiredState, Outcome)> = None;
    let mut reconciles: u64 = 0;

    let mut health = Health::new(cfg.health.clone());
    let prober = match &programs {
        Some(_) => Some(Prober::new(
            cfg.health.probe_interval.min(Duration::from_secs(1)),
        )?),
        None => None,
    };
    let (probe_tx, mut probe_rx) = mpsc::channel::<(IpAddr, bool)>(64);
    if let Some(p) = &programs {
        let now = Instant::now();
        let now_ms = unix_ms(SystemTime::now());
        for (gw, info) in p.recorded() {
            if info.state == routing_agent_common::GW_DOWN {
                let down_for = Duration::from_millis(now_ms.saturating_sub(info.down_since_ms));
                health.restore_down(gw, info.penalty, down_for, now);
                info!(gateway = %gw, penalty = info.penalty, down_for_s = down_for.as_secs(),
                    "gateway still down according to the pinned record");
            }
        }
    }
    let mut watch = Watch::default();
    let mut last_doc: Option<serde_json::Value> = None;
    let mut node = cfg.node.clone();
    let mut reported: Option<crate::crd::NodeRoutes> = None;
    let mut endpoints: Vec<IpAddr> = Vec::new();

    loop {
        cfg.probes.beat();
        let retry = async {
            match retry_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            s = snapshots.recv() => match s {
                Some(s) => {
                    routes = Some(s.routes);
                    if let Some(e) = s.control_plane {
                        if e != endpoints {
                            info!(endpoints = ?e, "control-plane endpoints");
                        }
                        endpoints = e;
                    }
                    if let Some(labels) = s.node_labels
                        && labels != node.labels
                    {
                        info!(labels = ?labels, "this node's labels changed");
                        node.labels = labels;
                    }
                }
                None => anyhow::bail!("the Route source stopped"),
            },
            _ = wake_rx.recv() => {
                // Let a burst of notifications settle, then reconcile once.
                tokio::time::sleep(Duration::from_millis(50)).await;
                while wake_rx.try_recv().is_ok() {}
            }
            _ = retry => retry_at = None,
            _ = resync.tick() => {}
            _ = tick.tick(), if programs.is_some() => {
                let p = programs.as_mut().expect("guarded");
                let changes = health_step(&mut health, p, &dataplane, &mut watch, prober.as_ref(), &probe_tx, &cfg.metrics).await;
                if changes.is_empty() {
                    emit_status(&cfg, last.as_ref(), programs.as_ref(), &health, &watch, reconciles, &mut last_doc);
                    continue;
                }
                for t in &changes {
                    log_transition(t, &health, &watch);
                    count_transition(&cfg.metrics, t);
                }
            }
            r = probe_rx.recv() => {
                let Some((gw, ok)) = r else { continue };
                cfg.metrics
                    .probes
                    .get_or_create(&crate::metrics::ProbeLabels {
                        gateway: gw.to_string(),
                        answered: ok.to_string(),
                    })
                    .inc();
                let t = health.probe_result(gw, ok, Instant::now());
                if let Some(t) = &t {
                    count_transition(&cfg.metrics, t);
                }
                let h = health.get(&gw);
                match (&t, h) {
                    (Some(t), _) => log_transition(t, &health, &watch),
                    (None, Some(h)) if h.down => {
                        let wait = h.restore_after.map(|t| t.saturating_duration_since(Instant::now()));
                        info!(gateway = %gw, answered = ok, restore_in_s = wait.map(|w| w.as_secs()),
                            "probe of a withdrawn gateway");
                    }
                    _ => {}
                }
                if t.is_none() {
                    continue;
                }
                if let Some(p) = &mut programs {
                    record(p, &health, gw);
                }
            }
            _ = sigterm.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
        // Until the source has delivered its first complete view, the kernel stays as it
        // is: a restart never removes routes it has not yet been told to remove.
        let Some(routes) = &routes else { continue };
        let mut desired = plan::plan(routes, &node);
        // Default-route overrides: what must stay reachable through the node's own uplink.
        // Without the facts, nothing changes (an override without its protection could cut
        // the node off).
        // Read only while an override is planned: the kernel dumps and resolv.conf are not
        // needed otherwise (no override: nothing to protect).
        if desired.routes.values().any(|r| r.from_default) {
            let facts = match cfg.protect.protection(&endpoints) {
                Ok(p) => dataplane
                    .facts(p.symmetric.as_ref())
                    .await
                    .map(|f| (p, f))
                    .map_err(|e| {
                        format!("cannot read the node's routes, addresses and rules: {e}")
                    }),
                Err(e) => Err(e),
            };
            match facts {
                Ok((protection, facts)) => {
                    default_route::protect(&mut desired, &facts, &protection)
                }
                Err(e) => {
                    cfg.metrics.reconcile_errors.inc();
                    let wait = backoff.step();
                    error!(error = %e, retry_in = ?wait, "reconcile skipped; nothing changed");
                    retry_at = Some(tokio::time::Instant::now() + wait);
                    continue;
                }
            }
        }
        let all_gateways: BTreeSet<IpAddr> = desired
            .routes
            .values()
            .flat_map(|r| r.gateways.iter().copied())
            .collect();
        watch.peers = health::peers(desired.routes.values().map(|r| r.gateways.as_slice()));
        health.set_gateways(&all_gateways, Instant::now());
        if let Some(p) = &mut programs {
            p.set_gateways(&all_gateways);
        }
        let kept_down = plan::withdraw(&mut desired, &health.down());
        for (dst, gws) in &kept_down {
            if watch.kept_down.get(dst) != Some(gws) {
                warn!(destination = %dst, gateways = ?gws,
                    "every gateway of the route is down; keeping them (fail-closed: never falling back to the node's default route)");
            }
        }
        watch.kept_down = kept_down;
        let started = Instant::now();
        match dataplane.reconcile(&desired).await {
            Ok(outcome) => {
                reconciles += 1;
                if let Some(p) = &mut programs {
                    p.sync(&outcome.interfaces);
                }
                // Ready: a full reconcile done and the TC programs on every interface
                // that faces a gateway.
                if programs
                    .as_ref()
                    .is_none_or(|p| p.covers(&outcome.interfaces))
                {
                    cfg.probes.set_ready();
                }
                record_reconcile(&cfg.metrics, &desired, &outcome, &health, started.elapsed());
                watch.oifs = outcome.gateway_oifs.clone();
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
                send_report(&cfg, routes, &desired, &outcome, &health, &mut reported);
                last = Some((desired, outcome));
                emit_status(
                    &cfg,
                    last.as_ref(),
                    programs.as_ref(),
                    &health,
                    &watch,
                    reconciles,
                    &mut last_doc,
                );
            }
            Err(e) => {
                cfg.metrics.reconcile_errors.inc();
                let wait = backoff.step();
                error!(error = format!("{e:#}"), retry_in = ?wait, "reconcile failed; nothing changed");
                retry_at = Some(tokio::time::Instant::now() + wait);
            }
        }
    }
    info!("stopping; installed routes stay in place (`routing-agent cleanup` removes them)");
    Ok(())
}

/// One health tick: neighbour table → attribution map; counters + neighbour state →
/// state machine; due probes are sent. Returns the transitions (already recorded).
async fn health_step(
    health: &mut Health,
    programs: &mut Programs,
    dataplane: &Dataplane,
    watch: &mut Watch,
    prober: Option<&Prober>,
    probe_tx: &mpsc::Sender<(IpAddr, bool)>,
    metrics: &crate::metrics::Metrics,
) -> Vec<Transition> {
    let now = Instant::now();
    let neighbours = match dataplane.neighbours(&watch.oifs).await {
        Ok(n) => n,
        Err(e) => {
            warn!(error = %e, "cannot read the neighbour table");
            BTreeMap::new()
        }
    };
    let macs: BTreeMap<(u32, [u8; 6]), IpAddr> = neighbours
        .iter()
        .filter_map(|(gw, n)| Some(((n.ifindex, n.mac?), *gw)))
        .collect();
    programs.set_neighbours(&macs);
    watch.macs = neighbours
        .iter()
        .filter_map(|(gw, n)| Some((*gw, n.mac?)))
        .collect();
    if let Some(prober) = prober {
        for gw in watch.oifs.keys() {
            if watch.macs.contains_key(gw) || health.get(gw).is_some_and(|h| h.down) {
                continue;
            }
            if watch
                .warmed
                .get(gw)
                .is_some_and(|t| now.duration_since(*t) < WARM_UP_EVERY)
            {
                continue;
            }
            watch.warmed.insert(*gw, now);
            let (prober, gw) = (prober.clone(), *gw);
            tokio::spawn(async move { prober.probe(gw).await });
        }
    }
    let stats = programs.read_stats();
    for (gw, s) in &stats {
        metrics.observe_stats(*gw, s);
    }
    for gw in watch.oifs.keys() {
        let s = stats.get(gw).copied().unwrap_or_default();
        let failed = neighbours.get(gw).is_some_and(|n| n.failed);
        health.observe(*gw, &s, failed, now);
    }
    let changes = health.evaluate(&watch.peers, now);
    for t in &changes {
        record(programs, health, t.gateway);
    }
    if let Some(prober) = prober {
        for gw in health.due_probes(now) {
            record(programs, health, gw);
            let (prober, tx) = (prober.clone(), probe_tx.clone());
            tokio::spawn(async move {
                let ok = prober.probe(gw).await;
                let _ = tx.send((gw, ok)).await;
            });
        }
    }
    changes
}

fn count_transition(metrics: &crate::metrics::Metrics, t: &Transition) {
    let l = crate::metrics::Metrics::gateway(t.gateway);
    if t.down {
        metrics.withdrawals.get_or_create(&l).inc();
    } else {
        metrics.restores.get_or_create(&l).inc();
    }
    metrics
        .gateway_last_change
        .get_or_create(&l)
        .set((unix_ms(SystemTime::now()) / 1000) as i64);
}

/// The gauges of one reconcile: routes, problems, gateways' state; its duration.
fn record_reconcile(
    metrics: &crate::metrics::Metrics,
    desired: &DesiredState,
    outcome: &Outcome,
    health: &Health,
    took: Duration,
) {
    metrics.reconciles.inc();
    metrics.reconcile_duration.observe(took.as_secs_f64());
    metrics.kernel_changes.inc_by(outcome.changes as u64);
    metrics
        .destinations_installed
        .set(outcome.installed.len() as i64);
    metrics.route_applied.clear();
    for name in &desired.selected {
        let failed = outcome.problems.iter().any(|p| &p.route == name);
        metrics
            .route_applied
            .get_or_create(&crate::metrics::RouteLabels {
                route: name.clone(),
            })
            .set(i64::from(!failed));
    }
    metrics.problems.clear();
    for p in &outcome.problems {
        metrics
            .problems
            .get_or_create(&crate::metrics::ReasonLabels {
                reason: report::reason(&p.kind).into(),
            })
            .inc();
    }
    metrics.gateway_up.clear();
    metrics.gateway_penalty.clear();
    for (gw, h) in health.iter() {
        let l = crate::metrics::Metrics::gateway(*gw);
        metrics.gateway_up.get_or_create(&l).set(i64::from(!h.down));
        metrics
            .gateway_penalty
            .get_or_create(&l)
            .set(i64::from(h.penalty));
    }
}

fn record(programs: &mut Programs, health: &Health, gw: IpAddr) {
    let Some(h) = health.get(&gw) else { return };
    let (now, wall) = (Instant::now(), SystemTime::now());
    let at = |t: Instant| unix_ms(wall - now.saturating_duration_since(t));
    let after = |t: Instant| unix_ms(wall + t.saturating_duration_since(now));
    let changed = at(h.since);
    programs.record_health(
        gw,
        crate::ebpf::HealthRecord {
            state: if h.down {
                routing_agent_common::GW_DOWN
            } else {
                routing_agent_common::GW_UP
            },
            penalty: h.penalty,
            down_since_ms: if h.down { changed } else { 0 },
            changed_ms: changed,
            next_probe_ms: if h.down {
                h.next_probe.map(after).unwrap_or(0)
            } else {
                0
            },
        },
    );
}

fn log_transition(t: &Transition, health: &Health, watch: &Watch) {
    let h = health.get(&t.gateway);
    let peers = watch
        .peers
        .get(&t.gateway)
        .map(|p| p.len())
        .unwrap_or_default();
    if t.down {
        let restore_in = h
            .and_then(|h| h.restore_after)
            .map(|r| r.saturating_duration_since(Instant::now()).as_secs());
        warn!(gateway = %t.gateway, reason = %t.reason, penalty = h.map(|h| h.penalty),
            restore_not_before_s = restore_in, peers,
            "gateway down: withdrawing it from its routes and probing it");
    } else {
        info!(gateway = %t.gateway, reason = %t.reason, "gateway up: back in its routes");
    }
}

fn gateway_status(
    health: &Health,
    programs: Option<&Programs>,
    watch: &Watch,
) -> Vec<serde_json::Value> {
    let now = Instant::now();
    health
        .iter()
        .map(|(gw, h)| {
            let c = &h.counters;
            serde_json::json!({
                "address": gw.to_string(),
                "slot": programs.and_then(|p| p.slot(*gw)),
                "mac": watch.macs.get(gw).map(|m| m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")),
                "state": if h.down { "down" } else { "up" },
                "reason": h.reason,
                "sinceSeconds": now.saturating_duration_since(h.since).as_secs(),
                "penalty": h.penalty,
                "restoreInSeconds": h.restore_after.map(|t| t.saturating_duration_since(now).as_secs_f64()),
                "lastProbeAnswered": h.last_probe_ok,
                "failureStreak": h.streak(),
                "counters": c,
            })
        })
        .collect()
}

/// Hands this node's status to the publisher when it changed (with the Events the change
/// is worth). Never waits: when the publisher is busy, the next reconcile reports again.
fn send_report(
    cfg: &AgentConfig,
    routes: &[Route],
    desired: &DesiredState,
    outcome: &Outcome,
    health: &Health,
    sent: &mut Option<crate::crd::NodeRoutes>,
) {
    let Some(tx) = &cfg.publisher else { return };
    let gateways: BTreeMap<IpAddr, GatewayState> = health
        .iter()
        .map(|(g, h)| {
            (
                *g,
                GatewayState {
                    down: h.down,
                    reason: h.reason.clone(),
                },
            )
        })
        .collect();
    let status = report::node_routes(
        routes,
        desired,
        &outcome.installed,
        &outcome.problems,
        &gateways,
        sent.as_ref(),
        &publish::now(),
    );
    if sent.as_ref().is_some_and(|s| report::same(s, &status)) {
        return;
    }
    let notes = report::notes(
        &cfg.node.name,
        sent.as_ref(),
        &status,
        &report::gateway_routes(desired),
    );
    let r = publish::Report {
        status: status.clone(),
        notes,
        refs: publish::refs(routes),
    };
    match tx.try_send(r) {
        Ok(()) => *sent = Some(status),
        Err(e) => {
            warn!(error = %e, "the status publisher is busy; reporting again at the next reconcile")
        }
    }
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

/// Writes the status file when its content changed.
fn emit_status(
    cfg: &AgentConfig,
    last: Option<&(DesiredState, Outcome)>,
    programs: Option<&Programs>,
    health: &Health,
    watch: &Watch,
    reconciles: u64,
    last_doc: &mut Option<serde_json::Value>,
) {
    let (Some(path), Some((desired, outcome))) = (&cfg.status_file, last) else {
        return;
    };
    let attached = programs.map(|p| p.attached()).unwrap_or_default();
    let gateways = gateway_status(health, programs, watch);
    let doc = status_doc(
        &cfg.node.name,
        desired,
        outcome,
        &attached,
        &gateways,
        reconciles,
    );
    if last_doc.as_ref() == Some(&doc) {
        return;
    }
    let write = || -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&doc)?)?;
        std::fs::rename(tmp, path)
    };
    match write() {
        Ok(()) => *last_doc = Some(doc),
        Err(e) => warn!(path = %path.display(), error = %e, "cannot write the status file"),
    }
}

fn status_doc(
    node: &str,
    desired: &DesiredState,
    outcome: &Outcome,
    attached: &[String],
    gateways: &[serde_json::Value],
    reconciles: u64,
) -> serde_json::Value {
    let routes: Vec<_> = outcome
        .installed
        .iter()
        .map(|(dst, gws)| {
            serde_json::json!({
                "destination": dst.to_string(),
                "gateways": gws.iter().map(|g| g.to_string()).collect::<Vec<_>>(),
                "withdrawn": desired.routes.get(dst).map(|r| r.withdrawn.iter().map(|g| g.to_string()).collect::<Vec<_>>()).unwrap_or_default(),
                "owner": desired.routes.get(dst).map(|r| r.owner.clone()),
            })
        })
        .collect();
    let problems: Vec<_> = outcome
        .problems
        .iter()
        .map(|p| {
            let kind = report::reason(&p.kind);
            serde_json::json!({"route": p.route, "kind": kind, "message": p.message})
        })
        .collect();
    serde_json::json!({
        "node": node,
        "reconciles": reconciles,
        "lastChanges": outcome.changes,
        "selected": desired.selected,
        "routes": routes,
        "problems": problems,
        "warnings": desired.warnings,
        "attached": attached,
        "gateways": gateways,
        "defaultRoute": report::default_routes(desired),
    })
}
