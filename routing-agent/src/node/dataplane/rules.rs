//! Policy routing rules through rtnetlink: the agent's `from <address> lookup <table>` rules
//! (marked with its route protocol id), and what else sits at their priority.
use std::collections::BTreeSet;
use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::route::RouteProtocol;
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{Handle, IpVersion};

use super::nexthop::NlError;
use super::routes::nl_error;
use crate::logic::default_route::SourceRule;
use crate::logic::route::Family;

/// A rule as dumped.
#[derive(Clone, Debug)]
pub struct Rule {
    pub priority: u32,
    pub protocol: u8,
    pub source: Option<(IpAddr, u8)>,
    pub table: u32,
    pub message: RuleMessage,
}

impl Rule {
    /// `from <src> lookup <table>` as `ip rule` shows it.
    pub fn describe(&self) -> String {
        let from = match self.source {
            Some((a, l)) if l as u32 == if a.is_ipv4() { 32 } else { 128 } => a.to_string(),
            Some((a, l)) => format!("{a}/{l}"),
            None => "all".into(),
        };
        format!(
            "{}: from {from} lookup {} proto {}",
            self.priority, self.table, self.protocol
        )
    }

    /// The agent's rule this is, if it is one of the agent's at `priority`.
    fn as_owned(&self, protocol: u8, priority: u32) -> Option<SourceRule> {
        if self.protocol != protocol || self.priority != priority {
            return None;
        }
        let (source, len) = self.source?;
        (len as u32 == if source.is_ipv4() { 32 } else { 128 }).then_some(SourceRule {
            source,
            table: self.table,
            priority,
        })
    }
}

fn parse(m: &RuleMessage) -> Rule {
    let mut r = Rule {
        priority: 0,
        protocol: 0,
        source: None,
        table: u32::from(m.header.table),
        message: m.clone(),
    };
    for a in &m.attributes {
        match a {
            RuleAttribute::Priority(p) => r.priority = *p,
            RuleAttribute::Protocol(p) => r.protocol = u8::from(*p),
            RuleAttribute::Source(s) => r.source = Some((*s, m.header.src_len)),
            RuleAttribute::Table(t) => r.table = *t,
            _ => {}
        }
    }
    r
}

/// Every rule, both families.
pub async fn dump(handle: &Handle) -> Result<Vec<Rule>, NlError> {
    let mut out = Vec::new();
    for v in [IpVersion::V4, IpVersion::V6] {
        let mut stream = handle.rule().get(v).execute();
        while let Some(m) = stream.try_next().await.map_err(nl_error)? {
            out.push(parse(&m));
        }
    }
    Ok(out)
}

/// The rules at `priority` that are not the agent's, described, with their family.
pub fn foreign_at(rules: &[Rule], protocol: u8, priority: u32) -> Vec<(Family, String)> {
    rules
        .iter()
        .filter(|r| r.priority == priority && r.as_owned(protocol, priority).is_none())
        .map(|r| {
            let fam = if r.message.header.family == AddressFamily::Inet6 {
                Family::V6
            } else {
                Family::V4
            };
            (fam, r.describe())
        })
        .collect()
}

/// Makes the agent's rules at `priority` exactly `want` (adds the missing, deletes the
/// others of its own). Returns the number of changes.
pub async fn sync(
    handle: &Handle,
    rules: &[Rule],
    protocol: u8,
    priority: u32,
    want: &BTreeSet<SourceRule>,
) -> Result<usize, NlError> {
    let mut have = BTreeSet::new();
    let mut changes = 0;
    for r in rules {
        let Some(own) = r.as_owned(protocol, priority) else {
            continue;
        };
        if want.contains(&own) && have.insert(own) {
            continue;
        }
        handle
            .rule()
            .del(r.message.clone())
            .execute()
            .await
            .map_err(nl_error)?;
        changes += 1;
    }
    for w in want.difference(&have) {
        let mut req = handle
            .rule()
            .add()
            .priority(w.priority)
            .table_id(w.table)
            .action(RuleAction::ToTable);
        req.message_mut()
            .attributes
            .push(RuleAttribute::Protocol(RouteProtocol::from(protocol)));
        let r = match w.source {
            IpAddr::V4(a) => req.v4().source_prefix(a, 32).execute().await,
            IpAddr::V6(a) => req.v6().source_prefix(a, 128).execute().await,
        };
        r.map_err(nl_error)?;
        changes += 1;
    }
    Ok(changes)
}
