//! What the agent tells about itself after an event: log lines, metrics, the status file,
//! the NodeRouteStatus handed to the publisher, and the health records in the slots.
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};

use tracing::{info, warn};

use super::{Agent, Kernel, TcPrograms};
use crate::cluster::publish;
use crate::logic::desired::{DesiredState, FailMode};
use crate::logic::health::{GatewayHealth, Transition};
use crate::logic::report::{self, GatewayState};
use crate::node::dataplane::Outcome;
use crate::node::ebpf::HealthRecord;
use crate::ops::metrics::{Metrics, ReasonLabels, RouteLabels};

pub(super) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A gateway's health as its slot records it (times in ms since the Unix epoch).
pub(super) fn health_record(h: &GatewayHealth) -> HealthRecord {
    let (now, wall) = (Instant::now(), SystemTime::now());
    let at = |t: Instant| unix_ms(wall - now.saturating_duration_since(t));
    let after = |t: Instant| unix_ms(wall + t.saturating_duration_since(now));
    let changed = at(h.since);
    HealthRecord {
        state: match (h.down, h.unshared) {
            (true, false) => routing_agent_common::GW_DOWN,
            (true, true) => routing_agent_common::GW_SUSPECT,
            (false, _) => routing_agent_common::GW_UP,
        },
        penalty: h.penalty,
        down_since_ms: if h.down { changed } else { 0 },
        changed_ms: changed,
        next_probe_ms: if h.down {
            h.next_probe.map(after).unwrap_or(0)
        } else {
            0
        },
    }
}

/// One log line per change: problems that appear or clear, warnings, and a summary when
/// the kernel was changed.
pub(super) fn log_reconcile(
    desired: &DesiredState,
    outcome: &Outcome,
    last: Option<(&DesiredState, &Outcome)>,
    took: Duration,
) {
    let (old_problems, old_warnings) = match last {
        Some((d, o)) => (o.problems.as_slice(), d.warnings.as_slice()),
        None => (&[][..], &[][..]),
    };
    // Sets: thousands of destinations failing alike are thousands of problems.
    let (old_p, new_p): (BTreeSet<_>, BTreeSet<_>) = (
        old_problems.iter().collect(),
        outcome.problems.iter().collect(),
    );
    for p in new_p.difference(&old_p) {
        warn!(route = %p.route, "{}", p.message);
    }
    for p in old_p.difference(&new_p) {
        info!(route = %p.route, "resolved: {}", p.message);
    }
    let old_w: BTreeSet<_> = old_warnings.iter().collect();
    for w in desired.warnings.iter().filter(|w| !old_w.contains(w)) {
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

/// Destinations with no usable gateway (`failingClosed` / `fallingThrough`), each with
/// its Route, reason and sentence: what `/status` answers and the status file carries.
pub(super) fn no_gateway_doc(desired: &DesiredState, outcome: &Outcome) -> serde_json::Value {
    let list = |want: FailMode| -> Vec<serde_json::Value> {
        outcome
            .no_gateway
            .iter()
            .filter(|(_, (_, mode))| *mode == want)
            .map(|(dst, (why, _))| {
                serde_json::json!({
                    "destination": dst.to_string(),
                    "owner": desired.routes.get(dst).map(|r| r.owner.clone()),
                    "reason": why.reason(),
                    "message": why.describe(),
                })
            })
            .collect()
    };
    serde_json::json!({
        "failingClosed": list(FailMode::Closed),
        "fallingThrough": list(FailMode::Open),
    })
}

/// The part of the status file that changes only with a reconcile (built once per
/// reconcile, not once per health tick), but for its installed routes: those are written
/// straight from the plan and the outcome the agent keeps anyway ([`InstalledRoutes`]).
fn status_doc(
    node: &str,
    desired: &DesiredState,
    outcome: &Outcome,
    reconciles: u64,
) -> serde_json::Value {
    let no_gateway = no_gateway_doc(desired, outcome);
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
        "failingClosed": no_gateway["failingClosed"],
        "fallingThrough": no_gateway["fallingThrough"],
        "problems": problems,
        "warnings": desired.warnings,
        "defaultRoute": report::default_routes(desired),
    })
}

/// The status file's `routes`: each installed destination with its gateways, the ones
/// withdrawn by health, and its Route. Serialized from the plan and the outcome at each
/// write: a JSON tree of them kept between writes was 17 MiB at 10,000 routes (measured
/// with heaptrack), more than the rest of the agent.
struct InstalledRoutes<'a> {
    desired: &'a DesiredState,
    outcome: &'a Outcome,
}

impl serde::Serialize for InstalledRoutes<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(serde::Serialize)]
        struct Entry<'a> {
            destination: &'a ipnet::IpNet,
            gateways: &'a [std::net::IpAddr],
            withdrawn: &'a [std::net::IpAddr],
            owner: Option<&'a str>,
        }
        s.collect_seq(self.outcome.installed.iter().map(|(dst, gws)| {
            let r = self.desired.routes.get(dst);
            Entry {
                destination: dst,
                gateways: gws,
                withdrawn: r.map(|r| r.withdrawn.as_slice()).unwrap_or_default(),
                owner: r.map(|r| r.owner.as_str()),
            }
        }))
    }
}

impl<K: Kernel, P: TcPrograms> Agent<K, P> {
    pub(super) fn count_transition(&self, t: &Transition) {
        let metrics = &self.cfg.metrics;
        let l = Metrics::gateway(t.gateway);
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

    pub(super) fn log_transition(&self, t: &Transition) {
        let h = self.health.get(&t.gateway);
        let peers = self
            .watch
            .peers
            .get(&t.gateway)
            .map(|p| p.len())
            .unwrap_or_default();
        if t.down && h.is_some_and(|h| h.unshared) {
            warn!(gateway = %t.gateway, reason = %t.reason,
                "gateway down, with no peer to compare: reported and probed, not withdrawn");
        } else if t.down {
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

    /// The gauges of one reconcile: routes, problems, gateways' state; its duration.
    pub(super) fn record_reconcile(
        &self,
        desired: &DesiredState,
        outcome: &Outcome,
        took: Duration,
        unchanged: bool,
    ) {
        let metrics = &self.cfg.metrics;
        metrics.reconciles.inc();
        metrics.reconcile_duration.observe(took.as_secs_f64());
        metrics.kernel_changes.inc_by(outcome.changes as u64);
        if unchanged {
            return;
        }
        metrics
            .destinations_installed
            .set(outcome.installed.len() as i64);
        metrics.route_applied.clear();
        for name in &desired.selected {
            let failed = outcome.problems.iter().any(|p| &p.route == name);
            metrics
                .route_applied
                .get_or_create(&RouteLabels {
                    route: name.clone(),
                })
                .set(i64::from(!failed));
        }
        metrics.problems.clear();
        for p in &outcome.problems {
            metrics
                .problems
                .get_or_create(&ReasonLabels {
                    reason: report::reason(&p.kind).into(),
                })
                .inc();
        }
        metrics.failing_closed.clear();
        for (why, mode) in outcome.no_gateway.values() {
            if *mode == FailMode::Closed {
                metrics
                    .failing_closed
                    .get_or_create(&ReasonLabels {
                        reason: why.reason().into(),
                    })
                    .inc();
            }
        }
        metrics.gateway_up.clear();
        metrics.gateway_penalty.clear();
        // Gateways no Route names any more lose their series; the health tick sets them.
        metrics.gateway_threshold.clear();
        metrics.gateway_loss.clear();
        for (gw, h) in self.health.iter() {
            let l = Metrics::gateway(*gw);
            metrics.gateway_up.get_or_create(&l).set(i64::from(!h.down));
            metrics
                .gateway_penalty
                .get_or_create(&l)
                .set(i64::from(h.penalty));
        }
    }

    fn gateway_status(&self) -> Vec<serde_json::Value> {
        let now = Instant::now();
        let programs = self.programs.as_ref();
        self.health
            .iter()
            .map(|(gw, h)| {
                serde_json::json!({
                    "address": gw.to_string(),
                    "slot": programs.and_then(|p| p.slot(*gw)),
                    "mac": self.watch.macs.get(gw).map(|m| m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")),
                    "state": if h.down { "down" } else { "up" },
                    "withdrawn": h.down && !h.unshared,
                    "reason": h.reason,
                    "sinceSeconds": now.saturating_duration_since(h.since).as_secs(),
                    "penalty": h.penalty,
                    "restoreInSeconds": h.restore_after.map(|t| t.saturating_duration_since(now).as_secs_f64()),
                    "lastProbeAnswered": h.last_probe_ok,
                    "lastProbe": h.last_probe.map(|k| serde_json::json!({
                        "kind": k.label(),
                        "target": k.target().map(|t| t.to_string()),
                    })),
                    "failureStreak": h.streak(),
                    "lossRate": h.loss.rate(&self.cfg.health, now),
                    "failureThreshold": self.health.threshold(gw, &self.watch.peers, now),
                    "counters": &h.counters,
                })
            })
            .collect()
    }

    /// Hands this node's status to the publisher when it changed (with the Events the
    /// change is worth). Never waits: when the publisher is busy, the next reconcile
    /// reports again.
    pub(super) fn send_report(&mut self, desired: &DesiredState, outcome: &Outcome) {
        let (Some(tx), Some(routes)) = (&self.cfg.publisher, &self.routes) else {
            return;
        };
        let gateways: BTreeMap<IpAddr, GatewayState> = self
            .health
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
            self.reported.as_deref(),
            &publish::now(),
        );
        if self
            .reported
            .as_deref()
            .is_some_and(|s| report::same(s, &status))
        {
            self.report_due = false;
            return;
        }
        let notes = report::notes(
            &self.cfg.node.name,
            self.reported.as_deref(),
            &status,
            &report::gateway_routes(desired),
        );
        let status = std::sync::Arc::new(status);
        let r = publish::Report {
            status: status.clone(),
            notes,
            refs: publish::refs(routes),
        };
        match tx.try_send(r) {
            Ok(()) => {
                self.reported = Some(status);
                self.report_due = false;
            }
            Err(e) => {
                self.report_due = true;
                warn!(error = %e, "the status publisher is busy; reporting again at the next reconcile")
            }
        }
    }

    /// Writes the status file when its content changed.
    pub(super) fn emit_status(&mut self) {
        let (Some(path), Some((desired, outcome))) = (&self.cfg.status_file, &self.last) else {
            return;
        };
        let attached = self
            .programs
            .as_ref()
            .map(|p| p.attached())
            .unwrap_or_default();
        let gateways = serde_json::Value::Array(self.gateway_status());
        let rebuilt = self.status_base.is_none();
        if rebuilt {
            self.status_base = Some(status_doc(
                &self.cfg.node.name,
                desired,
                outcome,
                self.reconciles,
            ));
        }
        let tick = (attached, gateways);
        if !rebuilt && self.last_doc.as_ref() == Some(&tick) {
            return;
        }
        /// The file: the reconcile's part with this tick's attachments and gateways.
        #[derive(serde::Serialize)]
        struct Doc<'a> {
            #[serde(flatten)]
            base: &'a serde_json::Value,
            routes: InstalledRoutes<'a>,
            attached: &'a [String],
            gateways: &'a serde_json::Value,
        }
        let doc = Doc {
            base: self.status_base.as_ref().expect("built above"),
            routes: InstalledRoutes { desired, outcome },
            attached: &tick.0,
            gateways: &tick.1,
        };
        let write = || -> std::io::Result<()> {
            let tmp = path.with_extension("tmp");
            let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
            serde_json::to_writer_pretty(&mut f, &doc)?;
            std::io::Write::flush(&mut f)?;
            drop(f);
            std::fs::rename(tmp, path)
        };
        match write() {
            Ok(()) => self.last_doc = Some(tick),
            Err(e) => warn!(path = %path.display(), error = %e, "cannot write the status file"),
        }
    }
}
