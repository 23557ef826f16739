//! Sources of `Route` objects. Each source delivers complete snapshots (level-based): the
//! agent plans from the latest one. The directory source is standalone mode; the
//! Kubernetes source plugs into the same channel.
pub mod dir;
pub mod kube;
mod retry;

use crate::logic::crd::Route;

/// A complete view of the Routes, as a source knows them now.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub routes: Vec<Route>,
    /// This node's labels, when the source knows them (Kubernetes); `None` keeps the ones
    /// the agent was started with (standalone mode).
    pub node_labels: Option<std::collections::BTreeMap<String, String>>,
    /// The control-plane endpoint addresses (the `kubernetes` Service's endpoints), when
    /// the source knows them; `None` keeps the last ones.
    pub control_plane: Option<Vec<std::net::IpAddr>>,
}
