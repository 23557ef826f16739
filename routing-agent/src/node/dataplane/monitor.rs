//! Wakes the reconcile loop when routes, nexthops, links or addresses change in this
//! network namespace, so that an owned route deleted or changed by hand is repaired and a
//! gateway that becomes reachable is installed without waiting for a timer.
//!
//! The notifications are not parsed: any change is a reason for a level-based reconcile,
//! which is cheap when nothing differs. A plain netlink-sys socket on a thread of its own
//! (the nexthop group's messages are not understood by netlink-packet-route).
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use tokio::sync::mpsc;

use super::nexthop::RTNLGRP_NEXTHOP;

const GROUPS: [u32; 7] = [
    1,  // RTNLGRP_LINK
    5,  // RTNLGRP_IPV4_IFADDR
    7,  // RTNLGRP_IPV4_ROUTE
    8,  // RTNLGRP_IPV4_RULE (symmetric routing)
    9,  // RTNLGRP_IPV6_IFADDR
    11, // RTNLGRP_IPV6_ROUTE
    19, // RTNLGRP_IPV6_RULE
];

/// Starts the monitor. Every batch of notifications puts one token into `wake`
/// (capacity 1, so bursts coalesce).
pub fn spawn(wake: mpsc::Sender<()>) -> std::io::Result<()> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    let mask = GROUPS.iter().fold(0u32, |m, g| m | 1 << (g - 1));
    socket.bind(&SocketAddr::new(0, mask))?;
    socket.add_membership(RTNLGRP_NEXTHOP)?;
    let _ = socket.set_no_enobufs(true);
    std::thread::Builder::new()
        .name("netlink-monitor".into())
        .spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            loop {
                match socket.recv(&mut &mut buf[..], 0) {
                    Ok(_) => {
                        if wake.try_send(()).is_err() && wake.is_closed() {
                            return;
                        }
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
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
