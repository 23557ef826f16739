//! What the agent needs of the node, as two traits: [`Kernel`] (routes, facts, neighbours:
//! the netlink dataplane) and [`TcPrograms`] (the TC programs' attachments and maps). The
//! real adapters implement them here, so that the adapters know nothing of the agent;
//! unit tests drive an [`super::Agent`] with fakes.
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use routing_agent_common::{GatewayInfo, GatewayStats};

use crate::logic::default_route::{NodeFacts, Symmetric};
use crate::logic::desired::DesiredState;
use crate::node::dataplane::{Dataplane, Outcome, Read, neigh::Neighbour, nexthop::NlError};
use crate::node::ebpf::{HealthRecord, Programs};

/// The routing side of the kernel, as the agent uses it.
// The agent's loop runs on the main task (`block_on`): no `Send` bound is needed.
#[allow(async_fn_in_trait)]
pub trait Kernel {
    /// Level-based: makes the agent's kernel objects exactly `desired`, reading as much of
    /// the kernel first as `read` says (see [`Dataplane::reconcile`]).
    async fn reconcile(
        &mut self,
        desired: &Arc<DesiredState>,
        read: Read,
    ) -> anyhow::Result<Outcome>;
    /// The node's own default routes, addresses and rules, for default-route planning.
    async fn facts(&self, symmetric: Option<&Symmetric>) -> Result<NodeFacts, NlError>;
    /// The neighbour entries of `gateways` (gateway → interface it is reached through).
    async fn neighbours(
        &self,
        gateways: &BTreeMap<IpAddr, u32>,
    ) -> Result<BTreeMap<IpAddr, Neighbour>, NlError>;
}

impl Kernel for Dataplane {
    async fn reconcile(
        &mut self,
        desired: &Arc<DesiredState>,
        read: Read,
    ) -> anyhow::Result<Outcome> {
        Dataplane::reconcile(self, desired, read).await
    }
    async fn facts(&self, symmetric: Option<&Symmetric>) -> Result<NodeFacts, NlError> {
        Dataplane::facts(self, symmetric).await
    }
    async fn neighbours(
        &self,
        gateways: &BTreeMap<IpAddr, u32>,
    ) -> Result<BTreeMap<IpAddr, Neighbour>, NlError> {
        Dataplane::neighbours(self, gateways).await
    }
}

/// The TC programs and their maps, as the agent uses them (see [`Programs`]).
pub trait TcPrograms {
    /// Gives every gateway in `gateways` a slot and frees the others'.
    fn set_gateways(&mut self, gateways: &BTreeSet<IpAddr>);
    /// Attaches to exactly these interfaces.
    fn sync(&mut self, ifindexes: &BTreeSet<u32>);
    /// Whether every interface of `ifindexes` has both programs attached.
    fn covers(&self, ifindexes: &BTreeSet<u32>) -> bool;
    /// Interface names with attachments.
    fn attached(&self) -> Vec<String>;
    /// (interface, MAC) → gateway, for attribution and flow pinning.
    fn set_neighbours(&mut self, want: &BTreeMap<(u32, [u8; 6], u8), IpAddr>) -> usize;
    /// Counters per gateway, summed over the CPUs.
    fn read_stats(&self) -> BTreeMap<IpAddr, GatewayStats>;
    /// Per gateway, the latest destination that answered through it, and how long ago.
    fn read_targets(&self) -> BTreeMap<IpAddr, (SocketAddr, Duration)>;
    /// Records a gateway's health in its slot.
    fn record_health(&mut self, gw: IpAddr, h: HealthRecord);
    /// The verdicts an earlier agent recorded.
    fn recorded(&self) -> Vec<(IpAddr, GatewayInfo)>;
    fn slot(&self, gw: IpAddr) -> Option<u32>;
    /// Puts the uplink guard on exactly this interface, or nowhere.
    fn guard_uplink(&mut self, ifindex: Option<u32>);
    /// Packets the uplink guard refused so far.
    fn uplink_refused(&self) -> u64;
}

impl TcPrograms for Programs {
    fn set_gateways(&mut self, gateways: &BTreeSet<IpAddr>) {
        Programs::set_gateways(self, gateways)
    }
    fn sync(&mut self, ifindexes: &BTreeSet<u32>) {
        Programs::sync(self, ifindexes)
    }
    fn covers(&self, ifindexes: &BTreeSet<u32>) -> bool {
        Programs::covers(self, ifindexes)
    }
    fn attached(&self) -> Vec<String> {
        Programs::attached(self)
    }
    fn set_neighbours(&mut self, want: &BTreeMap<(u32, [u8; 6], u8), IpAddr>) -> usize {
        Programs::set_neighbours(self, want)
    }
    fn read_stats(&self) -> BTreeMap<IpAddr, GatewayStats> {
        Programs::read_stats(self)
    }
    fn read_targets(&self) -> BTreeMap<IpAddr, (SocketAddr, Duration)> {
        Programs::read_targets(self)
    }
    fn record_health(&mut self, gw: IpAddr, h: HealthRecord) {
        Programs::record_health(self, gw, h)
    }
    fn recorded(&self) -> Vec<(IpAddr, GatewayInfo)> {
        Programs::recorded(self)
    }
    fn slot(&self, gw: IpAddr) -> Option<u32> {
        Programs::slot(self, gw)
    }
    fn guard_uplink(&mut self, ifindex: Option<u32>) {
        Programs::guard_uplink(self, ifindex)
    }
    fn uplink_refused(&self) -> u64 {
        Programs::uplink_refused(self)
    }
}
