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
    /// [`crate::logic::plan::withdraw`]); sorted. When it holds every gateway of the Route,
    /// `gateways` is empty and the destination has no usable gateway.
    pub withdrawn: Vec<IpAddr>,
    /// Name of the Route this comes from.
    pub owner: String,
    /// A half of a Route's default route (see [`crate::logic::default_route`]).
    pub from_default: bool,
    /// What happens while no gateway can be used (see [`FailMode`]).
    pub fail_mode: FailMode,
}

/// What a destination's traffic does while none of its gateways can be used (interface
/// down, address or connected network gone, every neighbour FAILED, every gateway down by
/// health).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FailMode {
    /// Refused: an `unreachable` route of the agent's stays in place at a worse metric
    /// than the real route, installed with it, so that the traffic never falls through
    /// to the node's own default route (another egress IP, private ranges sent to the
    /// internet). The default.
    #[default]
    Closed,
    /// Falls through to the node's own routes (the predecessor's behaviour).
    Open,
}

impl FailMode {
    pub fn parse(s: &str) -> Option<FailMode> {
        match s {
            "closed" => Some(FailMode::Closed),
            "open" => Some(FailMode::Open),
            _ => None,
        }
    }
}

impl std::fmt::Display for FailMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FailMode::Closed => "closed",
            FailMode::Open => "open",
        })
    }
}

/// Why a destination has no usable gateway.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NoGateway {
    /// Every gateway of the Route is down by health (withdrawn).
    AllDown,
    /// The interface its gateways were reached through is down or gone.
    InterfaceDown { interface: String },
    /// No gateway is on a directly connected network (address or connected route gone,
    /// or never there).
    Unreachable,
}

impl NoGateway {
    /// The reason as the status and the metrics name it.
    pub fn reason(&self) -> &'static str {
        match self {
            NoGateway::AllDown => "AllGatewaysDown",
            NoGateway::InterfaceDown { .. } => "InterfaceDown",
            NoGateway::Unreachable => "GatewayUnreachable",
        }
    }

    /// The sentence a message uses.
    pub fn describe(&self) -> String {
        match self {
            NoGateway::AllDown => "every gateway is down".into(),
            NoGateway::InterfaceDown { interface } => {
                format!("the interface of its gateways ({interface}) is down")
            }
            NoGateway::Unreachable => {
                "no gateway is on a directly connected network of this node".into()
            }
        }
    }
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
    /// No gateway of this destination can be used: its traffic is refused (fail-closed)
    /// or falls through to the node's own routes (fail-open).
    NoGateway {
        destination: IpNet,
        why: NoGateway,
        mode: FailMode,
    },
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
    /// The public interface of symmetric routing, per family (its addresses are the rules'
    /// sources).
    pub public_interface: BTreeMap<Family, u32>,
}
