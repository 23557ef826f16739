//! Probes of withdrawn gateways.
//!
//! - **Echo**: an ICMP echo to the gateway (surge-ping, raw ICMP sockets: root or
//!   CAP_NET_RAW, works inside a network namespace). It proves the gateway is alive, not
//!   that it forwards.
//! - **Forward**: a TCP connection attempt *through* the gateway to a destination known to
//!   answer. The socket carries a mark of the agent's (`mark_base + index`), and the
//!   agent's rule `fwmark M lookup T` (priority `rule_priority`, protocol = the agent's)
//!   sends it to table `table_base + index`, which holds one host route to the target via
//!   that gateway. So the probe leaves through the withdrawn gateway whatever the routes
//!   say, including a fail-closed `unreachable` route, a peer on another interface, or an
//!   IPv6 route. (A MAC rewrite in the egress TC program, as flow pinning does, would need
//!   the packet to reach that interface first: with every gateway of a route withdrawn it
//!   never does.) The rule and the route exist only while the probe runs; the rules an
//!   agent that died mid-probe left are swept at start. A SYN-ACK or a RST from the
//!   destination is an answer (the gateway forwarded both ways); the socket is closed with
//!   a RST (linger 0), so the destination keeps no connection.
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use netlink_packet_route::AddressFamily;
use netlink_packet_route::route::{RouteMessage, RouteProtocol};
use netlink_packet_route::rule::{RuleAction, RuleAttribute};
use rtnetlink::{Handle, RouteMessageBuilder};
use surge_ping::{Client, Config, ICMP, PingIdentifier, PingSequence};
use tracing::{debug, info, warn};

use super::dataplane::rules;

/// Where the forwarding probes' rules and tables live.
#[derive(Clone, Copy, Debug)]
pub struct Steering {
    /// The agent's route protocol id: marks the rules and routes.
    pub protocol: u8,
    /// Gateway index `i` uses table `table_base + i`…
    pub table_base: u32,
    /// …and mark `mark_base + i`.
    pub mark_base: u32,
    /// Priority of the `fwmark` rules (before the main table and the agent's others).
    pub rule_priority: u32,
}

/// Where a forwarding probe goes: through `gateway` on `oif`, to `target`; `index` picks
/// the mark and table (the gateway's slot: distinct per gateway).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forward {
    pub gateway: IpAddr,
    pub oif: u32,
    pub index: u32,
    pub target: SocketAddr,
}

#[derive(Clone)]
pub struct Prober {
    v4: Arc<Client>,
    v6: Option<Arc<Client>>,
    timeout: Duration,
    seq: Arc<AtomicU16>,
    steer: Option<(Steering, Handle)>,
    /// One forwarding probe per gateway index at a time: a probe that outlived its
    /// interval must not delete the rule of the next one while that one connects (its SYN
    /// would take the normal routes, and a peer would answer for the withdrawn gateway).
    busy: Arc<std::sync::Mutex<std::collections::BTreeMap<u32, Arc<tokio::sync::Mutex<()>>>>>,
}

impl Prober {
    /// `steering`: forwarding probes on (a netlink connection of the prober's own).
    pub async fn new(timeout: Duration, steering: Option<Steering>) -> std::io::Result<Self> {
        let raw = |kind| {
            Config::builder()
                .kind(kind)
                .sock_type_hint(socket2::Type::RAW)
                .build()
        };
        let v4 = Arc::new(Client::new(&raw(ICMP::V4))?);
        // A node without IPv6 still probes its IPv4 gateways.
        let v6 = Client::new(&raw(ICMP::V6)).ok().map(Arc::new);
        let steer = match steering {
            None => None,
            Some(s) => {
                let (conn, handle, _) = rtnetlink::new_connection()?;
                tokio::spawn(conn);
                let swept = sweep(&handle, &s).await;
                if swept > 0 {
                    info!(
                        rules = swept,
                        "removed forwarding-probe rules an earlier agent left"
                    );
                }
                Some((s, handle))
            }
        };
        Ok(Prober {
            v4,
            v6,
            timeout,
            seq: Arc::new(AtomicU16::new(0)),
            steer,
            busy: Arc::default(),
        })
    }

    /// Sends one echo request to `gw`; true when it is answered within the timeout.
    pub async fn probe(&self, gw: IpAddr) -> bool {
        let client = match gw {
            IpAddr::V4(_) => &self.v4,
            IpAddr::V6(_) => match &self.v6 {
                Some(c) => c,
                None => return false,
            },
        };
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let ident = PingIdentifier((std::process::id() as u16) ^ n.rotate_left(8));
        let mut pinger = client.pinger(gw, ident).await;
        pinger.timeout(self.timeout);
        pinger
            .ping(PingSequence(n), b"routing-agent probe")
            .await
            .is_ok()
    }

    /// One TCP connection attempt to `f.target` through `f.gateway`; true when the
    /// destination answered (SYN-ACK or RST) within the timeout. False as well when the
    /// steering could not be set up (logged).
    pub async fn forward(&self, f: Forward) -> bool {
        let Some((s, handle)) = &self.steer else {
            return false;
        };
        let lock = self
            .busy
            .lock()
            .expect("not poisoned")
            .entry(f.index)
            .or_default()
            .clone();
        let _one_at_a_time = lock.lock().await;
        let (table, mark) = (s.table_base + f.index, s.mark_base + f.index);
        let (route, mut add) = match steering(handle, s, &f, table, mark) {
            Ok(m) => m,
            Err(e) => {
                warn!(gateway = %f.gateway, target = %f.target, error = %e, "forwarding probe");
                return false;
            }
        };
        let rule = add.message_mut().clone();
        if let Err(e) = handle.route().add(route.clone()).replace().execute().await {
            warn!(gateway = %f.gateway, table, error = %e, "forwarding probe: adding its route");
            return false;
        }
        let ok = match add.execute().await {
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code().abs() == libc::EEXIST => true,
            Err(e) => {
                warn!(gateway = %f.gateway, mark, error = %e, "forwarding probe: adding its rule");
                false
            }
            Ok(()) => true,
        };
        let answered = ok && self.connect(f.target, mark).await;
        if let Err(e) = handle.rule().del(rule).execute().await {
            warn!(gateway = %f.gateway, mark, error = %e, "forwarding probe: removing its rule");
        }
        let _ = handle.route().del(route).execute().await;
        debug!(gateway = %f.gateway, target = %f.target, answered, "forwarding probe");
        answered
    }

    async fn connect(&self, target: SocketAddr, mark: u32) -> bool {
        let sock = match marked_socket(target, mark) {
            Ok(s) => s,
            Err(e) => {
                warn!(target = %target, error = %e, "forwarding probe: socket");
                return false;
            }
        };
        match tokio::time::timeout(self.timeout, sock.connect(target)).await {
            // Dropped at once: linger 0 sends a RST.
            Ok(Ok(_stream)) => true,
            Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionRefused,
            Err(_) => false,
        }
    }
}

/// A non-blocking TCP socket with `SO_MARK` (CAP_NET_ADMIN) and linger 0.
fn marked_socket(target: SocketAddr, mark: u32) -> std::io::Result<tokio::net::TcpSocket> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(target),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    s.set_mark(mark)?;
    s.set_linger(Some(Duration::ZERO))?;
    s.set_nonblocking(true)?;
    Ok(tokio::net::TcpSocket::from_std_stream(s.into()))
}

/// The host route (`target via gateway dev oif table T proto P`) and the rule (`fwmark M
/// lookup T priority R proto P`) of one probe.
fn steering(
    handle: &Handle,
    s: &Steering,
    f: &Forward,
    table: u32,
    mark: u32,
) -> Result<(RouteMessage, rtnetlink::RuleAddRequest), String> {
    let host = if f.target.is_ipv4() { 32 } else { 128 };
    let route = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(f.target.ip(), host)
        .and_then(|b| b.gateway(f.gateway))
        .map_err(|e| e.to_string())?
        .output_interface(f.oif)
        .table_id(table)
        .protocol(RouteProtocol::from(s.protocol))
        .build();
    let mut req = handle
        .rule()
        .add()
        .priority(s.rule_priority)
        .table_id(table)
        .fw_mark(mark)
        .action(RuleAction::ToTable);
    req.message_mut()
        .attributes
        .push(RuleAttribute::Protocol(RouteProtocol::from(s.protocol)));
    req.message_mut().header.family = if f.target.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    Ok((route, req))
}

/// `routing-agent cleanup`: the rules a probe left (see [`sweep`]).
pub async fn remove_leftovers(s: Steering) -> std::io::Result<usize> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(conn);
    Ok(sweep(&handle, &s).await)
}

/// Deletes the agent's rules at the probes' priority (an earlier agent died mid-probe;
/// the host routes in the probe tables are dead without them and replaced by the next
/// probe of their slot).
async fn sweep(handle: &Handle, s: &Steering) -> usize {
    let rules = match rules::dump(handle).await {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "forwarding probes: reading the rules");
            return 0;
        }
    };
    let mut n = 0;
    for r in rules {
        if r.protocol == s.protocol
            && r.priority == s.rule_priority
            && handle.rule().del(r.message).execute().await.is_ok()
        {
            n += 1;
        }
    }
    n
}
