//! The planning core: `(Routes, this node) -> desired routes + problems`. Pure: no I/O, no
//! clock, no kernel. The dataplane turns its output into kernel objects.
//!
//! Conflict rule (documented in the README): when several Routes that select this node
//! name the same destination, the **oldest** Route wins (`metadata.creationTimestamp`; a
//! Route without one, as in standalone mode, counts as newer than any that has one), ties
//! broken by name in byte order. Every loser is reported with the winner's name; its other
//! destinations are still installed.
use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::logic::crd::Route;
pub use crate::logic::desired::{DesiredRoute, DesiredState, Problem, ProblemKind};
use crate::logic::route;
use crate::logic::selector::{self, NodeInfo};

/// Plans the routes for `node`. The result does not depend on the order of `routes`.
pub fn plan(routes: &[Route], node: &NodeInfo) -> DesiredState {
    let mut ordered: Vec<&Route> = routes.iter().collect();
    ordered.sort_by_key(|r| precedence(r));

    let mut state = DesiredState::default();
    for r in ordered {
        // Being deleted: no longer wanted here (the finalizer holds the object until the
        // nodes report it gone).
        if r.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let name = r.metadata.name.clone().unwrap_or_default();
        let valid = match route::validate(r) {
            Ok(v) => v,
            Err(e) => {
                state.problems.push(Problem {
                    route: name,
                    kind: ProblemKind::Invalid,
                    message: e.to_string(),
                });
                continue;
            }
        };
        match selector::matches(r.spec.node_selector.as_ref(), node) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                state.problems.push(Problem {
                    route: name.clone(),
                    kind: ProblemKind::Invalid,
                    message: format!("Route {name}: {}: {}", e.field, e.reason),
                });
                continue;
            }
        }
        state
            .warnings
            .extend(valid.warnings.iter().map(|w| format!("Route {name}: {w}")));
        state.selected.push(name.clone());
        let mut gateways = valid.gateways.clone();
        gateways.sort();
        for (asked, dst) in valid.destinations.iter().flat_map(|d| {
            route::kernel_destinations(*d)
                .into_iter()
                .map(move |k| (*d, k))
        }) {
            if let Some(winner) = state.routes.get(&dst) {
                state.problems.push(Problem {
                    route: name.clone(),
                    kind: ProblemKind::Conflict {
                        destination: dst,
                        winner: winner.owner.clone(),
                    },
                    message: format!(
                        "Route {name}: destination {dst} is already routed on this node by the \
                         older Route {}; this one is not applied for it",
                        winner.owner
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
                },
            );
        }
    }
    state.selected.sort();
    state.problems.sort();
    state.warnings.sort();
    state
}

/// Takes the gateways in `down` out of every route, except that a route never loses its
/// last gateway (fail-closed): withdrawing it would send the destination out through the
/// node's own default route, with another egress IP. When every gateway of a route is
/// down, the route keeps all of them (none is better than another, and the first to come
/// back carries traffic at once). Returns the gateways that are down but kept, per route.
pub fn withdraw(
    state: &mut DesiredState,
    down: &std::collections::BTreeSet<IpAddr>,
) -> BTreeMap<IpNet, Vec<IpAddr>> {
    let mut kept_down = BTreeMap::new();
    if down.is_empty() {
        return kept_down;
    }
    for (dst, r) in state.routes.iter_mut() {
        let (bad, good): (Vec<IpAddr>, Vec<IpAddr>) =
            r.gateways.iter().partition(|g| down.contains(g));
        if bad.is_empty() {
            continue;
        }
        if good.is_empty() {
            kept_down.insert(*dst, bad);
            continue;
        }
        r.gateways = good;
        r.withdrawn = bad;
    }
    kept_down
}

/// Sort key: older first (no timestamp = newest), then name.
fn precedence(r: &Route) -> (bool, Option<String>, String) {
    let ts = r
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.to_string());
    (
        ts.is_none(),
        ts,
        r.metadata.name.clone().unwrap_or_default(),
    )
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
    fn withdraw_removes_down_gateways_but_never_the_last() {
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
        let kept = withdraw(&mut s, &down);
        // ECMP: both down gateways go, the healthy one stays.
        assert_eq!(s.routes[&net("1.0.0.0/8")].gateways, ips(&["10.0.0.3"]));
        assert_eq!(
            s.routes[&net("1.0.0.0/8")].withdrawn,
            ips(&["10.0.0.1", "10.0.0.2"])
        );
        // A single gateway that is down is kept and reported.
        assert_eq!(s.routes[&net("2.0.0.0/8")].gateways, ips(&["10.0.0.1"]));
        assert!(s.routes[&net("2.0.0.0/8")].withdrawn.is_empty());
        // All gateways down: all kept.
        assert_eq!(
            s.routes[&net("3.0.0.0/8")].gateways,
            ips(&["10.0.0.1", "10.0.0.2"])
        );
        assert_eq!(
            kept.keys().copied().collect::<Vec<_>>(),
            vec![net("2.0.0.0/8"), net("3.0.0.0/8")]
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
