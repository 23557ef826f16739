//! The faces of a black-holing gateway (`../shared/lab.md`), applied and undone.
use std::time::Duration;

use anyhow::Result;

use crate::{Lab, public_v6, wait_for};

/// The faces of a black-holing gateway (`../shared/lab.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Forwarding dropped (nft) while the gateway still answers ARP and ping.
    ForwardingDropped,
    /// The gateway is gone (its VPC link down).
    Removed,
    /// 100 % packet loss on its VPC side, both ways.
    Loss,
    /// Its uplink is cut: the gateway is up, the internet unreachable through it.
    UplinkCut,
    /// A healthy gateway on a lossy path: this many packets per thousand lost at random
    /// on its VPC side, each way (20: 2 %, about 4 % of the connection attempts).
    RandomLoss(u16),
}

impl Lab {
    /// Applies a failure face to gateway `i` (see `Failure`).
    pub fn fail(&self, i: u8, f: Failure) -> Result<()> {
        let gw = self.ns(&format!("gw{i}"));
        match f {
            Failure::ForwardingDropped => self.sh(
                &gw,
                "nft add table inet ra_fail && \
                 nft add chain inet ra_fail ra_fwd '{ type filter hook forward priority 0 ; policy drop ; }'",
            )?,
            Failure::Removed => self.ip(&gw, "link set dev vpc down")?,
            // Every packet both ways (netem would do the same; not every lab kernel has
            // sch_netem, nftables' netdev hooks are everywhere).
            Failure::Loss => self.sh(
                &gw,
                "nft add table netdev ra_loss && \
                 nft add chain netdev ra_loss ra_in '{ type filter hook ingress device vpc priority 0 ; policy drop ; }' && \
                 nft add chain netdev ra_loss ra_out '{ type filter hook egress device vpc priority 0 ; policy drop ; }'",
            )?,
            Failure::UplinkCut => self.ip(&gw, "link set dev uplink down")?,
            Failure::RandomLoss(per_mille) => self.sh(
                &gw,
                &format!(
                    "nft add table netdev ra_lossy && \
                     nft add chain netdev ra_lossy ra_in '{{ type filter hook ingress device vpc priority 0 ; policy accept ; }}' && \
                     nft add rule netdev ra_lossy ra_in numgen random mod 1000 '<' {per_mille} drop && \
                     nft add chain netdev ra_lossy ra_out '{{ type filter hook egress device vpc priority 0 ; policy accept ; }}' && \
                     nft add rule netdev ra_lossy ra_out numgen random mod 1000 '<' {per_mille} drop"
                ),
            )?,
        };
        Ok(())
    }

    /// Undoes `fail`.
    pub fn heal(&self, i: u8, f: Failure) -> Result<()> {
        let gw = self.ns(&format!("gw{i}"));
        match f {
            Failure::ForwardingDropped => self.sh(&gw, "nft delete table inet ra_fail")?,
            Failure::Removed => self.ip(&gw, "link set dev vpc up")?,
            Failure::Loss => self.sh(&gw, "nft delete table netdev ra_loss")?,
            Failure::RandomLoss(_) => self.sh(&gw, "nft delete table netdev ra_lossy")?,
            Failure::UplinkCut => {
                self.ip(&gw, "link set dev uplink up")?;
                // IPv6 addresses are flushed on link down (keep_addr_on_down=0).
                self.ip(
                    &gw,
                    &format!("addr replace {}/64 dev uplink nodad", public_v6(i)),
                )?;
                // The connected routes come back with the carrier, a moment later.
                wait_for("gateway uplink routes back", Duration::from_secs(5), || {
                    (self
                        .ip(&gw, "route replace default via 203.0.113.254")
                        .is_ok()
                        && self
                            .ip(&gw, "-6 route replace default via 2001:db8:113::fe")
                            .is_ok())
                    .then_some(())
                })?;
                String::new()
            }
        };
        Ok(())
    }
}
