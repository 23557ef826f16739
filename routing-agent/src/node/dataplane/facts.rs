//! The node facts the default-route planning needs ([`NodeFacts`]), read from the kernel:
//! the node's own default routes, the prefixes of its own routes, its global addresses,
//! and what occupies the symmetric rule priority and table.
use std::collections::BTreeMap;
use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressScope};

use super::diff::Target;
use super::nexthop::NlError;
use super::routes::{self, Dumped, nl_error};
use super::rules;
use crate::logic::default_route::{NodeFacts, Symmetric, Uplink};
use crate::logic::route::Family;

/// The main table.
const MAIN: u32 = 254;

fn describe(d: &Dumped) -> String {
    match &d.target {
        Target::Hops(h) if !h.is_empty() => format!(
            "{} via {} proto {} (table {})",
            d.dst,
            h.iter()
                .map(|(g, _)| g.to_string())
                .collect::<Vec<_>>()
                .join(","),
            d.protocol,
            d.table
        ),
        Target::Nhid(id) => format!(
            "{} nhid {id} proto {} (table {})",
            d.dst, d.protocol, d.table
        ),
        _ => format!("{} proto {} (table {})", d.dst, d.protocol, d.table),
    }
}

/// Reads the facts; `protocol` marks the agent's own objects. The routes are read one
/// at a time through `dumper` (none is kept: the agent's own 10,000 are passed over),
/// else through rtnetlink.
pub async fn read(
    handle: &rtnetlink::Handle,
    dumper: Option<&routes::RouteDumper>,
    protocol: u8,
    symmetric: Option<&Symmetric>,
) -> Result<NodeFacts, NlError> {
    let mut facts = NodeFacts::default();
    let mut best: BTreeMap<Family, (u32, Uplink)> = BTreeMap::new();
    let mut consider = |d: Dumped| {
        if d.protocol == protocol {
            return;
        }
        if d.table == MAIN && d.unicast {
            facts.foreign_prefixes.push(d.dst);
            if d.dst.prefix_len() == 0 {
                let hop = match &d.target {
                    Target::Hops(h) => h.first(),
                    Target::Nhid(_) => None,
                };
                let Some((gateway, oif)) = hop else {
                    facts.unreadable.insert(Family::of(&d.dst.addr()));
                    return;
                };
                let fam = Family::of(&d.dst.addr());
                let up = Uplink {
                    gateway: *gateway,
                    oif: *oif,
                };
                if best.get(&fam).is_none_or(|(m, _)| d.metric < *m) {
                    best.insert(fam, (d.metric, up));
                }
            }
        }
        if let Some(s) = symmetric
            && d.table == s.table
        {
            facts
                .foreign_table_routes
                .push((Family::of(&d.dst.addr()), describe(&d)));
        }
    };
    match dumper {
        Some(dumper) => dumper.each(None, &mut consider)?,
        None => routes::dump_all(handle)
            .await?
            .into_iter()
            .for_each(&mut consider),
    }
    facts.original = best.into_iter().map(|(f, (_, u))| (f, u)).collect();
    let mut stream = handle.address().get().execute();
    while let Some(m) = stream.try_next().await.map_err(nl_error)? {
        if m.header.scope != AddressScope::Universe {
            continue;
        }
        let addr: Option<IpAddr> = m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(a) => Some(*a),
            _ => None,
        });
        if let Some(a) = addr {
            facts.addresses.entry(m.header.index).or_default().push(a);
        }
    }
    if let Some(s) = symmetric {
        let rules = rules::dump(handle).await?;
        facts.foreign_rules = rules::foreign_at(&rules, protocol, s.priority);
    }
    Ok(facts)
}
