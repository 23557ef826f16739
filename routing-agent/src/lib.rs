//! routing-agent: programs static and ECMP routes on a Kubernetes node from `Route`
//! custom resources.
//!
//! The layers, and the only direction imports go (see `docs/architecture.md`):
//!
//! - [`logic`]: the pure core. Route validation, node selection, the planner, default-route
//!   planning, the gateway-health state machine, status building. No I/O, no clock, no
//!   kernel; it imports nothing else of this crate.
//! - Adapters, each importing [`logic`] only:
//!   - [`source`]: where Routes come from (a directory of manifests, the Kubernetes API);
//!   - [`node`]: this node's kernel (netlink dataplane, eBPF programs and maps, ICMP
//!     probes, sysctls, `status` read-back);
//!   - [`cluster`]: what goes back to the cluster (NodeRouteStatus, Events) and the
//!     cluster-wide controller;
//!   - [`ops`]: what an operator scrapes (Prometheus metrics, health endpoints).
//! - [`agent`]: the agent as explicit state, one method per event, and the loop that
//!   turns events into those calls. It wires the adapters to the core.
pub mod agent;
pub mod cluster;
pub mod logic;
#[cfg(test)]
mod mock_api;
pub mod node;
pub mod ops;
pub mod source;
