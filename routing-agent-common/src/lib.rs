//! Types shared by the kernel side (`routing-agent-ebpf`) and user space.
//!
//! Everything here is `#[repr(C)]` plain data without implicit padding: the eBPF programs
//! write it into maps and user space reads it back (directly, or through
//! `bpftool map dump pinned …`, which prints the field names from BTF).
//!
//! How the maps fit together:
//! - user space assigns every gateway a *slot* (`0..MAX_GATEWAYS`) and records it in
//!   `RA_GATEWAYS[slot]` (`GatewayInfo`: address, health as user space sees it);
//! - user space maps each gateway's (interface, MAC) to its slot in `RA_NEIGH`, from the
//!   neighbour table;
//! - the TC programs attribute each packet to a slot by its destination MAC (egress) or
//!   source MAC (ingress), count into `RA_GW_STATS[slot]`, and follow TCP handshakes in
//!   `RA_FLOWS`;
//! - the ingress program records, per gateway, the latest destination whose SYN-ACK came
//!   back through it (`RA_TARGETS`): the target of the forwarding probes.
#![no_std]

/// Gateways the programs can tell apart (size of `RA_GATEWAYS` and `RA_GW_STATS`).
pub const MAX_GATEWAYS: u32 = 256;
/// TCP connections followed at once, attempts and established ones (LRU: the least
/// recently used are evicted first). About 10 MiB of kernel memory.
pub const MAX_FLOWS: u32 = 131072;
/// (interface, MAC) pairs known to belong to gateways.
pub const MAX_NEIGHBOURS: u32 = 1024;

/// `RA_NEIGH` key: a gateway's MAC address as seen on one interface, for one IP family.
/// The family is part of the key because one box is often the gateway for both: its IPv4
/// and its IPv6 address share a MAC, and they are two gateways (two slots, two verdicts).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NeighKey {
    pub ifindex: u32,
    pub mac: [u8; 6],
    /// 4 or 6.
    pub family: u8,
    pub _pad: u8,
}

/// `RA_NEIGH` value: the slot of the gateway that owns the MAC.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GatewaySlot {
    pub slot: u32,
}

/// `RA_GW_STATS[slot]`: per-CPU counters of one gateway; user space adds the CPUs up.
/// User space shows them as they are (camelCase) in the status file and `status --json`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(
    feature = "user",
    derive(serde::Serialize),
    serde(rename_all = "camelCase")
)]
pub struct GatewayStats {
    /// TCP connection attempts (first SYN) sent through the gateway.
    pub syn_sent: u64,
    /// Attempts answered by a SYN-ACK from the gateway's side.
    pub established: u64,
    /// Attempts whose SYN was retransmitted while still unanswered, or that drew an ICMP
    /// destination-unreachable from the gateway's side; counted once per attempt.
    pub failed: u64,
    /// Attempts answered by a RST (the gateway forwarded; the destination refused).
    pub rst: u64,
    /// ICMP / ICMPv6 destination-unreachable messages arriving from the gateway.
    pub icmp_unreachable: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Egress packets of established connections that the kernel had re-routed to another
    /// gateway, sent back to this one (flow pinning).
    pub steered_back: u64,
    /// Of `icmp_unreachable`: those quoting a UDP datagram of ours (a port or host
    /// unreachable through this gateway). Counted, not judged: UDP has no handshake that
    /// tells a lost datagram from an unanswered one.
    pub udp_unreachable: u64,
}

impl GatewayStats {
    /// Field-wise sum (user space adds the per-CPU values up with it).
    pub fn add(&mut self, o: &GatewayStats) {
        *self = self.zip(o, |a, b| a + b);
    }

    /// What each counter gained since `before`; one that went backwards (the maps were
    /// recreated) counts again from zero.
    pub fn since(&self, before: &GatewayStats) -> GatewayStats {
        self.zip(before, |new, old| if new >= old { new - old } else { new })
    }

    /// `f(self.x, o.x)` for every field `x`.
    fn zip(&self, o: &GatewayStats, f: impl Fn(u64, u64) -> u64) -> GatewayStats {
        GatewayStats {
            syn_sent: f(self.syn_sent, o.syn_sent),
            established: f(self.established, o.established),
            failed: f(self.failed, o.failed),
            rst: f(self.rst, o.rst),
            icmp_unreachable: f(self.icmp_unreachable, o.icmp_unreachable),
            tx_packets: f(self.tx_packets, o.tx_packets),
            tx_bytes: f(self.tx_bytes, o.tx_bytes),
            rx_packets: f(self.rx_packets, o.rx_packets),
            rx_bytes: f(self.rx_bytes, o.rx_bytes),
            steered_back: f(self.steered_back, o.steered_back),
            udp_unreachable: f(self.udp_unreachable, o.udp_unreachable),
        }
    }
}

/// `RA_FLOWS` key: one TCP connection attempt, seen from this node. IPv4 addresses take
/// the first 4 bytes of the 16; ports are in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub local: [u8; 16],
    pub remote: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    /// 4 or 6.
    pub family: u8,
    pub _pad: [u8; 3],
}

/// The first SYN has gone out; no answer yet.
pub const FLOW_PENDING: u32 = 1;
/// The SYN was retransmitted (or an ICMP unreachable came back) before any answer.
pub const FLOW_FAILED: u32 = 2;
/// A SYN-ACK came back through the same gateway: the connection is pinned to it.
pub const FLOW_ESTABLISHED: u32 = 3;

/// `RA_FLOWS` value. A RST (either way) deletes the entry; the LRU evicts the least
/// recently used.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    pub slot: u32,
    /// `FLOW_PENDING`, `FLOW_FAILED` or `FLOW_ESTABLISHED`.
    pub state: u32,
    /// `bpf_ktime_get_ns()` of the (latest) first SYN.
    pub started_ns: u64,
    /// The attempt's initial sequence number (host order): a SYN with another one on the
    /// same 4-tuple is a new connection, not a retransmission of this attempt.
    pub isn: u32,
    pub _pad: u32,
}

/// `RA_GATEWAYS[slot].state`: slot not in use.
pub const GW_UNUSED: u32 = 0;
/// In rotation.
pub const GW_UP: u32 = 1;
/// Detected as black-holing; withdrawn (unless it is a route's last gateway) and probed.
pub const GW_DOWN: u32 = 2;
/// Failing with no peer gateway to compare with (its routes have no other gateway):
/// reported and probed, not withdrawn. A restarted agent judges it afresh.
pub const GW_SUSPECT: u32 = 3;

/// `RA_GATEWAYS[slot]`, written by user space only: which gateway a slot stands for and
/// its health, so that a restarted agent keeps its slots and its verdicts, and so that
/// `bpftool` users can read the slot numbers of the other maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GatewayInfo {
    /// The gateway's address (IPv4 in the first 4 bytes).
    pub addr: [u8; 16],
    /// 4 or 6; 0 when the slot is unused.
    pub family: u32,
    /// `GW_UNUSED`, `GW_UP`, `GW_DOWN` or `GW_SUSPECT`.
    pub state: u32,
    /// Damping level: how many times in a row it failed again soon after a restore.
    pub penalty: u32,
    /// Interface the gateway is reached through (0: not resolved yet).
    pub ifindex: u32,
    /// When it went down (ms since the Unix epoch; 0 when up).
    pub down_since_ms: u64,
    /// The gateway's MAC on `ifindex` (from the neighbour table), used by flow pinning.
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
    /// When the state last changed (ms since the Unix epoch; 0: never).
    pub changed_ms: u64,
    /// Down: when the next ICMP probe is due (ms since the Unix epoch; 0 when up).
    pub next_probe_ms: u64,
}

/// `RA_TARGETS[slot]` (per CPU): the latest connection attempt through the gateway that a
/// SYN-ACK answered. User space probes a withdrawn peer gateway with a TCP connection to
/// it (a destination known to answer, through a gateway known to forward) and takes the
/// freshest of the CPUs' entries.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeTarget {
    /// The remote address (IPv4 in the first 4 bytes).
    pub addr: [u8; 16],
    /// The remote port (host byte order).
    pub port: u16,
    /// 4 or 6; 0: none seen yet.
    pub family: u8,
    pub _pad: [u8; 5],
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the SYN-ACK.
    pub seen_ns: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all): plain old data, `#[repr(C)]`, explicit padding, every bit pattern valid.
    unsafe impl aya::Pod for super::NeighKey {}
    unsafe impl aya::Pod for super::GatewaySlot {}
    unsafe impl aya::Pod for super::GatewayStats {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowState {}
    unsafe impl aya::Pod for super::GatewayInfo {}
    unsafe impl aya::Pod for super::ProbeTarget {}
}

/// Names of the programs and maps in the object file, shared so that user space and
/// the kernel side cannot drift apart.
pub mod names {
    pub const PROG_EGRESS: &str = "ra_egress";
    pub const PROG_INGRESS: &str = "ra_ingress";
    /// The fail-closed guard on the public interface (IPv6 overrides).
    pub const PROG_UPLINK: &str = "ra_uplink";
    pub const MAP_NEIGH: &str = "RA_NEIGH";
    pub const MAP_GW_STATS: &str = "RA_GW_STATS";
    pub const MAP_FLOWS: &str = "RA_FLOWS";
    pub const MAP_GATEWAYS: &str = "RA_GATEWAYS";
    /// Packets the uplink guard refused (per CPU).
    pub const MAP_UPLINK: &str = "RA_UPLINK";
    /// Per gateway, the latest destination that answered through it (forwarding probes).
    pub const MAP_TARGETS: &str = "RA_TARGETS";
    /// Every map, all pinned under the pin directory.
    pub const MAPS: [&str; 6] = [
        MAP_NEIGH,
        MAP_GW_STATS,
        MAP_FLOWS,
        MAP_GATEWAYS,
        MAP_UPLINK,
        MAP_TARGETS,
    ];
}
