//! TC programs of the routing agent.
//!
//! This is the minimal data path of the foundation: two classifiers, one per direction,
//! that count packets and bytes into a per-CPU BTF array and hand every packet on
//! unchanged (`TC_ACT_UNSPEC`, i.e. "next program / default action"), so they coexist
//! with programs of other owners on the same hook. Per-gateway flow tracking builds on
//! this in the gateway-health work.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    btf_maps::PerCpuArray,
    macros::{btf_map, classifier},
    programs::TcContext,
};
use routing_agent_common::{DIRECTION_EGRESS, DIRECTION_INGRESS, DIRECTIONS, TrafficCounters};

#[btf_map]
static RA_TRAFFIC: PerCpuArray<TrafficCounters, { DIRECTIONS as usize }> = PerCpuArray::new();

#[classifier]
pub fn ra_egress(ctx: TcContext) -> i32 {
    count(&ctx, DIRECTION_EGRESS);
    TC_ACT_UNSPEC
}

#[classifier]
pub fn ra_ingress(ctx: TcContext) -> i32 {
    count(&ctx, DIRECTION_INGRESS);
    TC_ACT_UNSPEC
}

#[inline(always)]
fn count(ctx: &TcContext, direction: u32) {
    if let Some(counters) = RA_TRAFFIC.get_ptr_mut(direction) {
        // SAFETY: the pointer comes from a successful lookup in a per-CPU map, so it is
        // valid and only this CPU writes through it while the program runs.
        unsafe {
            (*counters).packets += 1;
            (*counters).bytes += u64::from(ctx.len());
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
