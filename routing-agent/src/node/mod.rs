//! Adapters to this node's kernel.
//!
//! - [`dataplane`]: routes, nexthop objects and rules through rtnetlink (the agent's own
//!   only), the netlink monitor, node facts and neighbour entries;
//! - [`ebpf`]: the TC programs, their attachments and pinned maps;
//! - [`probe`]: ICMP echo probes of withdrawn gateways;
//! - [`sysctl`]: the ECMP sysctls of this network namespace;
//! - [`inspect`]: `routing-agent status`, read back from the kernel and the pins.
pub mod dataplane;
pub mod ebpf;
pub mod inspect;
pub mod probe;
pub mod sysctl;
