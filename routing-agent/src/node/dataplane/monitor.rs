//! Wakes the reconcile loop when routes, nexthops, links, addresses or rules change in this
//! network namespace, so that an owned route deleted or changed by hand is repaired, a
//! gateway that becomes reachable is installed and a device that goes down is noticed,
//! without waiting for a timer.
//!
//! **The agent's own changes do not wake it** (at 10,000 routes, one reconcile's echo is
//! 10,000 notifications; waking on them made the agent reconcile after every reconcile).
//! A notification is the agent's own when it adds, changes or deletes a route or nexthop
//! with the agent's protocol that the dataplane said it was about to add, change or
//! delete ([`Echo::expect`]), or a rule with its protocol (only the agent writes those).
//! Everything else — other owners' routes, links, addresses, a route or nexthop of the
//! agent's changed or deleted by someone else or flushed by the kernel with its device —
//! wakes it. A plain netlink-sys socket on a thread of its own
//! (netlink-packet-route does not understand nexthop messages); messages are decoded only
//! as far as the header fields that decide this.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use tokio::sync::mpsc;

use super::nexthop::{RTM_DELNEXTHOP, RTM_NEWNEXTHOP, RTNLGRP_NEXTHOP};

const GROUPS: [u32; 7] = [
    1,  // RTNLGRP_LINK
    5,  // RTNLGRP_IPV4_IFADDR
    7,  // RTNLGRP_IPV4_ROUTE
    8,  // RTNLGRP_IPV4_RULE (symmetric routing)
    9,  // RTNLGRP_IPV6_IFADDR
    11, // RTNLGRP_IPV6_ROUTE
    19, // RTNLGRP_IPV6_RULE
];

const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;
const NLMSG_HDRLEN: usize = 16;
const RTA_DST: u16 = 1;
const RTA_TABLE: u16 = 15;
const RTA_NH_ID: u16 = 30;
const NHA_ID: u16 = 1;
const FRA_PROTOCOL: u16 = 21;
/// An expected deletion not seen within this long is forgotten.
const EXPECT_FOR: Duration = Duration::from_secs(5);

/// Whether a notification says an object is there (added or changed) or gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Change {
    New,
    Del,
}

/// What one notification is about, as far as the monitor cares.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Object {
    /// A route: family, destination bytes, prefix length, table.
    Route(u8, Vec<u8>, u8, u32),
    Nexthop(u32),
}

/// The changes the dataplane is about to make, so that their notifications are known as
/// its own. Shared between the dataplane and the monitor thread.
#[derive(Default)]
pub struct Echo {
    expected: Mutex<HashMap<(Change, Object), (usize, Instant)>>,
    /// Nexthop groups the agent just replaced: the kernel then re-announces every route
    /// that uses them (`net.ipv4.nexthop_compat_mode=1`, the default: 10,000 RTM_NEWROUTE
    /// for one withdrawal at 10,000 routes), and those are its own change too.
    replaced: Mutex<HashMap<u32, Instant>>,
    /// A route or nexthop of the agent's was changed by someone else (or flushed by the
    /// kernel) since the dataplane last looked: its view of its own objects is stale.
    dirty: std::sync::atomic::AtomicBool,
}

impl Echo {
    /// The agent is about to make `change` to `what`.
    pub fn expect(&self, change: Change, what: Object) {
        let what = (change, what);
        let mut e = self.expected.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        e.retain(|_, (_, at)| now.duration_since(*at) < EXPECT_FOR);
        let entry = e.entry(what).or_insert((0, now));
        entry.0 += 1;
        entry.1 = now;
    }

    /// The agent is about to replace nexthop group `id` (its routes will be re-announced).
    pub fn replacing(&self, id: u32) {
        let mut r = self.replaced.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        r.retain(|_, at| now.duration_since(*at) < EXPECT_FOR);
        r.insert(id, now);
    }

    /// Whether the agent's objects were touched by someone else since the last call.
    pub fn take_dirty(&self) -> bool {
        self.dirty.swap(false, std::sync::atomic::Ordering::AcqRel)
    }

    fn mark_dirty(&self) {
        self.dirty.store(true, std::sync::atomic::Ordering::Release);
    }

    fn recently_replaced(&self, id: u32) -> bool {
        let r = self.replaced.lock().unwrap_or_else(|p| p.into_inner());
        r.get(&id).is_some_and(|at| at.elapsed() < EXPECT_FOR)
    }

    /// Whether `change` to `what` was expected (and consumes the expectation).
    fn consume(&self, change: Change, what: Object) -> bool {
        let what = &(change, what);
        let mut e = self.expected.lock().unwrap_or_else(|p| p.into_inner());
        match e.get_mut(what) {
            Some((n, at)) if at.elapsed() < EXPECT_FOR => {
                *n -= 1;
                if *n == 0 {
                    e.remove(what);
                }
                true
            }
            Some(_) => {
                e.remove(what);
                false
            }
            None => false,
        }
    }
}

/// Whose change a notification is.
#[derive(Debug, PartialEq, Eq)]
enum Whose {
    Own,
    Foreign,
}

/// The marks of the agent's objects.
#[derive(Clone, Copy, Debug)]
pub struct Marks {
    pub protocol: u8,
}

/// The netlink attributes (type, value) in `buf`, nested or not. Hand-written: the
/// monitor and the route dump read a few attributes of raw messages, where parsing each
/// one into netlink-packet-route's types would cost more than the reconcile itself.
pub(super) fn attrs(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut off = 0;
    std::iter::from_fn(move || {
        if off + 4 > buf.len() {
            return None;
        }
        let len = u16::from_ne_bytes([buf[off], buf[off + 1]]) as usize;
        let kind = u16::from_ne_bytes([buf[off + 2], buf[off + 3]]) & 0x3fff;
        if len < 4 || off + len > buf.len() {
            return None;
        }
        let value = &buf[off + 4..off + len];
        off += (len + 3) & !3;
        Some((kind, value))
    })
}

/// Classifies one netlink message (type, payload after the netlink header).
fn classify(kind: u16, payload: &[u8], marks: Marks, echo: &Echo) -> Whose {
    match kind {
        RTM_NEWROUTE | RTM_DELROUTE if payload.len() >= 12 => {
            let (family, dst_len, table8, protocol) =
                (payload[0], payload[1], payload[4], payload[5]);
            let mut table = u32::from(table8);
            let mut dst = Vec::new();
            let mut nhid = None;
            for (k, v) in attrs(&payload[12..]) {
                match k {
                    RTA_TABLE if v.len() >= 4 => {
                        table = u32::from_ne_bytes([v[0], v[1], v[2], v[3]])
                    }
                    RTA_DST => dst = v.to_vec(),
                    RTA_NH_ID if v.len() >= 4 => {
                        nhid = Some(u32::from_ne_bytes([v[0], v[1], v[2], v[3]]))
                    }
                    _ => {}
                }
            }
            if protocol != marks.protocol {
                return Whose::Foreign;
            }
            if kind == RTM_NEWROUTE && nhid.is_some_and(|g| echo.recently_replaced(g)) {
                return Whose::Own;
            }
            let change = if kind == RTM_NEWROUTE {
                Change::New
            } else {
                Change::Del
            };
            if echo.consume(change, Object::Route(family, dst, dst_len, table)) {
                Whose::Own
            } else {
                echo.mark_dirty();
                Whose::Foreign
            }
        }
        RTM_NEWNEXTHOP | RTM_DELNEXTHOP if payload.len() >= 8 => {
            let protocol = payload[2];
            let id = attrs(&payload[8..])
                .find(|(k, v)| *k == NHA_ID && v.len() >= 4)
                .map(|(_, v)| u32::from_ne_bytes([v[0], v[1], v[2], v[3]]));
            if protocol != marks.protocol {
                return Whose::Foreign;
            }
            let change = if kind == RTM_NEWNEXTHOP {
                Change::New
            } else {
                Change::Del
            };
            match id {
                Some(id) if echo.consume(change, Object::Nexthop(id)) => Whose::Own,
                _ => {
                    echo.mark_dirty();
                    Whose::Foreign
                }
            }
        }
        RTM_NEWRULE | RTM_DELRULE if payload.len() >= 12 => {
            // Rules of the agent's protocol are its symmetric-routing rules, which only it
            // writes (a foreign rule at their priority is found by the next read).
            let ours = attrs(&payload[12..])
                .any(|(k, v)| k == FRA_PROTOCOL && v.first() == Some(&marks.protocol));
            if ours { Whose::Own } else { Whose::Foreign }
        }
        _ => Whose::Foreign,
    }
}

/// Whether a buffer of notifications holds any that is not the agent's own.
fn any_foreign(buf: &[u8], marks: Marks, echo: &Echo) -> bool {
    let mut off = 0;
    let mut foreign = false;
    while off + NLMSG_HDRLEN <= buf.len() {
        let len = u32::from_ne_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]]) as usize;
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            return true;
        }
        let kind = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
        // Every message is looked at, so that each expected deletion is consumed.
        foreign |=
            classify(kind, &buf[off + NLMSG_HDRLEN..off + len], marks, echo) == Whose::Foreign;
        off += (len + 3) & !3;
    }
    foreign
}

/// Starts the monitor. Every batch of notifications with a foreign one puts one token
/// into `wake` (capacity 1, so bursts coalesce); a lost batch (socket overrun) too.
pub fn spawn(wake: mpsc::Sender<()>, marks: Marks, echo: Arc<Echo>) -> std::io::Result<()> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    let mask = GROUPS.iter().fold(0u32, |m, g| m | 1 << (g - 1));
    socket.bind(&SocketAddr::new(0, mask))?;
    socket.add_membership(RTNLGRP_NEXTHOP)?;
    let _ = socket.set_no_enobufs(true);
    let _ = socket.set_rx_buf_sz(8 << 20);
    std::thread::Builder::new()
        .name("netlink-monitor".into())
        .spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            loop {
                match socket.recv(&mut &mut buf[..], 0) {
                    Ok(n) => {
                        if any_foreign(&buf[..n], marks, &echo)
                            && wake.try_send(()).is_err()
                            && wake.is_closed()
                        {
                            return;
                        }
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                        // Notifications lost: nothing is known of what changed.
                        echo.mark_dirty();
                        let _ = wake.try_send(());
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "netlink monitor stopped");
                        return;
                    }
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MARKS: Marks = Marks { protocol: 196 };

    fn attr(kind: u16, v: &[u8]) -> Vec<u8> {
        let mut a = ((4 + v.len()) as u16).to_ne_bytes().to_vec();
        a.extend(kind.to_ne_bytes());
        a.extend(v);
        while !a.len().is_multiple_of(4) {
            a.push(0);
        }
        a
    }

    fn route(kind: u16, protocol: u8, dst: [u8; 4], len: u8) -> Vec<u8> {
        let mut p = vec![2, len, 0, 0, 254, protocol, 0, 1, 0, 0, 0, 0];
        p.extend(attr(RTA_TABLE, &254u32.to_ne_bytes()));
        p.extend(attr(RTA_DST, &dst));
        message(kind, p)
    }

    fn message(kind: u16, payload: Vec<u8>) -> Vec<u8> {
        let mut m = ((NLMSG_HDRLEN + payload.len()) as u32)
            .to_ne_bytes()
            .to_vec();
        m.extend(kind.to_ne_bytes());
        m.extend([0u8; 10]);
        m.extend(payload);
        m
    }

    fn nexthop(kind: u16, protocol: u8, id: u32) -> Vec<u8> {
        let mut p = vec![2, 0, protocol, 0, 0, 0, 0, 0];
        p.extend(attr(NHA_ID, &id.to_ne_bytes()));
        message(kind, p)
    }

    #[test]
    fn the_agents_own_changes_do_not_wake_it_anything_else_does() {
        let echo = Echo::default();
        // Its own adds and group replaces, announced.
        echo.expect(
            Change::New,
            Object::Route(2, vec![198, 51, 100, 0], 24, 254),
        );
        echo.expect(Change::New, Object::Nexthop(1_960_001));
        let own = [
            route(RTM_NEWROUTE, 196, [198, 51, 100, 0], 24),
            nexthop(RTM_NEWNEXTHOP, 196, 1_960_001),
        ]
        .concat();
        assert!(!any_foreign(&own, MARKS, &echo));
        assert!(
            any_foreign(&own, MARKS, &echo),
            "the same again: a change by hand with the agent's marks"
        );
        // A deletion it announced is its own, once.
        echo.expect(
            Change::Del,
            Object::Route(2, vec![198, 51, 100, 0], 24, 254),
        );
        echo.expect(Change::Del, Object::Nexthop(1_960_001));
        let dels = [
            route(RTM_DELROUTE, 196, [198, 51, 100, 0], 24),
            nexthop(RTM_DELNEXTHOP, 196, 1_960_001),
        ]
        .concat();
        assert!(!any_foreign(&dels, MARKS, &echo));
        assert!(
            any_foreign(&dels, MARKS, &echo),
            "the same deletions again: someone else's (or the kernel's)"
        );
        assert!(
            echo.take_dirty(),
            "the agent's own objects were touched by someone else"
        );
        assert!(!echo.take_dirty());
        // Other owners' routes, and links: foreign, but the agent's objects are as it left
        // them.
        assert!(any_foreign(
            &route(RTM_NEWROUTE, 4, [10, 0, 0, 0], 8),
            MARKS,
            &echo
        ));
        assert!(any_foreign(&message(16, vec![0; 16]), MARKS, &echo));
        assert!(!echo.take_dirty());
        // One foreign message in a batch of own ones wakes.
        echo.expect(
            Change::New,
            Object::Route(2, vec![198, 51, 100, 0], 24, 254),
        );
        echo.expect(Change::New, Object::Nexthop(1_960_001));
        let mixed = [own, route(RTM_DELROUTE, 196, [203, 0, 113, 0], 24)].concat();
        assert!(any_foreign(&mixed, MARKS, &echo));
    }
}
