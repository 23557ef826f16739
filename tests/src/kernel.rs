//! What the kernel holds, read back for assertions: routes through `ip -j`, nexthop groups
//! resolved to their gateways, and what this kernel is known to do.
use std::fs;
use std::time::Duration;

use anyhow::Result;

use crate::{Lab, wait_for};

/// The running kernel's (major, minor) version.
pub fn kernel_version() -> (u32, u32) {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split(['.', '-', '+']);
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (major, minor)
}

/// Whether the running kernel has TCX (Linux ≥ 6.6): the agent attaches through it
/// there, through clsact + cls_bpf (netlink) before.
pub fn kernel_has_tcx() -> bool {
    kernel_version() >= (6, 6)
}

/// Whether the running kernel spreads locally originated IPv6 TCP connections whose source
/// port it picks itself over a multipath route, as measured (`cargo xtask vm-test --kernel
/// debian-6.1 --kernel debian-6.12 --kernel host --test dataplane --filter ecmp`):
/// Debian's 6.1 and 6.12 look the route up before they choose the port and hash port 0,
/// so every such connection to one address and port takes the same gateway; 6.18 spreads
/// them. `None` for the kernels in between, not measured.
pub fn kernel_spreads_local_v6_connections() -> Option<bool> {
    match kernel_version() {
        v if v <= (6, 12) => Some(false),
        v if v >= (6, 18) => Some(true),
        _ => None,
    }
}

impl Lab {
    /// `ip -j` output of a node, parsed.
    pub fn ip_json(&self, node: &str, args: &str) -> Result<serde_json::Value> {
        let out = self.ip(&self.node_ns(node), &format!("-j {args}"))?;
        if out.trim().is_empty() {
            return Ok(serde_json::Value::Array(vec![]));
        }
        Ok(serde_json::from_str(&out)?)
    }

    /// Every route to `dst` in the node's main table (the real one and the fail-closed
    /// standby), as `ip -j` shows them.
    pub fn routes_to(&self, node: &str, dst: &str) -> Result<Vec<serde_json::Value>> {
        let fam = if dst.contains(':') { "-6" } else { "-4" };
        let v = self.ip_json(node, &format!("{fam} route show exact {dst}"))?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// The node's route to `dst` in the main table that forwards (not an `unreachable`
    /// one), if any.
    pub fn route(&self, node: &str, dst: &str) -> Result<Option<serde_json::Value>> {
        Ok(self
            .routes_to(node, dst)?
            .into_iter()
            .find(|r| r["type"] != "unreachable"))
    }

    /// The agent's fail-closed standby route to `dst` (`unreachable`, protocol 196), if any.
    pub fn standby(&self, node: &str, dst: &str) -> Result<Option<serde_json::Value>> {
        Ok(self
            .routes_to(node, dst)?
            .into_iter()
            .find(|r| r["type"] == "unreachable" && r["protocol"] == "196"))
    }

    /// Gateways of the node's route to `dst`, resolved through its nexthop group.
    pub fn route_gateways(&self, node: &str, dst: &str) -> Result<Vec<String>> {
        let Some(r) = self.route(node, dst)? else {
            return Ok(vec![]);
        };
        self.gateways_of(node, &r)
    }

    /// Gateways of route `r` (`ip -j` output), resolved through its nexthop group.
    pub fn gateways_of(&self, node: &str, r: &serde_json::Value) -> Result<Vec<String>> {
        let mut gws = Vec::new();
        if let Some(hops) = r["nexthops"].as_array() {
            gws.extend(
                hops.iter()
                    .filter_map(|h| h["gateway"].as_str().map(String::from)),
            );
        } else if let Some(g) = r["gateway"].as_str() {
            gws.push(g.to_string());
        } else if let Some(id) = r["nhid"].as_u64() {
            let nh = self.ip_json(node, &format!("nexthop show id {id}"))?;
            for m in nh[0]["group"].as_array().into_iter().flatten() {
                let m = self.ip_json(node, &format!("nexthop show id {}", m["id"]))?;
                if let Some(g) = m[0]["gateway"].as_str() {
                    gws.push(g.to_string());
                }
            }
            if let Some(g) = nh[0]["gateway"].as_str() {
                gws.push(g.to_string());
            }
        }
        gws.sort();
        Ok(gws)
    }

    /// How many buckets of the resilient group behind the node's route to `dst` each
    /// gateway holds (`ip nexthop bucket show`).
    pub fn bucket_share(
        &self,
        node: &str,
        dst: &str,
    ) -> Result<std::collections::BTreeMap<String, usize>> {
        let mut share = std::collections::BTreeMap::new();
        let Some(id) = self.route(node, dst)?.and_then(|r| r["nhid"].as_u64()) else {
            return Ok(share);
        };
        let mut gateway_of = std::collections::BTreeMap::new();
        for b in self
            .ip_json(node, &format!("nexthop bucket show id {id}"))?
            .as_array()
            .into_iter()
            .flatten()
        {
            let Some(nh) = b["bucket"]["nhid"].as_u64() else {
                continue;
            };
            if let std::collections::btree_map::Entry::Vacant(e) = gateway_of.entry(nh) {
                let m = self.ip_json(node, &format!("nexthop show id {nh}"))?;
                e.insert(m[0]["gateway"].as_str().unwrap_or_default().to_string());
            }
            *share.entry(gateway_of[&nh].clone()).or_insert(0) += 1;
        }
        Ok(share)
    }

    /// Waits until every interface of node `node` but lo has its IPv6 link-local address,
    /// past duplicate address detection (the kernel adds it after the link comes up, and
    /// its local route with it: a slow machine would see it appear mid-test).
    pub fn wait_ipv6_settled(&self, node: &str) -> Result<()> {
        let ns = self.node_ns(node);
        wait_for(
            &format!("IPv6 link-local addresses of node {node}"),
            Duration::from_secs(30),
            || {
                let links = self.ip(&ns, "-o link show").ok()?;
                let want = links.lines().filter(|l| !l.contains(" lo:")).count();
                let addrs = self.ip(&ns, "-o -6 addr show scope link").ok()?;
                let ready = addrs.lines().filter(|l| !l.contains("tentative")).count();
                (ready >= want).then_some(())
            },
        )
    }
}

/// `ip monitor` running in a node's namespace (see [`Lab::monitor`]).
pub struct Monitor {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Lab {
    /// Starts `ip monitor <what...>` in `node`'s namespace, logging to the scratch
    /// directory; it is listening when this returns.
    pub fn monitor(&self, node: &str, what: &[&str]) -> Result<Monitor> {
        let log = self.scratch.join(format!("monitor-{node}.log"));
        let child = std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.node_ns(node)))
            .args(["ip", "monitor"])
            .args(what)
            .stdout(std::fs::File::create(&log)?)
            .spawn()?;
        std::thread::sleep(Duration::from_millis(200));
        Ok(Monitor { child, log })
    }
}

impl Monitor {
    /// Stops the monitor: every event it printed.
    pub fn events(mut self) -> Result<String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        Ok(fs::read_to_string(&self.log)?)
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
