//! Sources of `Route` objects. Each source delivers complete snapshots (level-based): the
//! agent plans from the latest one. The directory source is standalone mode; the
//! Kubernetes source plugs into the same channel.
pub mod dir;
pub mod kube;
mod retry;

use std::sync::Arc;

use crate::logic::crd::Route;

/// A complete view of the Routes, as a source knows them now.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Shared with the source: an unchanged Route is the same allocation from one
    /// snapshot to the next (the planner compares by pointer first).
    pub routes: Vec<Arc<Route>>,
    /// This node's labels, when the source knows them (Kubernetes); `None` keeps the ones
    /// the agent was started with (standalone mode).
    pub node_labels: Option<std::collections::BTreeMap<String, String>>,
    /// The control-plane endpoint addresses (the `kubernetes` Service's endpoints), when
    /// the source knows them; `None` keeps the last ones.
    pub control_plane: Option<Vec<std::net::IpAddr>>,
}

impl Snapshot {
    /// The same view: the same Routes (the same objects, or equal ones) and the same node
    /// facts. Objects shared with `other` are not compared field by field.
    pub fn same(&self, other: &Snapshot) -> bool {
        self.node_labels == other.node_labels
            && self.control_plane == other.control_plane
            && self.routes.len() == other.routes.len()
            && self
                .routes
                .iter()
                .zip(&other.routes)
                .all(|(a, b)| Arc::ptr_eq(a, b) || a == b)
    }
}
