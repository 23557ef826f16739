//! The few sysctls the agent sets, in its own network namespace (`/proc/sys/net` shows the
//! namespace of the process that opens it).
use std::path::Path;

use tracing::{info, warn};

/// Writes `value` to `/proc/sys/<key with dots as slashes>` when it differs.
pub fn ensure(key: &str, value: &str) -> std::io::Result<()> {
    let path = Path::new("/proc/sys").join(key.replace('.', "/"));
    let current = std::fs::read_to_string(&path)?;
    if current.trim() != value {
        std::fs::write(&path, value)?;
        info!(
            sysctl = key,
            from = current.trim(),
            to = value,
            "sysctl set"
        );
    }
    Ok(())
}

/// ECMP settings: hash on L4 ports (policy 1) and, for IPv4, avoid next hops whose
/// neighbour entry failed.
pub fn wanted(hash_policy: bool, use_neigh: bool) -> Vec<(&'static str, &'static str)> {
    let mut wanted = Vec::new();
    if hash_policy {
        wanted.push(("net.ipv4.fib_multipath_hash_policy", "1"));
        wanted.push(("net.ipv6.fib_multipath_hash_policy", "1"));
    }
    if use_neigh {
        wanted.push(("net.ipv4.fib_multipath_use_neigh", "1"));
    }
    wanted
}

/// Sets the [`wanted`] sysctls, warning about those it cannot set (in a container,
/// /proc/sys is read-only: the DaemonSet's privileged init container, `routing-agent
/// sysctls`, sets them first, and then they already have their value here).
pub fn apply(hash_policy: bool, use_neigh: bool) {
    for (k, v) in wanted(hash_policy, use_neigh) {
        if let Err(e) = ensure(k, v) {
            warn!(sysctl = k, error = %e, "cannot set sysctl");
        }
    }
}
