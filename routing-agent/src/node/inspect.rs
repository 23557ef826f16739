//! `routing-agent status`: what the agent left in this network namespace, read from the
//! kernel and the pinned maps — so it works while the agent runs and after it stopped.
//! Routes (destination, gateways, nexthop group, table), the symmetric-routing rules, and
//! the gateways of the slot table (interface, MAC, health, counters, last change).
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use aya::maps::{Array, Map, MapData, PerCpuArray};
use routing_agent_common::{
    GW_DOWN, GW_SUSPECT, GW_UNUSED, GatewayInfo, GatewayStats, MAX_GATEWAYS, names,
};
use serde::Serialize;

use crate::node::dataplane::diff::Target;
use crate::node::dataplane::nexthop::{NexthopKind, NexthopSocket};
use crate::node::dataplane::{routes, rules};

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteView {
    pub destination: String,
    pub gateways: Vec<String>,
    /// The nexthop object the route points at (a resilient group, or a single gateway).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nexthop_id: Option<u32>,
    pub table: u32,
    /// `ok`; `refusing` when only its fail-closed standby route is left (no gateway can be
    /// used: its traffic is refused rather than sent out of the node's default route);
    /// `gateway-down` when it still uses a gateway that is down (for a moment, until the
    /// agent withdraws it).
    pub state: String,
    /// It has its fail-closed standby route (`unreachable`, at a worse metric).
    pub standby: bool,
    /// Why it refuses traffic, as the running agent says (`AllGatewaysDown`,
    /// `InterfaceDown`, `GatewayUnreachable`); absent when the agent does not answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayView {
    pub address: String,
    pub slot: u32,
    /// `up` or `down` (withdrawn, probed).
    pub state: String,
    pub penalty: u32,
    pub interface: String,
    pub mac: String,
    /// When it went down (RFC 3339), while down.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub down_since: Option<String>,
    /// When its state last changed (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_change: Option<String>,
    /// While down: when the next ICMP probe is due (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_probe: Option<String>,
    pub counters: GatewayStats,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeView {
    pub routes: Vec<RouteView>,
    pub rules: Vec<String>,
    /// TC programs attached: TCX links, and cls_bpf filters of the netlink attach mode
    /// (with a count when an interface carries more than one of a kind).
    pub attachments: Vec<String>,
    /// Whether the running agent answered on its HTTP port (the reasons come from it).
    pub agent_answered: bool,
    pub gateways: Vec<GatewayView>,
    /// Why the gateways could not be read (no pins: the agent never ran with eBPF here).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateways_unavailable: Option<String>,
}

/// What to read.
pub struct Scope<'a> {
    pub protocol: u8,
    /// The agent's route table, and the symmetric table (when used).
    pub tables: Vec<u32>,
    pub rule_priority: Option<u32>,
    pub pin_dir: &'a Path,
    /// The agent's HTTP port, asked for the reasons behind refusing destinations.
    pub agent_addr: Option<std::net::SocketAddr>,
}

/// `GET /status` from the running agent (a plain HTTP/1.0 exchange: one small JSON).
fn agent_status(addr: std::net::SocketAddr) -> Option<serde_json::Value> {
    use std::io::{Read as _, Write as _};
    let timeout = std::time::Duration::from_secs(2);
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.write_all(b"GET /status HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    (head.split_whitespace().nth(1) == Some("200")).then_some(())?;
    serde_json::from_str(body).ok()
}

fn ifname(index: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return format!("if{index}");
    }
    // SAFETY: on success if_indextoname wrote a NUL-terminated name into buf.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// Reads the node's state.
pub async fn read(scope: &Scope<'_>) -> anyhow::Result<NodeView> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(conn);
    let nexthops: BTreeMap<u32, NexthopKind> = match NexthopSocket::new() {
        Ok(mut s) => s
            .dump()
            .map(|v| v.into_iter().map(|n| (n.id, n.kind)).collect())
            .unwrap_or_default(),
        Err(_) => BTreeMap::new(),
    };
    let gateways_of = |id: u32| -> Vec<IpAddr> {
        match nexthops.get(&id) {
            Some(NexthopKind::Gateway { gateway, .. }) => vec![*gateway],
            Some(NexthopKind::Group { members, .. }) => members
                .iter()
                .filter_map(|(m, _)| match nexthops.get(m) {
                    Some(NexthopKind::Gateway { gateway, .. }) => Some(*gateway),
                    _ => None,
                })
                .collect(),
            _ => vec![],
        }
    };
    let mut by_dst: BTreeMap<(u32, ipnet::IpNet), RouteView> = BTreeMap::new();
    let dumped = routes::dump_all(&handle)
        .await
        .map_err(|e| anyhow::anyhow!("reading the routes: {e}"))?;
    for d in dumped
        .into_iter()
        .filter(|d| d.protocol == scope.protocol && scope.tables.contains(&d.table))
    {
        let v = by_dst.entry((d.table, d.dst)).or_insert_with(|| RouteView {
            destination: d.dst.to_string(),
            gateways: vec![],
            nexthop_id: None,
            table: d.table,
            state: "refusing".into(),
            standby: false,
            reason: None,
        });
        if d.unreachable {
            v.standby = true;
            continue;
        }
        let (gws, id) = match &d.target {
            Target::Nhid(id) => (gateways_of(*id), Some(*id)),
            Target::Hops(h) => (h.iter().map(|(g, _)| *g).collect(), None),
        };
        let mut gateways: Vec<String> = gws.iter().map(|g| g.to_string()).collect();
        gateways.sort();
        v.gateways = gateways;
        v.nexthop_id = id;
        v.state = "ok".into();
    }
    let status = scope.agent_addr.and_then(agent_status);
    if let Some(s) = &status {
        for key in ["failingClosed", "fallingThrough"] {
            for d in s[key].as_array().into_iter().flatten() {
                let (Some(dst), Some(reason)) = (d["destination"].as_str(), d["reason"].as_str())
                else {
                    continue;
                };
                for v in by_dst.values_mut().filter(|v| v.destination == dst) {
                    v.reason = Some(reason.to_string());
                }
            }
        }
    }
    let mut routes: Vec<RouteView> = by_dst.into_values().collect();
    routes.sort_by(|a, b| (a.table, &a.destination).cmp(&(b.table, &b.destination)));
    let rules = match scope.rule_priority {
        Some(prio) => rules::dump(&handle)
            .await
            .map_err(|e| anyhow::anyhow!("reading the rules: {e}"))?
            .into_iter()
            .filter(|r| r.priority == prio && r.protocol == scope.protocol)
            .map(|r| r.describe())
            .collect(),
        None => vec![],
    };

    let (gateways, gateways_unavailable) = match read_pins(scope.pin_dir) {
        Ok(g) => (g, None),
        Err(e) => (vec![], Some(format!("{e:#}"))),
    };
    let down: Vec<&str> = gateways
        .iter()
        .filter(|g| g.state == "down")
        .map(|g| g.address.as_str())
        .collect();
    for r in routes.iter_mut() {
        if r.state == "ok" && r.gateways.iter().any(|g| down.contains(&g.as_str())) {
            r.state = "gateway-down".into();
        }
    }
    let mut attachments: Vec<String> = crate::node::ebpf::tcx_attachments()
        .into_iter()
        .map(|(i, d)| format!("{i} {d} (tcx)"))
        .collect();
    attachments.extend(
        crate::node::ebpf::netlink_attachments(&handle)
            .await
            .into_iter()
            .map(|(i, d, n)| match n {
                1 => format!("{i} {d} (cls_bpf)"),
                n => format!("{i} {d} (cls_bpf x{n})"),
            }),
    );
    Ok(NodeView {
        routes,
        rules,
        attachments,
        agent_answered: status.is_some(),
        gateways,
        gateways_unavailable,
    })
}

/// Milliseconds since the Unix epoch as RFC 3339 (to the second).
fn time(ms: u64) -> String {
    k8s_openapi::jiff::Timestamp::from_millisecond(ms as i64)
        .and_then(|t| t.round(k8s_openapi::jiff::Unit::Second))
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn read_pins(dir: &Path) -> anyhow::Result<Vec<GatewayView>> {
    let open = |name: &str| -> anyhow::Result<MapData> {
        let p = dir.join(name);
        MapData::from_pin(&p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
    };
    let slots: Array<MapData, GatewayInfo> =
        Array::try_from(Map::Array(open(names::MAP_GATEWAYS)?))?;
    let stats: PerCpuArray<MapData, GatewayStats> =
        PerCpuArray::try_from(Map::PerCpuArray(open(names::MAP_GW_STATS)?))?;
    let mut out = Vec::new();
    for slot in 0..MAX_GATEWAYS {
        let Ok(info) = slots.get(&slot, 0) else {
            continue;
        };
        if info.state == GW_UNUSED {
            continue;
        }
        let address = match info.family {
            4 => IpAddr::from(<[u8; 4]>::try_from(&info.addr[..4])?),
            6 => IpAddr::from(info.addr),
            _ => continue,
        };
        let mut s = GatewayStats::default();
        if let Ok(values) = stats.get(&slot, 0) {
            values.iter().for_each(|v| s.add(v));
        }
        let down = matches!(info.state, GW_DOWN | GW_SUSPECT);
        out.push(GatewayView {
            address: address.to_string(),
            slot,
            state: match info.state {
                GW_DOWN => "down",
                GW_SUSPECT => "down (not withdrawn: no peer)",
                _ => "up",
            }
            .into(),
            penalty: info.penalty,
            interface: if info.ifindex == 0 {
                String::new()
            } else {
                ifname(info.ifindex)
            },
            mac: if info.mac == [0; 6] {
                String::new()
            } else {
                info.mac
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":")
            },
            down_since: (down && info.down_since_ms > 0).then(|| time(info.down_since_ms)),
            last_change: (info.changed_ms > 0).then(|| time(info.changed_ms)),
            next_probe: (down && info.next_probe_ms > 0).then(|| time(info.next_probe_ms)),
            counters: s,
        });
    }
    out.sort_by_key(|g| g.slot);
    Ok(out)
}

/// The human table.
pub fn render(v: &NodeView) -> String {
    let mut out = String::new();
    out.push_str("ROUTES\n");
    out.push_str(&format!(
        "  {:<22} {:<6} {:<10} {:<12} {:<8} GATEWAYS / REASON\n",
        "DESTINATION", "TABLE", "NEXTHOP", "STATE", "STANDBY"
    ));
    for r in &v.routes {
        let what = if r.state == "refusing" {
            r.reason
                .clone()
                .unwrap_or_else(|| "(no usable gateway; the agent did not say why)".into())
        } else {
            r.gateways.join(",")
        };
        out.push_str(&format!(
            "  {:<22} {:<6} {:<10} {:<12} {:<8} {}\n",
            r.destination,
            r.table,
            r.nexthop_id.map(|i| i.to_string()).unwrap_or("-".into()),
            r.state,
            if r.standby { "yes" } else { "no" },
            what
        ));
    }
    if !v.rules.is_empty() {
        out.push_str("RULES\n");
        for r in &v.rules {
            out.push_str(&format!("  {r}\n"));
        }
    }
    out.push_str("ATTACHMENTS\n");
    if v.attachments.is_empty() {
        out.push_str("  (none)\n");
    }
    for a in &v.attachments {
        out.push_str(&format!("  {a}\n"));
    }
    out.push_str("GATEWAYS\n");
    if let Some(why) = &v.gateways_unavailable {
        out.push_str(&format!("  (no pinned maps: {why})\n"));
    } else {
        out.push_str(&format!(
            "  {:<18} {:<4} {:<5} {:<7} {:<9} {:<17} {:>8} {:>8} {:>6} {}\n",
            "ADDRESS",
            "SLOT",
            "STATE",
            "PENALTY",
            "INTERFACE",
            "MAC",
            "SYN",
            "ESTAB",
            "FAILED",
            "DOWN SINCE"
        ));
        for g in &v.gateways {
            out.push_str(&format!(
                "  {:<18} {:<4} {:<5} {:<7} {:<9} {:<17} {:>8} {:>8} {:>6} {:<20} {}\n",
                g.address,
                g.slot,
                g.state,
                g.penalty,
                g.interface,
                g.mac,
                g.counters.syn_sent,
                g.counters.established,
                g.counters.failed,
                g.last_change.clone().unwrap_or("-".into()),
                g.next_probe.clone().unwrap_or_default()
            ));
        }
    }
    out
}
