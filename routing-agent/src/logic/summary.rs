//! The controller's core (pure): a Route's status summarised from the nodes' reports, and
//! whether its deletion still waits for a node.
use std::collections::BTreeMap;

use crate::logic::crd::{
    APPLIED, Condition, FAILED, NodeFailure, NodeRoute, NodeRoutes, Route, RouteStatus,
};
use crate::logic::route;
use crate::logic::selector::{self, NodeInfo};

/// Failures listed in a Route's status (the count is always complete).
pub const MAX_FAILURES: usize = 20;

/// Summarises `route` over `nodes` (every Node of the cluster) from `reports` (node name →
/// its [`NodeRoutes`]). `prev` carries the conditions' transition times over; `now` stamps
/// the ones that change.
pub fn summarize(
    route: &Route,
    nodes: &[NodeInfo],
    reports: &BTreeMap<String, NodeRoutes>,
    prev: Option<&RouteStatus>,
    now: &str,
) -> RouteStatus {
    let name = route.metadata.name.as_deref().unwrap_or_default();
    let generation = route.metadata.generation;
    let mut st = RouteStatus {
        observed_generation: generation,
        ..Default::default()
    };
    let invalid = route::validate(route).err().map(|e| e.to_string());
    let mut selector_error = None;
    for node in nodes {
        match selector::matches(route.spec.node_selector.as_ref(), node) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                selector_error = Some(format!(
                    "{}: {}: {}",
                    crate::logic::owner::describe(name),
                    e.field,
                    e.reason
                ));
                break;
            }
        }
        st.selected += 1;
        let entry: Option<&NodeRoute> = reports.get(&node.name).and_then(|r| {
            r.routes
                .iter()
                .find(|e| e.name == name && e.kind.is_empty())
        });
        match entry {
            Some(e) if generation.is_none() || e.generation == generation => {
                if e.state == APPLIED {
                    st.ready += 1;
                } else if e.state == FAILED {
                    st.failed += 1;
                    if st.failures.len() < MAX_FAILURES {
                        st.failures.push(NodeFailure {
                            node: node.name.clone(),
                            reason: e.reason.clone(),
                            message: e.message.clone(),
                        });
                    }
                } else {
                    st.pending += 1;
                }
            }
            _ => st.pending += 1,
        }
    }
    if selector_error.is_some() {
        st.selected = 0;
        st.ready = 0;
        st.failed = 0;
        st.pending = 0;
        st.failures.clear();
    }
    st.nodes = format!("{}/{}", st.ready, st.selected);
    let invalid = invalid.or(selector_error);
    let valid = match &invalid {
        Some(msg) => cond("Valid", "False", "Invalid", msg.clone()),
        None => cond("Valid", "True", "Valid", String::new()),
    };
    let ready = if invalid.is_some() {
        cond("Ready", "False", "Invalid", "the spec is invalid".into())
    } else if st.selected == 0 {
        cond(
            "Ready",
            "False",
            "NoNodeSelected",
            "the node selector picks no node".into(),
        )
    } else if st.ready == st.selected {
        cond(
            "Ready",
            "True",
            "Applied",
            format!("applied on all {} selected nodes", st.selected),
        )
    } else if st.failed > 0 {
        let first = &st.failures[0];
        cond(
            "Ready",
            "False",
            "Failed",
            format!(
                "{} of {} selected nodes failed (first: node {}: {}: {})",
                st.failed, st.selected, first.node, first.reason, first.message
            ),
        )
    } else {
        cond(
            "Ready",
            "False",
            "Pending",
            format!(
                "{} of {} selected nodes have not reported this generation",
                st.pending, st.selected
            ),
        )
    };
    st.conditions = [valid, ready]
        .into_iter()
        .map(|mut c| {
            let old = prev.and_then(|p| p.conditions.iter().find(|o| o.type_ == c.type_));
            c.last_transition_time = match old {
                Some(o) if o.status == c.status => o.last_transition_time.clone(),
                _ => now.to_string(),
            };
            c
        })
        .collect();
    st
}

fn cond(type_: &str, status: &str, reason: &str, message: String) -> Condition {
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        last_transition_time: String::new(),
    }
}

/// The nodes whose last report still lists Route `name` (any state): a Route being deleted
/// waits for them. A report of a node that no longer exists is ignored (`nodes`: the
/// cluster's Node names).
pub fn still_carried_by(
    name: &str,
    nodes: &[NodeInfo],
    reports: &BTreeMap<String, NodeRoutes>,
) -> Vec<String> {
    nodes
        .iter()
        .filter(|n| {
            reports
                .get(&n.name)
                .is_some_and(|r| r.routes.iter().any(|e| e.name == name && e.kind.is_empty()))
        })
        .map(|n| n.name.clone())
        .collect()
}

/// What to do with a Route being deleted.
#[derive(Debug, PartialEq, Eq)]
pub enum Deletion {
    /// Every node that carried it has dropped it: remove the finalizer.
    Done,
    /// Nodes still list it and the timeout has not passed: wait for them.
    Wait(Vec<String>),
    /// The timeout passed: remove the finalizer anyway; these nodes (agent stopped, node
    /// unreachable) drop the route when their agent next lists the Routes.
    GaveUp(Vec<String>),
}

pub fn deletion(
    carriers: Vec<String>,
    waited: std::time::Duration,
    timeout: std::time::Duration,
) -> Deletion {
    if carriers.is_empty() {
        Deletion::Done
    } else if waited < timeout {
        Deletion::Wait(carriers)
    } else {
        Deletion::GaveUp(carriers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logic::crd::RouteSpec;
    use k8s_openapi::api::core::v1::{NodeSelector, NodeSelectorRequirement, NodeSelectorTerm};
    use std::time::Duration;

    fn route(gw: &str, generation: i64, pool: Option<&str>) -> Route {
        let mut r = Route::new(
            "r",
            RouteSpec {
                destinations: vec!["1.0.0.0/8".into()],
                gateways: vec![gw.into()],
                node_selector: pool.map(|p| NodeSelector {
                    node_selector_terms: vec![NodeSelectorTerm {
                        match_expressions: Some(vec![NodeSelectorRequirement {
                            key: "pool".into(),
                            operator: "In".into(),
                            values: Some(vec![p.into()]),
                        }]),
                        match_fields: None,
                    }],
                }),
            },
        );
        r.metadata.generation = Some(generation);
        r
    }

    fn nodes() -> Vec<NodeInfo> {
        vec![
            NodeInfo::new("a", &[("pool", "x")]),
            NodeInfo::new("b", &[("pool", "x")]),
            NodeInfo::new("c", &[("pool", "y")]),
        ]
    }

    fn report(entries: &[(&str, i64, &str)]) -> NodeRoutes {
        NodeRoutes {
            routes: entries
                .iter()
                .map(|(name, g, state)| NodeRoute {
                    name: name.to_string(),
                    generation: Some(*g),
                    state: state.to_string(),
                    reason: if *state == FAILED {
                        "GatewayUnreachable".into()
                    } else {
                        String::new()
                    },
                    message: if *state == FAILED {
                        "gw not on link".into()
                    } else {
                        String::new()
                    },
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn reports(r: &[(&str, NodeRoutes)]) -> BTreeMap<String, NodeRoutes> {
        r.iter().map(|(n, r)| (n.to_string(), r.clone())).collect()
    }

    fn condition<'a>(s: &'a RouteStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn counts_selected_ready_failed_pending() {
        let rep = reports(&[
            ("a", report(&[("r", 2, APPLIED)])),
            ("b", report(&[("r", 2, FAILED)])),
            ("c", report(&[("r", 2, APPLIED)])), // not selected: not counted
        ]);
        let s = summarize(&route("10.0.0.1", 2, Some("x")), &nodes(), &rep, None, "T0");
        assert_eq!((s.selected, s.ready, s.failed, s.pending), (2, 1, 1, 0));
        assert_eq!(s.nodes, "1/2");
        assert_eq!(s.observed_generation, Some(2));
        assert_eq!(s.failures.len(), 1);
        assert_eq!(s.failures[0].node, "b");
        let ready = condition(&s, "Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "Failed")
        );
        assert!(ready.message.contains("node b"), "{}", ready.message);
        assert_eq!(condition(&s, "Valid").status, "True");
    }

    #[test]
    fn an_older_generation_or_no_report_is_pending() {
        let rep = reports(&[("a", report(&[("r", 1, APPLIED)]))]);
        let s = summarize(&route("10.0.0.1", 2, None), &nodes(), &rep, None, "T0");
        assert_eq!((s.selected, s.ready, s.pending), (3, 0, 3));
        assert_eq!(condition(&s, "Ready").reason, "Pending");
    }

    #[test]
    fn all_ready_is_ready_and_transition_times_carry_over() {
        let all = reports(&[
            ("a", report(&[("r", 1, APPLIED)])),
            ("b", report(&[("r", 1, APPLIED)])),
            ("c", report(&[("r", 1, APPLIED)])),
        ]);
        let r = route("10.0.0.1", 1, None);
        let s0 = summarize(&r, &nodes(), &all, None, "T0");
        assert_eq!(s0.nodes, "3/3");
        assert_eq!(condition(&s0, "Ready").status, "True");
        let s1 = summarize(&r, &nodes(), &all, Some(&s0), "T1");
        assert_eq!(s1, s0, "nothing changed: equal, so nothing is written");
        let fewer = reports(&[("a", report(&[("r", 1, APPLIED)]))]);
        let s2 = summarize(&r, &nodes(), &fewer, Some(&s1), "T2");
        assert_eq!(condition(&s2, "Ready").last_transition_time, "T2");
        assert_eq!(condition(&s2, "Valid").last_transition_time, "T0");
    }

    #[test]
    fn an_invalid_route_says_why_in_its_valid_condition() {
        let s = summarize(
            &route("not-an-ip", 1, None),
            &nodes(),
            &BTreeMap::new(),
            None,
            "T0",
        );
        let v = condition(&s, "Valid");
        assert_eq!((v.status.as_str(), v.reason.as_str()), ("False", "Invalid"));
        assert!(v.message.contains("spec.gateways[0]"), "{}", v.message);
        assert_eq!(condition(&s, "Ready").reason, "Invalid");
    }

    #[test]
    fn a_broken_selector_is_invalid_and_selects_nothing() {
        let mut r = route("10.0.0.1", 1, Some("x"));
        r.spec.node_selector.as_mut().unwrap().node_selector_terms[0]
            .match_expressions
            .as_mut()
            .unwrap()[0]
            .operator = "Near".into();
        let s = summarize(&r, &nodes(), &BTreeMap::new(), None, "T0");
        assert_eq!(s.selected, 0);
        assert_eq!(condition(&s, "Valid").status, "False");
        assert!(
            condition(&s, "Valid").message.contains("operator"),
            "{:?}",
            s.conditions
        );
    }

    #[test]
    fn no_node_selected_is_not_ready_with_its_own_reason() {
        let s = summarize(
            &route("10.0.0.1", 1, Some("z")),
            &nodes(),
            &BTreeMap::new(),
            None,
            "T0",
        );
        assert_eq!(s.nodes, "0/0");
        assert_eq!(condition(&s, "Ready").reason, "NoNodeSelected");
    }

    #[test]
    fn failures_are_capped_but_counted() {
        let many: Vec<NodeInfo> = (0..50)
            .map(|i| NodeInfo::new(&format!("n{i:02}"), &[]))
            .collect();
        let rep: BTreeMap<String, NodeRoutes> = many
            .iter()
            .map(|n| (n.name.clone(), report(&[("r", 1, FAILED)])))
            .collect();
        let s = summarize(&route("10.0.0.1", 1, None), &many, &rep, None, "T0");
        assert_eq!(s.failed, 50);
        assert_eq!(s.failures.len(), MAX_FAILURES);
        assert_eq!(s.failures[0].node, "n00");
    }

    #[test]
    fn deletion_waits_for_carriers_of_existing_nodes_then_gives_up() {
        let rep = reports(&[
            ("a", report(&[("r", 1, APPLIED)])),
            ("b", report(&[("other", 1, APPLIED)])),
            ("gone", report(&[("r", 1, APPLIED)])), // no such Node any more
        ]);
        let carriers = still_carried_by("r", &nodes(), &rep);
        assert_eq!(carriers, vec!["a".to_string()]);
        let t = Duration::from_secs(15);
        assert_eq!(
            deletion(carriers.clone(), Duration::from_secs(3), t),
            Deletion::Wait(vec!["a".into()])
        );
        assert_eq!(
            deletion(carriers, Duration::from_secs(15), t),
            Deletion::GaveUp(vec!["a".into()])
        );
        assert_eq!(deletion(vec![], Duration::ZERO, t), Deletion::Done);
        // A failed entry is carried too (it may still hold some destinations).
        let failed = reports(&[("b", report(&[("r", 1, FAILED)]))]);
        assert_eq!(
            still_carried_by("r", &nodes(), &failed),
            vec!["b".to_string()]
        );
    }
}
