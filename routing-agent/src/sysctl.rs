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
pub fn apply(hash_policy: bool, use_neigh: bool) {
    let mut wanted = Vec::new();
    if hash_policy {
        wanted.push(("net.ipv4.fib_multipath_hash_policy", "1"));
        wanted.push(("net.ipv6.fib_multipath_hash_policy", "1"));
    }
    if use_neigh {
        wanted.push(("net.ipv4.fib_multipath_use_neigh", "1"));
    }
    for (k, v) in wanted {
        if let Err(e) = ensure(k, v) {
            warn!(sysctl = k, error = %e, "cannot set sysctl");
        }
    }
}
