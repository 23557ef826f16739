//! routing-agent: programs static and ECMP routes on a Kubernetes node from `Route`
//! custom resources.
//!
//! Layout: a pure planning core ([`route`], [`selector`], [`plan`]) and thin adapters
//! around it: sources ([`source`]), the netlink dataplane ([`dataplane`]), eBPF
//! ([`ebpf`]), and the loop that ties them together ([`agent`]).
pub mod agent;
pub mod controller;
pub mod crd;
pub mod dataplane;
pub mod default_route;
pub mod ebpf;
pub mod events;
pub mod health;
pub mod inspect;
pub mod metrics;
#[cfg(test)]
mod mock_api;
pub mod plan;
pub mod probe;
pub mod publish;
pub mod report;
pub mod route;
pub mod selector;
pub mod serve;
pub mod source;
pub mod summary;
pub mod sysctl;
