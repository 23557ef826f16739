//! The netlink dataplane: turns a [`DesiredState`] into kernel routes and nexthop objects
//! the agent owns, and reports what it could not install.
//!
//! Ownership marks: routes carry the agent's route protocol id (default 196) in its table
//! (default main); nexthop objects carry the same protocol id and an id from the agent's
//! range. Nothing else is ever changed or deleted.
pub mod diff;
pub mod facts;
pub mod monitor;
pub mod neigh;
pub mod nexthop;
pub mod routes;
pub mod rules;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use futures::StreamExt;
use ipnet::IpNet;
use tracing::{debug, info, warn};

use crate::logic::desired::{FailMode, NoGateway};
use crate::logic::plan::{self, DesiredState, Problem, ProblemKind};
use diff::{Hop, IdRange, KernelState, Mode, Op, Stale, Target};
use nexthop::{Nexthop, NexthopSocket, NlError, Resilient};
use routes::RouteKey;

/// How routes are expressed in the kernel, as chosen on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeChoice {
    /// The best the kernel accepts, probed at start: resilient nexthop groups (Linux ≥
    /// 5.13), else hash-threshold nexthop groups (≥ 5.3), else `RTA_MULTIPATH` routes.
    Auto,
    /// Resilient nexthop groups (fails on a kernel without them).
    Nexthop,
    /// Nexthop objects with hash-threshold groups.
    Groups,
    Multipath,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub protocol: u8,
    pub table: u32,
    pub metric: u32,
    pub ids: IdRange,
    pub mode: ModeChoice,
    pub resilient: Resilient,
    /// Table and rule priority of symmetric routing (`None`: never used; nothing of it is
    /// cleaned up either).
    pub symmetric: Option<(u32, u32)>,
    /// Route protocols of routes the agent adopts (empty: none); see [`Dataplane::adopt`].
    pub adopt: Vec<u8>,
}

/// What one reconcile achieved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Destinations in the kernel now, with the gateways they use.
    pub installed: Arc<BTreeMap<IpNet, Vec<IpAddr>>>,
    /// The planner's problems plus the dataplane's (unreachable gateways, kernel refusals).
    pub problems: Vec<Problem>,
    /// Interfaces through which at least one installed gateway is reached.
    pub interfaces: BTreeSet<u32>,
    /// Every reachable gateway of the desired routes (withdrawn ones included), with the
    /// interface it is reached through.
    pub gateway_oifs: BTreeMap<IpAddr, u32>,
    /// Kernel operations applied (0: the kernel already matched).
    pub changes: usize,
    /// Destinations with no usable gateway, and what their traffic does meanwhile.
    pub no_gateway: Arc<BTreeMap<IpNet, (NoGateway, FailMode)>>,
    /// The interfaces the desired gateways were last reached through, reachable now or
    /// not (the TC programs stay on them while a gateway is away: attaching and detaching
    /// on every link flap toggles the kernel's static keys for nothing).
    pub gateway_interfaces: BTreeSet<u32>,
}

pub struct Dataplane {
    handle: rtnetlink::Handle,
    nh: Option<NexthopSocket>,
    mode: Mode,
    cfg: Config,
    /// The last symmetric-routing sync wanted nothing and left nothing of the agent's:
    /// until an override wants some, there is nothing to read back (saves two kernel
    /// dumps per reconcile).
    symmetric_clean: bool,
    /// The interface each gateway was last reached through: when it stops resolving, the
    /// state of that interface says why.
    last_oif: BTreeMap<IpAddr, u32>,
    /// A second connection with `NETLINK_GET_STRICT_CHK`: the kernel filters the dump of
    /// the agent's routes by table and protocol (falls back to the plain one).
    strict: rtnetlink::Handle,
    /// The fast dump of the agent's own routes (`None`: use `strict`).
    dumper: Option<routes::RouteDumper>,
    /// The agent's objects as the kernel holds them after the last reconcile (read then,
    /// plus what was applied since). `None`: read them at the next reconcile. A reconcile
    /// that is not `fresh` diffs against this instead of dumping the kernel.
    view: Option<KernelState>,
    /// How each gateway resolved at the last fresh reconcile.
    reach: BTreeMap<IpAddr, Result<u32, String>>,
    /// The overrides the last reconcile synced (symmetric routing is read back only when
    /// they change, or on a fresh reconcile).
    synced_overrides: Option<crate::logic::desired::Overrides>,
    /// The deletions about to be made, shared with the netlink monitor so that their
    /// notifications do not wake the agent.
    echo: Arc<monitor::Echo>,
    /// The plan of the last pass that left the kernel as planned, and its outcome.
    last: Option<(Arc<DesiredState>, Outcome)>,
}

/// How much of the kernel a reconcile reads before it diffs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Read {
    /// Nothing: the view the last pass left (a Route edit, a gateway verdict).
    View,
    /// How the gateways resolve (someone else's change: a connected network, an address,
    /// a link); the agent's own objects only if someone else touched them.
    Gateways,
    /// Everything: gateways, routes, nexthops (the resync, a retry, the check after a
    /// change).
    All,
}

/// How the netlink monitor names a route of the agent's.
fn route_object(dst: &IpNet, table: u32) -> monitor::Object {
    let (family, bytes) = match dst.addr() {
        IpAddr::V4(a) => (libc::AF_INET as u8, a.octets().to_vec()),
        IpAddr::V6(a) => (libc::AF_INET6 as u8, a.octets().to_vec()),
    };
    let bytes = if dst.prefix_len() == 0 { vec![] } else { bytes };
    monitor::Object::Route(family, bytes, dst.prefix_len(), table)
}

/// What the kernel accepts, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    /// Resilient nexthop groups (Linux ≥ 5.13).
    Resilient,
    /// Nexthop objects and hash-threshold groups only (Linux 5.3 – 5.12).
    Groups,
    /// No nexthop objects: `RTA_MULTIPATH` routes.
    NoNexthops,
}

/// Asks the kernel, by trying: a blackhole nexthop and a one-member resilient group of it
/// (else a hash-threshold group), with two free ids of the agent's range, deleted at once.
/// Skipped when a resilient group is already there.
fn probe_kernel(nh: &mut NexthopSocket, ids: IdRange, protocol: u8, res: Resilient) -> Kernel {
    let Ok(existing) = nh.dump() else {
        return Kernel::NoNexthops;
    };
    // A resilient group already there (an earlier agent's) answers the question without
    // creating anything: a restart changes nothing in the kernel.
    if existing.iter().any(|n| {
        matches!(
            n.kind,
            nexthop::NexthopKind::Group {
                resilient: Some(_),
                ..
            }
        )
    }) {
        return Kernel::Resilient;
    }
    let taken: BTreeSet<u32> = existing.iter().map(|n| n.id).collect();
    let mut free = (ids.base..ids.base.saturating_add(ids.span))
        .rev()
        .filter(|i| !taken.contains(i));
    let (Some(member), Some(group)) = (free.next(), free.next()) else {
        // No room to try: assume the best and let the first reconcile say otherwise.
        return Kernel::Resilient;
    };
    let blackhole = Nexthop {
        id: member,
        protocol,
        kind: nexthop::NexthopKind::Blackhole,
    };
    if nh.add(&blackhole, false).is_err() {
        return Kernel::NoNexthops;
    }
    let try_group = |nh: &mut NexthopSocket, resilient: Option<Resilient>| {
        let g = Nexthop {
            id: group,
            protocol,
            kind: nexthop::NexthopKind::Group {
                members: vec![(member, 1)],
                resilient,
            },
        };
        let ok = nh.add(&g, false).is_ok();
        if ok {
            let _ = nh.del(group);
        }
        ok
    };
    let probe = Resilient {
        buckets: res.buckets.max(1),
        ..res
    };
    let kernel = if try_group(nh, Some(probe)) {
        Kernel::Resilient
    } else if try_group(nh, None) {
        Kernel::Groups
    } else {
        Kernel::NoNexthops
    };
    let _ = nh.del(member);
    kernel
}

impl Dataplane {
    /// Connects to rtnetlink in the current network namespace and picks the mode.
    pub async fn new(cfg: Config) -> anyhow::Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        let mut nh = NexthopSocket::new()?;
        let kernel = probe_kernel(&mut nh, cfg.ids, cfg.protocol, cfg.resilient);
        let mode = match (cfg.mode, kernel) {
            (ModeChoice::Multipath, _) | (ModeChoice::Auto, Kernel::NoNexthops) => Mode::Multipath,
            (ModeChoice::Nexthop, Kernel::NoNexthops | Kernel::Groups) => {
                anyhow::bail!(
                    "--dataplane nexthop: this kernel has no resilient nexthop groups (Linux >= 5.13 needed)"
                )
            }
            (ModeChoice::Groups, Kernel::NoNexthops) => {
                anyhow::bail!(
                    "--dataplane groups: this kernel has no nexthop objects (Linux >= 5.3 needed)"
                )
            }
            (ModeChoice::Groups, _) | (ModeChoice::Auto, Kernel::Groups) => Mode::Nexthop(None),
            (_, Kernel::Resilient) => Mode::Nexthop(Some(cfg.resilient)),
        };
        let chosen = match mode {
            Mode::Nexthop(Some(_)) => "resilient nexthop groups",
            Mode::Nexthop(None) => {
                "hash-threshold nexthop groups (this kernel has no resilient groups: Linux >= 5.13)"
            }
            Mode::Multipath => "RTA_MULTIPATH routes",
        };
        info!(?mode, ?kernel, "dataplane: {chosen}");
        let strict = match rtnetlink::new_connection_with_strict_check() {
            Ok((conn, h, _)) => {
                tokio::spawn(conn);
                h
            }
            Err(e) => {
                warn!(error = %e, "no strict netlink dumps: the agent's routes are filtered here");
                handle.clone()
            }
        };
        Ok(Dataplane {
            dumper: routes::RouteDumper::new().ok(),
            strict,
            view: None,
            reach: BTreeMap::new(),
            synced_overrides: None,
            echo: Arc::new(monitor::Echo::default()),
            last: None,
            handle,
            nh: matches!(mode, Mode::Nexthop(_)).then_some(nh),
            mode,
            cfg,
            symmetric_clean: false,
            last_oif: BTreeMap::new(),
        })
    }

    fn key(&self) -> RouteKey {
        RouteKey {
            protocol: self.cfg.protocol,
            table: self.cfg.table,
            metric: self.cfg.metric,
        }
    }

    async fn snapshot(&mut self) -> Result<KernelState, NlError> {
        let nexthops = match &mut self.nh {
            Some(s) => s.dump()?,
            None => vec![],
        };
        let key = self.key();
        let mut state = KernelState {
            nexthops,
            ..KernelState::default()
        };
        let dumped = match &self.dumper {
            Some(d) => d.dump(key)?,
            None => routes::dump_owned(&self.strict, key).await?,
        };
        for d in dumped {
            if d.unicast && d.metric == key.metric_of(&d.dst) {
                state.routes.insert(d.dst, d.target);
            } else if d.unreachable && d.metric == key.standby_metric_of(&d.dst) {
                state.standby.insert(d.dst);
            } else {
                state.stale.push(Stale {
                    dst: d.dst,
                    metric: d.metric,
                    unreachable: d.unreachable,
                });
            }
        }
        Ok(state)
    }

    /// Why none of `gateways` resolves: the interface they were last reached through is
    /// down or gone, or they are simply not on a connected network.
    async fn why_unreachable(&self, gateways: &[IpAddr]) -> NoGateway {
        use futures::TryStreamExt as _;
        use netlink_packet_route::link::{LinkAttribute, LinkFlags};
        for oif in gateways.iter().filter_map(|g| self.last_oif.get(g)) {
            let mut links = self.handle.link().get().match_index(*oif).execute();
            match links.try_next().await {
                Ok(Some(link)) => {
                    let up = link.header.flags.contains(LinkFlags::Up)
                        && link.header.flags.contains(LinkFlags::LowerUp);
                    if !up {
                        let interface = link
                            .attributes
                            .iter()
                            .find_map(|a| match a {
                                LinkAttribute::IfName(n) => Some(n.clone()),
                                _ => None,
                            })
                            .unwrap_or_else(|| format!("if{oif}"));
                        return NoGateway::InterfaceDown { interface };
                    }
                }
                // Gone.
                _ => {
                    return NoGateway::InterfaceDown {
                        interface: format!("if{oif} (gone)"),
                    };
                }
            }
        }
        NoGateway::Unreachable
    }

    /// The deletions the netlink monitor should know as the agent's own.
    pub fn echo(&self) -> Arc<monitor::Echo> {
        self.echo.clone()
    }

    /// The marks of the agent's objects, for the netlink monitor.
    pub fn marks(&self) -> monitor::Marks {
        monitor::Marks {
            protocol: self.cfg.protocol,
        }
    }

    /// Level-based reconcile: diff what the agent owns against `desired` and apply the
    /// difference, reading as much of the kernel first as `read` says (see [`Read`]); the
    /// agent's own objects are read back anyway when someone else touched them (the
    /// netlink monitor says so) or when the last pass failed somewhere. Per-destination
    /// failures become problems; only a failure to read the kernel is an error (and then
    /// nothing was changed).
    pub async fn reconcile(
        &mut self,
        desired: &Arc<DesiredState>,
        read: Read,
    ) -> anyhow::Result<Outcome> {
        if self.echo.take_dirty() {
            self.view = None;
        }
        let dump = read == Read::All || self.view.is_none();
        let fresh = read != Read::View || dump;
        // Nothing could differ: the same plan, the agent's objects as it left them, the
        // gateways resolving as before. The last outcome stands (this is the pass someone
        // else's change elsewhere in the namespace costs).
        let unchanged = |d: &Dataplane| {
            !dump
                && d.last
                    .as_ref()
                    .is_some_and(|(p, _)| Arc::ptr_eq(p, desired))
        };
        let mut problems = desired.problems.clone();

        // Resolve every gateway once (on a cached pass, only the new ones).
        let gateways: BTreeSet<IpAddr> = desired
            .routes
            .values()
            .flat_map(|r| r.gateways.iter().chain(&r.withdrawn).copied())
            .collect();
        let before = std::mem::take(&mut self.reach);
        for gw in gateways {
            let r = match before.get(&gw) {
                Some(r) if !fresh => r.clone(),
                _ => routes::resolve_gateway(&self.handle, gw).await,
            };
            self.reach.insert(gw, r);
        }
        if unchanged(self) && self.reach == before {
            let (_, last) = self.last.as_ref().expect("checked by unchanged");
            return Ok(Outcome {
                changes: 0,
                ..last.clone()
            });
        }
        let reach = self.reach.clone();
        let gateway_oifs: BTreeMap<IpAddr, u32> = reach
            .iter()
            .filter_map(|(g, r)| Some((*g, *r.as_ref().ok()?)))
            .collect();
        self.last_oif.extend(&gateway_oifs);
        let gateway_interfaces: BTreeSet<u32> = reach
            .keys()
            .filter_map(|g| self.last_oif.get(g).copied())
            .collect();

        let mut want: BTreeMap<IpNet, Vec<Hop>> = BTreeMap::new();
        let mut standby: BTreeSet<IpNet> = BTreeSet::new();
        let mut no_gateway = BTreeMap::new();
        let mut reported: BTreeSet<(String, IpAddr)> = BTreeSet::new();
        for (dst, r) in &desired.routes {
            if r.fail_mode == FailMode::Closed {
                standby.insert(*dst);
            }
            let mut hops = Vec::new();
            for gw in &r.gateways {
                match &reach[gw] {
                    Ok(oif) => hops.push((*gw, *oif)),
                    Err(why) => {
                        if reported.insert((r.owner.clone(), *gw)) {
                            problems.push(Problem {
                                route: r.owner.clone(),
                                kind: ProblemKind::GatewayUnreachable { gateway: *gw },
                                message: format!(
                                    "{}: gateway {gw} is unreachable from this node: {why}; retrying",
                                    crate::logic::owner::describe(&r.owner)
                                ),
                            });
                        }
                    }
                }
            }
            if !hops.is_empty() {
                want.insert(*dst, hops);
            } else if r.gateways.is_empty() {
                // Every gateway down by health: the planner reported it.
                no_gateway.insert(*dst, (NoGateway::AllDown, r.fail_mode));
            } else {
                let why = self.why_unreachable(&r.gateways).await;
                no_gateway.insert(*dst, (why.clone(), r.fail_mode));
                problems.push(plan::no_gateway(r, why));
            }
        }

        // Protected destinations: through the node's own uplink (not gateways of Routes:
        // no health, no TC programs on their interface).
        for (dst, up) in &desired.overrides.protected {
            want.entry(*dst)
                .or_insert_with(|| vec![(up.gateway, up.oif)]);
        }

        let kernel = match (dump, self.view.take()) {
            (false, Some(v)) => v,
            _ => self.snapshot().await?,
        };
        let ops = diff::diff(
            &want,
            &standby,
            &kernel,
            self.mode,
            self.cfg.ids,
            self.cfg.protocol,
        )?;
        let (failed, nexthops_failed) = self.apply(&ops).await;
        let failed = self.adopt(desired, &ops, failed).await;
        // Destinations whose route operation failed and that had no route before: not
        // installed.
        let not_installed: BTreeSet<IpNet> = failed
            .iter()
            .filter(|(d, _, is_standby)| !is_standby && !kernel.routes.contains_key(d))
            .map(|(d, _, _)| *d)
            .collect();
        // The view of the kernel after this: what was read, plus what was applied (kept,
        // not copied). Any failure: read it again next time.
        self.view = (failed.is_empty() && !nexthops_failed).then(|| {
            let mut v = kernel;
            for op in &ops {
                v.apply(op);
            }
            v
        });
        let mut changes = ops.len();
        for (dst, err, is_standby) in &failed {
            changes -= 1;
            let owner = desired
                .routes
                .get(dst)
                .map(|r| r.owner.clone())
                .unwrap_or_default();
            let who = crate::logic::owner::describe(&owner);
            let message = if *is_standby {
                format!(
                    "{who}: destination {dst}: the kernel refused its fail-closed \
                     standby route: {err}"
                )
            } else if err.errno == libc::EEXIST {
                format!(
                    "{who}: destination {dst}: a route the agent does not own already exists \
                     in table {}; leaving it alone",
                    self.cfg.table
                )
            } else {
                format!("{who}: destination {dst}: the kernel refused the route: {err}")
            };
            problems.push(Problem {
                route: owner,
                kind: ProblemKind::Kernel { destination: *dst },
                message,
            });
        }
        problems.sort();

        if fresh || self.synced_overrides.as_ref() != Some(&desired.overrides) {
            changes += self.sync_symmetric(desired, &mut problems).await;
            self.synced_overrides = Some(desired.overrides.clone());
        }

        let mut installed = BTreeMap::new();
        let mut interfaces = BTreeSet::new();
        for (dst, hops) in &want {
            if desired.overrides.protected.contains_key(dst) {
                continue;
            }
            if not_installed.contains(dst) {
                continue;
            }
            installed.insert(*dst, hops.iter().map(|h| h.0).collect());
            interfaces.extend(hops.iter().map(|h| h.1));
        }
        let outcome = Outcome {
            installed: Arc::new(installed),
            problems,
            interfaces,
            gateway_oifs,
            changes,
            no_gateway: Arc::new(no_gateway),
            gateway_interfaces,
        };
        // A pass that left everything as planned is what the next one can stand on.
        self.last = (self.view.is_some()
            && outcome.problems.iter().all(|p| {
                !matches!(
                    p.kind,
                    ProblemKind::Kernel { .. } | ProblemKind::SymmetricRouting
                )
            }))
        .then(|| (desired.clone(), outcome.clone()));
        Ok(outcome)
    }

    /// Symmetric routing: the default routes of the symmetric table and the `from` rules
    /// become exactly the desired ones (the agent's own only). Failures become problems.
    async fn sync_symmetric(
        &mut self,
        desired: &DesiredState,
        problems: &mut Vec<Problem>,
    ) -> usize {
        let Some((table, priority)) = self.cfg.symmetric else {
            return 0;
        };
        let key = RouteKey {
            protocol: self.cfg.protocol,
            table,
            metric: 0,
        };
        let o = &desired.overrides;
        let nothing_wanted = o.table_routes.is_empty() && o.rules.is_empty();
        if nothing_wanted && self.symmetric_clean {
            return 0;
        }
        let problems_before = problems.len();
        let owner = || {
            desired
                .routes
                .values()
                .find(|r| r.from_default)
                .map(|r| r.owner.clone())
                .unwrap_or_default()
        };
        let mut changes = 0;
        let mut fail = |what: String, e: NlError| {
            let route = owner();
            let who = crate::logic::owner::describe(&route);
            problems.push(Problem {
                message: format!("{who}: symmetric routing: {what}: {e}"),
                route,
                kind: ProblemKind::SymmetricRouting,
            });
        };
        match routes::dump_owned(&self.handle, key).await {
            Ok(have) => {
                let want: BTreeMap<IpNet, diff::Target> = o
                    .table_routes
                    .iter()
                    .map(|(f, up)| {
                        let any = match f {
                            crate::logic::route::Family::V4 => "0.0.0.0/0",
                            crate::logic::route::Family::V6 => "::/0",
                        };
                        (
                            any.parse().expect("valid"),
                            diff::Target::Hops(vec![(up.gateway, up.oif)]),
                        )
                    })
                    .collect();
                let have: Vec<(IpNet, diff::Target)> =
                    have.into_iter().map(|d| (d.dst, d.target)).collect();
                for (dst, _) in have.iter().filter(|(d, _)| !want.contains_key(d)) {
                    self.echo
                        .expect(monitor::Change::Del, route_object(dst, table));
                    match routes::del(&self.handle, key, *dst).await {
                        Ok(()) => changes += 1,
                        Err(e) => fail(format!("removing {dst} from table {table}"), e),
                    }
                }
                for (dst, t) in &want {
                    if have.iter().any(|(d, h)| d == dst && h == t) {
                        continue;
                    }
                    self.echo
                        .expect(monitor::Change::New, route_object(dst, table));
                    match routes::add(&self.handle, key, *dst, t, true).await {
                        Ok(()) => changes += 1,
                        Err(e) => fail(format!("{dst} in table {table}"), e),
                    }
                }
            }
            Err(e) => fail(format!("reading table {table}"), e),
        }
        match rules::dump(&self.handle).await {
            Ok(all) => {
                match rules::sync(&self.handle, &all, self.cfg.protocol, priority, &o.rules).await {
                    Ok(n) => changes += n,
                    Err(e) => fail(format!("rules at priority {priority}"), e),
                }
            }
            Err(e) => fail("reading the rules".into(), e),
        }
        self.symmetric_clean = nothing_wanted && problems.len() == problems_before;
        if changes > 0 {
            info!(
                table,
                priority,
                rules = o.rules.len(),
                table_routes = o.table_routes.len(),
                changes,
                "symmetric routing"
            );
        }
        changes
    }

    /// The node facts for default-route planning.
    pub async fn facts(
        &self,
        symmetric: Option<&crate::logic::default_route::Symmetric>,
    ) -> Result<crate::logic::default_route::NodeFacts, NlError> {
        facts::read(
            &self.handle,
            self.dumper.as_ref(),
            self.cfg.protocol,
            symmetric,
        )
        .await
    }

    /// Applies ops phase by phase (nexthops, routes, garbage); routes within a phase go
    /// out concurrently. Returns the destinations whose route operation failed, and
    /// whether it was of their standby route.
    async fn apply(&mut self, ops: &[Op]) -> (Vec<(IpNet, NlError, bool)>, bool) {
        let mut failed = Vec::new();
        let mut nexthops_failed = false;
        // Nexthops first (members, then groups: the diff orders them).
        for op in ops {
            if let Op::AddNexthop(n) | Op::ReplaceNexthop(n) = op {
                let replace = matches!(op, Op::ReplaceNexthop(_));
                self.echo
                    .expect(monitor::Change::New, monitor::Object::Nexthop(n.id));
                if let Some(s) = &mut self.nh
                    && let Err(e) = s.add(n, replace)
                {
                    nexthops_failed = true;
                    warn!(id = n.id, kind = ?n.kind, error = %e, "nexthop add failed");
                }
            }
        }
        // Standby routes before the real routes they stand behind, then the real routes,
        // then the standby and stale routes that go: a destination that is wanted is never
        // left with neither.
        let adds = ops.iter().filter(|o| matches!(o, Op::AddStandby(_)));
        failed.extend(self.routes_phase(adds).await);
        let real = ops
            .iter()
            .filter(|o| matches!(o, Op::AddRoute(..) | Op::ReplaceRoute(..) | Op::DelRoute(_)));
        failed.extend(self.routes_phase(real).await);
        let dels = ops
            .iter()
            .filter(|o| matches!(o, Op::DelStandby(_) | Op::DelStale(_)));
        failed.extend(self.routes_phase(dels).await);
        for op in ops {
            if let Op::DelNexthop(id) = op
                && let Some(s) = &mut self.nh
            {
                self.echo
                    .expect(monitor::Change::Del, monitor::Object::Nexthop(*id));
                if let Err(e) = s.del(*id)
                    && e.errno != libc::ENOENT
                {
                    nexthops_failed = true;
                    warn!(id, error = %e, "nexthop delete failed");
                }
            }
        }
        (failed, nexthops_failed)
    }

    /// Adopts what another owner left where the agent's route goes: a route the agent's
    /// add met (`EEXIST`: same table, destination and metric) whose protocol is one of
    /// `adopt` (`static`: the static route operator's, written by pyroute2) and whose one
    /// gateway is exactly the planned route's one gateway is replaced in place
    /// (`NLM_F_REPLACE`) by the agent's own, marked route: no delete, no gap in traffic.
    /// Anything else stays foreign, left alone and reported. Returns the failures left.
    /// Costs nothing unless an add met a route that is not the agent's.
    async fn adopt(
        &mut self,
        desired: &DesiredState,
        ops: &[Op],
        failed: Vec<(IpNet, NlError, bool)>,
    ) -> Vec<(IpNet, NlError, bool)> {
        let clash = |f: &(IpNet, NlError, bool)| !f.2 && f.1.errno == libc::EEXIST;
        if self.cfg.adopt.is_empty() || !failed.iter().any(clash) {
            return failed;
        }
        let key = self.key();
        let mut foreign: BTreeMap<IpNet, (u8, Target)> = BTreeMap::new();
        for protocol in self.cfg.adopt.clone() {
            let theirs = RouteKey { protocol, ..key };
            match routes::dump_owned(&self.strict, theirs).await {
                Ok(found) => foreign.extend(
                    found
                        .into_iter()
                        .filter(|d| d.unicast && d.metric == key.metric_of(&d.dst))
                        .map(|d| (d.dst, (d.protocol, d.target))),
                ),
                Err(e) => {
                    warn!(protocol, error = %e, "cannot read the routes to adopt; leaving them");
                    return failed;
                }
            }
        }
        let targets: BTreeMap<IpNet, &Target> = ops
            .iter()
            .filter_map(|o| match o {
                Op::AddRoute(d, t) => Some((*d, t)),
                _ => None,
            })
            .collect();
        let mut left = Vec::new();
        for f in failed {
            let (dst, planned) = (f.0, desired.routes.get(&f.0));
            let matching = match (clash(&f), planned, foreign.get(&dst), targets.get(&dst)) {
                (true, Some(r), Some((protocol, Target::Hops(h))), Some(t))
                    if h.len() == 1 && r.gateways == [h[0].0] && r.withdrawn.is_empty() =>
                {
                    Some((*protocol, h[0].0, *t, r))
                }
                _ => None,
            };
            let Some((protocol, gateway, target, r)) = matching else {
                left.push(f);
                continue;
            };
            self.echo
                .expect(monitor::Change::New, route_object(&dst, key.table));
            match routes::add(&self.handle, key, dst, target, true).await {
                Ok(()) => info!(
                    owner = %crate::logic::owner::describe(&r.owner),
                    destination = %dst,
                    %gateway,
                    protocol,
                    "adopted a route another owner left (exactly what is planned): replaced in place by the agent's own"
                ),
                Err(e) => left.push((dst, e, false)),
            }
        }
        left
    }

    /// Applies route ops concurrently (64 in flight). Returns the destinations whose
    /// operation failed; deleting what is already gone is no failure.
    async fn routes_phase<'a>(
        &self,
        ops: impl Iterator<Item = &'a Op>,
    ) -> Vec<(IpNet, NlError, bool)> {
        let key = self.key();
        let results: Vec<Option<(IpNet, NlError, bool)>> = futures::stream::iter(ops)
            .map(|op| {
                let handle = self.handle.clone();
                match op {
                    Op::DelRoute(d) | Op::DelStandby(d) | Op::DelStale(Stale { dst: d, .. }) => {
                        self.echo
                            .expect(monitor::Change::Del, route_object(d, key.table))
                    }
                    Op::AddRoute(d, _) | Op::ReplaceRoute(d, _) | Op::AddStandby(d) => self
                        .echo
                        .expect(monitor::Change::New, route_object(d, key.table)),
                    _ => {}
                }
                async move {
                    let h = &handle;
                    let (dst, deleting, r) = match op {
                        Op::AddRoute(d, t) => (*d, false, routes::add(h, key, *d, t, false).await),
                        Op::ReplaceRoute(d, t) => {
                            (*d, false, routes::add(h, key, *d, t, true).await)
                        }
                        Op::DelRoute(d) => (*d, true, routes::del(h, key, *d).await),
                        Op::AddStandby(d) => (*d, false, routes::add_standby(h, key, *d).await),
                        Op::DelStandby(d) => {
                            let metric = key.standby_metric_of(d);
                            (*d, true, routes::del_at(h, key, *d, metric, true).await)
                        }
                        Op::DelStale(s) => {
                            let r = routes::del_at(h, key, s.dst, s.metric, s.unreachable).await;
                            (s.dst, true, r)
                        }
                        _ => return None,
                    };
                    let is_standby = matches!(op, Op::AddStandby(_) | Op::DelStandby(_));
                    match r {
                        Ok(()) => {
                            debug!(?op, "route applied");
                            None
                        }
                        // Already gone: the goal is reached.
                        Err(e) if deleting && e.errno == libc::ESRCH => None,
                        Err(e) => Some((dst, e, is_standby)),
                    }
                }
            })
            .buffer_unordered(64)
            .collect()
            .await;
        results.into_iter().flatten().collect()
    }

    /// The neighbour entries of `gateways` (gateway → interface it is reached through).
    pub async fn neighbours(
        &self,
        gateways: &BTreeMap<IpAddr, u32>,
    ) -> Result<BTreeMap<IpAddr, neigh::Neighbour>, NlError> {
        neigh::gateways(&self.handle, gateways).await
    }

    /// Removes every route and nexthop the agent owns (`routing-agent cleanup`).
    pub async fn remove_all(&mut self) -> anyhow::Result<usize> {
        let outcome = self
            .reconcile(&Arc::new(DesiredState::default()), Read::All)
            .await?;
        Ok(outcome.changes)
    }
}
