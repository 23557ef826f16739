//! What this node tells the cluster (pure): the [`NodeRoutes`] status built from the plan,
//! what the kernel took and the gateways' health; the Events worth sending when it
//! changes; and the limiter that keeps Events from flooding the API server.
//!
//! No clock here: `now` is given (an RFC 3339 string for the status, an `Instant` for the
//! limiter).
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::logic::crd::{
    APPLIED, DOWN, FAILED, NodeGateway, NodeNoGateway, NodeRoute, NodeRoutes, Route, UP,
};
use crate::logic::desired::FailMode;
use crate::logic::plan::{DesiredState, Problem, ProblemKind};

/// A gateway's state as the health side sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayState {
    pub down: bool,
    pub reason: String,
}

/// The `reason` of a failed route entry.
pub fn reason(kind: &ProblemKind) -> &'static str {
    match kind {
        ProblemKind::Invalid => "Invalid",
        ProblemKind::Conflict { .. } => "Conflict",
        ProblemKind::NoGateway {
            mode: FailMode::Closed,
            ..
        } => FAILING_CLOSED,
        ProblemKind::NoGateway {
            mode: FailMode::Open,
            ..
        } => "FallingThrough",
        ProblemKind::GatewayUnreachable { .. } => "GatewayUnreachable",
        ProblemKind::Kernel { .. } => "KernelRefused",
        ProblemKind::SymmetricRouting => "SymmetricRoutingConflict",
        ProblemKind::UnknownUplink => "UnknownUplink",
    }
}

/// The reason of a Route some of whose destinations refuse traffic on this node.
pub const FAILING_CLOSED: &str = "FailingClosed";

/// Messages longer than this are cut (a status entry stays small).
const MAX_MESSAGE: usize = 1024;

fn cut(s: String) -> String {
    truncate(s, MAX_MESSAGE)
}

/// `s` cut to at most `max` bytes (plus an ellipsis), on a character boundary.
pub fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// Builds this node's status. `prev` carries each gateway's `since` over while its state
/// does not change; `now` stamps the ones that did.
pub fn node_routes<R: std::borrow::Borrow<Route>>(
    routes: &[R],
    desired: &DesiredState,
    installed: &BTreeMap<IpNet, Vec<IpAddr>>,
    problems: &[Problem],
    gateways: &BTreeMap<IpAddr, GatewayState>,
    prev: Option<&NodeRoutes>,
    now: &str,
) -> NodeRoutes {
    let generation: BTreeMap<&str, Option<i64>> = routes
        .iter()
        .map(|r| r.borrow())
        .filter_map(|r| Some((r.metadata.name.as_deref()?, r.metadata.generation)))
        .collect();
    let mut by_route: BTreeMap<&str, Vec<&Problem>> = BTreeMap::new();
    for p in problems {
        by_route.entry(p.route.as_str()).or_default().push(p);
    }
    let names: BTreeSet<&str> = desired
        .selected
        .iter()
        .map(String::as_str)
        .chain(
            problems
                .iter()
                .filter(|p| p.kind == ProblemKind::Invalid)
                .map(|p| p.route.as_str()),
        )
        .collect();
    // Each Route's destinations, gathered once (linear in destinations).
    let mut by_owner: BTreeMap<&str, Vec<&IpNet>> = BTreeMap::new();
    for (d, r) in &desired.routes {
        by_owner.entry(r.owner.as_str()).or_default().push(d);
    }
    let mut out = NodeRoutes::default();
    for name in names {
        let planned: Vec<&IpNet> = by_owner.remove(name).unwrap_or_default();
        let in_kernel: Vec<String> = planned
            .iter()
            .filter(|d| installed.contains_key(d))
            .map(|d| d.to_string())
            .collect();
        let (kind, plain) = crate::logic::owner::parse(name);
        let mut entry = NodeRoute {
            name: plain.to_string(),
            kind: match kind {
                crate::logic::owner::Kind::Route => String::new(),
                k => k.as_str().to_string(),
            },
            generation: generation.get(name).copied().flatten(),
            state: APPLIED.into(),
            destinations: in_kernel,
            ..Default::default()
        };
        for p in by_route.get(name).into_iter().flatten() {
            if let ProblemKind::NoGateway {
                destination,
                why,
                mode,
            } = &p.kind
            {
                let d = NodeNoGateway {
                    destination: destination.to_string(),
                    reason: why.reason().into(),
                };
                match mode {
                    FailMode::Closed => entry.failing_closed.push(d),
                    FailMode::Open => entry.falling_through.push(d),
                }
            }
        }
        out.failing_closed += entry.failing_closed.len() as u32;
        if let Some(ps) = by_route.get(name) {
            // Problems are sorted: the most fundamental kind comes first.
            entry.state = FAILED.into();
            entry.reason = reason(&ps[0].kind).into();
            entry.message = cut(ps
                .iter()
                .map(|p| p.message.as_str())
                .collect::<Vec<_>>()
                .join("; "));
        } else if entry.destinations.len() < planned.len() {
            entry.state = FAILED.into();
            entry.reason = "NotInstalled".into();
            entry.message = format!(
                "{who}: {} of {} destinations are not in the kernel yet",
                planned.len() - entry.destinations.len(),
                planned.len(),
                who = crate::logic::owner::describe(name),
            );
        }
        if entry.state == APPLIED {
            out.applied += 1;
        } else {
            out.failed += 1;
        }
        out.routes.push(entry);
    }
    let used: BTreeSet<IpAddr> = desired
        .routes
        .values()
        .flat_map(|r| r.gateways.iter().chain(&r.withdrawn).copied())
        .collect();
    for gw in used {
        let (state, reason) = match gateways.get(&gw) {
            Some(g) if g.down => (DOWN, g.reason.clone()),
            _ => (UP, String::new()),
        };
        let address = gw.to_string();
        let since = prev
            .and_then(|p| p.gateways.iter().find(|g| g.address == address))
            .filter(|g| g.state == state)
            .map(|g| g.since.clone())
            .unwrap_or_else(|| now.to_string());
        if state == DOWN {
            out.gateways_down += 1;
        }
        out.gateways.push(NodeGateway {
            address,
            state: state.into(),
            reason: cut(reason),
            since,
        });
    }
    out.default_route = default_routes(desired);
    out
}

/// The active default-route overrides as the status shows them.
pub fn default_routes(desired: &DesiredState) -> Vec<crate::logic::crd::NodeDefaultRoute> {
    use crate::logic::route::Family;
    let o = &desired.overrides;
    let mut families: BTreeSet<Family> = desired
        .routes
        .values()
        .filter(|r| r.from_default)
        .map(|r| r.family())
        .collect();
    families.extend(o.table_routes.keys());
    families
        .into_iter()
        .map(|fam| {
            let original = o
                .table_routes
                .get(&fam)
                .or_else(|| {
                    o.protected
                        .iter()
                        .find(|(d, _)| Family::of(&d.addr()) == fam)
                        .map(|(_, u)| u)
                })
                .map(|u| u.gateway.to_string())
                .unwrap_or_default();
            crate::logic::crd::NodeDefaultRoute {
                family: fam.to_string(),
                original_gateway: original,
                protected: o
                    .protected
                    .keys()
                    .filter(|d| Family::of(&d.addr()) == fam)
                    .map(|d| d.to_string())
                    .collect(),
                symmetric_rules: o
                    .rules
                    .iter()
                    .filter(|r| Family::of(&r.source) == fam)
                    .map(|r| format!("{}: from {} lookup {}", r.priority, r.source, r.table))
                    .collect(),
            }
        })
        .collect()
}

/// Equal but for the `since` stamps (which alone never justify a write).
pub fn same(a: &NodeRoutes, b: &NodeRoutes) -> bool {
    let strip = |n: &NodeRoutes| {
        let mut n = n.clone();
        n.gateways.iter_mut().for_each(|g| g.since.clear());
        n
    };
    strip(a) == strip(b)
}

/// An Event about a Route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub route: String,
    pub warning: bool,
    /// CamelCase, e.g. `GatewayWithdrawn`.
    pub reason: String,
    pub note: String,
    /// What the limiter counts per: route, reason and subject (a gateway, or empty).
    pub key: String,
}

/// The Events for the change `prev` → `next` on node `node`. Invalid Routes are left to
/// the controller (one Event per Route, not one per node). `gateway_routes` maps a
/// gateway to the Routes that use it here.
pub fn notes(
    node: &str,
    prev: Option<&NodeRoutes>,
    next: &NodeRoutes,
    gateway_routes: &BTreeMap<String, BTreeSet<String>>,
) -> Vec<Note> {
    let mut out = Vec::new();
    let find_route = |n: &NodeRoutes, name: &str| n.routes.iter().find(|r| r.name == name).cloned();
    for r in &next.routes {
        let before = prev.and_then(|p| find_route(p, &r.name));
        out.extend(fail_closed_notes(node, r, before.as_ref()));
        let was_failing_closed = before.as_ref().is_some_and(|b| b.reason == FAILING_CLOSED);
        if r.reason == FAILING_CLOSED {
            // Told per destination, when it starts and when it ends (above).
        } else if r.state == FAILED && r.reason != "Invalid" {
            let same = before.as_ref().is_some_and(|b| {
                b.state == r.state && b.reason == r.reason && b.message == r.message
            });
            if !same {
                out.push(Note {
                    route: r.name.clone(),
                    warning: true,
                    reason: r.reason.clone(),
                    note: format!("node {node}: {}", r.message),
                    key: format!("{}/{}", r.name, r.reason),
                });
            }
        } else if r.state == APPLIED
            && !was_failing_closed
            && let Some(b) = before.filter(|b| b.state == FAILED)
        {
            out.push(Note {
                route: r.name.clone(),
                warning: false,
                reason: "Applied".into(),
                note: format!("node {node}: applied (was failing: {})", b.reason),
                key: format!("{}/Applied", r.name),
            });
        }
    }
    for g in &next.gateways {
        let before = prev.and_then(|p| p.gateways.iter().find(|b| b.address == g.address));
        let changed = match before {
            Some(b) => b.state != g.state,
            // First report (agent start): only a gateway already down is news.
            None => g.state == DOWN,
        };
        if !changed {
            continue;
        }
        for route in gateway_routes.get(&g.address).into_iter().flatten() {
            let (warning, reason, note) = if g.state == DOWN {
                (
                    true,
                    "GatewayWithdrawn",
                    format!(
                        "node {node}: gateway {} withdrawn: {}; probing it",
                        g.address, g.reason
                    ),
                )
            } else {
                (
                    false,
                    "GatewayRestored",
                    format!(
                        "node {node}: gateway {} answers again; back in the route",
                        g.address
                    ),
                )
            };
            out.push(Note {
                route: route.clone(),
                warning,
                reason: reason.into(),
                note,
                key: format!("{route}/{reason}/{}", g.address),
            });
        }
    }
    out
}

/// The Events of a Route's destinations starting and ending to fail closed.
fn fail_closed_notes(node: &str, r: &NodeRoute, before: Option<&NodeRoute>) -> Vec<Note> {
    let old: BTreeSet<&NodeNoGateway> = before.iter().flat_map(|b| &b.failing_closed).collect();
    let new: BTreeSet<&NodeNoGateway> = r.failing_closed.iter().collect();
    let old_dst: BTreeSet<&str> = old.iter().map(|d| d.destination.as_str()).collect();
    let new_dst: BTreeSet<&str> = new.iter().map(|d| d.destination.as_str()).collect();
    let mut out = Vec::new();
    let started: Vec<String> = new
        .iter()
        .filter(|d| !old.contains(*d))
        .map(|d| format!("{} ({})", d.destination, d.reason))
        .collect();
    if !started.is_empty() {
        out.push(Note {
            route: r.name.clone(),
            warning: true,
            reason: FAILING_CLOSED.into(),
            note: cut(format!(
                "node {node}: no usable gateway for {}: its traffic is refused (fail-closed) \
                 rather than sent out of the node's own default route",
                started.join(", ")
            )),
            key: format!("{}/{FAILING_CLOSED}", r.name),
        });
    }
    let ended: Vec<&str> = old_dst.difference(&new_dst).copied().collect();
    if !ended.is_empty() {
        out.push(Note {
            route: r.name.clone(),
            warning: false,
            reason: "FailClosedEnded".into(),
            note: cut(format!(
                "node {node}: {} forward through their gateways again",
                ended.join(", ")
            )),
            key: format!("{}/FailClosedEnded", r.name),
        });
    }
    out
}

/// Gateway → the Routes that use it in `desired`.
pub fn gateway_routes(desired: &DesiredState) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in desired.routes.values() {
        for g in r.gateways.iter().chain(&r.withdrawn) {
            out.entry(g.to_string())
                .or_default()
                .insert(r.owner.clone());
        }
    }
    out
}

/// The agent's and the controller's Event limit: one per Route/reason/gateway per minute;
/// at most 10 at once, then one per 6 s.
pub fn limiter() -> Limiter {
    Limiter::new(Duration::from_secs(60), 10, Duration::from_secs(6))
}

/// Rate limit of Events: one per key per `per_key` interval, and a token bucket over all
/// keys (`burst` Events, refilled at one per `refill`). What is held back is counted and
/// said in the next Event of that key.
pub struct Limiter {
    per_key: Duration,
    burst: u32,
    refill: Duration,
    tokens: f64,
    refilled: Option<Instant>,
    last: HashMap<String, Instant>,
    held: HashMap<String, u32>,
}

impl Limiter {
    pub fn new(per_key: Duration, burst: u32, refill: Duration) -> Self {
        Limiter {
            per_key,
            burst,
            refill,
            tokens: burst as f64,
            refilled: None,
            last: HashMap::new(),
            held: HashMap::new(),
        }
    }

    /// `Some(n)`: send it, `n` like it were held back before. `None`: hold it back.
    pub fn admit(&mut self, key: &str, now: Instant) -> Option<u32> {
        if let Some(t) = self.refilled {
            let gained = now.saturating_duration_since(t).as_secs_f64() / self.refill.as_secs_f64();
            self.tokens = (self.tokens + gained).min(self.burst as f64);
        }
        self.refilled = Some(now);
        let recent = self
            .last
            .get(key)
            .is_some_and(|t| now.saturating_duration_since(*t) < self.per_key);
        if recent || self.tokens < 1.0 {
            *self.held.entry(key.to_string()).or_default() += 1;
            return None;
        }
        self.tokens -= 1.0;
        self.last.insert(key.to_string(), now);
        // Forget keys quiet for long (bounded memory).
        let per_key = self.per_key;
        self.last
            .retain(|_, t| now.saturating_duration_since(*t) < per_key * 10);
        Some(self.held.remove(key).unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logic::crd::RouteSpec;
    use crate::logic::plan;
    use crate::logic::selector::NodeInfo;

    fn route(name: &str, dst: &[&str], gw: &[&str], generation: i64) -> Route {
        let mut r = Route::new(
            name,
            RouteSpec {
                destinations: dst.iter().map(|s| s.to_string()).collect(),
                gateways: gw.iter().map(|s| s.to_string()).collect(),
                node_selector: None,
            },
        );
        r.metadata.generation = Some(generation);
        r
    }

    fn node() -> NodeInfo {
        NodeInfo::new("node-a", &[])
    }

    /// What the dataplane installs of `d`: every destination with a gateway left.
    fn everything_installed(d: &DesiredState) -> BTreeMap<IpNet, Vec<IpAddr>> {
        d.routes
            .iter()
            .filter(|(_, r)| !r.gateways.is_empty())
            .map(|(k, r)| (*k, r.gateways.clone()))
            .collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn build(
        routes: &[Route],
        down: &[(&str, &str)],
        prev: Option<&NodeRoutes>,
        now: &str,
    ) -> (DesiredState, NodeRoutes) {
        let d = plan::plan(routes, &node());
        let gws = down
            .iter()
            .map(|(g, why)| {
                (
                    ip(g),
                    GatewayState {
                        down: true,
                        reason: why.to_string(),
                    },
                )
            })
            .collect();
        let n = node_routes(
            routes,
            &d,
            &everything_installed(&d),
            &d.problems,
            &gws,
            prev,
            now,
        );
        (d, n)
    }

    #[test]
    fn applied_routes_carry_generation_and_destinations() {
        let (_, n) = build(
            &[route("a", &["1.0.0.0/8", "2.0.0.0/8"], &["10.0.0.1"], 3)],
            &[],
            None,
            "T0",
        );
        assert_eq!(n.applied, 1);
        assert_eq!(n.failed, 0);
        let r = &n.routes[0];
        assert_eq!(
            (r.name.as_str(), r.generation, r.state.as_str()),
            ("a", Some(3), APPLIED)
        );
        assert_eq!(r.destinations, vec!["1.0.0.0/8", "2.0.0.0/8"]);
        assert_eq!(n.gateways.len(), 1);
        assert_eq!(n.gateways[0].state, UP);
        assert_eq!(n.gateways[0].since, "T0");
    }

    #[test]
    fn conflicts_and_invalid_routes_are_failed_with_reason_and_message() {
        let mut older = route("older", &["1.0.0.0/8"], &["10.0.0.1"], 1);
        older.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::from_second(1).unwrap(),
            ));
        let (_, n) = build(
            &[
                older,
                route("newer", &["1.0.0.0/8", "3.0.0.0/8"], &["10.0.0.2"], 1),
                route("bad", &["1.0.0.0/8"], &["nope"], 7),
            ],
            &[],
            None,
            "T0",
        );
        let by: BTreeMap<&str, &NodeRoute> =
            n.routes.iter().map(|r| (r.name.as_str(), r)).collect();
        assert_eq!(by["older"].state, APPLIED);
        assert_eq!(by["newer"].state, FAILED);
        assert_eq!(by["newer"].reason, "Conflict");
        assert!(
            by["newer"].message.contains("older"),
            "{}",
            by["newer"].message
        );
        // Its other destination is still in the kernel.
        assert_eq!(by["newer"].destinations, vec!["3.0.0.0/8"]);
        assert_eq!(by["bad"].reason, "Invalid");
        assert!(by["bad"].message.contains("spec.gateways[0]"));
        assert_eq!(by["bad"].generation, Some(7));
        assert_eq!((n.applied, n.failed), (1, 2));
    }

    #[test]
    fn a_destination_missing_from_the_kernel_without_a_problem_is_not_applied() {
        let routes = [route("a", &["1.0.0.0/8", "2.0.0.0/8"], &["10.0.0.1"], 1)];
        let d = plan::plan(&routes, &node());
        let mut installed = everything_installed(&d);
        installed.remove(&"2.0.0.0/8".parse().unwrap());
        let n = node_routes(&routes, &d, &installed, &[], &BTreeMap::new(), None, "T0");
        assert_eq!(n.routes[0].state, FAILED);
        assert_eq!(n.routes[0].reason, "NotInstalled");
    }

    #[test]
    fn gateway_since_is_kept_until_the_state_changes() {
        let routes = [route("a", &["1.0.0.0/8"], &["10.0.0.1", "10.0.0.2"], 1)];
        let (_, n0) = build(&routes, &[], None, "T0");
        let (_, n1) = build(&routes, &[], Some(&n0), "T1");
        assert_eq!(n1, n0, "nothing changed: same object, T0 kept");
        let (_, n2) = build(&routes, &[("10.0.0.1", "black hole")], Some(&n1), "T2");
        let g1 = &n2.gateways[0];
        assert_eq!(
            (g1.state.as_str(), g1.since.as_str(), g1.reason.as_str()),
            (DOWN, "T2", "black hole")
        );
        assert_eq!(n2.gateways[1].since, "T0");
        assert_eq!(n2.gateways_down, 1);
        assert!(!same(&n1, &n2));
        // Withdrawn gateways are still listed.
        assert_eq!(n2.gateways.len(), 2);
    }

    #[test]
    fn same_ignores_only_since() {
        let routes = [route("a", &["1.0.0.0/8"], &["10.0.0.1"], 1)];
        let (_, a) = build(&routes, &[], None, "T0");
        let (_, b) = build(&routes, &[], None, "T9");
        assert!(same(&a, &b));
        let (_, c) = build(
            &[route("a", &["1.0.0.0/8"], &["10.0.0.1"], 2)],
            &[],
            None,
            "T0",
        );
        assert!(!same(&a, &c), "a new generation is a change");
    }

    #[test]
    fn notes_for_failures_recoveries_and_gateway_transitions() {
        let routes = [
            route("a", &["1.0.0.0/8"], &["10.0.0.1", "10.0.0.2"], 1),
            route("b", &["2.0.0.0/8"], &["10.0.0.1"], 1),
            route("bad", &["3.0.0.0/8"], &["x"], 1),
        ];
        let (d, n0) = build(&routes, &[], None, "T0");
        let gr = gateway_routes(&d);
        let first = notes("node-a", None, &n0, &gr);
        assert!(
            first.is_empty(),
            "nothing but an invalid Route (the controller's): {first:?}"
        );
        let (_, n1) = build(&routes, &[("10.0.0.1", "black hole")], Some(&n0), "T1");
        let down = notes("node-a", Some(&n0), &n1, &gr);
        let reasons: Vec<(&str, &str, bool)> = down
            .iter()
            .map(|n| (n.route.as_str(), n.reason.as_str(), n.warning))
            .collect();
        assert_eq!(
            reasons,
            vec![
                ("a", "GatewayWithdrawn", true),
                ("b", "GatewayWithdrawn", true)
            ]
        );
        assert!(down[0].note.contains("node node-a") && down[0].note.contains("10.0.0.1"));
        assert!(
            notes("node-a", Some(&n1), &n1, &gr).is_empty(),
            "no change, no event"
        );
        let (_, n2) = build(&routes, &[], Some(&n1), "T2");
        let up: Vec<String> = notes("node-a", Some(&n1), &n2, &gr)
            .into_iter()
            .map(|n| n.reason)
            .collect();
        assert_eq!(up, vec!["GatewayRestored", "GatewayRestored"]);
        // A route failing, then recovering.
        let mut failing = n2.clone();
        failing.routes[0].state = FAILED.into();
        failing.routes[0].reason = "GatewayUnreachable".into();
        failing.routes[0].message =
            "Route a: gateway 10.0.0.2 is not on a connected network".into();
        let f = notes("node-a", Some(&n2), &failing, &gr);
        assert_eq!(f.len(), 1);
        assert!(
            f[0].warning
                && f[0].reason == "GatewayUnreachable"
                && f[0].key == "a/GatewayUnreachable"
        );
        let back = notes("node-a", Some(&failing), &n2, &gr);
        assert_eq!(back.len(), 1);
        assert_eq!(
            (back[0].reason.as_str(), back[0].warning),
            ("Applied", false)
        );
    }

    #[test]
    fn a_gateway_down_at_start_is_news_once() {
        let routes = [route("a", &["1.0.0.0/8"], &["10.0.0.1", "10.0.0.2"], 1)];
        let (d, n) = build(&routes, &[("10.0.0.2", "pinned record")], None, "T0");
        let gr = gateway_routes(&d);
        let got = notes("node-a", None, &n, &gr);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].key, "a/GatewayWithdrawn/10.0.0.2");
    }

    #[test]
    fn limiter_holds_repeats_per_key_and_caps_the_total() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut l = Limiter::new(s(60), 3, s(10));
        assert_eq!(l.admit("a", t0), Some(0));
        assert_eq!(l.admit("a", t0 + s(1)), None, "same key within a minute");
        assert_eq!(l.admit("a", t0 + s(2)), None);
        assert_eq!(l.admit("b", t0 + s(2)), Some(0));
        assert_eq!(l.admit("c", t0 + s(2)), Some(0));
        assert_eq!(l.admit("d", t0 + s(2)), None, "bucket empty");
        assert_eq!(
            l.admit("d", t0 + s(13)),
            Some(1),
            "refilled; one held back before"
        );
        assert_eq!(
            l.admit("a", t0 + s(61)),
            Some(2),
            "a's two repeats are counted"
        );
    }

    #[test]
    fn destinations_failing_closed_are_listed_counted_and_told_when_they_start_and_end() {
        let routes = [
            route("a", &["1.0.0.0/8", "2.0.0.0/8"], &["10.0.0.1"], 1),
            route("b", &["3.0.0.0/8"], &["10.0.0.2"], 1),
        ];
        let (d, n0) = build(&routes, &[], None, "T0");
        let gr = gateway_routes(&d);
        // 10.0.0.1 down by health: a's two destinations have no gateway left.
        let mut d1 = plan::plan(&routes, &node());
        plan::withdraw(&mut d1, &[ip("10.0.0.1")].into());
        let n1 = node_routes(
            &routes,
            &d1,
            &everything_installed(&d1),
            &d1.problems,
            &BTreeMap::new(),
            Some(&n0),
            "T1",
        );
        let a = &n1.routes[0];
        assert_eq!(
            (a.state.as_str(), a.reason.as_str()),
            (FAILED, FAILING_CLOSED)
        );
        assert_eq!(
            a.failing_closed,
            vec![
                NodeNoGateway {
                    destination: "1.0.0.0/8".into(),
                    reason: "AllGatewaysDown".into()
                },
                NodeNoGateway {
                    destination: "2.0.0.0/8".into(),
                    reason: "AllGatewaysDown".into()
                },
            ]
        );
        assert!(a.destinations.is_empty(), "no real route in the kernel");
        assert_eq!(n1.failing_closed, 2);
        assert_eq!(n1.routes[1].state, APPLIED);
        let start = notes("node-a", Some(&n0), &n1, &gr);
        let start: Vec<&Note> = start.iter().filter(|n| n.route == "a").collect();
        assert_eq!(start.len(), 1, "one Event for the Route: {start:?}");
        assert!(start[0].warning && start[0].reason == FAILING_CLOSED);
        assert!(
            start[0].note.contains("1.0.0.0/8 (AllGatewaysDown)"),
            "{}",
            start[0].note
        );
        // Back: one Event saying so, no generic "Applied".
        let (_, n2) = build(&routes, &[], Some(&n1), "T2");
        let end = notes("node-a", Some(&n1), &n2, &gr);
        let end: Vec<&Note> = end.iter().filter(|n| n.route == "a").collect();
        assert_eq!(end.len(), 1, "{end:?}");
        assert_eq!(
            (end[0].reason.as_str(), end[0].warning),
            ("FailClosedEnded", false)
        );
        assert_eq!(n2.failing_closed, 0);
    }
}
