//! Types shared by the kernel side (`routing-agent-ebpf`) and user space.
//!
//! Everything here is `#[repr(C)]` plain data: the eBPF programs write it into maps and
//! user space reads it back (directly, or through `bpftool map dump`, which prints the field
//! names from BTF).
#![no_std]

/// Index into the `RA_TRAFFIC` per-CPU array: packets leaving the interface.
pub const DIRECTION_EGRESS: u32 = 0;
/// Index into the `RA_TRAFFIC` per-CPU array: packets entering the interface.
pub const DIRECTION_INGRESS: u32 = 1;
/// Number of entries of `RA_TRAFFIC`.
pub const DIRECTIONS: u32 = 2;

/// Packet and byte counters of one direction, summed over every interface the
/// programs are attached to. One value per CPU; user space adds them up.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounters {
    pub packets: u64,
    pub bytes: u64,
}

#[cfg(feature = "user")]
// SAFETY: plain old data, `#[repr(C)]`, no padding (two u64).
unsafe impl aya::Pod for TrafficCounters {}

/// Names of the programs and maps in the object file, shared so that user space and
/// the kernel side cannot drift apart.
pub mod names {
    pub const PROG_EGRESS: &str = "ra_egress";
    pub const PROG_INGRESS: &str = "ra_ingress";
    pub const MAP_TRAFFIC: &str = "RA_TRAFFIC";
}
