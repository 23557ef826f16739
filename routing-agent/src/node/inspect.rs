//! `routing-agent status`: what the agent left in this network namespace, read from the
//! kernel and the pinned maps — so it works while the agent runs and after it stopped.
//! Routes (destination, gateways, nexthop group, table), the symmetric-routing rules, and
//! the gateways of the slot table (interface, MAC, health, counters, last change).
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use aya::maps::{Array, Map, MapData, PerCpuArray};
use routing_agent_common::{GW_DOWN, GW_UNUSED, GatewayInfo, GatewayStats, MAX_GATEWAYS, names};
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
    /// `ok`, or `fail-closed` when a gateway it still uses is down (its last ones are kept
    /// rather than falling back to the node's own default route).
    pub state: String,
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
    /// TC programs attached (TCX links; `tc filter show` lists the cls_bpf ones of the
    /// netlink attach mode).
    pub attachments: Vec<String>,
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
    let mut routes: Vec<RouteView> = routes::dump_all(&handle)
        .await
        .map_err(|e| anyhow::anyhow!("reading the routes: {e}"))?
        .into_iter()
        .filter(|d| d.protocol == scope.protocol && scope.tables.contains(&d.table))
        .map(|d| {
            let (gws, id) = match &d.target {
                Target::Nhid(id) => (gateways_of(*id), Some(*id)),
                Target::Hops(h) => (h.iter().map(|(g, _)| *g).collect(), None),
            };
            let mut gateways: Vec<String> = gws.iter().map(|g| g.to_string()).collect();
            gateways.sort();
            RouteView {
                destination: d.dst.to_string(),
                gateways,
                nexthop_id: id,
                table: d.table,
                state: "ok".into(),
            }
        })
        .collect();
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
        if r.gateways.iter().any(|g| down.contains(&g.as_str())) {
            r.state = "fail-closed".into();
        }
    }
    let attachments = crate::node::ebpf::tcx_attachments()
        .into_iter()
        .map(|(i, d)| format!("{i} {d} (tcx)"))
        .collect();
    Ok(NodeView {
        routes,
        rules,
        attachments,
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
        let down = info.state == GW_DOWN;
        out.push(GatewayView {
            address: address.to_string(),
            slot,
            state: if down { "down" } else { "up" }.into(),
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
        "  {:<22} {:<6} {:<10} {:<12} GATEWAYS\n",
        "DESTINATION", "TABLE", "NEXTHOP", "STATE"
    ));
    for r in &v.routes {
        out.push_str(&format!(
            "  {:<22} {:<6} {:<10} {:<12} {}\n",
            r.destination,
            r.table,
            r.nexthop_id.map(|i| i.to_string()).unwrap_or("-".into()),
            r.state,
            r.gateways.join(",")
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
        out.push_str("  (no TCX attachment: the agent is not running, or attaches through netlink: tc filter show dev IF egress)\n");
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
