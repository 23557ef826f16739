//! Routes through rtnetlink: dump the agent's own routes, add/replace/delete one, and look
//! up how a gateway is reached.
use std::net::IpAddr;

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::{
    AddressFamily,
    route::{
        RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteNextHop, RouteProtocol,
        RouteScope, RouteType,
    },
};
use rtnetlink::{Handle, IpVersion};

use super::diff::{Hop, Target};
use super::monitor::attrs;
use super::nexthop::NlError;

/// Where the agent's routes live and how they are marked.
#[derive(Clone, Copy, Debug)]
pub struct RouteKey {
    pub protocol: u8,
    pub table: u32,
    pub metric: u32,
}

/// IPv6 routes added with metric 0 get this one (`IP6_RT_PRIO_USER`).
const IP6_DEFAULT_METRIC: u32 = 1024;

impl RouteKey {
    /// The metric the kernel gives the agent's real route to `dst`: the configured one,
    /// or 1024 for an IPv6 route configured with 0. Always given explicitly: an IPv6
    /// delete without a metric would remove whichever of the agent's routes comes first.
    pub fn metric_of(&self, dst: &IpNet) -> u32 {
        match dst {
            IpNet::V6(_) if self.metric == 0 => IP6_DEFAULT_METRIC,
            _ => self.metric,
        }
    }

    /// The metric of the fail-closed standby route to `dst`: just worse than the real one,
    /// so that it carries nothing while the real route is there and refuses the traffic
    /// the moment the kernel drops it.
    pub fn standby_metric_of(&self, dst: &IpNet) -> u32 {
        self.metric_of(dst).saturating_add(1)
    }
}

pub fn nl_error(e: rtnetlink::Error) -> NlError {
    match e {
        rtnetlink::Error::NetlinkError(m) => NlError {
            errno: m.raw_code().abs(),
            message: None,
        },
        other => NlError {
            errno: libc::EIO,
            message: Some(other.to_string()),
        },
    }
}

fn addr(a: IpAddr) -> RouteAddress {
    match a {
        IpAddr::V4(a) => RouteAddress::Inet(a),
        IpAddr::V6(a) => RouteAddress::Inet6(a),
    }
}

fn family(a: &IpAddr) -> AddressFamily {
    match a {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn table_of(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table))
}

fn base_message(key: RouteKey, dst: IpNet) -> RouteMessage {
    message_at(key, dst, key.metric_of(&dst), RouteType::Unicast)
}

fn message_at(key: RouteKey, dst: IpNet, metric: u32, kind: RouteType) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = family(&dst.addr());
    m.header.destination_prefix_length = dst.prefix_len();
    m.header.table = u8::try_from(key.table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
    m.header.protocol = RouteProtocol::from(key.protocol);
    m.header.scope = RouteScope::Universe;
    m.header.kind = kind;
    if dst.prefix_len() > 0 {
        m.attributes
            .push(RouteAttribute::Destination(addr(dst.addr())));
    }
    m.attributes.push(RouteAttribute::Table(key.table));
    if metric != 0 {
        m.attributes.push(RouteAttribute::Priority(metric));
    }
    m
}

fn with_target(mut m: RouteMessage, target: &Target) -> RouteMessage {
    match target {
        Target::Nhid(id) => m.attributes.push(RouteAttribute::NhId(*id)),
        Target::Hops(hops) if hops.len() == 1 => {
            m.attributes.push(RouteAttribute::Gateway(addr(hops[0].0)));
            m.attributes.push(RouteAttribute::Oif(hops[0].1));
        }
        Target::Hops(hops) => {
            let nhs = hops
                .iter()
                .map(|(gw, oif)| {
                    let mut nh = RouteNextHop::default();
                    nh.interface_index = *oif;
                    nh.attributes.push(RouteAttribute::Gateway(addr(*gw)));
                    nh
                })
                .collect();
            m.attributes.push(RouteAttribute::MultiPath(nhs));
        }
    }
    m
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

/// A route as dumped, whoever owns it.
#[derive(Clone, Debug)]
pub struct Dumped {
    pub protocol: u8,
    pub table: u32,
    pub dst: IpNet,
    pub target: Target,
    pub metric: u32,
    pub unicast: bool,
    /// An `unreachable` route (the agent's fail-closed standby routes are).
    pub unreachable: bool,
}

fn parse(m: &RouteMessage) -> Option<Dumped> {
    let len = m.header.destination_prefix_length;
    let dst_addr = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Destination(d) => route_addr(d),
            _ => None,
        })
        .unwrap_or(match m.header.address_family {
            AddressFamily::Inet6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
            _ => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        });
    let dst = IpNet::new(dst_addr, len).ok()?;
    let (mut gw, mut oif, mut hops, mut nhid) = (None, None, None, None);
    for a in &m.attributes {
        match a {
            RouteAttribute::NhId(id) => nhid = Some(*id),
            RouteAttribute::Gateway(g) => gw = route_addr(g),
            RouteAttribute::Oif(o) => oif = Some(*o),
            RouteAttribute::MultiPath(nhs) => {
                let mut v: Vec<Hop> = nhs
                    .iter()
                    .filter_map(|nh| {
                        nh.attributes.iter().find_map(|a| match a {
                            RouteAttribute::Gateway(g) => {
                                route_addr(g).map(|g| (g, nh.interface_index))
                            }
                            _ => None,
                        })
                    })
                    .collect();
                v.sort();
                hops = Some(v);
            }
            _ => {}
        }
    }
    let target = if let Some(id) = nhid {
        Target::Nhid(id)
    } else if let Some(h) = hops {
        Target::Hops(h)
    } else {
        Target::Hops(gw.zip(oif).into_iter().collect())
    };
    let metric = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Priority(p) => Some(*p),
            _ => None,
        })
        .unwrap_or(0);
    Some(Dumped {
        protocol: u8::from(m.header.protocol),
        table: table_of(m),
        dst,
        target,
        metric,
        unicast: m.header.kind == RouteType::Unicast,
        unreachable: m.header.kind == RouteType::Unreachable,
    })
}

/// Every route of every table, both families.
pub async fn dump_all(handle: &Handle) -> Result<Vec<Dumped>, NlError> {
    let mut out = Vec::new();
    for v in [IpVersion::V4, IpVersion::V6] {
        let mut req = handle
            .route()
            .get(rtnetlink::RouteMessageBuilder::<IpAddr>::new().build());
        req.message_mut().header.address_family = match v {
            IpVersion::V4 => AddressFamily::Inet,
            IpVersion::V6 => AddressFamily::Inet6,
        };
        let mut stream = req.execute();
        while let Some(m) = stream.try_next().await.map_err(nl_error)? {
            out.extend(parse(&m));
        }
    }
    Ok(out)
}

/// The agent's routes (both families) in its table, marked with its protocol. On a
/// `strict` handle (`NETLINK_GET_STRICT_CHK`) the kernel filters the dump by table and
/// protocol itself, so its cost follows the agent's routes, not the node's; the filter
/// here makes either handle give the same answer.
pub async fn dump_owned(handle: &Handle, key: RouteKey) -> Result<Vec<Dumped>, NlError> {
    let mut out = Vec::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut req = handle
            .route()
            .get(rtnetlink::RouteMessageBuilder::<IpAddr>::new().build());
        let m = req.message_mut();
        m.header.address_family = family;
        m.header.protocol = RouteProtocol::from(key.protocol);
        m.header.table = u8::try_from(key.table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
        // Any type (the standby routes are `unreachable`), any scope: no filter on these.
        m.header.kind = RouteType::Unspec;
        m.header.scope = RouteScope::Universe;
        m.attributes.push(RouteAttribute::Table(key.table));
        let mut stream = req.execute();
        while let Some(m) = stream.try_next().await.map_err(nl_error)? {
            out.extend(parse(&m).filter(|d| d.protocol == key.protocol && d.table == key.table));
        }
    }
    Ok(out)
}

pub async fn add(
    handle: &Handle,
    key: RouteKey,
    dst: IpNet,
    target: &Target,
    replace: bool,
) -> Result<(), NlError> {
    let req = handle
        .route()
        .add(with_target(base_message(key, dst), target));
    let req = if replace { req.replace() } else { req };
    req.execute().await.map_err(nl_error)
}

pub async fn del(handle: &Handle, key: RouteKey, dst: IpNet) -> Result<(), NlError> {
    handle
        .route()
        .del(base_message(key, dst))
        .execute()
        .await
        .map_err(nl_error)
}

/// Adds the fail-closed standby route to `dst`: `unreachable`, at the standby metric.
pub async fn add_standby(handle: &Handle, key: RouteKey, dst: IpNet) -> Result<(), NlError> {
    handle
        .route()
        .add(message_at(
            key,
            dst,
            key.standby_metric_of(&dst),
            RouteType::Unreachable,
        ))
        .execute()
        .await
        .map_err(nl_error)
}

/// Deletes the agent's route to `dst` at `metric`, of type unreachable or unicast.
pub async fn del_at(
    handle: &Handle,
    key: RouteKey,
    dst: IpNet,
    metric: u32,
    unreachable: bool,
) -> Result<(), NlError> {
    let kind = if unreachable {
        RouteType::Unreachable
    } else {
        RouteType::Unicast
    };
    handle
        .route()
        .del(message_at(key, dst, metric, kind))
        .execute()
        .await
        .map_err(nl_error)
}

/// How `gateway` is reached: the interface of a directly connected network, or why not.
pub async fn resolve_gateway(handle: &Handle, gateway: IpAddr) -> Result<u32, String> {
    let mut m = RouteMessage::default();
    m.header.address_family = family(&gateway);
    m.header.destination_prefix_length = if gateway.is_ipv4() { 32 } else { 128 };
    m.attributes
        .push(RouteAttribute::Destination(addr(gateway)));
    let reply = match handle.route().get(m).execute().try_next().await {
        Ok(Some(r)) => r,
        Ok(None) => return Err("the kernel gave no route to it".into()),
        Err(e) => {
            let e = nl_error(e);
            return Err(format!("no route to it ({e})"));
        }
    };
    match reply.header.kind {
        RouteType::Unicast => {}
        RouteType::Local => return Err("it is an address of this node".into()),
        other => return Err(format!("the route to it is of type {other:?}")),
    }
    let via = reply.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(g) => route_addr(g),
        _ => None,
    });
    if let Some(via) = via {
        return Err(format!(
            "it is not on a directly connected network (reached via {via})"
        ));
    }
    reply
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Oif(o) => Some(*o),
            _ => None,
        })
        .ok_or_else(|| "the kernel named no interface for it".into())
}

/// A dump of routes on a raw netlink socket, decoding only what [`Dumped`] holds, one
/// message at a time. Written by hand for speed and memory, not for want of a crate: a
/// fresh pass at 10,000 prefixes dumps 20,000 routes (real and standby, and the kernel
/// adds each `nhid` route's hops inline, `nexthop_compat_mode`), and rtnetlink's generic
/// decoder allocates every attribute of every message: most of the pass went there
/// (measured with perf). And netlink-proto decodes a whole dump ahead of its reader, so a
/// dump of every route through rtnetlink (the node facts) held all 10,000 decoded
/// messages at once: 11 MiB of the agent's peak (measured with heaptrack). For the agent's
/// own routes the kernel filters the dump by table and protocol (`NETLINK_GET_STRICT_CHK`).
pub struct RouteDumper {
    socket: netlink_sys::Socket,
    seq: std::sync::atomic::AtomicU32,
}

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PRIORITY: u16 = 6;
const RTA_MULTIPATH: u16 = 9;
const RTA_TABLE: u16 = 15;
const RTA_NH_ID: u16 = 30;

fn raw_addr(family: u8, v: &[u8]) -> Option<IpAddr> {
    match (family, v.len()) {
        (2, 4) => Some(IpAddr::from(<[u8; 4]>::try_from(v).ok()?)),
        (10, 16) => Some(IpAddr::from(<[u8; 16]>::try_from(v).ok()?)),
        _ => None,
    }
}

fn raw_u32(v: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(v.get(..4)?.try_into().ok()?))
}

/// One RTM_NEWROUTE payload (`struct rtmsg` + attributes).
fn parse_raw(p: &[u8]) -> Option<Dumped> {
    if p.len() < 12 {
        return None;
    }
    let (family, dst_len, table8, protocol, kind) = (p[0], p[1], p[4], p[5], p[7]);
    let (mut dst, mut table, mut metric) = (None, u32::from(table8), 0);
    let (mut gw, mut oif, mut nhid, mut hops) = (None, None, None, None);
    for (k, v) in attrs(&p[12..]) {
        match k {
            RTA_DST => dst = raw_addr(family, v),
            RTA_TABLE => table = raw_u32(v)?,
            RTA_PRIORITY => metric = raw_u32(v)?,
            RTA_GATEWAY => gw = raw_addr(family, v),
            RTA_OIF => oif = raw_u32(v),
            RTA_NH_ID => nhid = raw_u32(v),
            RTA_MULTIPATH => {
                // struct rtnexthop { u16 len; u8 flags; u8 hops; i32 ifindex } + attributes.
                let mut list = Vec::new();
                let mut off = 0;
                while off + 8 <= v.len() {
                    let len = u16::from_ne_bytes([v[off], v[off + 1]]) as usize;
                    if len < 8 || off + len > v.len() {
                        break;
                    }
                    let ifindex = raw_u32(&v[off + 4..off + 8])?;
                    let gateway = attrs(&v[off + 8..off + len])
                        .find(|(k, _)| *k == RTA_GATEWAY)
                        .and_then(|(_, a)| raw_addr(family, a));
                    if let Some(g) = gateway {
                        list.push((g, ifindex));
                    }
                    off += (len + 3) & !3;
                }
                list.sort();
                hops = Some(list);
            }
            _ => {}
        }
    }
    let unspecified = match family {
        10 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        _ => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
    };
    let dst = IpNet::new(dst.unwrap_or(unspecified), dst_len).ok()?;
    let target = match (nhid, hops) {
        (Some(id), _) => Target::Nhid(id),
        (None, Some(h)) => Target::Hops(h),
        (None, None) => Target::Hops(gw.zip(oif).into_iter().collect()),
    };
    Some(Dumped {
        protocol,
        table,
        dst,
        target,
        metric,
        unicast: kind == u8::from(RouteType::Unicast),
        unreachable: kind == u8::from(RouteType::Unreachable),
    })
}

impl RouteDumper {
    pub fn new() -> Result<Self, NlError> {
        let io = |e: std::io::Error| NlError {
            errno: e.raw_os_error().unwrap_or(libc::EIO),
            message: Some(e.to_string()),
        };
        let mut socket =
            netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_ROUTE).map_err(io)?;
        socket.bind_auto().map_err(io)?;
        socket
            .connect(&netlink_sys::SocketAddr::new(0, 0))
            .map_err(io)?;
        // Without it (kernels before 4.20) the kernel sends every route; the filter below
        // keeps the answer the same.
        let _ = socket.set_netlink_get_strict_chk(true);
        let _ = socket.set_ext_ack(true);
        Ok(RouteDumper {
            socket,
            seq: std::sync::atomic::AtomicU32::new(0),
        })
    }

    /// The agent's routes (both families) in its table, marked with its protocol.
    pub fn dump(&self, key: RouteKey) -> Result<Vec<Dumped>, NlError> {
        let mut out = Vec::new();
        self.each(Some(key), |d| out.push(d))?;
        Ok(out)
    }

    /// Every route of both families, handed to `f` as it is decoded: `only` keeps the
    /// agent's table and protocol (the kernel filters), `None` is every route of every
    /// table.
    pub fn each(&self, only: Option<RouteKey>, mut f: impl FnMut(Dumped)) -> Result<(), NlError> {
        let io = |e: std::io::Error| NlError {
            errno: e.raw_os_error().unwrap_or(libc::EIO),
            message: Some(e.to_string()),
        };
        for family in [2u8, 10u8] {
            let seq = self
                .seq
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                .wrapping_add(1);
            let (table8, protocol) = match only {
                Some(key) => (u8::try_from(key.table).unwrap_or(0), key.protocol),
                None => (0, 0),
            };
            let len = NLMSG_HDRLEN + 12 + if only.is_some() { 8 } else { 0 };
            let mut req = Vec::with_capacity(len);
            req.extend_from_slice(&(len as u32).to_ne_bytes());
            req.extend_from_slice(&RTM_GETROUTE.to_ne_bytes());
            let flags = netlink_packet_core::NLM_F_REQUEST | netlink_packet_core::NLM_F_DUMP;
            req.extend_from_slice(&flags.to_ne_bytes());
            req.extend_from_slice(&seq.to_ne_bytes());
            req.extend_from_slice(&0u32.to_ne_bytes());
            // rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
            req.extend_from_slice(&[family, 0, 0, 0, table8, protocol, 0, 0]);
            req.extend_from_slice(&0u32.to_ne_bytes());
            if let Some(key) = only {
                req.extend_from_slice(&8u16.to_ne_bytes());
                req.extend_from_slice(&RTA_TABLE.to_ne_bytes());
                req.extend_from_slice(&key.table.to_ne_bytes());
            }
            self.socket.send(&req, 0).map_err(io)?;
            'recv: loop {
                let (data, _) = self.socket.recv_from_full().map_err(io)?;
                let mut off = 0;
                while off + NLMSG_HDRLEN <= data.len() {
                    let len = u32::from_ne_bytes(data[off..off + 4].try_into().unwrap()) as usize;
                    if len < NLMSG_HDRLEN || off + len > data.len() {
                        break;
                    }
                    let kind = u16::from_ne_bytes([data[off + 4], data[off + 5]]);
                    let mseq = u32::from_ne_bytes(data[off + 8..off + 12].try_into().unwrap());
                    let payload = &data[off + NLMSG_HDRLEN..off + len];
                    off += (len + 3) & !3;
                    if mseq != seq {
                        continue;
                    }
                    match kind {
                        NLMSG_DONE => break 'recv,
                        NLMSG_ERROR => {
                            let code = payload
                                .get(..4)
                                .map(|c| i32::from_ne_bytes(c.try_into().unwrap()))
                                .unwrap_or(-libc::EIO);
                            if code != 0 {
                                return Err(NlError {
                                    errno: -code,
                                    message: Some("dumping the routes".into()),
                                });
                            }
                            break 'recv;
                        }
                        RTM_NEWROUTE => {
                            if let Some(d) = parse_raw(payload).filter(|d| {
                                only.is_none_or(|k| d.protocol == k.protocol && d.table == k.table)
                            }) {
                                f(d)
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(())
    }
}
