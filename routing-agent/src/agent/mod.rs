//! The agent as explicit state: [`Agent`] owns everything the loop used to keep in locals
//! (the latest Routes, this node, the control-plane endpoints, the last plan and what the
//! kernel took, gateway health, retry back-off, what was last reported) and has one
//! method per event. Each method does the event's work through the [`ports`] (the kernel,
//! the TC programs) and returns the [`Next`] things to do that need the runtime (probes to
//! send, a stop). [`run`] only turns events into those calls.
//!
//! Level-based: a new snapshot, a netlink notification, a retry and the periodic resync
//! all run the same full reconcile (latest snapshot + this node → plan → kernel → eBPF
//! attachments → report). A health tick or a probe result reconciles only when a gateway
//! changed state.
mod config;
pub mod ports;
mod run;
mod status;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ipnet::IpNet;
use tracing::{error, info, warn};

pub use config::{AgentConfig, ForwardProbes, ProtectConfig, SymmetricConfig};
pub use ports::{Kernel, TcPrograms};
pub use run::run;

use crate::logic::crd::{NodeRoutes, Route};
use crate::logic::default_route;
use crate::logic::desired::{DesiredState, ProblemKind};
use crate::logic::health::{self, Health, ProbeKind, Transition};
use crate::logic::plan;
use crate::logic::selector::NodeInfo;
use crate::node::dataplane::{Outcome, Read};
use crate::node::probe::Forward;
use crate::source::Snapshot;

/// How much a reconcile redoes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    /// Everything: read the kernel and the node's facts again (a retry, the periodic
    /// resync, the check after a change).
    Fresh,
    /// Someone else changed something in the namespace: the node's facts and how the
    /// gateways resolve are read again, the agent's own objects only if they were touched.
    Notified,
    /// The Routes or this node changed: plan again; diff against the kernel as the agent
    /// left it.
    Replan,
    /// A gateway changed state: the last plan with the new withdrawals, diffed against the
    /// kernel as the agent left it (a withdrawal is one group replace, whatever the number
    /// of routes).
    Health,
}

/// What an event asks of the runtime once the agent has handled it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Next {
    /// Withdrawn gateways whose probe is due: send one each and report the answer with
    /// [`Agent::on_probe_result`].
    pub probe: Vec<Probe>,
    /// Unresolved gateways to ping once so that the kernel learns their MAC (and their
    /// traffic is attributed before the first connection); no answer is expected.
    pub warm_up: Vec<IpAddr>,
    /// Stop the loop.
    pub stop: bool,
}

/// One probe to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// An ICMP echo to the gateway.
    Echo(IpAddr),
    /// A TCP connection attempt through the gateway (its interface and slot, which picks
    /// the probe's mark and table).
    Forward(Forward),
}

impl Probe {
    pub fn gateway(&self) -> IpAddr {
        match self {
            Probe::Echo(g) => *g,
            Probe::Forward(f) => f.gateway,
        }
    }

    pub fn kind(&self) -> ProbeKind {
        match self {
            Probe::Echo(_) => ProbeKind::Echo,
            Probe::Forward(f) => ProbeKind::Forward(f.target),
        }
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
    /// Route destinations whose gateways are all down by health.
    all_down: BTreeMap<IpNet, Vec<IpAddr>>,
    /// Gateways' MAC addresses as last read from the neighbour table.
    macs: BTreeMap<IpAddr, [u8; 6]>,
    /// When an unresolved gateway was last pinged to make the kernel resolve it.
    warmed: BTreeMap<IpAddr, Instant>,
}

/// How soon a pass that changed the kernel is confirmed by a fresh one.
const VERIFY_AFTER: Duration = Duration::from_millis(250);

/// How often an unresolved gateway is pinged so that its MAC is known (and its traffic
/// attributed) before the first connection through it.
const WARM_UP_EVERY: Duration = Duration::from_secs(5);

/// The agent's state. `K` is the kernel's routing side, `P` the TC programs (absent with
/// `--no-ebpf`: no health, no probes).
pub struct Agent<K, P> {
    cfg: AgentConfig,
    kernel: K,
    programs: Option<P>,
    /// The latest complete view of the Routes; `None` until the source delivered one (the
    /// kernel stays as it is until then: a restart never removes what it was not told to).
    routes: Option<Vec<Arc<Route>>>,
    /// Each Route's share of the plan, worked out again only when the Route changed.
    planner: plan::Planner,
    /// This node as the source knows it now (labels follow the Node object).
    node: NodeInfo,
    /// The control-plane endpoints (protected while the default route is overridden).
    endpoints: Vec<IpAddr>,
    health: Health,
    watch: Watch,
    /// The last reconcile's plan and what the kernel took of it.
    last: Option<(Arc<DesiredState>, Outcome)>,
    reconciles: u64,
    backoff: Backoff,
    /// When to retry what the kernel could not take (`None`: nothing pending).
    retry_at: Option<Instant>,
    /// The pending deadline only confirms a pass that changed the kernel (nothing failed):
    /// that check reads how the gateways resolve and the agent's own objects only if
    /// someone else touched them (the monitor says), not the whole table (at 10,000
    /// routes a full read takes tens of milliseconds, and an edit right after it waits).
    /// The periodic resync and real retries read everything.
    verifying: bool,
    /// The NodeRouteStatus last handed to the publisher.
    reported: Option<std::sync::Arc<NodeRoutes>>,
    /// A report is owed whatever the plan: the Routes changed since the last one (their
    /// generations are in it), or the publisher was busy.
    report_due: bool,
    /// The status file's part that changes with a reconcile (`None`: build it again).
    status_base: Option<serde_json::Value>,
    /// The status file's last per-tick part (attachments, gateways).
    last_doc: Option<(Vec<String>, serde_json::Value)>,
    /// The last plan before withdrawals (what a health pass starts from).
    planned: Option<Arc<DesiredState>>,
    /// The node facts of the last plan with an override (read again on a fresh pass).
    facts: Option<default_route::NodeFacts>,
}

impl<K: Kernel, P: TcPrograms> Agent<K, P> {
    /// A fresh agent. Verdicts an earlier agent recorded in the pinned maps are taken
    /// over: a gateway that was down stays down (with its penalty) until probed back.
    pub fn new(cfg: AgentConfig, kernel: K, programs: Option<P>) -> Self {
        let mut health = Health::new(cfg.health.clone());
        if let Some(p) = &programs {
            let now = Instant::now();
            let now_ms = status::unix_ms(SystemTime::now());
            for (gw, info) in p.recorded() {
                if info.state == routing_agent_common::GW_DOWN {
                    let down_for = Duration::from_millis(now_ms.saturating_sub(info.down_since_ms));
                    health.restore_down(gw, info.penalty, down_for, now);
                    info!(gateway = %gw, penalty = info.penalty, down_for_s = down_for.as_secs(),
                        "gateway still down according to the pinned record");
                }
            }
        }
        Agent {
            node: cfg.node.clone(),
            backoff: Backoff::new(cfg.retry_min, cfg.retry_max),
            cfg,
            kernel,
            programs,
            routes: None,
            planner: plan::Planner::default(),
            endpoints: Vec::new(),
            health,
            watch: Watch::default(),
            last: None,
            reconciles: 0,
            retry_at: None,
            verifying: false,
            reported: None,
            report_due: true,
            last_doc: None,
            status_base: None,
            planned: None,
            facts: None,
        }
    }

    /// Whether the TC programs are loaded (health ticks and probes only then).
    pub fn has_programs(&self) -> bool {
        self.programs.is_some()
    }

    /// When [`Agent::on_retry`] is due, if a retry is pending.
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// The last plan and what the kernel took of it.
    pub fn last(&self) -> Option<(&DesiredState, &Outcome)> {
        self.last.as_ref().map(|(d, o)| (&**d, o))
    }

    /// The kernel side (tests inspect their fake through it).
    pub fn kernel(&self) -> &K {
        &self.kernel
    }

    /// The TC programs (tests feed their fake counters through it).
    pub fn programs_mut(&mut self) -> Option<&mut P> {
        self.programs.as_mut()
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    /// A new complete view from the source: the Routes, and the node's labels and the
    /// control-plane endpoints when the source knows them.
    pub async fn on_snapshot(&mut self, s: Snapshot) -> Next {
        self.routes = Some(s.routes);
        self.report_due = true;
        if let Some(e) = s.control_plane {
            if e != self.endpoints {
                info!(endpoints = ?e, "control-plane endpoints");
            }
            self.endpoints = e;
        }
        if let Some(labels) = s.node_labels
            && labels != self.node.labels
        {
            info!(labels = ?labels, "this node's labels changed");
            self.node.labels = labels;
        }
        self.reconcile(Pass::Replan).await
    }

    /// Routes, nexthops, links, addresses or rules changed in this namespace (a burst of
    /// notifications, coalesced by the caller).
    pub async fn on_netlink(&mut self) -> Next {
        self.reconcile(Pass::Notified).await
    }

    /// The retry deadline ([`Agent::retry_at`]) passed.
    pub async fn on_retry(&mut self) -> Next {
        self.retry_at = None;
        let pass = if std::mem::take(&mut self.verifying) {
            Pass::Notified
        } else {
            Pass::Fresh
        };
        self.reconcile(pass).await
    }

    /// The periodic resync: the same full reconcile, whether or not anything was notified.
    pub async fn on_resync(&mut self) -> Next {
        self.reconcile(Pass::Fresh).await
    }

    /// A health tick: neighbour table → attribution map; counters + neighbour state →
    /// state machine; the probes that are due. Reconciles only when a gateway changed state.
    pub async fn on_health_tick(&mut self, now: Instant) -> Next {
        if self.programs.is_none() {
            return Next::default();
        }
        let (changes, mut next) = self.health_step(now).await;
        if changes.is_empty() {
            self.emit_status();
            return next;
        }
        for t in &changes {
            self.log_transition(t);
            self.count_transition(t);
        }
        let after = self.reconcile(Pass::Health).await;
        next.probe.extend(after.probe);
        next.warm_up.extend(after.warm_up);
        next
    }

    /// The answer to a probe sent for [`Next::probe`].
    pub async fn on_probe_result(&mut self, probe: Probe, answered: bool, now: Instant) -> Next {
        let (gw, kind) = (probe.gateway(), probe.kind());
        self.cfg
            .metrics
            .probes
            .get_or_create(&crate::ops::metrics::ProbeLabels {
                gateway: gw.to_string(),
                kind: kind.label().to_string(),
                answered: answered.to_string(),
            })
            .inc();
        let t = self.health.probe_result(gw, kind, answered, now);
        match (&t, self.health.get(&gw)) {
            (Some(t), _) => {
                self.count_transition(t);
                self.log_transition(t);
            }
            (None, Some(h)) if h.down => {
                let wait = h.restore_after.map(|t| t.saturating_duration_since(now));
                info!(gateway = %gw, probe = kind.label(),
                    target = kind.target().map(|t| t.to_string()), answered,
                    restore_in_s = wait.map(|w| w.as_secs()), "probe of a withdrawn gateway");
            }
            _ => {}
        }
        if t.is_none() {
            return Next::default();
        }
        self.record(gw);
        self.reconcile(Pass::Health).await
    }

    /// SIGTERM or Ctrl-C: stop; the installed routes stay.
    pub fn on_shutdown(&mut self) -> Next {
        info!("stopping; installed routes stay in place (`routing-agent cleanup` removes them)");
        Next {
            stop: true,
            ..Next::default()
        }
    }

    /// The level-based reconcile, as much of it as `pass` needs.
    async fn reconcile(&mut self, pass: Pass) -> Next {
        // Until the source has delivered its first complete view, the kernel stays as it
        // is: a restart never removes routes it has not yet been told to remove.
        if self.routes.is_none() {
            return Next::default();
        }
        let fresh = matches!(pass, Pass::Fresh | Pass::Notified);
        if fresh {
            self.facts = None;
        }
        // A health pass starts from the last plan; so does a fresh one when nothing a read of
        // the kernel could change is in it (no default-route override: no node facts). The
        // plan is shared, not copied, unless gateways are withdrawn from it.
        let reuse = match (&self.planned, pass) {
            (Some(p), Pass::Health) => Some(p.clone()),
            (Some(p), Pass::Fresh | Pass::Notified)
                if !p.routes.values().any(|r| r.from_default) =>
            {
                Some(p.clone())
            }
            _ => None,
        };
        let planned = match reuse {
            Some(p) => p,
            None => match self.plan(pass).await {
                Some(d) => {
                    let d = Arc::new(d);
                    self.planned = Some(d.clone());
                    d
                }
                None => return Next::default(),
            },
        };
        let down = self.health.down();
        let withdrawn = planned
            .routes
            .values()
            .any(|r| r.gateways.iter().any(|g| down.contains(g)));
        let (desired, all_down) = if withdrawn {
            let mut d = (*planned).clone();
            let all_down = plan::withdraw(&mut d, &down);
            (Arc::new(d), all_down)
        } else {
            (planned, BTreeMap::new())
        };
        for (dst, gws) in &all_down {
            if self.watch.all_down.get(dst) != Some(gws) {
                let mode = desired
                    .routes
                    .get(dst)
                    .map(|r| r.fail_mode)
                    .unwrap_or_default();
                warn!(destination = %dst, gateways = ?gws, fail_mode = %mode,
                    "every gateway of the destination is down");
            }
        }
        self.watch.all_down = all_down;
        let started = Instant::now();
        let read = match pass {
            Pass::Fresh => Read::All,
            Pass::Notified => Read::Gateways,
            Pass::Replan | Pass::Health => Read::View,
        };
        match self.kernel.reconcile(&desired, read).await {
            Ok(outcome) => {
                self.reconciles += 1;
                if let Some(p) = &mut self.programs {
                    p.sync(
                        &outcome
                            .interfaces
                            .union(&outcome.gateway_interfaces)
                            .copied()
                            .collect(),
                    );
                    // The IPv6 fallback-source leak exists only with symmetric rules for
                    // IPv6 (see `ra_uplink` in the eBPF crate).
                    let v6_rules = desired.overrides.rules.iter().any(|r| r.source.is_ipv6());
                    p.guard_uplink(
                        desired
                            .overrides
                            .public_interface
                            .get(&crate::logic::route::Family::V6)
                            .copied()
                            .filter(|_| v6_rules),
                    );
                }
                // Ready: a full reconcile done and the TC programs on every interface
                // that faces a gateway.
                if self
                    .programs
                    .as_ref()
                    .is_none_or(|p| p.covers(&outcome.interfaces))
                {
                    self.cfg.probes.set_ready();
                }
                let took = started.elapsed();
                // The same plan and the same result as the last pass (a resync, the check
                // after a change): the status, the report and the per-Route gauges stay as
                // they are (at 10,000 routes, building them is most of a pass's work).
                let unchanged = self.last.as_ref().is_some_and(|(d, o)| {
                    (Arc::ptr_eq(d, &desired) || **d == *desired)
                        && *o
                            == Outcome {
                                changes: o.changes,
                                ..outcome.clone()
                            }
                });
                self.record_reconcile(&desired, &outcome, took, unchanged);
                self.watch.oifs = outcome.gateway_oifs.clone();
                let retryable = outcome.problems.iter().any(|p| {
                    matches!(
                        p.kind,
                        ProblemKind::GatewayUnreachable { .. } | ProblemKind::Kernel { .. }
                    )
                });
                if retryable {
                    self.retry_at = Some(Instant::now() + self.backoff.step());
                    self.verifying = false;
                } else {
                    self.backoff.reset();
                    // A pass that changed the kernel is confirmed by another shortly after
                    // (its own notifications no longer wake the agent): the gateways are
                    // resolved again, the agent's objects read back if someone else touched
                    // them, and the status says when nothing is left to do.
                    self.retry_at = (outcome.changes > 0).then(|| Instant::now() + VERIFY_AFTER);
                    self.verifying = self.retry_at.is_some();
                }
                status::log_reconcile(
                    &desired,
                    &outcome,
                    self.last.as_ref().map(|(d, o)| (&**d, o)),
                    took,
                );
                if self
                    .last
                    .as_ref()
                    .is_none_or(|(_, o)| o.no_gateway != outcome.no_gateway)
                {
                    let doc = status::no_gateway_doc(&desired, &outcome);
                    self.cfg.probes.set_status(doc.to_string());
                    for (dst, (why, mode)) in outcome.no_gateway.iter() {
                        let was = self.last.as_ref().and_then(|(_, o)| o.no_gateway.get(dst));
                        if was != Some(&(why.clone(), *mode)) {
                            warn!(destination = %dst, reason = why.reason(), fail_mode = %mode,
                                "no usable gateway: {}", why.describe());
                        }
                    }
                    for dst in self
                        .last
                        .iter()
                        .flat_map(|(_, o)| o.no_gateway.keys())
                        .filter(|d| !outcome.no_gateway.contains_key(d))
                    {
                        info!(destination = %dst, "a gateway can be used again");
                    }
                }
                if !unchanged || self.report_due {
                    self.send_report(&desired, &outcome);
                }
                let changes_before = self.last.as_ref().map(|(_, o)| o.changes);
                let changes = outcome.changes;
                self.last = Some((desired, outcome));
                match &mut self.status_base {
                    Some(base) if unchanged => {
                        base["reconciles"] = self.reconciles.into();
                        if changes_before != Some(changes) {
                            base["lastChanges"] = changes.into();
                            self.last_doc = None; // written below
                        }
                    }
                    _ => self.status_base = None,
                }
                self.emit_status();
            }
            Err(e) => {
                self.cfg.metrics.reconcile_errors.inc();
                let wait = self.backoff.step();
                error!(error = format!("{e:#}"), retry_in = ?wait, "reconcile failed; nothing changed");
                self.retry_at = Some(Instant::now() + wait);
                self.verifying = false;
            }
        }
        Next::default()
    }

    /// Plans from the latest Routes and node, with the protection of any default-route
    /// override (the node facts are read again on a fresh pass only), and hands the
    /// gateways to health and the TC programs. `None`: the facts could not be read; a retry
    /// is scheduled and nothing changes.
    async fn plan(&mut self, pass: Pass) -> Option<DesiredState> {
        let routes = self.routes.as_ref()?;
        let mut desired = self.planner.plan(routes, &self.node, &self.cfg.policy);
        // Default-route overrides: what must stay reachable through the node's own uplink.
        // Without the facts, nothing changes (an override without its protection could cut
        // the node off). Read only while an override is planned: the kernel dumps and
        // resolv.conf are not needed otherwise (no override: nothing to protect).
        if desired.routes.values().any(|r| r.from_default) {
            let protection = self.cfg.protect.protection(&self.endpoints);
            let facts = match (&protection, self.facts.take()) {
                (Ok(_), Some(f)) if !matches!(pass, Pass::Fresh | Pass::Notified) => Ok(f),
                (Ok(p), _) => self.kernel.facts(p.symmetric.as_ref()).await.map_err(|e| {
                    format!("cannot read the node's routes, addresses and rules: {e}")
                }),
                (Err(e), _) => Err(e.clone()),
            };
            match (protection, facts) {
                (Ok(protection), Ok(facts)) => {
                    default_route::protect(&mut desired, &facts, &protection);
                    self.facts = Some(facts);
                }
                (_, Err(e)) | (Err(e), _) => {
                    self.cfg.metrics.reconcile_errors.inc();
                    let wait = self.backoff.step();
                    error!(error = %e, retry_in = ?wait, "reconcile skipped; nothing changed");
                    self.retry_at = Some(Instant::now() + wait);
                    self.verifying = false;
                    return None;
                }
            }
        }
        let all_gateways: BTreeSet<IpAddr> = desired
            .routes
            .values()
            .flat_map(|r| r.gateways.iter().copied())
            .collect();
        // Peers from the distinct gateway sets (thousands of destinations share a few).
        let sets: BTreeSet<&[IpAddr]> = desired
            .routes
            .values()
            .map(|r| r.gateways.as_slice())
            .collect();
        self.watch.peers = health::peers(sets);
        self.health.set_gateways(&all_gateways, Instant::now());
        if let Some(p) = &mut self.programs {
            p.set_gateways(&all_gateways);
        }
        Some(desired)
    }

    /// One health tick's reading and judging. Returns the transitions (already recorded
    /// in the slots) and the probes and warm-up pings to send.
    async fn health_step(&mut self, now: Instant) -> (Vec<Transition>, Next) {
        let mut next = Next::default();
        let neighbours = match self.kernel.neighbours(&self.watch.oifs).await {
            Ok(n) => n,
            Err(e) => {
                warn!(error = %e, "cannot read the neighbour table");
                BTreeMap::new()
            }
        };
        let Some(programs) = &mut self.programs else {
            return (Vec::new(), next);
        };
        // Keyed by family too: a dual-stack gateway's IPv4 and IPv6 addresses share a MAC.
        let macs: BTreeMap<(u32, [u8; 6], u8), IpAddr> = neighbours
            .iter()
            .filter_map(|(gw, n)| {
                let family = if gw.is_ipv4() { 4 } else { 6 };
                Some(((n.ifindex, n.mac?, family), *gw))
            })
            .collect();
        programs.set_neighbours(&macs);
        self.watch.macs = neighbours
            .iter()
            .filter_map(|(gw, n)| Some((*gw, n.mac?)))
            .collect();
        for gw in self.watch.oifs.keys() {
            if self.watch.macs.contains_key(gw) || self.health.get(gw).is_some_and(|h| h.down) {
                continue;
            }
            if self
                .watch
                .warmed
                .get(gw)
                .is_some_and(|t| now.saturating_duration_since(*t) < WARM_UP_EVERY)
            {
                continue;
            }
            self.watch.warmed.insert(*gw, now);
            next.warm_up.push(*gw);
        }
        self.cfg
            .metrics
            .uplink_refused
            .set(programs.uplink_refused() as i64);
        let stats = programs.read_stats();
        for (gw, s) in &stats {
            self.cfg.metrics.observe_stats(*gw, s);
        }
        for gw in self.watch.oifs.keys() {
            let s = stats.get(gw).copied().unwrap_or_default();
            let n = match neighbours.get(gw) {
                None => health::Neighbour::Unknown,
                Some(n) if n.failed => health::Neighbour::Failed,
                Some(n) if n.unresolved => health::Neighbour::Unresolved,
                Some(_) => health::Neighbour::Resolved,
            };
            self.health.observe(*gw, &s, n, now);
        }
        let changes = self.health.evaluate(&self.watch.peers, now);
        for t in &changes {
            self.record(t.gateway);
        }
        let m = &self.cfg.metrics;
        for (gw, h) in self.health.iter() {
            let l = crate::ops::metrics::Metrics::gateway(*gw);
            let k = self.health.threshold(gw, &self.watch.peers, now);
            m.gateway_threshold.get_or_create(&l).set(i64::from(k));
            m.gateway_loss
                .get_or_create(&l)
                .set(h.loss.rate(&self.cfg.health, now));
        }
        let due = self.health.due_probes(now);
        let learned = match (&self.programs, &self.cfg.forward_probes, due.is_empty()) {
            (Some(p), Some(_), false) => p.read_targets(),
            _ => BTreeMap::new(),
        };
        for gw in due {
            self.record(gw);
            let probe = self.probe_for(gw, &learned);
            next.probe.push(probe);
        }
        (changes, next)
    }

    /// How `gw` is probed now: through it when forwarding probes are on and a target is
    /// known (see [`health::forwarding_target`]), else with an echo.
    fn probe_for(&self, gw: IpAddr, learned: &BTreeMap<IpAddr, (SocketAddr, Duration)>) -> Probe {
        let echo = Probe::Echo(gw);
        let (Some(fwd), Some(programs)) = (&self.cfg.forward_probes, &self.programs) else {
            return echo;
        };
        let (Some(&oif), Some(index)) = (self.watch.oifs.get(&gw), programs.slot(gw)) else {
            return echo;
        };
        let routes = self.last.as_ref().map(|(d, _)| &d.routes);
        let target = health::forwarding_target(
            gw,
            &fwd.targets,
            learned,
            self.watch.peers.get(&gw),
            |p| self.health.get(p).is_none_or(|h| h.down),
            |a| routes.is_some_and(|r| health::serves(r, gw, a)),
            health::TARGET_MAX_AGE,
        );
        match target {
            Some(target) => Probe::Forward(Forward {
                gateway: gw,
                oif,
                index,
                target,
            }),
            None => echo,
        }
    }

    /// Writes `gw`'s health into its slot of the pinned gateway table.
    fn record(&mut self, gw: IpAddr) {
        let (Some(programs), Some(h)) = (&mut self.programs, self.health.get(&gw)) else {
            return;
        };
        programs.record_health(gw, status::health_record(h));
    }
}
