//! What planning produces (pure data): the routes this node should have, what could not be
//! honoured, and the objects of active default-route overrides. The planner
//! ([`crate::logic::plan`]) and the default-route planning ([`crate::logic::default_route`])
//! both write it; the dataplane reads it.
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use crate::logic::route::Family;

/// One destination this node should route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredRoute {
    pub destination: IpNet,
    /// Sorted, deduplicated. More than one: ECMP. The gateways in use.
    pub gateways: Vec<IpAddr>,
    /// Gateways of the Route taken out of rotation because they are down (see
    /// [`withdraw`]); sorted.
    pub withdrawn: Vec<IpAddr>,
    /// Name of the Route this comes from.
    pub owner: String,
    /// A half of a Route's default route (see [`crate::logic::default_route`]).
    pub from_default: bool,
}

impl DesiredRoute {
    pub fn family(&self) -> Family {
        Family::of(&self.destination.addr())
    }
}

/// Why (part of) a Route is not applied on this node.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ProblemKind {
    /// The spec does not parse; nothing of the Route is applied.
    Invalid,
    /// Another Route owns this destination on this node.
    Conflict { destination: IpNet, winner: String },
    /// A gateway cannot be used as a next hop from this node (filled in by the dataplane).
    GatewayUnreachable { gateway: IpAddr },
    /// The kernel refused a destination (filled in by the dataplane).
    Kernel { destination: IpNet },
    /// A default-route override refused: symmetric routing would clobber a rule or table
    /// the agent does not own.
    SymmetricRouting,
    /// A default-route override refused: the node's own default route has no readable
    /// gateway to keep protected destinations on.
    UnknownUplink,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    pub route: String,
    pub kind: ProblemKind,
    /// A sentence naming the object and the field or value.
    pub message: String,
}

/// What this node should look like, and what could not be honoured.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub routes: BTreeMap<IpNet, DesiredRoute>,
    /// Names of the valid Routes that select this node (applied or in conflict).
    pub selected: Vec<String>,
    pub problems: Vec<Problem>,
    /// Non-fatal findings (normalised CIDRs, duplicates), each naming the Route.
    pub warnings: Vec<String>,
    /// Protected routes and symmetric routing of active default-route overrides (filled
    /// in by [`crate::logic::default_route::protect`]).
    pub overrides: Overrides,
}

/// A next hop of the node's own: gateway and interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Uplink {
    pub gateway: IpAddr,
    pub oif: u32,
}

/// A rule `from <source> lookup <table>` at `priority`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceRule {
    pub source: IpAddr,
    pub table: u32,
    pub priority: u32,
}

/// The kernel objects of the active overrides.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    /// Protected destination → the original uplink.
    pub protected: BTreeMap<IpNet, Uplink>,
    /// Default route per family in the symmetric table.
    pub table_routes: BTreeMap<Family, Uplink>,
    pub rules: BTreeSet<SourceRule>,
}
