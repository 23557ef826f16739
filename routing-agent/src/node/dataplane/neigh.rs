//! The neighbour table entries of the gateways: their MAC addresses (for the eBPF
//! attribution map) and whether the kernel gave up resolving them (`FAILED`).
use std::collections::BTreeMap;
use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};

use super::nexthop::NlError;
use super::routes::nl_error;

/// One gateway's neighbour entry on the interface it is reached through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub ifindex: u32,
    /// None while unresolved (INCOMPLETE, FAILED).
    pub mac: Option<[u8; 6]>,
    pub failed: bool,
    /// INCOMPLETE or FAILED: the kernel is (or gave up) resolving it.
    pub unresolved: bool,
}

/// Dumps the neighbour table and keeps the entries of `gateways` (gateway → interface).
pub async fn gateways(
    handle: &rtnetlink::Handle,
    gateways: &BTreeMap<IpAddr, u32>,
) -> Result<BTreeMap<IpAddr, Neighbour>, NlError> {
    let mut out = BTreeMap::new();
    let mut dump = handle.neighbours().get().execute();
    while let Some(m) = dump.try_next().await.map_err(nl_error)? {
        let mut dst = None;
        let mut mac = None;
        for a in &m.attributes {
            match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                    dst = Some(IpAddr::V4(*v4))
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                    dst = Some(IpAddr::V6(*v6))
                }
                NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => {
                    mac = <[u8; 6]>::try_from(&l[..]).ok()
                }
                _ => {}
            }
        }
        let Some(dst) = dst else { continue };
        if gateways.get(&dst) != Some(&m.header.ifindex) {
            continue;
        }
        let failed = m.header.state == NeighbourState::Failed;
        let resolved = !matches!(
            m.header.state,
            NeighbourState::Incomplete | NeighbourState::Failed | NeighbourState::None
        );
        out.insert(
            dst,
            Neighbour {
                ifindex: m.header.ifindex,
                mac: if resolved { mac } else { None },
                failed,
                unresolved: matches!(
                    m.header.state,
                    NeighbourState::Incomplete | NeighbourState::Failed
                ),
            },
        );
    }
    Ok(out)
}
