//! routing-agent: programs static and ECMP routes on a Kubernetes node from `Route`
//! custom resources.
//!
//! Layout: a pure planning core ([`route`], [`selector`], [`plan`]) and thin adapters around
//! it: sources ([`source`]), the netlink dataplane ([`dataplane`]), eBPF ([`ebpf`]).
pub mod crd;
pub mod plan;
pub mod route;
pub mod selector;
