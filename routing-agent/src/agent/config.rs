//! What the agent is started with: its node, timers, health rules, what a default-route
//! override must protect, and where status goes.
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tokio::sync::mpsc;

use crate::cluster::publish;
use crate::logic::default_route;
use crate::logic::health;
use crate::logic::plan;
use crate::logic::selector::NodeInfo;
use crate::ops::{http, metrics::Metrics};

pub struct AgentConfig {
    pub node: NodeInfo,
    pub resync: Duration,
    pub retry_min: Duration,
    pub retry_max: Duration,
    pub status_file: Option<PathBuf>,
    pub health: health::Config,
    /// How often the eBPF counters and the neighbour table are read.
    pub health_tick: Duration,
    /// Kubernetes mode: where this node's status and Events go.
    pub publisher: Option<mpsc::Sender<publish::Report>>,
    /// Liveness / readiness, served on the health port.
    pub probes: Arc<http::Probes>,
    /// What a default-route override must not cut off.
    pub protect: ProtectConfig,
    pub metrics: Arc<Metrics>,
    /// Planner settings that are not in the Routes (the default fail mode).
    pub policy: plan::Policy,
    /// Probe withdrawn gateways through themselves (`None`: ICMP echoes only).
    pub forward_probes: Option<ForwardProbes>,
}

/// Forwarding probes, as configured.
#[derive(Clone, Debug)]
pub struct ForwardProbes {
    /// `--probe-target`: used before any learned destination.
    pub targets: Vec<std::net::SocketAddr>,
    pub steering: crate::node::probe::Steering,
}

/// Protected destinations and symmetric routing, as configured.
#[derive(Clone, Debug, Default)]
pub struct ProtectConfig {
    /// Always protected: metadata, `--protected-cidr`, the configured API server host.
    pub fixed: Vec<IpNet>,
    /// Its nameservers are protected (read at every reconcile).
    pub resolv_conf: Option<PathBuf>,
    /// Nameservers inside these are cluster-internal: not protected.
    pub in_cluster: Vec<IpNet>,
    pub symmetric: Option<SymmetricConfig>,
}

#[derive(Clone, Debug)]
pub struct SymmetricConfig {
    pub table: u32,
    pub priority: u32,
    /// The public interface by name (`None`: the one of the node's own default route).
    pub interface: Option<String>,
}

/// The index of interface `name` in this network namespace.
fn if_index(name: &str) -> Result<u32, String> {
    let c = std::ffi::CString::new(name).map_err(|_| format!("bad interface name {name:?}"))?;
    // SAFETY: a valid NUL-terminated string; if_nametoindex only reads it.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(format!(
            "--public-interface {name}: {}",
            std::io::Error::last_os_error()
        )),
        i => Ok(i),
    }
}

impl ProtectConfig {
    /// The protection for this reconcile: fixed candidates, the nameservers of the
    /// resolv.conf as it is now, the control-plane endpoints from the source.
    pub fn protection(&self, endpoints: &[IpAddr]) -> Result<default_route::Protection, String> {
        let mut candidates: BTreeSet<IpNet> = self.fixed.iter().copied().collect();
        candidates.extend(endpoints.iter().map(|a| IpNet::from(*a)));
        if let Some(path) = &self.resolv_conf {
            match std::fs::read_to_string(path) {
                Ok(text) => candidates.extend(
                    default_route::nameservers(&text, &self.in_cluster)
                        .into_iter()
                        .map(IpNet::from),
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("reading {}: {e}", path.display())),
            }
        }
        let symmetric = match &self.symmetric {
            None => None,
            Some(s) => Some(default_route::Symmetric {
                table: s.table,
                priority: s.priority,
                interface: match &s.interface {
                    None => None,
                    Some(name) => Some(if_index(name)?),
                },
            }),
        };
        Ok(default_route::Protection {
            candidates,
            symmetric,
        })
    }
}
