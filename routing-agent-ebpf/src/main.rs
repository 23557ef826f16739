//! TC programs of the routing agent: per-gateway traffic counters and TCP handshake
//! tracking on the interfaces that face gateways.
//!
//! Attribution: user space fills `RA_NEIGH` with (ifindex, MAC) → gateway slot from the
//! neighbour table. On egress the destination MAC names the gateway a packet is handed to;
//! on ingress the source MAC names the gateway it came from. Packets of other neighbours
//! are not touched (one hash lookup, then out).
//!
//! Handshakes (`RA_FLOWS`, LRU): a first SYN through gateway G starts an attempt; a SYN-ACK
//! from G's side establishes it (`established`), a RST ends it (`rst`, entry deleted); a
//! retransmitted SYN of an attempt still waiting, or an ICMP destination-unreachable
//! quoting it, marks it `failed` (once per attempt). Established connections stay in the
//! map (until a RST or LRU eviction) so that egress can keep them on their gateway (see
//! `pinned`).
//!
//! Every program returns `TC_ACT_UNSPEC` (never drops, never redirects; the only write is
//! the destination MAC of a pinned packet), so it coexists with programs of other owners
//! on the same hook.
#![no_std]
#![no_main]
// Map keys are passed by reference on purpose: no copies of 40-byte keys on the 512-byte
// BPF stack.
#![allow(clippy::needless_borrows_for_generic_args)]

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_FIB_LKUP_RET_BLACKHOLE, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_PROHIBIT,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LKUP_RET_UNREACHABLE, BPF_FIB_LOOKUP_DIRECT,
        BPF_FIB_LOOKUP_OUTPUT, BPF_NOEXIST, TC_ACT_SHOT, TC_ACT_UNSPEC, bpf_fib_lookup,
    },
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray},
    helpers::{bpf_fib_lookup as fib_lookup, bpf_ktime_get_ns},
    macros::{btf_map, classifier},
    programs::TcContext,
};
use routing_agent_common::{
    FLOW_ESTABLISHED, FLOW_FAILED, FLOW_PENDING, FlowKey, FlowState, GW_UP, GatewayInfo,
    GatewaySlot, GatewayStats, MAX_FLOWS, MAX_GATEWAYS, MAX_NEIGHBOURS, NeighKey, ProbeTarget,
};

#[btf_map]
static RA_NEIGH: HashMap<NeighKey, GatewaySlot, { MAX_NEIGHBOURS as usize }> = HashMap::new();

#[btf_map]
static RA_GW_STATS: PerCpuArray<GatewayStats, { MAX_GATEWAYS as usize }> = PerCpuArray::new();

#[btf_map]
static RA_FLOWS: LruHashMap<FlowKey, FlowState, { MAX_FLOWS as usize }> = LruHashMap::new();

/// Packets `ra_uplink` refused, per CPU (index 0).
#[btf_map]
static RA_UPLINK: PerCpuArray<u64, 1> = PerCpuArray::new();

/// Per gateway and CPU: the latest connection a SYN-ACK answered through it (the target of
/// user space's forwarding probes). Per CPU: no torn entry, no shared cache line.
#[btf_map]
static RA_TARGETS: PerCpuArray<ProbeTarget, { MAX_GATEWAYS as usize }> = PerCpuArray::new();

/// Written by user space only (read here for flow pinning); declared here so that it is
/// part of the object and pinned with the others.
#[btf_map]
static RA_GATEWAYS: Array<GatewayInfo, { MAX_GATEWAYS as usize }> = Array::new();

const ETH_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

#[classifier]
pub fn ra_egress(ctx: TcContext) -> i32 {
    let _ = handle(&ctx, true);
    TC_ACT_UNSPEC
}

#[classifier]
pub fn ra_ingress(ctx: TcContext) -> i32 {
    let _ = handle(&ctx, false);
    TC_ACT_UNSPEC
}

/// The fail-closed guard on the node's own uplink (egress of the public interface, while an
/// IPv6 default-route override with symmetric routing is in force): an IPv6 packet leaving
/// through it whose destination the **main** table refuses (an `unreachable`, `blackhole`
/// or `prohibit` route: the agent's standby route of a destination with no usable gateway)
/// is dropped.
///
/// Why it is needed: when an IPv6 connect()'s first route lookup fails, the kernel picks a
/// source address among all of the node's and looks the route up again with it
/// (`ip6_dst_lookup_tail`). That source is usually the public address, and the symmetric
/// routing rule (`from <public address> lookup 135`) then sends the connection out of the
/// uplink. No route or rule can tell such a packet from a reply to an inbound connection;
/// the main table can, at the moment the packet leaves. IPv4 looks up once and fails.
///
/// A new TCP connection (a SYN without ACK) leaving here also needs the main table to
/// route its destination through this very interface: one that took the fallback during
/// the outage is bound to the public address, and its retransmitted SYNs would otherwise
/// leave by the uplink once the gateways are back. (So, under an IPv6 override, a
/// connection a process opens from the public address on purpose goes out here only to
/// what the main table sends here: protected destinations, connected networks.) Other
/// packets the main table routes (replies, protected destinations, connected networks)
/// pass untouched.
#[classifier]
pub fn ra_uplink(ctx: TcContext) -> i32 {
    match refused_by_main(&ctx) {
        Ok(true) => {
            if let Some(n) = RA_UPLINK.get_ptr_mut(0) {
                // SAFETY: this CPU's value of a per-CPU map.
                unsafe { *n += 1 };
            }
            TC_ACT_SHOT
        }
        _ => TC_ACT_UNSPEC,
    }
}

#[inline(always)]
fn refused_by_main(ctx: &TcContext) -> Result<bool, ()> {
    let eth: [u8; ETH_LEN] = read(ctx, 0)?;
    if u16::from_be_bytes([eth[12], eth[13]]) != ETH_P_IPV6 {
        return Ok(false);
    }
    let h: [u8; 40] = read(ctx, ETH_LEN)?;
    // Link-local and multicast destinations are never routed by the agent.
    if h[24] == 0xff || (h[24] == 0xfe && h[25] & 0xc0 == 0x80) {
        return Ok(false);
    }
    let word = |b: &[u8]| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
    // SAFETY: plain data; every field the helper reads is set or zero.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = 10; // AF_INET6
    params.l4_protocol = h[6];
    // SAFETY: the context pointer is valid for the program's run.
    let here = unsafe { (*ctx.skb.skb).ifindex };
    params.ifindex = here;
    // A TCP SYN without ACK (no extension headers followed): a new connection.
    let syn = h[6] == IPPROTO_TCP
        && read::<[u8; 14]>(ctx, ETH_LEN + 40)
            .is_ok_and(|tcp| tcp[13] & (TCP_SYN | TCP_ACK) == TCP_SYN);
    for i in 0..4 {
        // SAFETY: writes to plain unions of integers.
        unsafe {
            params.__bindgen_anon_3.ipv6_src[i] = word(&h[8 + 4 * i..]);
            params.__bindgen_anon_4.ipv6_dst[i] = word(&h[24 + 4 * i..]);
        }
    }
    // SAFETY: a valid skb context and a parameter block of the size given.
    let ret = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &mut params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_DIRECT | BPF_FIB_LOOKUP_OUTPUT,
        )
    };
    let refused = ret == BPF_FIB_LKUP_RET_UNREACHABLE as i64
        || ret == BPF_FIB_LKUP_RET_BLACKHOLE as i64
        || ret == BPF_FIB_LKUP_RET_PROHIBIT as i64;
    let routed_elsewhere = (ret == BPF_FIB_LKUP_RET_SUCCESS as i64
        || ret == BPF_FIB_LKUP_RET_NO_NEIGH as i64)
        && params.ifindex != here;
    Ok(refused || (syn && routed_elsewhere))
}

/// What a packet carries that matters here, addresses as (source, destination).
struct Packet {
    family: u8,
    src: [u8; 16],
    dst: [u8; 16],
    proto: u8,
    /// Offset of the L4 header.
    l4: usize,
}

#[inline(always)]
fn handle(ctx: &TcContext, egress: bool) -> Result<(), ()> {
    let eth: [u8; ETH_LEN] = read(ctx, 0)?;
    // SAFETY: the context pointer is valid for the program's run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let ethertype = u16::from_be_bytes([eth[12], eth[13]]);
    let family = match ethertype {
        ETH_P_IP => 4,
        ETH_P_IPV6 => 6,
        // ARP and the rest: not traffic through a gateway.
        _ => return Ok(()),
    };
    let key = NeighKey {
        ifindex,
        mac: if egress {
            [eth[0], eth[1], eth[2], eth[3], eth[4], eth[5]]
        } else {
            [eth[6], eth[7], eth[8], eth[9], eth[10], eth[11]]
        },
        family,
        _pad: 0,
    };
    // SAFETY: the value is plain data copied out at once.
    let mut slot = match unsafe { RA_NEIGH.get(&key) } {
        Some(s) => s.slot,
        None => return Ok(()),
    };
    let p = parse_ip(ctx, ethertype, ETH_LEN).ok();
    // TCP: ports (bytes 0..4) and the flags byte (13), in one load.
    let tcp: Option<[u8; 14]> = match &p {
        Some(p) if p.proto == IPPROTO_TCP => read(ctx, p.l4).ok(),
        _ => None,
    };
    let (flags, sport, dport, seq) = match &tcp {
        Some(h) => (
            h[13],
            u16::from_be_bytes([h[0], h[1]]),
            u16::from_be_bytes([h[2], h[3]]),
            u32::from_be_bytes([h[4], h[5], h[6], h[7]]),
        ),
        None => (0, 0, 0, 0),
    };
    // Egress TCP: the connection's entry, looked up once for pinning and for the SYN.
    let mut flow: Option<(FlowKey, Option<*mut FlowState>)> = None;
    let mut steered = false;
    if egress
        && tcp.is_some()
        && let Some(p) = &p
    {
        let key = flow_key(p.family, p.src, p.dst, sport, dport);
        let f = RA_FLOWS.get_ptr_mut(&key);
        if let Some(f) = f
            && let Some(to) = pinned(ctx, ifindex, f, flags, seq, slot)
        {
            slot = to;
            steered = true;
        }
        flow = Some((key, f));
    }
    let stats = RA_GW_STATS.get_ptr_mut(slot).ok_or(())?;
    let len = u64::from(ctx.len());
    // SAFETY: per-CPU value of a successful lookup; only this CPU writes it while we run.
    unsafe {
        if egress {
            (*stats).tx_packets += 1;
            (*stats).tx_bytes += len;
            if steered {
                (*stats).steered_back += 1;
            }
        } else {
            (*stats).rx_packets += 1;
            (*stats).rx_bytes += len;
        }
    }
    let Some(p) = p else { return Ok(()) };
    if let Some((key, f)) = &flow {
        if flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
            syn_out(key, *f, slot, seq, stats);
        } else if flags & TCP_RST != 0 && f.is_some() {
            let _ = RA_FLOWS.remove(key);
        }
    } else if tcp.is_some() {
        // Ingress: a SYN-ACK or a RST answers a connection of ours, keyed from our side.
        let syn_ack = flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK;
        if syn_ack || flags & TCP_RST != 0 {
            let key = flow_key(p.family, p.dst, p.src, dport, sport);
            answer(&key, slot, stats, !syn_ack);
        }
    } else if !egress && (p.proto == IPPROTO_ICMP || p.proto == IPPROTO_ICMPV6) {
        let t: u8 = ctx.load(p.l4).map_err(|_| ())?;
        let unreachable = if p.family == 4 { t == 3 } else { t == 1 };
        if unreachable {
            // SAFETY: as above.
            unsafe { (*stats).icmp_unreachable += 1 };
            icmp_quote(ctx, &p, slot, stats)?;
        }
    }
    Ok(())
}

/// Flow pinning. A TCP packet of a known connection (`f`) that the kernel hands to another
/// gateway than the one its connection started on goes back to that gateway, by rewriting
/// the destination MAC, as long as that gateway is up and on this interface. Returns the
/// slot the packet now goes to.
///
/// Why: every FIB change (a withdrawal, any route edit) makes established sockets look
/// their route up again, by the 5-tuple hash; on recent kernels (6.18 in the lab) the
/// route of a connect() with a kernel-chosen source port does not follow that hash, so
/// after the next FIB change about (n-1)/n of the connections would move to another
/// gateway, whose masquerade address breaks them. (Hash-threshold `RTA_MULTIPATH` routes
/// and resilient groups that gain a member move some connections on any kernel.) A SYN is
/// pinned only as a retransmission of the recorded attempt (same initial sequence number):
/// a SYN on a 4-tuple whose old connection or old attempt is still recorded is a new
/// connection, and goes where its route says (after a Route edit that dropped the old
/// gateway, a reused source port would otherwise keep sending new connections there).
#[inline(always)]
fn pinned(
    ctx: &TcContext,
    ifindex: u32,
    f: *mut FlowState,
    flags: u8,
    seq: u32,
    slot: u32,
) -> Option<u32> {
    // SAFETY: `f` comes from a successful lookup; plain data read at once.
    let (pin, state, isn) = unsafe { ((*f).slot, (*f).state, (*f).isn) };
    if pin == slot
        || (flags & (TCP_SYN | TCP_ACK) == TCP_SYN && (state == FLOW_ESTABLISHED || isn != seq))
    {
        return None;
    }
    let g = RA_GATEWAYS.get(pin)?;
    if g.state != GW_UP || g.ifindex != ifindex || g.mac == [0; 6] {
        return None;
    }
    ctx.store(0, &g.mac, 0).ok()?;
    Some(pin)
}

/// `size_of::<T>()` bytes at `off`: read in place when they lie in the linear part of the
/// packet (the usual case: no helper call), copied out with `bpf_skb_load_bytes` otherwise.
#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, off: usize) -> Result<T, ()> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if off < 128 {
        // The offset masked to 0..=127 (the same value here) through a volatile load, so
        // that LLVM keeps the mask: older verifiers (6.1) also walk branches they could
        // prove impossible, and an offset whose known bounds contradict each other turns
        // `data + off` into an unknown scalar there ("R1 invalid mem access 'scalar'").
        // SAFETY: reads a local.
        let o = unsafe { core::ptr::read_volatile(&off) } & 0x7f;
        if start + o + core::mem::size_of::<T>() <= end {
            // SAFETY: the bytes lie between data and data_end (checked just above, in a
            // form the verifier follows).
            return Ok(unsafe { core::ptr::read_unaligned((start + o) as *const T) });
        }
    }
    ctx.load(off).map_err(|_| ())
}

/// Parses the IPv4 or IPv6 header at `off`. IPv6 extension headers and non-first IPv4
/// fragments are not followed (reported as protocol 0).
#[inline(always)]
fn parse_ip(ctx: &TcContext, ethertype: u16, off: usize) -> Result<Packet, ()> {
    let mut p = Packet {
        family: 0,
        src: [0; 16],
        dst: [0; 16],
        proto: 0,
        l4: 0,
    };
    if ethertype == ETH_P_IP {
        let h: [u8; 20] = read(ctx, off)?;
        if h[0] >> 4 != 4 {
            return Err(());
        }
        p.family = 4;
        p.src[..4].copy_from_slice(&h[12..16]);
        p.dst[..4].copy_from_slice(&h[16..20]);
        let frag_off = u16::from_be_bytes([h[6], h[7]]) & 0x1fff;
        p.proto = if frag_off == 0 { h[9] } else { 0 };
        p.l4 = off + usize::from(h[0] & 0x0f) * 4;
    } else if ethertype == ETH_P_IPV6 {
        let h: [u8; 40] = read(ctx, off)?;
        p.family = 6;
        p.src.copy_from_slice(&h[8..24]);
        p.dst.copy_from_slice(&h[24..40]);
        p.proto = h[6];
        p.l4 = off + 40;
    } else {
        return Err(());
    }
    Ok(p)
}

#[inline(always)]
fn flow_key(family: u8, local: [u8; 16], remote: [u8; 16], lport: u16, rport: u16) -> FlowKey {
    FlowKey {
        local,
        remote,
        local_port: lport,
        remote_port: rport,
        family,
        _pad: [0; 3],
    }
}

/// A SYN of connection `key` (initial sequence number `seq`) leaving through gateway
/// `slot`; `flow` is its entry, if any.
#[inline(always)]
fn syn_out(
    key: &FlowKey,
    flow: Option<*mut FlowState>,
    slot: u32,
    seq: u32,
    stats: *mut GatewayStats,
) {
    match flow {
        Some(f) => {
            // SAFETY: the entry may be updated concurrently by another CPU; a lost update
            // costs at most one count, never memory safety (plain integers).
            unsafe {
                let reused = (*f).state == FLOW_ESTABLISHED || (*f).isn != seq;
                if reused || (*f).slot != slot {
                    // A new attempt: the 4-tuple reused by a new connection (after an
                    // established one, or after an attempt with another initial sequence
                    // number), or the attempt re-routed through another gateway (its own
                    // was withdrawn).
                    (*f).slot = slot;
                    (*f).state = FLOW_PENDING;
                    if reused {
                        (*f).started_ns = bpf_ktime_get_ns();
                        (*f).isn = seq;
                    }
                    (*stats).syn_sent += 1;
                } else {
                    fail_once(f, stats);
                }
            }
        }
        None => {
            let v = FlowState {
                slot,
                state: FLOW_PENDING,
                // SAFETY: helper without preconditions.
                started_ns: unsafe { bpf_ktime_get_ns() },
                isn: seq,
                _pad: 0,
            };
            if RA_FLOWS.insert(key, &v, u64::from(BPF_NOEXIST)).is_ok() {
                // SAFETY: per-CPU value, see `handle`.
                unsafe { (*stats).syn_sent += 1 };
            }
        }
    }
}

/// A SYN-ACK or RST arriving from gateway `slot` for connection `key`.
#[inline(always)]
fn answer(key: &FlowKey, slot: u32, stats: *mut GatewayStats, rst: bool) {
    let Some(f) = RA_FLOWS.get_ptr_mut(key) else {
        return;
    };
    // SAFETY: see `syn_out`; `stats` is this CPU's per-CPU value.
    unsafe {
        let attempt = (*f).state != FLOW_ESTABLISHED;
        if attempt && (*f).slot != slot {
            // Not an answer to the attempt through this gateway.
            return;
        }
        if rst {
            // The attempt or the connection is over (a connection reset through another
            // gateway too: it had moved there, its pin is worthless).
            if RA_FLOWS.remove(key).is_ok() && attempt {
                (*stats).rst += 1;
            }
        } else if attempt {
            // Kept, for pinning, until a RST or LRU eviction.
            (*f).state = FLOW_ESTABLISHED;
            (*stats).established += 1;
            if let Some(t) = RA_TARGETS.get_ptr_mut(slot) {
                (*t).addr = key.remote;
                (*t).port = key.remote_port;
                (*t).family = key.family;
                (*t).seen_ns = bpf_ktime_get_ns();
            }
        }
    }
}

/// An ICMP destination-unreachable from gateway `slot`: if it quotes a pending TCP attempt
/// of ours through that gateway, the attempt failed (the kernel aborts the connect at once,
/// so no SYN retransmission would tell).
#[inline(always)]
fn icmp_quote(ctx: &TcContext, p: &Packet, slot: u32, stats: *mut GatewayStats) -> Result<(), ()> {
    let inner_type = if p.family == 4 { ETH_P_IP } else { ETH_P_IPV6 };
    let q = parse_ip(ctx, inner_type, p.l4 + 8)?;
    if q.proto == IPPROTO_UDP {
        // SAFETY: this CPU's per-CPU value (see `handle`).
        unsafe { (*stats).udp_unreachable += 1 };
        return Ok(());
    }
    if q.proto != IPPROTO_TCP {
        return Ok(());
    }
    let ports: [u8; 4] = read(ctx, q.l4)?;
    let sport = u16::from_be_bytes([ports[0], ports[1]]);
    let dport = u16::from_be_bytes([ports[2], ports[3]]);
    // The quoted packet is ours: source = local.
    let key = flow_key(q.family, q.src, q.dst, sport, dport);
    if let Some(f) = RA_FLOWS.get_ptr_mut(&key)
        // SAFETY: see `syn_out`.
        && unsafe { (*f).slot } == slot
    {
        fail_once(f, stats);
    }
    Ok(())
}

/// A pending attempt failed: counted once, later signals of the same attempt are not.
#[inline(always)]
fn fail_once(f: *mut FlowState, stats: *mut GatewayStats) {
    // SAFETY: `f` comes from a successful lookup (see `syn_out` on concurrent updates);
    // `stats` is this CPU's per-CPU value.
    unsafe {
        if (*f).state == FLOW_PENDING {
            (*f).state = FLOW_FAILED;
            (*stats).failed += 1;
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
