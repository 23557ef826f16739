//! The planning core: `(Routes, this node) -> desired routes + problems`. Pure: no I/O, no
//! clock, no kernel. The dataplane turns its output into kernel objects.
//!
//! Conflict rule (documented in the README): when several Routes that select this node
//! name the same destination, the **oldest** Route wins (`metadata.creationTimestamp`; a
//! Route without one, as in standalone mode, counts as newer than any that has one), ties
//! broken by name in byte order. Every loser is reported with the winner's name; its other
//! destinations are still installed.
use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::logic::crd::Route;
pub use crate::logic::desired::{
    DesiredRoute, DesiredState, FailMode, NoGateway, Problem, ProblemKind,
};
use crate::logic::owner;
use crate::logic::route;
use crate::logic::selector::{self, NodeInfo};

/// The annotation that chooses a Route's [`FailMode`] (`closed` or `open`), over
/// `--fail-mode`.
pub const FAIL_MODE_ANNOTATION: &str = "networking.doks.digitalocean.com/fail-mode";

/// Settings of the planner that are not in the Routes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// The fail mode of a Route without the annotation (`--fail-mode`).
    pub fail_mode: FailMode,
}

/// A Route's fail mode: its annotation, else the policy's. An annotation that is neither
/// `closed` nor `open` is warned about and means `closed` (the safe side).
fn fail_mode(r: &Route, name: &str, policy: &Policy, warnings: &mut Vec<String>) -> FailMode {
    let Some(v) = r
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(FAIL_MODE_ANNOTATION))
    else {
        return policy.fail_mode;
    };
    FailMode::parse(v.trim()).unwrap_or_else(|| {
        warnings.push(format!(
            "{}: metadata.annotations[\"{FAIL_MODE_ANNOTATION}\"]: {v:?} is neither \
             \"closed\" nor \"open\"; failing closed",
            owner::describe(name)
        ));
        FailMode::Closed
    })
}

/// Plans the routes for `node` with the default [`Policy`].
pub fn plan<R: Borrow<Route>>(routes: &[R], node: &NodeInfo) -> DesiredState {
    plan_with(routes, node, &Policy::default())
}

/// Plans the routes for `node`. The result does not depend on the order of `routes`.
pub fn plan_with<R: Borrow<Route>>(routes: &[R], node: &NodeInfo, policy: &Policy) -> DesiredState {
    let parts: Vec<Part> = routes
        .iter()
        .map(|r| Part::of(r.borrow(), node, policy))
        .collect();
    merge(parts.iter())
}

/// One Route's share of the plan: everything about it that depends on that Route, this
/// node and the policy only (validation, node selection, fail mode). Conflicts between
/// Routes are settled when the shares are merged ([`merge`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Part {
    name: String,
    precedence: (owner::Kind, bool, Option<String>, String),
    what: Share,
}

#[derive(Clone, Debug, PartialEq)]
enum Share {
    /// Being deleted, or not selecting this node.
    Nothing,
    Invalid(Problem),
    Selected {
        warnings: Vec<String>,
        mode: FailMode,
        /// Sorted.
        gateways: Vec<IpAddr>,
        /// (as asked, as planned in the kernel): a default route becomes its two halves.
        destinations: Vec<(IpNet, IpNet)>,
    },
}

impl Part {
    pub fn of(r: &Route, node: &NodeInfo, policy: &Policy) -> Part {
        let name = r.metadata.name.clone().unwrap_or_default();
        let what = Self::share(r, &name, node, policy);
        Part {
            precedence: precedence(r),
            name,
            what,
        }
    }

    fn share(r: &Route, name: &str, node: &NodeInfo, policy: &Policy) -> Share {
        // Being deleted: no longer wanted here (the finalizer holds the object until the
        // nodes report it gone).
        if r.metadata.deletion_timestamp.is_some() {
            return Share::Nothing;
        }
        let valid = match route::validate(r) {
            Ok(v) => v,
            Err(e) => {
                return Share::Invalid(Problem {
                    route: name.to_string(),
                    kind: ProblemKind::Invalid,
                    message: e.to_string(),
                });
            }
        };
        match selector::matches(r.spec.node_selector.as_ref(), node) {
            Ok(true) => {}
            Ok(false) => return Share::Nothing,
            Err(e) => {
                return Share::Invalid(Problem {
                    route: name.to_string(),
                    kind: ProblemKind::Invalid,
                    message: format!("{}: {}: {}", owner::describe(name), e.field, e.reason),
                });
            }
        }
        let mut warnings: Vec<String> = valid
            .warnings
            .iter()
            .map(|w| format!("{}: {w}", owner::describe(name)))
            .collect();
        let mode = fail_mode(r, name, policy, &mut warnings);
        let mut gateways = valid.gateways.clone();
        gateways.sort();
        let destinations = valid
            .destinations
            .iter()
            .flat_map(|d| {
                route::kernel_destinations(*d)
                    .into_iter()
                    .map(move |k| (*d, k))
            })
            .collect();
        Share::Selected {
            warnings,
            mode,
            gateways,
            destinations,
        }
    }
}

/// The plan from every Route's share: the oldest Route wins a destination that several
/// name (see the module's conflict rule). Linear in the destinations (after sorting the
/// shares by precedence).
pub fn merge<'a>(parts: impl IntoIterator<Item = &'a Part>) -> DesiredState {
    let mut ordered: Vec<&Part> = parts.into_iter().collect();
    ordered.sort_by(|a, b| a.precedence.cmp(&b.precedence));
    let mut state = DesiredState::default();
    for part in ordered {
        let name = &part.name;
        let (warnings, mode, gateways, destinations) = match &part.what {
            Share::Nothing => continue,
            Share::Invalid(p) => {
                state.problems.push(p.clone());
                continue;
            }
            Share::Selected {
                warnings,
                mode,
                gateways,
                destinations,
            } => (warnings, *mode, gateways, destinations),
        };
        state.warnings.extend(warnings.iter().cloned());
        state.selected.push(name.clone());
        for &(asked, dst) in destinations {
            if let Some(winner) = state.routes.get(&dst) {
                state.problems.push(Problem {
                    route: name.clone(),
                    kind: ProblemKind::Conflict {
                        destination: dst,
                        winner: winner.owner.clone(),
                    },
                    message: format!(
                        "{}: destination {dst} is already routed on this node by {}; this one \
                         is not applied for it",
                        owner::describe(name),
                        winner_phrase(name, &winner.owner)
                    ),
                });
                continue;
            }
            state.routes.insert(
                dst,
                DesiredRoute {
                    destination: dst,
                    gateways: gateways.clone(),
                    withdrawn: Vec::new(),
                    owner: name.clone(),
                    from_default: asked.prefix_len() == 0,
                    fail_mode: mode,
                },
            );
        }
    }
    state.selected.sort();
    state.problems.sort();
    state.warnings.sort();
    state
}

/// The planner with a memory: each Route's [`Part`] is kept, and worked out again only
/// when that Route changed (a new object from the source: compared by pointer, then by
/// value) or when this node's labels or the policy did. An edit of one Route among 2,000
/// validates and selects that one only; the merge stays linear in the destinations.
#[derive(Default)]
pub struct Planner {
    node: Option<NodeInfo>,
    policy: Policy,
    parts: HashMap<String, (Arc<Route>, Arc<Part>)>,
    /// How many shares the last plan worked out again.
    fresh: usize,
}

impl Planner {
    pub fn plan(
        &mut self,
        routes: &[Arc<Route>],
        node: &NodeInfo,
        policy: &Policy,
    ) -> DesiredState {
        if self.node.as_ref() != Some(node) || self.policy != *policy {
            self.parts.clear();
            self.node = Some(node.clone());
            self.policy = *policy;
        }
        let mut kept = HashMap::with_capacity(routes.len());
        let mut parts: Vec<Arc<Part>> = Vec::with_capacity(routes.len());
        self.fresh = 0;
        for r in routes {
            let name = r.metadata.name.as_deref().unwrap_or_default();
            let known = self
                .parts
                .remove(name)
                .filter(|(old, _)| Arc::ptr_eq(old, r) || **old == **r);
            let part = match known {
                Some((_, part)) => part,
                None => {
                    self.fresh += 1;
                    Arc::new(Part::of(r, node, policy))
                }
            };
            parts.push(part.clone());
            // Two Routes of one name (a source's mistake): the second is not remembered.
            kept.entry(name.to_string()).or_insert((r.clone(), part));
        }
        self.parts = kept;
        merge(parts.iter().map(|p| &**p))
    }

    /// How many Routes the last [`Planner::plan`] validated and selected again.
    pub fn fresh(&self) -> usize {
        self.fresh
    }
}

/// Takes the gateways in `down` out of every route. A route whose every gateway is down
/// keeps none: it has no usable gateway, which is reported as a [`ProblemKind::NoGateway`]
/// (its traffic is refused when it fails closed, the dataplane's standby route does that;
/// it falls through when it fails open). Returns those destinations with their gateways.
pub fn withdraw(
    state: &mut DesiredState,
    down: &std::collections::BTreeSet<IpAddr>,
) -> BTreeMap<IpNet, Vec<IpAddr>> {
    let mut all_down = BTreeMap::new();
    if down.is_empty() {
        return all_down;
    }
    for (dst, r) in state.routes.iter_mut() {
        let (bad, good): (Vec<IpAddr>, Vec<IpAddr>) =
            r.gateways.iter().partition(|g| down.contains(g));
        if bad.is_empty() {
            continue;
        }
        if good.is_empty() {
            all_down.insert(*dst, bad.clone());
            state.problems.push(no_gateway(r, NoGateway::AllDown));
        }
        r.gateways = good;
        r.withdrawn = bad;
    }
    state.problems.sort();
    all_down
}

/// The problem of `r` having no usable gateway, `why`.
pub fn no_gateway(r: &DesiredRoute, why: NoGateway) -> Problem {
    let what = match r.fail_mode {
        FailMode::Closed => {
            "its traffic is refused (fail-closed) rather than sent out of the node's own \
             default route"
        }
        FailMode::Open => "its traffic falls through to the node's own routes (fail-open)",
    };
    let mut gateways: Vec<String> = r
        .gateways
        .iter()
        .chain(&r.withdrawn)
        .map(|g| g.to_string())
        .collect();
    gateways.sort();
    Problem {
        route: r.owner.clone(),
        message: format!(
            "{}: destination {}: no usable gateway ({}): {}; {what}",
            owner::describe(&r.owner),
            r.destination,
            gateways.join(", "),
            why.describe()
        ),
        kind: ProblemKind::NoGateway {
            destination: r.destination,
            why,
            mode: r.fail_mode,
        },
    }
}

/// How a conflict message names the winner: the older one, or the Route that wins over
/// a StaticRoute.
fn winner_phrase(loser: &str, winner: &str) -> String {
    match (owner::parse(loser).0, owner::parse(winner).0) {
        (owner::Kind::StaticRoute, owner::Kind::Route) => format!(
            "{} (a Route wins over a StaticRoute)",
            owner::describe(winner)
        ),
        _ => format!("the older {}", owner::describe(winner)),
    }
}

/// Sort key: Routes before StaticRoutes (a Route wins a destination both name), then
/// older first (no timestamp = newest), then name.
fn precedence(r: &Route) -> (owner::Kind, bool, Option<String>, String) {
    let ts = r
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.to_string());
    let key = r.metadata.name.clone().unwrap_or_default();
    (owner::parse(&key).0, ts.is_none(), ts, key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logic::crd::RouteSpec;
    use crate::logic::route::Family;
    use k8s_openapi::api::core::v1::{NodeSelector, NodeSelectorRequirement, NodeSelectorTerm};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn route(name: &str, dst: &[&str], gw: &[&str]) -> Route {
        Route::new(
            name,
            RouteSpec {
                destinations: dst.iter().map(|s| s.to_string()).collect(),
                gateways: gw.iter().map(|s| s.to_string()).collect(),
                node_selector: None,
            },
        )
    }

    fn aged(mut r: Route, secs: i64) -> Route {
        let t = k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + secs).unwrap();
        r.metadata.creation_timestamp = Some(Time(t));
        r
    }

    fn node() -> NodeInfo {
        NodeInfo {
            name: "node-a".into(),
            labels: [("pool".to_string(), "a".to_string())].into(),
        }
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ips(s: &[&str]) -> Vec<IpAddr> {
        s.iter().map(|a| a.parse().unwrap()).collect()
    }

    fn static_route(name: &str, dst: &[&str], gw: &str) -> Route {
        crate::logic::owner::from_static(&crate::logic::crd::StaticRoute::new(
            name,
            crate::logic::crd::StaticRouteSpec {
                destinations: dst.iter().map(|s| s.to_string()).collect(),
                gateway: gw.into(),
            },
        ))
    }

    #[test]
    fn a_route_wins_over_an_older_static_route_and_the_loser_is_told_why() {
        let old_static = aged(static_route("primary", &["34.160.111.145"], "10.0.0.5"), 0);
        let new_route = aged(route("primary", &["34.160.111.145/32"], &["10.0.0.6"]), 100);
        let s = plan(&[old_static.clone(), new_route], &node());
        let r = &s.routes[&net("34.160.111.145/32")];
        assert_eq!(r.owner, "primary", "the Route, though younger");
        assert_eq!(r.gateways, ips(&["10.0.0.6"]));
        assert_eq!(s.problems.len(), 1, "{:?}", s.problems);
        assert_eq!(s.problems[0].route, "StaticRoute/primary");
        assert!(
            s.problems[0]
                .message
                .starts_with("StaticRoute primary: destination")
                && s.problems[0]
                    .message
                    .contains("by Route primary (a Route wins over a StaticRoute)"),
            "{}",
            s.problems[0].message
        );
        // Alone, the StaticRoute plans on every node through its one gateway.
        let s = plan(&[old_static], &node());
        assert_eq!(
            s.routes[&net("34.160.111.145/32")].owner,
            "StaticRoute/primary"
        );
        assert_eq!(s.selected, vec!["StaticRoute/primary".to_string()]);
        // Between StaticRoutes the older wins, as between Routes (the operator's primary
        // and secondary for one destination).
        let a = aged(static_route("primary", &["1.0.0.0/8"], "10.0.0.5"), 0);
        let b = aged(static_route("secondary", &["1.0.0.0/8"], "10.0.0.12"), 5);
        let s = plan(&[b, a], &node());
        assert_eq!(s.routes[&net("1.0.0.0/8")].owner, "StaticRoute/primary");
        assert!(
            s.problems[0]
                .message
                .contains("by the older StaticRoute primary"),
            "{}",
            s.problems[0].message
        );
    }

    #[test]
    fn an_invalid_static_route_is_named_with_its_kind_and_field() {
        let s = plan(&[static_route("bad", &["1.2.3.4"], "gw.example")], &node());
        assert_eq!(s.problems.len(), 1);
        assert_eq!(
            s.problems[0].message,
            "StaticRoute bad: spec.gateway: \"gw.example\" is not an IP address"
        );
        let s = plan(&[static_route("empty", &["1.2.3.4"], "")], &node());
        assert!(
            s.problems[0]
                .message
                .starts_with("StaticRoute empty: spec.gateway: must be set"),
            "{}",
            s.problems[0].message
        );
        let s = plan(&[static_route("mixed", &["fd00::1"], "10.0.0.1")], &node());
        assert_eq!(
            s.problems[0].message,
            "StaticRoute mixed: spec.destinations[0]: fd00::1/128 is IPv6 but the gateways \
             are IPv4: one family per StaticRoute"
        );
    }

    #[test]
    fn a_route_being_deleted_is_not_planned_and_frees_its_destinations() {
        let mut old = aged(route("old", &["1.0.0.0/8"], &["10.0.0.1"]), 0);
        let new = aged(route("new", &["1.0.0.0/8"], &["10.0.0.2"]), 10);
        let s = plan(&[old.clone(), new.clone()], &node());
        assert_eq!(s.routes[&net("1.0.0.0/8")].owner, "old");
        old.metadata.deletion_timestamp = old.metadata.creation_timestamp.clone();
        let s = plan(&[old, new], &node());
        assert_eq!(s.routes[&net("1.0.0.0/8")].owner, "new");
        assert_eq!(s.selected, vec!["new".to_string()]);
        assert!(s.problems.is_empty(), "{:?}", s.problems);
    }

    #[test]
    fn withdraw_removes_down_gateways_and_a_route_with_none_left_has_no_gateway() {
        let mut s = plan(
            &[
                route(
                    "ecmp",
                    &["1.0.0.0/8"],
                    &["10.0.0.1", "10.0.0.2", "10.0.0.3"],
                ),
                route("single", &["2.0.0.0/8"], &["10.0.0.1"]),
                route("pair", &["3.0.0.0/8"], &["10.0.0.1", "10.0.0.2"]),
                route("other", &["4.0.0.0/8"], &["10.0.0.3"]),
            ],
            &node(),
        );
        let down = ips(&["10.0.0.1", "10.0.0.2"]).into_iter().collect();
        let all_down = withdraw(&mut s, &down);
        // ECMP: both down gateways go, the healthy one stays.
        assert_eq!(s.routes[&net("1.0.0.0/8")].gateways, ips(&["10.0.0.3"]));
        assert_eq!(
            s.routes[&net("1.0.0.0/8")].withdrawn,
            ips(&["10.0.0.1", "10.0.0.2"])
        );
        // A single gateway that is down: no usable gateway, the destination stays planned
        // (its standby route refuses the traffic) and is reported.
        assert!(s.routes[&net("2.0.0.0/8")].gateways.is_empty());
        assert_eq!(s.routes[&net("2.0.0.0/8")].withdrawn, ips(&["10.0.0.1"]));
        // All gateways down: none left.
        assert!(s.routes[&net("3.0.0.0/8")].gateways.is_empty());
        assert_eq!(
            all_down.keys().copied().collect::<Vec<_>>(),
            vec![net("2.0.0.0/8"), net("3.0.0.0/8")]
        );
        let reported: Vec<(&str, IpNet)> = s
            .problems
            .iter()
            .filter_map(|p| match &p.kind {
                ProblemKind::NoGateway {
                    destination,
                    why: NoGateway::AllDown,
                    mode: FailMode::Closed,
                } => Some((p.route.as_str(), *destination)),
                _ => None,
            })
            .collect();
        assert_eq!(
            reported,
            vec![("pair", net("3.0.0.0/8")), ("single", net("2.0.0.0/8"))]
        );
        assert!(
            s.problems[0].message.contains("refused (fail-closed)"),
            "{}",
            s.problems[0].message
        );
        // Untouched.
        assert_eq!(s.routes[&net("4.0.0.0/8")].gateways, ips(&["10.0.0.3"]));
        // Nothing down: nothing changes.
        let mut t = plan(&[route("ecmp", &["1.0.0.0/8"], &["10.0.0.1"])], &node());
        let before = t.clone();
        assert!(withdraw(&mut t, &Default::default()).is_empty());
        assert_eq!(t, before);
    }

    #[test]
    fn fail_mode_comes_from_the_annotation_else_the_policy() {
        let mut open = route("open", &["1.0.0.0/8"], &["10.0.0.1"]);
        open.metadata.annotations =
            Some([(FAIL_MODE_ANNOTATION.to_string(), "open".to_string())].into());
        let mut typo = route("typo", &["2.0.0.0/8"], &["10.0.0.1"]);
        typo.metadata.annotations =
            Some([(FAIL_MODE_ANNOTATION.to_string(), "opne".to_string())].into());
        let plain = route("plain", &["3.0.0.0/8"], &["10.0.0.1"]);
        let routes = [open, typo, plain];
        let s = plan(&routes, &node());
        assert_eq!(s.routes[&net("1.0.0.0/8")].fail_mode, FailMode::Open);
        assert_eq!(s.routes[&net("2.0.0.0/8")].fail_mode, FailMode::Closed);
        assert_eq!(s.routes[&net("3.0.0.0/8")].fail_mode, FailMode::Closed);
        assert_eq!(s.warnings.len(), 1);
        assert!(
            s.warnings[0].contains(
                "Route typo: metadata.annotations[\"networking.doks.digitalocean.com/fail-mode\"]"
            ),
            "{:?}",
            s.warnings
        );
        // --fail-mode open changes only the Routes without the annotation.
        let s = plan_with(
            &routes,
            &node(),
            &Policy {
                fail_mode: FailMode::Open,
            },
        );
        assert_eq!(s.routes[&net("2.0.0.0/8")].fail_mode, FailMode::Closed);
        assert_eq!(s.routes[&net("3.0.0.0/8")].fail_mode, FailMode::Open);
        // Falling through is reported as such.
        let mut s = s;
        withdraw(&mut s, &ips(&["10.0.0.1"]).into_iter().collect());
        let p = s.problems.iter().find(|p| p.route == "plain").unwrap();
        assert!(p.message.contains("falls through"), "{}", p.message);
    }

    #[test]
    fn single_and_ecmp_routes() {
        let s = plan(
            &[
                route("one", &["1.2.3.0/24"], &["10.114.0.3"]),
                route(
                    "two",
                    &["5.6.0.0/16", "7.7.7.7"],
                    &["10.114.0.4", "10.114.0.3"],
                ),
            ],
            &node(),
        );
        assert!(s.problems.is_empty(), "{:?}", s.problems);
        assert_eq!(s.routes.len(), 3);
        assert_eq!(s.routes[&net("1.2.3.0/24")].gateways.len(), 1);
        let ecmp = &s.routes[&net("5.6.0.0/16")];
        assert_eq!(
            ecmp.gateways,
            vec![
                "10.114.0.3".parse::<IpAddr>().unwrap(),
                "10.114.0.4".parse().unwrap()
            ]
        );
        assert_eq!(ecmp.owner, "two");
        assert!(s.routes.contains_key(&net("7.7.7.7/32")));
        assert_eq!(s.selected, vec!["one", "two"]);
    }

    #[test]
    fn both_families() {
        let s = plan(
            &[
                route("v6", &["2001:db8::/32", "::/0"], &["fd00::3", "fd00::4"]),
                route("v4", &["0.0.0.0/0"], &["10.0.0.1"]),
            ],
            &node(),
        );
        // Default routes are planned as their halves (see default_route).
        assert_eq!(s.routes.len(), 5);
        assert_eq!(s.routes[&net("8000::/1")].family(), Family::V6);
        assert_eq!(s.routes[&net("128.0.0.0/1")].family(), Family::V4);
        assert!(!s.routes[&net("2001:db8::/32")].from_default);
    }

    #[test]
    fn invalid_route_is_reported_and_others_still_apply() {
        let s = plan(
            &[
                route("bad", &["10.0.0.0/8"], &["fd00::1"]),
                route("good", &["10.0.0.0/8"], &["10.1.0.1"]),
            ],
            &node(),
        );
        assert_eq!(s.routes[&net("10.0.0.0/8")].owner, "good");
        assert_eq!(s.problems.len(), 1);
        assert_eq!(s.problems[0].route, "bad");
        assert_eq!(s.problems[0].kind, ProblemKind::Invalid);
        assert!(
            s.problems[0].message.contains("spec.destinations[0]"),
            "{}",
            s.problems[0].message
        );
    }

    #[test]
    fn conflict_oldest_wins_and_loser_is_reported() {
        let old = aged(
            route("zzz-old", &["10.0.0.0/8", "11.0.0.0/8"], &["10.1.0.1"]),
            0,
        );
        let new = aged(
            route("aaa-new", &["10.0.0.0/8", "12.0.0.0/8"], &["10.1.0.2"]),
            60,
        );
        let s = plan(&[new, old], &node());
        assert_eq!(s.routes[&net("10.0.0.0/8")].owner, "zzz-old");
        assert_eq!(
            s.routes[&net("12.0.0.0/8")].owner,
            "aaa-new",
            "loser keeps its other destinations"
        );
        assert_eq!(
            s.problems,
            vec![Problem {
                route: "aaa-new".into(),
                kind: ProblemKind::Conflict {
                    destination: net("10.0.0.0/8"),
                    winner: "zzz-old".into()
                },
                message: s.problems[0].message.clone(),
            }]
        );
        assert!(s.problems[0].message.contains("zzz-old"));
    }

    #[test]
    fn conflict_tie_and_missing_timestamps_break_by_name() {
        let s = plan(
            &[
                route("b", &["10.0.0.0/8"], &["10.1.0.2"]),
                route("a", &["10.0.0.0/8"], &["10.1.0.1"]),
            ],
            &node(),
        );
        assert_eq!(s.routes[&net("10.0.0.0/8")].owner, "a");
        // A Route with a timestamp beats one without.
        let s = plan(
            &[
                route("a", &["10.0.0.0/8"], &["10.1.0.1"]),
                aged(route("b", &["10.0.0.0/8"], &["10.1.0.2"]), 5),
            ],
            &node(),
        );
        assert_eq!(s.routes[&net("10.0.0.0/8")].owner, "b");
        // Host bits cleared: both name the same network, so they conflict.
        let s = plan(
            &[
                route("a", &["10.1.2.3/8"], &["10.1.0.1"]),
                route("b", &["10.0.0.0/8"], &["10.1.0.2"]),
            ],
            &node(),
        );
        assert_eq!(s.problems.len(), 1);
        assert_eq!(s.warnings.len(), 1);
        assert!(
            s.warnings[0].starts_with("Route a: spec.destinations[0]"),
            "{:?}",
            s.warnings
        );
    }

    #[test]
    fn result_is_independent_of_input_order() {
        let routes = vec![
            aged(route("a", &["10.0.0.0/8", "1.0.0.0/8"], &["10.1.0.1"]), 30),
            aged(route("b", &["10.0.0.0/8"], &["10.1.0.2", "10.1.0.3"]), 10),
            route("c", &["10.0.0.0/8", "2.0.0.0/8"], &["10.1.0.4"]),
            route("d", &["nonsense"], &["10.1.0.4"]),
            aged(route("e", &["2.0.0.0/8"], &["10.1.0.5"]), 10),
        ];
        let reference = plan(&routes, &node());
        // Every rotation and the reversal give the same plan.
        for k in 0..routes.len() {
            let mut r = routes.clone();
            r.rotate_left(k);
            assert_eq!(plan(&r, &node()), reference);
            r.reverse();
            assert_eq!(plan(&r, &node()), reference);
        }
        assert_eq!(reference.routes[&net("10.0.0.0/8")].owner, "b");
        assert_eq!(reference.routes[&net("2.0.0.0/8")].owner, "e");
        assert_eq!(reference.problems.len(), 4, "a, c twice (to b and e), d");
    }

    #[test]
    fn the_planner_works_out_again_only_what_changed_and_plans_as_from_scratch() {
        let mut routes: Vec<Arc<Route>> = (0..50)
            .map(|i| {
                let dst = format!("10.{i}.0.0/16");
                Arc::new(aged(route(&format!("r{i:02}"), &[&dst], &["10.1.0.1"]), i))
            })
            .collect();
        // r50 conflicts with r03 (older) for 10.3.0.0/16.
        routes.push(Arc::new(aged(
            route("r50", &["10.3.0.0/16", "11.0.0.0/8"], &["10.1.0.2"]),
            100,
        )));
        let mut p = Planner::default();
        let policy = Policy::default();
        assert_eq!(p.plan(&routes, &node(), &policy), plan(&routes, &node()));
        assert_eq!(p.fresh(), 51, "first plan: every Route");
        assert_eq!(p.plan(&routes, &node(), &policy), plan(&routes, &node()));
        assert_eq!(p.fresh(), 0, "same objects: nothing again");
        // The same content in new objects (a relist): compared by value, nothing again.
        let copies: Vec<Arc<Route>> = routes.iter().map(|r| Arc::new((**r).clone())).collect();
        p.plan(&copies, &node(), &policy);
        assert_eq!(p.fresh(), 0);
        // One edit: that Route only. The older Route of the conflict is deleted: the loser
        // wins its destination, though the loser itself did not change.
        let mut edited = (*routes[7]).clone();
        edited.spec.gateways = vec!["10.1.0.9".into()];
        routes[7] = Arc::new(edited);
        routes.remove(3);
        let s = p.plan(&routes, &node(), &policy);
        assert_eq!(p.fresh(), 1);
        assert_eq!(s, plan(&routes, &node()));
        assert_eq!(s.routes[&net("10.3.0.0/16")].owner, "r50");
        assert_eq!(s.routes[&net("10.7.0.0/16")].gateways, ips(&["10.1.0.9"]));
        assert!(s.problems.is_empty(), "{:?}", s.problems);
        // The node's labels or the policy changed: everything again.
        let relabelled = NodeInfo::new("node-a", &[("pool", "b")]);
        assert_eq!(
            p.plan(&routes, &relabelled, &policy),
            plan(&routes, &relabelled)
        );
        assert_eq!(p.fresh(), routes.len());
        let open = Policy {
            fail_mode: FailMode::Open,
        };
        assert_eq!(
            p.plan(&routes, &relabelled, &open),
            plan_with(&routes, &relabelled, &open)
        );
        assert_eq!(p.fresh(), routes.len());
        // Two Routes of one name (a source's mistake) plan as from scratch, every time.
        let twins = vec![
            Arc::new(route("twin", &["12.0.0.0/8"], &["10.1.0.1"])),
            Arc::new(route("twin", &["12.0.0.0/8"], &["10.1.0.2"])),
        ];
        for _ in 0..2 {
            assert_eq!(p.plan(&twins, &node(), &policy), plan(&twins, &node()));
        }
    }

    #[test]
    fn node_selector_decides_and_broken_selector_is_invalid() {
        let mut sel = route("sel", &["10.0.0.0/8"], &["10.1.0.1"]);
        let term = |op: &str, v: &str| NodeSelector {
            node_selector_terms: vec![NodeSelectorTerm {
                match_expressions: Some(vec![NodeSelectorRequirement {
                    key: "pool".into(),
                    operator: op.into(),
                    values: Some(vec![v.into()]),
                }]),
                match_fields: None,
            }],
        };
        sel.spec.node_selector = Some(term("In", "b"));
        assert!(plan(std::slice::from_ref(&sel), &node()).routes.is_empty());
        assert!(
            plan(std::slice::from_ref(&sel), &node())
                .selected
                .is_empty()
        );
        sel.spec.node_selector = Some(term("In", "a"));
        assert_eq!(plan(std::slice::from_ref(&sel), &node()).routes.len(), 1);
        sel.spec.node_selector = Some(term("Gt", "x"));
        let s = plan(&[sel], &node());
        assert!(s.routes.is_empty());
        assert_eq!(s.problems[0].kind, ProblemKind::Invalid);
        assert!(
            s.problems[0]
                .message
                .contains("nodeSelectorTerms[0].matchExpressions[0].values")
        );
    }
}
