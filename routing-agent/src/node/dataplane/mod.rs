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

use futures::StreamExt;
use ipnet::IpNet;
use tracing::{debug, info, warn};

use crate::logic::plan::{DesiredState, Problem, ProblemKind};
use diff::{Hop, IdRange, KernelState, Mode, Op};
use nexthop::{NexthopSocket, NlError, Resilient};
use routes::RouteKey;

/// How routes are expressed in the kernel, as chosen on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeChoice {
    /// Nexthop objects when the kernel has them, `RTA_MULTIPATH` otherwise.
    Auto,
    Nexthop,
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
}

/// What one reconcile achieved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Destinations in the kernel now, with the gateways they use.
    pub installed: BTreeMap<IpNet, Vec<IpAddr>>,
    /// The planner's problems plus the dataplane's (unreachable gateways, kernel refusals).
    pub problems: Vec<Problem>,
    /// Interfaces through which at least one installed gateway is reached.
    pub interfaces: BTreeSet<u32>,
    /// Every reachable gateway of the desired routes (withdrawn ones included), with the
    /// interface it is reached through.
    pub gateway_oifs: BTreeMap<IpAddr, u32>,
    /// Kernel operations applied (0: the kernel already matched).
    pub changes: usize,
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
}

impl Dataplane {
    /// Connects to rtnetlink in the current network namespace and picks the mode.
    pub async fn new(cfg: Config) -> anyhow::Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        let mut nh = NexthopSocket::new()?;
        let has_nexthops = nh.dump().is_ok();
        let mode = match (cfg.mode, has_nexthops) {
            (ModeChoice::Multipath, _) | (ModeChoice::Auto, false) => Mode::Multipath,
            (ModeChoice::Nexthop, false) => {
                anyhow::bail!(
                    "--dataplane nexthop: this kernel has no nexthop objects (Linux >= 5.13 needed)"
                )
            }
            (_, true) => Mode::Nexthop(cfg.resilient),
        };
        info!(?mode, kernel_has_nexthops = has_nexthops, "dataplane mode");
        Ok(Dataplane {
            handle,
            nh: matches!(mode, Mode::Nexthop(_)).then_some(nh),
            mode,
            cfg,
            symmetric_clean: false,
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
        let routes = routes::dump_owned(&self.handle, self.key())
            .await?
            .into_iter()
            .collect();
        Ok(KernelState { nexthops, routes })
    }

    /// Level-based reconcile: read what the agent owns, diff, apply the difference.
    /// Per-destination failures become problems; only a failure to read the kernel is an
    /// error (and then nothing was changed).
    pub async fn reconcile(&mut self, desired: &DesiredState) -> anyhow::Result<Outcome> {
        let mut problems = desired.problems.clone();

        // Resolve every gateway once.
        let gateways: BTreeSet<IpAddr> = desired
            .routes
            .values()
            .flat_map(|r| r.gateways.iter().chain(&r.withdrawn).copied())
            .collect();
        let mut reach: BTreeMap<IpAddr, Result<u32, String>> = BTreeMap::new();
        for gw in gateways {
            reach.insert(gw, routes::resolve_gateway(&self.handle, gw).await);
        }
        let gateway_oifs: BTreeMap<IpAddr, u32> = reach
            .iter()
            .filter_map(|(g, r)| Some((*g, *r.as_ref().ok()?)))
            .collect();
        let mut want: BTreeMap<IpNet, Vec<Hop>> = BTreeMap::new();
        let mut reported: BTreeSet<(String, IpAddr)> = BTreeSet::new();
        for (dst, r) in &desired.routes {
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
                                    "Route {}: gateway {gw} is unreachable from this node: {why}; retrying",
                                    r.owner
                                ),
                            });
                        }
                    }
                }
            }
            if !hops.is_empty() {
                want.insert(*dst, hops);
            }
        }

        // Protected destinations: through the node's own uplink (not gateways of Routes:
        // no health, no TC programs on their interface).
        for (dst, up) in &desired.overrides.protected {
            want.entry(*dst)
                .or_insert_with(|| vec![(up.gateway, up.oif)]);
        }

        let kernel = self.snapshot().await?;
        let ops = diff::diff(&want, &kernel, self.mode, self.cfg.ids, self.cfg.protocol)?;
        let failed = self.apply(&ops).await;
        let mut changes = ops.len();
        for (dst, err) in &failed {
            changes -= 1;
            let owner = desired
                .routes
                .get(dst)
                .map(|r| r.owner.clone())
                .unwrap_or_default();
            let message = if err.errno == libc::EEXIST {
                format!(
                    "Route {owner}: destination {dst}: a route the agent does not own already exists \
                     in table {}; leaving it alone",
                    self.cfg.table
                )
            } else {
                format!("Route {owner}: destination {dst}: the kernel refused the route: {err}")
            };
            problems.push(Problem {
                route: owner,
                kind: ProblemKind::Kernel { destination: *dst },
                message,
            });
        }
        problems.sort();

        changes += self.sync_symmetric(desired, &mut problems).await;

        let failed_dsts: BTreeSet<IpNet> = failed.iter().map(|(d, _)| *d).collect();
        let mut installed = BTreeMap::new();
        let mut interfaces = BTreeSet::new();
        for (dst, hops) in &want {
            if desired.overrides.protected.contains_key(dst) {
                continue;
            }
            if failed_dsts.contains(dst) && !kernel.routes.contains_key(dst) {
                continue;
            }
            installed.insert(*dst, hops.iter().map(|h| h.0).collect());
            interfaces.extend(hops.iter().map(|h| h.1));
        }
        Ok(Outcome {
            installed,
            problems,
            interfaces,
            gateway_oifs,
            changes,
        })
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
            problems.push(Problem {
                message: format!("Route {route}: symmetric routing: {what}: {e}"),
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
                for (dst, _) in have.iter().filter(|(d, _)| !want.contains_key(d)) {
                    match routes::del(&self.handle, key, *dst).await {
                        Ok(()) => changes += 1,
                        Err(e) => fail(format!("removing {dst} from table {table}"), e),
                    }
                }
                for (dst, t) in &want {
                    if have.iter().any(|(d, h)| d == dst && h == t) {
                        continue;
                    }
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
        facts::read(&self.handle, self.cfg.protocol, symmetric).await
    }

    /// Applies ops phase by phase (nexthops, routes, garbage); routes within a phase go
    /// out concurrently. Returns the destinations whose route operation failed.
    async fn apply(&mut self, ops: &[Op]) -> Vec<(IpNet, NlError)> {
        let mut failed = Vec::new();
        let key = self.key();
        // Nexthops first (members, then groups: the diff orders them).
        for op in ops {
            if let Op::AddNexthop(n) | Op::ReplaceNexthop(n) = op {
                let replace = matches!(op, Op::ReplaceNexthop(_));
                if let Some(s) = &mut self.nh
                    && let Err(e) = s.add(n, replace)
                {
                    warn!(id = n.id, kind = ?n.kind, error = %e, "nexthop add failed");
                }
            }
        }
        let handle = self.handle.clone();
        let results: Vec<Option<(IpNet, NlError)>> =
            futures::stream::iter(ops.iter().filter_map(|op| match op {
                Op::AddRoute(d, t) => Some((*d, Some(t.clone()), false)),
                Op::ReplaceRoute(d, t) => Some((*d, Some(t.clone()), true)),
                Op::DelRoute(d) => Some((*d, None, false)),
                _ => None,
            }))
            .map(|(dst, target, replace)| {
                let handle = handle.clone();
                async move {
                    let r = match &target {
                        Some(t) => routes::add(&handle, key, dst, t, replace).await,
                        None => routes::del(&handle, key, dst).await,
                    };
                    match r {
                        Ok(()) => {
                            debug!(%dst, ?target, replace, "route applied");
                            None
                        }
                        // Already gone: the goal is reached.
                        Err(e) if target.is_none() && e.errno == libc::ESRCH => None,
                        Err(e) => Some((dst, e)),
                    }
                }
            })
            .buffer_unordered(64)
            .collect()
            .await;
        failed.extend(results.into_iter().flatten());
        for op in ops {
            if let Op::DelNexthop(id) = op
                && let Some(s) = &mut self.nh
                && let Err(e) = s.del(*id)
                && e.errno != libc::ENOENT
            {
                warn!(id, error = %e, "nexthop delete failed");
            }
        }
        failed
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
        let outcome = self.reconcile(&DesiredState::default()).await?;
        Ok(outcome.changes)
    }
}
