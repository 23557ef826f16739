//! Kubernetes source: every `Route` (cluster-scoped), this node's own `Node` (field
//! selector `metadata.name`) and the control-plane endpoints (the `kubernetes` Endpoints in
//! `default`), followed with kube-runtime watchers feeding reflector stores. Once all three
//! have their first complete list, every change sends a complete [`Snapshot`] with the
//! node's current labels (a relabelled node re-plans at once) and the endpoint addresses
//! (protected while the default route is overridden).
//!
//! A lost API server is the watchers' business: they retry with back-off and relist when
//! it is back; nothing is sent meanwhile, so the agent keeps the kernel as it is. Before
//! the first complete list nothing is sent either (a restart while the API server is down
//! changes nothing).
use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::{Endpoints, Node};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::Snapshot;
use crate::crd::Route;

#[derive(Clone, Copy, Debug)]
enum Kind {
    Routes,
    Node,
    Endpoints,
}

/// What a watcher event means here.
enum Signal {
    /// The first complete list of this kind arrived.
    Ready(Kind),
    /// Part of a (re)list: the store settles at `Ready`.
    Listing,
    Changed,
    Failed(String),
}

fn signal<K>(what: Kind, e: Result<watcher::Event<K>, watcher::Error>) -> Signal {
    match e {
        Ok(watcher::Event::InitDone) => Signal::Ready(what),
        Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => Signal::Listing,
        Ok(_) => Signal::Changed,
        Err(e) => Signal::Failed(e.to_string()),
    }
}

/// Starts following the Routes and Node `node`; snapshots go to `tx`.
pub fn spawn(client: Client, node: String, tx: mpsc::Sender<Snapshot>) {
    let (routes, routes_writer) = reflector::store::<Route>();
    let (nodes, nodes_writer) = reflector::store::<Node>();
    let route_events = reflector(
        routes_writer,
        watcher(
            Api::<Route>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .map(|e| signal(Kind::Routes, e))
    .boxed();
    let node_events = reflector(
        nodes_writer,
        watcher(
            Api::<Node>::all(client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={node}")),
        ),
    )
    .default_backoff()
    .map(|e| signal(Kind::Node, e))
    .boxed();
    let (endpoints, endpoints_writer) = reflector::store::<Endpoints>();
    let endpoint_events = reflector(
        endpoints_writer,
        watcher(
            Api::<Endpoints>::namespaced(client.clone(), "default"),
            watcher::Config::default().fields("metadata.name=kubernetes"),
        ),
    )
    .default_backoff()
    .map(|e| signal(Kind::Endpoints, e))
    .boxed();
    tokio::spawn(async move {
        let mut events = stream::select_all([route_events, node_events, endpoint_events]);
        let (mut routes_ready, mut node_ready, mut endpoints_ready) = (false, false, false);
        while let Some(sig) = events.next().await {
            match sig {
                Signal::Ready(what) => {
                    match what {
                        Kind::Routes => routes_ready = true,
                        Kind::Node => node_ready = true,
                        Kind::Endpoints => endpoints_ready = true,
                    }
                    info!(?what, "initial list from the API server complete");
                }
                Signal::Listing => continue,
                Signal::Changed => {}
                Signal::Failed(e) => {
                    warn!(error = %e, "watching the API server failed; retrying, routes kept as they are");
                    continue;
                }
            }
            if !(routes_ready && node_ready && endpoints_ready) {
                continue;
            }
            let node_labels = match nodes.state().first() {
                Some(n) => n.metadata.labels.clone().unwrap_or_default(),
                None => {
                    warn!(node = %node, "this node's Node object does not exist; planning with no labels");
                    Default::default()
                }
            };
            let control_plane: Vec<std::net::IpAddr> = endpoints
                .state()
                .iter()
                .flat_map(|e| e.subsets.iter().flatten())
                .flat_map(|s| s.addresses.iter().flatten())
                .filter_map(|a| a.ip.parse().ok())
                .collect();
            let snapshot = Snapshot {
                routes: routes.state().iter().map(|r| (**r).clone()).collect(),
                node_labels: Some(node_labels),
                control_plane: Some(control_plane),
            };
            if tx.send(snapshot).await.is_err() {
                return;
            }
        }
    });
}
