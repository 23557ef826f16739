//! Sources of `Route` objects. Each source delivers complete snapshots (level-based): the
//! agent plans from the latest one. The directory source is standalone mode; the
//! Kubernetes source plugs into the same channel.
pub mod dir;

use crate::crd::Route;

/// A complete view of the Routes, as a source knows them now.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub routes: Vec<Route>,
}
