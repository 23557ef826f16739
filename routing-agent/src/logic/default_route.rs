//! Overriding the default route without losing the node (pure).
//!
//! A Route for `0.0.0.0/0` (`::/0`) is installed as its two halves, `0.0.0.0/1` and
//! `128.0.0.0/1` (`::/1`, `8000::/1`): more specific than any default route, so they win
//! whatever the node's own default route's metric, and that route is **never touched** —
//! DHCP clients, cloud agents and the kubelet keep seeing it, "the original default
//! gateway" is simply the node's own default route as the kernel has it now (so it is
//! remembered across restarts and re-learned when it changes), and removing the override
//! restores the original state exactly.
//!
//! While an override of a family is active:
//! - **protected destinations** (the control-plane endpoints, the metadata service, the
//!   node's nameservers, `--protected-cidr`) that the node's own default route carries get
//!   a route of their own through the original gateway, more specific than the override;
//! - **symmetric routing**: a table (135) holding the default route via the original
//!   gateway and a rule (priority 15135) `from <public address> lookup 135` per address of
//!   the public interface, so that replies to connections that came in on it leave by it.
//!   A rule at that priority or a route in that table that the agent does not own makes it
//!   refuse the override (reported; nothing of it installed) rather than clobber them.
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use crate::logic::desired::{DesiredState, Problem, ProblemKind};
pub use crate::logic::desired::{Overrides, SourceRule, Uplink};
use crate::logic::route::Family;

/// What the node looks like apart from the agent's own objects (read from the kernel).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeFacts {
    /// The node's own default route per family (the lowest metric in the main table).
    pub original: BTreeMap<Family, Uplink>,
    /// Families whose own default route has no gateway the agent can read (a nexthop
    /// object, a device route): nothing could be protected, so no override there.
    pub unreadable: BTreeSet<Family>,
    /// Prefixes of the routes of the main table that are not the agent's.
    pub foreign_prefixes: Vec<IpNet>,
    /// Global addresses per interface index.
    pub addresses: BTreeMap<u32, Vec<IpAddr>>,
    /// Rules at the symmetric priority that are not the agent's, described, per family.
    pub foreign_rules: Vec<(Family, String)>,
    /// Routes in the symmetric table that are not the agent's, described, per family.
    pub foreign_table_routes: Vec<(Family, String)>,
}

/// Symmetric routing settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Symmetric {
    pub table: u32,
    pub priority: u32,
    /// The public interface; `None`: the original default route's.
    pub interface: Option<u32>,
}

/// What to protect and how.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Protection {
    /// Candidates: control-plane endpoints, metadata, nameservers, user CIDRs.
    pub candidates: BTreeSet<IpNet>,
    /// `None`: no symmetric routing.
    pub symmetric: Option<Symmetric>,
}

fn family(n: &IpNet) -> Family {
    Family::of(&n.addr())
}

/// The longest of `prefixes` that contains `dst`.
fn longest<'a>(prefixes: impl IntoIterator<Item = &'a IpNet>, dst: &IpNet) -> Option<&'a IpNet> {
    prefixes
        .into_iter()
        .filter(|p| p.contains(dst))
        .max_by_key(|p| p.prefix_len())
}

/// Adds the protected routes and symmetric routing of the active overrides to `state`
/// (`state.overrides`), or refuses an override (its halves removed, a problem on its
/// Route) when symmetric routing would clobber what the agent does not own.
pub fn protect(state: &mut DesiredState, facts: &NodeFacts, cfg: &Protection) {
    state.overrides = plan_overrides(state, facts, cfg);
}

fn plan_overrides(state: &mut DesiredState, facts: &NodeFacts, cfg: &Protection) -> Overrides {
    let mut out = Overrides::default();
    // Families overridden, and by which Route.
    let mut active: BTreeMap<Family, String> = BTreeMap::new();
    for r in state.routes.values().filter(|r| r.from_default) {
        active.entry(r.family()).or_insert_with(|| r.owner.clone());
    }
    for (fam, owner) in active {
        let who = crate::logic::owner::describe(&owner);
        if !facts.original.contains_key(&fam) && facts.unreadable.contains(&fam) {
            state
                .routes
                .retain(|_, r| !(r.from_default && r.family() == fam));
            state.problems.push(Problem {
                route: owner.clone(),
                kind: ProblemKind::UnknownUplink,
                message: format!(
                    "{who}: not overriding the {fam} default route: the node's own \
                     default route has no gateway the agent can read (a nexthop object or a \
                     device route), so nothing could be kept reachable through it"
                ),
            });
            continue;
        }
        let Some(original) = facts.original.get(&fam).copied() else {
            // No default route of the node's own: nothing went through it to protect.
            state.warnings.push(format!(
                "{who}: the node has no {fam} default route of its own: no protected \
                 routes and no symmetric routing for the override"
            ));
            continue;
        };
        if let Some(sym) = &cfg.symmetric {
            let clash: Vec<&String> = facts
                .foreign_rules
                .iter()
                .chain(&facts.foreign_table_routes)
                .filter(|(f, _)| *f == fam)
                .map(|(_, what)| what)
                .collect();
            if !clash.is_empty() {
                state
                    .routes
                    .retain(|_, r| !(r.from_default && r.family() == fam));
                state.problems.push(Problem {
                    route: owner.clone(),
                    kind: ProblemKind::SymmetricRouting,
                    message: format!(
                        "{who}: not overriding the {fam} default route: symmetric routing \
                         needs rule priority {} and table {}, but the agent does not own {}; \
                         remove them or choose other numbers (--symmetric-rule-priority, \
                         --symmetric-table)",
                        sym.priority,
                        sym.table,
                        clash
                            .iter()
                            .map(|c| format!("`{c}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                });
                continue;
            }
            let iface = sym.interface.unwrap_or(original.oif);
            out.public_interface.insert(fam, iface);
            for a in facts.addresses.get(&iface).into_iter().flatten() {
                if Family::of(a) == fam {
                    out.rules.insert(SourceRule {
                        source: *a,
                        table: sym.table,
                        priority: sym.priority,
                    });
                }
            }
            out.table_routes.insert(fam, original);
        }
        let agent: Vec<IpNet> = state.routes.keys().copied().collect();
        for c in cfg.candidates.iter().filter(|c| family(c) == fam) {
            // Only what the node's own default route carries (not a connected network, not
            // a more specific route of the node's) ...
            let carried = longest(&facts.foreign_prefixes, c).is_some_and(|p| p.prefix_len() == 0);
            // ... and what the override would take (not a Route of its own).
            let taken = longest(&agent, c).is_some_and(|p| state.routes[p].from_default);
            if carried && taken {
                out.protected.insert(*c, original);
            }
        }
    }
    out.protected
        .retain(|dst, _| !state.routes.contains_key(dst));
    out
}

/// Parses the nameservers of a resolv.conf, skipping loopback addresses and those inside
/// `in_cluster` (a cluster DNS service address is not reached through the uplink).
pub fn nameservers(resolv_conf: &str, in_cluster: &[IpNet]) -> Vec<IpAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()? == "nameserver").then_some(())?;
            // A scoped IPv6 address (fe80::1%eth0) keeps its address part.
            w.next()?.split('%').next()?.parse::<IpAddr>().ok()
        })
        .filter(|a| !a.is_loopback() && !a.is_unspecified())
        .filter(|a| !in_cluster.iter().any(|n| n.contains(a)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    use crate::logic::crd::{Route, RouteSpec};
    use crate::logic::plan;
    use crate::logic::route::kernel_destinations;
    use crate::logic::selector::NodeInfo;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

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

    fn plan(routes: &[Route]) -> DesiredState {
        plan::plan(routes, &NodeInfo::new("n", &[]))
    }

    const ISP: Uplink = Uplink {
        gateway: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
        oif: 2,
    };

    fn facts() -> NodeFacts {
        NodeFacts {
            original: [(Family::V4, ISP)].into(),
            foreign_prefixes: vec![net("0.0.0.0/0"), net("192.0.2.0/24"), net("10.114.0.0/20")],
            addresses: [
                (2, vec![ip("192.0.2.10"), ip("2001:db8:2::2")]),
                (3, vec![ip("10.114.0.2")]),
            ]
            .into(),
            ..Default::default()
        }
    }

    fn cfg(candidates: &[&str]) -> Protection {
        Protection {
            candidates: candidates.iter().map(|c| net(c)).collect(),
            symmetric: Some(Symmetric {
                table: 135,
                priority: 15135,
                interface: None,
            }),
        }
    }

    #[test]
    fn a_default_route_is_planned_as_its_two_halves() {
        let s = plan(&[route("egress", &["0.0.0.0/0"], &["10.114.0.3"])]);
        let keys: Vec<String> = s.routes.keys().map(|k| k.to_string()).collect();
        assert_eq!(keys, ["0.0.0.0/1", "128.0.0.0/1"]);
        assert!(
            s.routes
                .values()
                .all(|r| r.from_default && r.owner == "egress")
        );
        let s6 = plan(&[route("e6", &["::/0"], &["fd00::3"])]);
        let keys: Vec<String> = s6.routes.keys().map(|k| k.to_string()).collect();
        assert_eq!(keys, ["::/1", "8000::/1"]);
        // Anything else is itself.
        assert_eq!(
            kernel_destinations(net("10.0.0.0/8")),
            vec![net("10.0.0.0/8")]
        );
    }

    #[test]
    fn protected_are_what_the_default_carried_and_the_override_would_take() {
        let mut s = plan(&[
            route("egress", &["0.0.0.0/0"], &["10.114.0.3"]),
            route("meta", &["169.254.169.0/24"], &["10.114.0.4"]),
        ]);
        let o = plan_overrides(
            &mut s,
            &facts(),
            &cfg(&[
                "198.18.1.250/32",    // API server behind the isp: protected
                "169.254.169.254/32", // a Route of its own takes it: not protected
                "10.114.0.250/32",    // connected: not protected
                "192.0.2.53/32",      // on the public subnet: not protected
                "2001:db8::53/128",   // no IPv6 override: not protected
            ]),
        );
        assert_eq!(
            o.protected.keys().collect::<Vec<_>>(),
            vec![&net("198.18.1.250/32")]
        );
        assert_eq!(o.protected[&net("198.18.1.250/32")], ISP);
        // Symmetric routing: the public interface's v4 address, the original default.
        assert_eq!(
            o.rules.iter().collect::<Vec<_>>(),
            vec![&SourceRule {
                source: ip("192.0.2.10"),
                table: 135,
                priority: 15135
            }]
        );
        assert_eq!(o.table_routes[&Family::V4], ISP);
        assert!(s.problems.is_empty());
    }

    #[test]
    fn nothing_without_an_override() {
        let mut s = plan(&[route("r", &["198.51.100.0/24"], &["10.114.0.3"])]);
        let before = s.clone();
        let o = plan_overrides(&mut s, &facts(), &cfg(&["198.18.1.250/32"]));
        assert_eq!(o.protected.len() + o.rules.len() + o.table_routes.len(), 0);
        assert_eq!(s, before);
    }

    #[test]
    fn a_foreign_rule_or_table_route_refuses_the_override_and_changes_nothing_of_it() {
        for (rules, table) in [
            (
                vec![(Family::V4, "from 192.0.2.10 lookup 200".to_string())],
                vec![],
            ),
            (
                vec![],
                vec![(Family::V4, "default via 192.0.2.99 dev eth0".to_string())],
            ),
        ] {
            let mut s = plan(&[
                route("egress", &["0.0.0.0/0"], &["10.114.0.3"]),
                route("other", &["198.51.100.0/24"], &["10.114.0.3"]),
            ]);
            let mut f = facts();
            f.foreign_rules = rules.clone();
            f.foreign_table_routes = table.clone();
            let o = plan_overrides(&mut s, &f, &cfg(&["198.18.1.250/32"]));
            assert_eq!(o.protected.len() + o.rules.len() + o.table_routes.len(), 0);
            assert_eq!(
                s.routes.keys().collect::<Vec<_>>(),
                vec![&net("198.51.100.0/24")],
                "the other Route stays"
            );
            assert_eq!(s.problems.len(), 1);
            let p = &s.problems[0];
            assert_eq!(
                (p.route.as_str(), &p.kind),
                ("egress", &ProblemKind::SymmetricRouting)
            );
            let what = &rules.first().or(table.first()).unwrap().1;
            assert!(
                p.message.contains(what) && p.message.contains("15135"),
                "{}",
                p.message
            );
        }
    }

    #[test]
    fn a_foreign_rule_of_the_other_family_does_not_matter() {
        let mut s = plan(&[route("egress", &["0.0.0.0/0"], &["10.114.0.3"])]);
        let mut f = facts();
        f.foreign_rules = vec![(Family::V6, "from 2001:db8:2::2 lookup 200".into())];
        let o = plan_overrides(&mut s, &f, &cfg(&[]));
        assert_eq!(o.rules.len(), 1);
        assert!(s.problems.is_empty());
    }

    #[test]
    fn without_symmetric_routing_a_foreign_rule_does_not_matter() {
        let mut s = plan(&[route("egress", &["0.0.0.0/0"], &["10.114.0.3"])]);
        let mut f = facts();
        f.foreign_rules = vec![(Family::V4, "from all lookup 200".into())];
        let mut c = cfg(&["198.18.1.250/32"]);
        c.symmetric = None;
        let o = plan_overrides(&mut s, &f, &c);
        assert_eq!(o.protected.len(), 1);
        assert!(o.rules.is_empty() && o.table_routes.is_empty());
        assert_eq!(s.routes.len(), 2);
    }

    #[test]
    fn no_default_route_of_its_own_means_nothing_to_protect() {
        let mut s = plan(&[route("egress", &["0.0.0.0/0"], &["10.114.0.3"])]);
        let mut f = facts();
        f.original.clear();
        let o = plan_overrides(&mut s, &f, &cfg(&["198.18.1.250/32"]));
        assert!(o.protected.is_empty() && o.rules.is_empty());
        assert_eq!(s.routes.len(), 2, "the override itself stays");
        assert!(
            s.warnings
                .iter()
                .any(|w| w.contains("no IPv4 default route")),
            "{:?}",
            s.warnings
        );
    }

    #[test]
    fn an_unreadable_node_default_route_refuses_the_override() {
        let mut s = plan(&[route("egress", &["0.0.0.0/0"], &["10.114.0.3"])]);
        let mut f = facts();
        f.original.clear();
        f.unreadable.insert(Family::V4);
        let o = plan_overrides(&mut s, &f, &cfg(&["198.18.1.250/32"]));
        assert!(s.routes.is_empty(), "no unprotected override");
        assert_eq!(s.problems[0].kind, ProblemKind::UnknownUplink);
        assert!(o.protected.is_empty());
    }

    #[test]
    fn an_explicit_public_interface_is_used_for_the_rules() {
        let mut s = plan(&[route("egress", &["0.0.0.0/0"], &["10.114.0.3"])]);
        let mut c = cfg(&[]);
        c.symmetric.as_mut().unwrap().interface = Some(3);
        let o = plan_overrides(&mut s, &facts(), &c);
        assert_eq!(
            o.rules.iter().map(|r| r.source).collect::<Vec<_>>(),
            vec![ip("10.114.0.2")]
        );
    }

    #[test]
    fn nameservers_skip_loopback_and_in_cluster_addresses() {
        let conf = "# generated\nsearch example\nnameserver 127.0.0.53\nnameserver 67.207.67.2\n\
                    nameserver 10.245.0.10\nnameserver fe80::1%eth0\nnameserver ::1\noptions ndots:5\n";
        let got = nameservers(conf, &[net("10.245.0.0/16")]);
        assert_eq!(got, vec![ip("67.207.67.2"), ip("fe80::1")]);
    }
}
