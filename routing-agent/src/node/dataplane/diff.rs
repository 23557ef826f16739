//! Pure diff between the owned kernel state and the desired state: the minimum of
//! nexthop and route operations, in an order the kernel accepts (members before groups
//! before routes; routes before the nexthops they used). No I/O.
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use super::nexthop::{Nexthop, NexthopKind, Resilient};

/// One next hop as the kernel needs it: a gateway and the interface that reaches it.
pub type Hop = (IpAddr, u32);

/// What a route points at.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    /// A nexthop object (`nhid`), in nexthop mode always an agent-owned group.
    Nhid(u32),
    /// Inline next hops (`RTA_GATEWAY`/`RTA_MULTIPATH`), sorted: the fallback mode.
    Hops(Vec<Hop>),
}

/// How routes are expressed in the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Nexthop objects and one group per distinct gateway set: resilient (Linux ≥ 5.13)
    /// when given, else hash-threshold.
    Nexthop(Option<Resilient>),
    /// `RTA_MULTIPATH` routes (kernels without nexthop objects).
    Multipath,
}

/// The agent's id range for nexthop objects, `[base, base + span)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdRange {
    pub base: u32,
    pub span: u32,
}

impl IdRange {
    pub fn contains(&self, id: u32) -> bool {
        id >= self.base && id - self.base < self.span
    }
}

/// What the kernel holds that matters to the diff.
#[derive(Clone, Debug, Default)]
pub struct KernelState {
    /// Every nexthop object of the namespace (foreign ones too: their ids are taken).
    pub nexthops: Vec<Nexthop>,
    /// The agent's routes (its protocol, its table, its metric) by destination.
    pub routes: BTreeMap<IpNet, Target>,
    /// The agent's fail-closed standby routes (`unreachable`, at the standby metric).
    pub standby: BTreeSet<IpNet>,
    /// Other routes with the agent's marks (another metric or type: an earlier agent's
    /// settings): garbage.
    pub stale: Vec<Stale>,
}

impl KernelState {
    /// What the kernel holds after `op` succeeded: keeps the agent's view of its own
    /// objects current without reading them back.
    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::AddNexthop(n) | Op::ReplaceNexthop(n) => {
                self.nexthops.retain(|k| k.id != n.id);
                self.nexthops.push(n.clone());
            }
            Op::DelNexthop(id) => self.nexthops.retain(|k| k.id != *id),
            Op::AddRoute(d, t) | Op::ReplaceRoute(d, t) => {
                self.routes.insert(*d, t.clone());
            }
            Op::DelRoute(d) => {
                self.routes.remove(d);
            }
            Op::AddStandby(d) => {
                self.standby.insert(*d);
            }
            Op::DelStandby(d) => {
                self.standby.remove(d);
            }
            Op::DelStale(s) => self.stale.retain(|k| k != s),
        }
    }
}

/// An agent-owned route that is neither a real route nor a standby route of this agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stale {
    pub dst: IpNet,
    pub metric: u32,
    pub unreachable: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    AddNexthop(Nexthop),
    ReplaceNexthop(Nexthop),
    AddRoute(IpNet, Target),
    ReplaceRoute(IpNet, Target),
    DelRoute(IpNet),
    DelNexthop(u32),
    /// The fail-closed standby route of a destination (added before its real route,
    /// deleted after it).
    AddStandby(IpNet),
    DelStandby(IpNet),
    DelStale(Stale),
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("the agent's nexthop id range {base}..{end} is exhausted", end = .0.base + .0.span, base = .0.base)]
pub struct RangeExhausted(pub IdRange);

/// Diffs `kernel` against `desired` (destination → next hops, non-empty) and `standby`
/// (the destinations that fail closed: each has its standby route whether or not it has
/// a real one).
pub fn diff(
    desired: &BTreeMap<IpNet, Vec<Hop>>,
    standby: &BTreeSet<IpNet>,
    kernel: &KernelState,
    mode: Mode,
    range: IdRange,
    protocol: u8,
) -> Result<Vec<Op>, RangeExhausted> {
    let mut ops = Vec::new();
    let targets: BTreeMap<IpNet, Target> = match mode {
        Mode::Multipath => desired
            .iter()
            .map(|(dst, hops)| {
                let mut hops = hops.clone();
                hops.sort();
                hops.dedup();
                (*dst, Target::Hops(hops))
            })
            .collect(),
        Mode::Nexthop(res) => nexthop_targets(desired, kernel, res, range, protocol, &mut ops)?,
    };

    ops.extend(
        standby
            .difference(&kernel.standby)
            .map(|d| Op::AddStandby(*d)),
    );
    let mut route_ops = Vec::new();
    for (dst, target) in &targets {
        match kernel.routes.get(dst) {
            Some(t) if t == target => {}
            Some(_) => route_ops.push(Op::ReplaceRoute(*dst, target.clone())),
            None => route_ops.push(Op::AddRoute(*dst, target.clone())),
        }
    }
    for dst in kernel.routes.keys() {
        if !targets.contains_key(dst) {
            route_ops.push(Op::DelRoute(*dst));
        }
    }
    ops.extend(route_ops);
    ops.extend(
        kernel
            .standby
            .difference(standby)
            .map(|d| Op::DelStandby(*d)),
    );
    ops.extend(kernel.stale.iter().cloned().map(Op::DelStale));

    // Garbage: owned nexthops no desired route reaches any more; groups before members.
    let mut known: BTreeMap<u32, &Nexthop> =
        owned(kernel, range, protocol).map(|n| (n.id, n)).collect();
    for op in &ops {
        if let Op::AddNexthop(n) | Op::ReplaceNexthop(n) = op {
            known.insert(n.id, n);
        }
    }
    let mut live = BTreeSet::new();
    for t in targets.values() {
        if let Target::Nhid(id) = t {
            live.insert(*id);
            if let Some(NexthopKind::Group { members, .. }) = known.get(id).map(|n| &n.kind) {
                live.extend(members.iter().map(|m| m.0));
            }
        }
    }
    let stale: Vec<&Nexthop> = owned(kernel, range, protocol)
        .filter(|n| !live.contains(&n.id))
        .collect();
    let is_group = |n: &&&Nexthop| matches!(n.kind, NexthopKind::Group { .. });
    ops.extend(stale.iter().filter(is_group).map(|n| Op::DelNexthop(n.id)));
    ops.extend(
        stale
            .iter()
            .filter(|n| !is_group(n))
            .map(|n| Op::DelNexthop(n.id)),
    );
    Ok(ops)
}

fn owned(kernel: &KernelState, range: IdRange, protocol: u8) -> impl Iterator<Item = &Nexthop> {
    kernel
        .nexthops
        .iter()
        .filter(move |n| range.contains(n.id) && n.protocol == protocol)
}

fn nexthop_targets(
    desired: &BTreeMap<IpNet, Vec<Hop>>,
    kernel: &KernelState,
    res: Option<Resilient>,
    range: IdRange,
    protocol: u8,
    ops: &mut Vec<Op>,
) -> Result<BTreeMap<IpNet, Target>, RangeExhausted> {
    let mut taken: BTreeSet<u32> = kernel.nexthops.iter().map(|n| n.id).collect();
    let mut alloc = || -> Result<u32, RangeExhausted> {
        let id = (range.base..range.base.saturating_add(range.span))
            .find(|id| !taken.contains(id))
            .ok_or(RangeExhausted(range))?;
        taken.insert(id);
        Ok(id)
    };

    // One nexthop object per (gateway, interface).
    let mut hop_ids: BTreeMap<Hop, u32> = BTreeMap::new();
    for nh in owned(kernel, range, protocol) {
        if let NexthopKind::Gateway { gateway, oif } = nh.kind {
            hop_ids.entry((gateway, oif)).or_insert(nh.id);
        }
    }
    let wanted_hops: BTreeSet<Hop> = desired.values().flatten().copied().collect();
    for hop in &wanted_hops {
        if !hop_ids.contains_key(hop) {
            let id = alloc()?;
            hop_ids.insert(*hop, id);
            ops.push(Op::AddNexthop(Nexthop {
                id,
                protocol,
                kind: NexthopKind::Gateway {
                    gateway: hop.0,
                    oif: hop.1,
                },
            }));
        }
    }

    // Groups (resilient where the kernel has them). A route keeps its group when it can:
    // the group's members are replaced in place (one RTM_NEWNEXTHOP replace), so that flows
    // on the gateways that stay keep their buckets, hence their gateway. That is what a
    // withdrawal or an edit needs. A group is changed in place only when every route that
    // uses it wants the same members; otherwise each route goes to a group with exactly its
    // members (found again by its members, or new).
    //
    // Linear in routes + groups: each distinct member set is worked out once (thousands of
    // destinations share a few gateway sets), and each group's verdict once.
    let mut groups: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    // Groups kept whose timers are not the configured ones (the flags changed): set again
    // in place, with their members, when they are decided below.
    let mut retime: BTreeSet<u32> = BTreeSet::new();
    for nh in owned(kernel, range, protocol) {
        if let NexthopKind::Group { members, resilient } = &nh.kind
            && resilient.map(|r| r.buckets) == res.map(|r| r.buckets)
        {
            let mut ids: Vec<u32> = members.iter().map(|m| m.0).collect();
            ids.sort();
            groups.insert(nh.id, ids);
            if *resilient != res {
                retime.insert(nh.id);
            }
        }
    }
    // The distinct member sets wanted, and each destination's.
    let mut sets: Vec<Vec<u32>> = Vec::new();
    let mut set_index: BTreeMap<&[Hop], usize> = BTreeMap::new();
    let mut by_members: BTreeMap<Vec<u32>, usize> = BTreeMap::new();
    let mut wanted: BTreeMap<IpNet, usize> = BTreeMap::new();
    for (dst, hops) in desired {
        let s = match set_index.get(hops.as_slice()) {
            Some(s) => *s,
            None => {
                let mut ids: Vec<u32> = hops.iter().map(|h| hop_ids[h]).collect();
                ids.sort();
                ids.dedup();
                let s = *by_members.entry(ids.clone()).or_insert_with(|| {
                    sets.push(ids);
                    sets.len() - 1
                });
                set_index.insert(hops.as_slice(), s);
                s
            }
        };
        wanted.insert(*dst, s);
    }
    // What the desired users of each group want: one set, or a conflict (`None`).
    let mut verdict: BTreeMap<u32, Option<usize>> = BTreeMap::new();
    for (dst, t) in &kernel.routes {
        if let (Target::Nhid(g), Some(s)) = (t, wanted.get(dst))
            && groups.contains_key(g)
        {
            verdict
                .entry(*g)
                .and_modify(|v| {
                    if *v != Some(*s) {
                        *v = None
                    }
                })
                .or_insert(Some(*s));
        }
    }
    // Groups whose members are decided: in place where every user agrees.
    let mut decided: BTreeMap<u32, usize> = BTreeMap::new();
    // A group that has (or will have) each set.
    let mut group_of: BTreeMap<usize, u32> = BTreeMap::new();
    for (g, v) in &verdict {
        if let Some(s) = v {
            if groups[g] != sets[*s] || retime.contains(g) {
                ops.push(Op::ReplaceNexthop(Nexthop {
                    id: *g,
                    protocol,
                    kind: NexthopKind::Group {
                        members: sets[*s].iter().map(|i| (*i, 1)).collect(),
                        resilient: res,
                    },
                }));
            }
            decided.insert(*g, *s);
            group_of.entry(*s).or_insert(*g);
        }
    }
    // Undecided groups keep their members: found by them.
    let mut undecided: BTreeMap<&[u32], u32> = BTreeMap::new();
    for (g, m) in &groups {
        if !decided.contains_key(g) {
            undecided.entry(m.as_slice()).or_insert(*g);
        }
    }
    let mut targets = BTreeMap::new();
    for (dst, s) in &wanted {
        if let Some(Target::Nhid(g)) = kernel.routes.get(dst)
            && decided.get(g) == Some(s)
        {
            targets.insert(*dst, Target::Nhid(*g));
            continue;
        }
        let gid = match group_of.get(s) {
            Some(g) => *g,
            None => {
                let g = match undecided.remove(sets[*s].as_slice()) {
                    Some(g) => g,
                    None => {
                        let g = alloc()?;
                        ops.push(Op::AddNexthop(Nexthop {
                            id: g,
                            protocol,
                            kind: NexthopKind::Group {
                                members: sets[*s].iter().map(|i| (*i, 1)).collect(),
                                resilient: res,
                            },
                        }));
                        g
                    }
                };
                decided.insert(g, *s);
                group_of.insert(*s, g);
                g
            }
        };
        targets.insert(*dst, Target::Nhid(gid));
    }
    Ok(targets)
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u8 = 196;
    const RANGE: IdRange = IdRange {
        base: 1000,
        span: 100,
    };
    const RES: Resilient = Resilient {
        buckets: 128,
        idle_timer_s: 120,
        unbalanced_timer_s: 30,
    };

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn hop(s: &str) -> Hop {
        (s.parse().unwrap(), 4)
    }
    fn desired(entries: &[(&str, &[&str])]) -> BTreeMap<IpNet, Vec<Hop>> {
        entries
            .iter()
            .map(|(d, gws)| (net(d), gws.iter().map(|g| hop(g)).collect()))
            .collect()
    }

    /// Applies ops to a kernel model the way the kernel would.
    fn apply(kernel: &mut KernelState, ops: &[Op]) {
        for op in ops {
            // What the kernel would refuse.
            match op {
                Op::AddNexthop(n) => assert!(
                    kernel.nexthops.iter().all(|k| k.id != n.id),
                    "id {} taken",
                    n.id
                ),
                Op::ReplaceNexthop(n) => assert!(kernel.nexthops.iter().any(|k| k.id == n.id)),
                Op::AddRoute(d, _) => assert!(!kernel.routes.contains_key(d)),
                Op::ReplaceRoute(d, _) | Op::DelRoute(d) => assert!(kernel.routes.contains_key(d)),
                Op::DelNexthop(id) => assert!(
                    !kernel.routes.values().any(|t| *t == Target::Nhid(*id)),
                    "deleting nexthop {id} still used by a route"
                ),
                Op::AddStandby(d) => assert!(!kernel.standby.contains(d)),
                Op::DelStandby(d) => assert!(kernel.standby.contains(d)),
                Op::DelStale(s) => assert!(kernel.stale.contains(s)),
            }
            kernel.apply(op);
        }
    }

    fn converge(kernel: &mut KernelState, want: &BTreeMap<IpNet, Vec<Hop>>, mode: Mode) -> Vec<Op> {
        let ops = diff(want, &BTreeSet::new(), kernel, mode, RANGE, P).unwrap();
        apply(kernel, &ops);
        assert_eq!(
            diff(want, &BTreeSet::new(), kernel, mode, RANGE, P).unwrap(),
            vec![],
            "second diff must be empty"
        );
        ops
    }

    #[test]
    fn fresh_install_creates_members_then_group_then_routes() {
        let mut k = KernelState::default();
        let want = desired(&[
            ("198.51.100.0/24", &["10.0.0.3", "10.0.0.4"]),
            ("192.0.2.0/24", &["10.0.0.4", "10.0.0.3"]),
        ]);
        let ops = converge(&mut k, &want, Mode::Nexthop(Some(RES)));
        assert!(matches!(
            ops[0],
            Op::AddNexthop(Nexthop {
                id: 1000,
                kind: NexthopKind::Gateway { .. },
                ..
            })
        ));
        assert!(matches!(
            ops[1],
            Op::AddNexthop(Nexthop {
                id: 1001,
                kind: NexthopKind::Gateway { .. },
                ..
            })
        ));
        assert!(matches!(
            &ops[2],
            Op::AddNexthop(Nexthop {
                id: 1002,
                kind: NexthopKind::Group { .. },
                ..
            })
        ));
        assert_eq!(
            ops.len(),
            5,
            "two members, one shared group, two routes: {ops:?}"
        );
        assert_eq!(k.routes[&net("192.0.2.0/24")], Target::Nhid(1002));
    }

    #[test]
    fn restart_adopts_without_any_op() {
        let mut k = KernelState::default();
        let want = desired(&[("198.51.100.0/24", &["10.0.0.3", "10.0.0.4", "10.0.0.5"])]);
        converge(&mut k, &want, Mode::Nexthop(Some(RES)));
        // Same kernel, fresh agent: nothing to do.
        assert_eq!(
            diff(
                &want,
                &BTreeSet::new(),
                &k,
                Mode::Nexthop(Some(RES)),
                RANGE,
                P
            )
            .unwrap(),
            vec![]
        );
    }

    #[test]
    fn editing_gateways_changes_the_group_in_place_and_collects_garbage() {
        let mut k = KernelState::default();
        converge(
            &mut k,
            &desired(&[("198.51.100.0/24", &["10.0.0.3", "10.0.0.4"])]),
            Mode::Nexthop(Some(RES)),
        );
        let group = k.routes[&net("198.51.100.0/24")].clone();
        let ops = converge(
            &mut k,
            &desired(&[("198.51.100.0/24", &["10.0.0.4", "10.0.0.5"])]),
            Mode::Nexthop(Some(RES)),
        );
        // The route keeps its group (flows on 10.0.0.4 keep their buckets); only the
        // group's members change.
        assert!(
            !ops.iter()
                .any(|o| matches!(o, Op::ReplaceRoute(..) | Op::AddRoute(..))),
            "{ops:?}"
        );
        assert_eq!(
            ops.iter()
                .filter(|o| matches!(o, Op::ReplaceNexthop(..)))
                .count(),
            1
        );
        assert_eq!(k.routes[&net("198.51.100.0/24")], group);
        // The gateway nobody uses (10.0.0.3) is gone; 10.0.0.4 keeps its id.
        let ids: Vec<u32> = k.nexthops.iter().map(|n| n.id).collect();
        assert!(ids.contains(&1001), "10.0.0.4 keeps its id: {ids:?}");
        assert!(!ids.contains(&1000), "{ids:?}");
        assert_eq!(k.nexthops.len(), 3);
    }

    #[test]
    fn new_group_timers_are_set_in_place_with_the_same_members() {
        let mut k = KernelState::default();
        let want = desired(&[
            ("198.51.100.0/24", &["10.0.0.3", "10.0.0.4"]),
            ("192.0.2.0/24", &["10.0.0.3", "10.0.0.4"]),
        ]);
        let never = Resilient {
            unbalanced_timer_s: 0,
            ..RES
        };
        converge(&mut k, &want, Mode::Nexthop(Some(never)));
        let group = k.routes[&net("198.51.100.0/24")].clone();
        // The agent restarted with another unbalanced timer: one replace of the group,
        // same id and members, no route touched (the buckets stay where they are).
        let ops = converge(&mut k, &want, Mode::Nexthop(Some(RES)));
        assert_eq!(ops.len(), 1, "{ops:?}");
        let Op::ReplaceNexthop(Nexthop {
            kind: NexthopKind::Group { members, resilient },
            ..
        }) = &ops[0]
        else {
            panic!("{ops:?}")
        };
        assert_eq!(*resilient, Some(RES));
        assert_eq!(members.len(), 2);
        assert_eq!(k.routes[&net("192.0.2.0/24")], group);
    }

    #[test]
    fn a_shared_group_changes_in_place_only_when_all_its_routes_agree() {
        let mut k = KernelState::default();
        let both = &["10.0.0.3", "10.0.0.4", "10.0.0.5"][..];
        converge(
            &mut k,
            &desired(&[("198.51.100.0/24", both), ("203.0.113.0/24", both)]),
            Mode::Nexthop(Some(RES)),
        );
        let g = k.routes[&net("198.51.100.0/24")].clone();
        assert_eq!(k.routes[&net("203.0.113.0/24")], g, "one group for one set");
        // A withdrawal hits both routes alike: one in-place replace, no route op.
        let less = &["10.0.0.4", "10.0.0.5"][..];
        let ops = converge(
            &mut k,
            &desired(&[("198.51.100.0/24", less), ("203.0.113.0/24", less)]),
            Mode::Nexthop(Some(RES)),
        );
        assert_eq!(
            ops.len(),
            1 + 1,
            "replace the group, delete 10.0.0.3: {ops:?}"
        );
        assert!(matches!(ops[0], Op::ReplaceNexthop(_)));
        assert_eq!(k.routes[&net("198.51.100.0/24")], g);
        assert_eq!(k.routes[&net("203.0.113.0/24")], g);
        // One route is edited, the other not: the group stays as the other wants it,
        // the edited route moves to a group of its own.
        converge(
            &mut k,
            &desired(&[
                ("198.51.100.0/24", less),
                ("203.0.113.0/24", &["10.0.0.5", "10.0.0.6"]),
            ]),
            Mode::Nexthop(Some(RES)),
        );
        assert_eq!(k.routes[&net("198.51.100.0/24")], g);
        assert_ne!(k.routes[&net("203.0.113.0/24")], g);
        assert_eq!(
            diff(
                &desired(&[
                    ("198.51.100.0/24", less),
                    ("203.0.113.0/24", &["10.0.0.5", "10.0.0.6"]),
                ]),
                &BTreeSet::new(),
                &k,
                Mode::Nexthop(Some(RES)),
                RANGE,
                P
            )
            .unwrap(),
            vec![],
            "converged"
        );
    }

    #[test]
    fn deleting_everything_leaves_nothing_owned_but_keeps_foreign() {
        let mut k = KernelState::default();
        k.nexthops.push(Nexthop {
            id: 1000,
            protocol: 4,
            kind: NexthopKind::Blackhole,
        });
        k.nexthops.push(Nexthop {
            id: 5,
            protocol: P,
            kind: NexthopKind::Blackhole,
        });
        converge(
            &mut k,
            &desired(&[("198.51.100.0/24", &["10.0.0.3"])]),
            Mode::Nexthop(Some(RES)),
        );
        assert!(
            k.nexthops.iter().all(|n| n.id != 1000 || n.protocol == 4),
            "foreign id 1000 skipped"
        );
        converge(&mut k, &BTreeMap::new(), Mode::Nexthop(Some(RES)));
        assert_eq!(k.routes.len(), 0);
        let left: Vec<u32> = k.nexthops.iter().map(|n| n.id).collect();
        assert_eq!(
            left,
            vec![1000, 5],
            "only foreign nexthops remain (other protocol, or outside the range)"
        );
    }

    #[test]
    fn multipath_mode_uses_inline_hops() {
        let mut k = KernelState::default();
        let want = desired(&[("198.51.100.0/24", &["10.0.0.4", "10.0.0.3"])]);
        let ops = converge(&mut k, &want, Mode::Multipath);
        assert_eq!(
            ops,
            vec![Op::AddRoute(
                net("198.51.100.0/24"),
                Target::Hops(vec![hop("10.0.0.3"), hop("10.0.0.4")])
            )]
        );
        let ops = converge(
            &mut k,
            &desired(&[("198.51.100.0/24", &["10.0.0.3"])]),
            Mode::Multipath,
        );
        assert!(matches!(ops[0], Op::ReplaceRoute(..)));
    }

    #[test]
    fn exhausted_range_is_an_error() {
        let k = KernelState::default();
        let r = diff(
            &desired(&[("198.51.100.0/24", &["10.0.0.3", "10.0.0.4"])]),
            &BTreeSet::new(),
            &k,
            Mode::Nexthop(Some(RES)),
            IdRange { base: 1, span: 2 },
            P,
        );
        assert_eq!(r, Err(RangeExhausted(IdRange { base: 1, span: 2 })));
    }

    #[test]
    fn standby_routes_come_before_their_real_route_and_go_after_it() {
        let mut k = KernelState::default();
        let both = desired(&[
            ("198.51.100.0/24", &["10.0.0.3"]),
            ("203.0.113.0/24", &["10.0.0.3"]),
        ]);
        let standby: BTreeSet<IpNet> = both.keys().copied().collect();
        let ops = diff(&both, &standby, &k, Mode::Nexthop(Some(RES)), RANGE, P).unwrap();
        apply(&mut k, &ops);
        let pos = |want: &Op| ops.iter().position(|o| o == want).unwrap();
        let add = |d: &str| {
            ops.iter()
                .position(|o| matches!(o, Op::AddRoute(x, _) if *x == net(d)))
                .unwrap()
        };
        for d in ["198.51.100.0/24", "203.0.113.0/24"] {
            assert!(pos(&Op::AddStandby(net(d))) < add(d), "{ops:?}");
        }
        assert_eq!(k.standby, standby);
        assert!(
            diff(&both, &standby, &k, Mode::Nexthop(Some(RES)), RANGE, P)
                .unwrap()
                .is_empty()
        );

        // No usable gateway for one destination: its real route goes, its standby stays.
        let one = desired(&[("203.0.113.0/24", &["10.0.0.3"])]);
        let ops = diff(&one, &standby, &k, Mode::Nexthop(Some(RES)), RANGE, P).unwrap();
        assert_eq!(ops, vec![Op::DelRoute(net("198.51.100.0/24"))]);
        apply(&mut k, &ops);

        // Not wanted at all any more: the real route first, then the standby.
        let ops = diff(
            &BTreeMap::new(),
            &BTreeSet::new(),
            &k,
            Mode::Nexthop(Some(RES)),
            RANGE,
            P,
        )
        .unwrap();
        let del = ops
            .iter()
            .position(|o| *o == Op::DelRoute(net("203.0.113.0/24")))
            .unwrap();
        assert!(del < pos_in(&ops, &Op::DelStandby(net("203.0.113.0/24"))));
        assert!(ops.contains(&Op::DelStandby(net("198.51.100.0/24"))));
        apply(&mut k, &ops);
        assert!(k.standby.is_empty() && k.routes.is_empty() && k.nexthops.is_empty());
    }

    fn pos_in(ops: &[Op], want: &Op) -> usize {
        ops.iter().position(|o| o == want).unwrap()
    }

    #[test]
    fn routes_with_the_agents_marks_at_another_metric_are_garbage() {
        let mut k = KernelState::default();
        let s = Stale {
            dst: net("198.51.100.0/24"),
            metric: 50,
            unreachable: false,
        };
        k.stale.push(s.clone());
        let ops = diff(
            &BTreeMap::new(),
            &BTreeSet::new(),
            &k,
            Mode::Multipath,
            RANGE,
            P,
        )
        .unwrap();
        assert_eq!(ops, vec![Op::DelStale(s)]);
    }

    #[test]
    fn hash_threshold_groups_where_resilient_ones_are_missing() {
        let mut k = KernelState::default();
        let want = desired(&[("198.51.100.0/24", &["10.0.0.3", "10.0.0.4"])]);
        converge(&mut k, &want, Mode::Nexthop(None));
        let group = k
            .nexthops
            .iter()
            .find(|n| matches!(n.kind, NexthopKind::Group { .. }))
            .unwrap();
        assert!(
            matches!(&group.kind, NexthopKind::Group { resilient: None, members } if members.len() == 2)
        );
        // The group is adopted, not replaced, by an agent in the same mode.
        assert!(
            diff(&want, &BTreeSet::new(), &k, Mode::Nexthop(None), RANGE, P)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn a_withdrawal_at_10000_destinations_is_one_group_replace() {
        let mut k = KernelState::default();
        let gws = ["10.0.0.3", "10.0.0.4", "10.0.0.5"];
        let all = |gws: &[&str]| -> BTreeMap<IpNet, Vec<Hop>> {
            (0..10_000u32)
                .map(|i| {
                    let d: IpNet = format!("100.{}.{}.0/24", i / 256, i % 256).parse().unwrap();
                    (d, gws.iter().map(|g| hop(g)).collect())
                })
                .collect()
        };
        let range = IdRange {
            base: 1000,
            span: 1000,
        };
        let ops = diff(
            &all(&gws),
            &BTreeSet::new(),
            &k,
            Mode::Nexthop(Some(RES)),
            range,
            P,
        )
        .unwrap();
        assert_eq!(ops.len(), 3 + 1 + 10_000, "members, one group, the routes");
        apply(&mut k, &ops);
        let ops = diff(
            &all(&gws[1..]),
            &BTreeSet::new(),
            &k,
            Mode::Nexthop(Some(RES)),
            range,
            P,
        )
        .unwrap();
        assert!(
            matches!(ops.as_slice(), [Op::ReplaceNexthop(_), Op::DelNexthop(_)]),
            "{:?}",
            &ops[..ops.len().min(4)]
        );
    }

    /// Random desired states over a few destinations and gateways, one after another:
    /// every diff converges in one step, never reuses a taken id, and every route ends on
    /// a group with exactly its gateways.
    #[test]
    fn random_sequences_converge_in_one_step() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let gws = ["10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"];
        let dsts: Vec<String> = (0..8).map(|i| format!("198.51.{i}.0/24")).collect();
        for mode in [
            Mode::Nexthop(Some(RES)),
            Mode::Nexthop(None),
            Mode::Multipath,
        ] {
            let mut k = KernelState::default();
            for _ in 0..300 {
                let mut want = BTreeMap::new();
                for d in &dsts {
                    let mask = next() % 32;
                    if mask >= 16 {
                        continue;
                    }
                    let hops: Vec<Hop> = gws
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| mask & (1 << i) != 0)
                        .map(|(_, g)| hop(g))
                        .collect();
                    if !hops.is_empty() {
                        want.insert(net(d), hops);
                    }
                }
                converge(&mut k, &want, mode);
                for (d, hops) in &want {
                    let mut gw: Vec<IpAddr> = match &k.routes[d] {
                        Target::Hops(h) => h.iter().map(|h| h.0).collect(),
                        Target::Nhid(g) => {
                            let Some(NexthopKind::Group { members, .. }) =
                                k.nexthops.iter().find(|n| n.id == *g).map(|n| &n.kind)
                            else {
                                panic!("{d}: no group {g}");
                            };
                            members
                                .iter()
                                .map(|(m, _)| {
                                    match k.nexthops.iter().find(|n| n.id == *m).map(|n| &n.kind) {
                                        Some(NexthopKind::Gateway { gateway, .. }) => *gateway,
                                        other => panic!("member {m}: {other:?}"),
                                    }
                                })
                                .collect()
                        }
                    };
                    gw.sort();
                    let mut w: Vec<IpAddr> = hops.iter().map(|h| h.0).collect();
                    w.sort();
                    assert_eq!(gw, w, "{d} in {mode:?}");
                }
                assert_eq!(k.routes.len(), want.len());
            }
        }
    }
}
