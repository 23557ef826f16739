//! Kubernetes source: every `Route` (cluster-scoped), this node's own `Node` (field
//! selector `metadata.name`) and the control-plane endpoints (the `kubernetes` Endpoints in
//! `default`), followed with kube-runtime watchers feeding reflector stores. Once all three
//! have their first complete list, every change sends a complete [`Snapshot`] with the
//! node's current labels (a relabelled node re-plans at once) and the endpoint addresses
//! (protected while the default route is overridden).
//!
//! StaticRoutes (the static route operator's kind) are followed too, while their CRD is
//! served: the CRD itself is watched (by name), so that it can be installed or removed
//! after the agent started. Each StaticRoute enters the snapshot as the Route it plans as
//! ([`crate::logic::owner::from_static`]). Until the CRD's state is known (and, when it is
//! served, the StaticRoutes listed), nothing is sent: a restart never drops their routes.
//!
//! A lost API server is the watchers' business: they retry (see [`super::retry`]: capped
//! at a few seconds, with jitter; a 410 relists at once) and relist when it is back;
//! nothing is sent meanwhile, so the agent keeps the kernel as it is. Before
//! the first complete list nothing is sent either (a restart while the API server is down
//! changes nothing).
use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::{Endpoints, Node};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt as _;
use kube::runtime::{WatchStreamExt as _, reflector, watcher};
use kube::{Api, Client};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::Snapshot;
use crate::logic::crd::{Route, STATIC_CRD, StaticRoute};
use crate::logic::owner;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

#[derive(Clone, Copy, Debug)]
enum Kind {
    Routes,
    Node,
    Endpoints,
    StaticRoutes,
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
pub fn spawn(
    client: Client,
    node: String,
    tx: mpsc::Sender<Snapshot>,
    metrics: std::sync::Arc<crate::ops::metrics::Metrics>,
) {
    let (routes, routes_writer) = reflector::store::<Route>();
    let (nodes, nodes_writer) = reflector::store::<Node>();
    let route_events = reflector(
        routes_writer,
        // Managed fields and foreign annotations are not read here: not kept (memory, and
        // a cheaper comparison when the planner checks whether a Route changed). kubectl
        // apply's `last-applied-configuration` alone is the whole object again.
        watcher(
            Api::<Route>::all(client.clone()),
            watcher::Config::default(),
        )
        .modify(|r| {
            r.managed_fields_mut().clear();
            r.annotations_mut()
                .retain(|k, _| k.starts_with(crate::logic::migrate::OWN_ANNOTATION_PREFIX));
        }),
    )
    .boxed();
    let route_events = super::retry::backoff(route_events)
        .map(|e| signal(Kind::Routes, e))
        .boxed();
    let node_events = reflector(
        nodes_writer,
        // Only the labels are read: the status (images, conditions) is not kept.
        watcher(
            Api::<Node>::all(client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={node}")),
        )
        .modify(|n| {
            n.managed_fields_mut().clear();
            n.status = None;
        }),
    )
    .boxed();
    let node_events = super::retry::backoff(node_events)
        .map(|e| signal(Kind::Node, e))
        .boxed();
    let (endpoint_events, control_plane) = control_plane_endpoints(client.clone());
    let (static_events, statics) = static_routes(client.clone());
    tokio::spawn(async move {
        let mut events =
            stream::select_all([route_events, node_events, endpoint_events, static_events]);
        let (mut routes_ready, mut node_ready, mut endpoints_ready) = (false, false, false);
        let mut statics_ready = false;
        while let Some(sig) = events.next().await {
            match sig {
                Signal::Ready(what) => {
                    match what {
                        Kind::Routes => routes_ready = true,
                        Kind::Node => node_ready = true,
                        Kind::Endpoints => endpoints_ready = true,
                        Kind::StaticRoutes => statics_ready = true,
                    }
                    info!(?what, "initial list from the API server complete");
                }
                Signal::Listing => continue,
                Signal::Changed => {}
                Signal::Failed(e) => {
                    metrics
                        .api_errors
                        .get_or_create(&crate::ops::metrics::ComponentLabels {
                            component: "watch".into(),
                        })
                        .inc();
                    warn!(error = %e, "watching the API server failed; retrying, routes kept as they are");
                    continue;
                }
            }
            if !(routes_ready && node_ready && endpoints_ready && statics_ready) {
                continue;
            }
            let node_labels = match nodes.state().first() {
                Some(n) => n.metadata.labels.clone().unwrap_or_default(),
                None => {
                    warn!(node = %node, "this node's Node object does not exist; planning with no labels");
                    Default::default()
                }
            };
            let control_plane = control_plane();
            let mut all = routes.state();
            if let Some(s) = statics.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                all.extend(s.state());
            }
            let snapshot = Snapshot {
                routes: all,
                node_labels: Some(node_labels),
                control_plane: Some(control_plane),
            };
            if tx.send(snapshot).await.is_err() {
                return;
            }
        }
    });
}

/// The StaticRoutes while their CRD is served, as the Routes they plan as.
type Statics = std::sync::Arc<std::sync::Mutex<Option<reflector::Store<Route>>>>;

/// Is this the static route operator's CRD, established and serving `v1`?
fn serves_static_routes(crd: &CustomResourceDefinition) -> bool {
    let established = crd
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        });
    established
        && crd.metadata.deletion_timestamp.is_none()
        && crd.spec.versions.iter().any(|v| v.name == "v1" && v.served)
}

/// Follows the StaticRoute CRD (by name) and, while it is served, the StaticRoutes. The
/// signals: `Ready(StaticRoutes)` once it is known that the CRD is absent, or once the
/// StaticRoutes are listed; `Changed` when they change or the CRD goes away.
fn static_routes(client: Client) -> (futures::stream::BoxStream<'static, Signal>, Statics) {
    let statics: Statics = Default::default();
    let (tx, rx) = futures::channel::mpsc::unbounded::<Signal>();
    let store = statics.clone();
    tokio::spawn(async move {
        let crds = watcher(
            Api::<CustomResourceDefinition>::all(client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={STATIC_CRD}")),
        )
        .boxed();
        let mut crds = super::retry::backoff(crds).boxed();
        // During a (re)list: whether the listed CRD serves StaticRoutes.
        let mut listing: Option<bool> = None;
        let mut served: Option<bool> = None;
        let mut follower: Option<tokio::task::JoinHandle<()>> = None;
        while let Some(e) = crds.next().await {
            let now = match e {
                Ok(watcher::Event::Init) => {
                    listing = Some(false);
                    continue;
                }
                Ok(watcher::Event::InitApply(c)) => {
                    listing = Some(serves_static_routes(&c));
                    continue;
                }
                Ok(watcher::Event::InitDone) => listing.take().unwrap_or(false),
                Ok(watcher::Event::Apply(c)) => serves_static_routes(&c),
                Ok(watcher::Event::Delete(_)) => false,
                // Not allowed to read CRDs (the RBAC of an older release): StaticRoutes
                // cannot be followed, which must not hold the Routes back. Asked again
                // (the watcher retries), so a fixed ClusterRole is picked up.
                Err(watcher::Error::InitialListFailed(kube::Error::Api(st))) if st.code == 403 => {
                    if served.is_some() {
                        continue;
                    }
                    warn!(crd = STATIC_CRD, error = %st.message, "cannot read CustomResourceDefinitions: StaticRoutes are not followed (grant list/watch on customresourcedefinitions, see deploy/rbac.yaml)");
                    false
                }
                Err(e) => {
                    let _ = tx.unbounded_send(Signal::Failed(e.to_string()));
                    continue;
                }
            };
            if served == Some(now) {
                continue;
            }
            let first = served.is_none();
            served = Some(now);
            if let Some(f) = follower.take() {
                f.abort();
            }
            if now {
                info!(
                    crd = STATIC_CRD,
                    "the StaticRoute CRD is served: following StaticRoutes"
                );
                let (reader, writer) = reflector::store::<Route>();
                *store.lock().unwrap_or_else(|p| p.into_inner()) = Some(reader);
                follower = Some(tokio::spawn(follow_static_routes(
                    client.clone(),
                    writer,
                    tx.clone(),
                )));
            } else {
                if !first {
                    info!(
                        crd = STATIC_CRD,
                        "the StaticRoute CRD is gone: StaticRoutes no longer followed"
                    );
                }
                *store.lock().unwrap_or_else(|p| p.into_inner()) = None;
                let sig = if first {
                    Signal::Ready(Kind::StaticRoutes)
                } else {
                    Signal::Changed
                };
                if tx.unbounded_send(sig).is_err() {
                    return;
                }
            }
        }
    });
    (rx.boxed(), statics)
}

/// The StaticRoutes into `writer`, as Routes.
async fn follow_static_routes(
    client: Client,
    writer: reflector::store::Writer<Route>,
    tx: futures::channel::mpsc::UnboundedSender<Signal>,
) {
    let as_route = |s: StaticRoute| owner::from_static(&s);
    let events =
        watcher(Api::<StaticRoute>::all(client), watcher::Config::default()).map(move |e| {
            e.map(|e| match e {
                watcher::Event::Apply(s) => watcher::Event::Apply(as_route(s)),
                watcher::Event::Delete(s) => watcher::Event::Delete(as_route(s)),
                watcher::Event::InitApply(s) => watcher::Event::InitApply(as_route(s)),
                watcher::Event::Init => watcher::Event::Init,
                watcher::Event::InitDone => watcher::Event::InitDone,
            })
        });
    let events = reflector(writer, events).boxed();
    let mut events = super::retry::backoff(events).boxed();
    while let Some(e) = events.next().await {
        if tx.unbounded_send(signal(Kind::StaticRoutes, e)).is_err() {
            return;
        }
    }
}

/// The addresses of the control plane, read from a store.
type Addresses = Box<dyn Fn() -> Vec<std::net::IpAddr> + Send>;

/// Follows the `kubernetes` Service's endpoints: its EndpointSlices (discovery.k8s.io/v1)
/// where the API server serves them, else the core/v1 Endpoints (which is all a server
/// before 1.21 has). The choice is made once the first request answers.
fn control_plane_endpoints(
    client: Client,
) -> (futures::stream::BoxStream<'static, Signal>, Addresses) {
    let (slices, slices_writer) = reflector::store::<EndpointSlice>();
    let (endpoints, endpoints_writer) = reflector::store::<Endpoints>();
    let events = stream::once(async move {
        let use_slices = serves_endpoint_slices(&client).await;
        info!(
            api = if use_slices {
                "discovery.k8s.io/v1 EndpointSlice"
            } else {
                "core/v1 Endpoints"
            },
            "following the control-plane endpoints"
        );
        if use_slices {
            let events = reflector(
                slices_writer,
                watcher(
                    Api::<EndpointSlice>::namespaced(client, "default"),
                    watcher::Config::default().labels("kubernetes.io/service-name=kubernetes"),
                ),
            )
            .boxed();
            super::retry::backoff(events)
                .map(|e| signal(Kind::Endpoints, e))
                .boxed()
        } else {
            let events = reflector(
                endpoints_writer,
                watcher(
                    Api::<Endpoints>::namespaced(client, "default"),
                    watcher::Config::default().fields("metadata.name=kubernetes"),
                ),
            )
            .boxed();
            super::retry::backoff(events)
                .map(|e| signal(Kind::Endpoints, e))
                .boxed()
        }
    })
    .flatten()
    .boxed();
    let addresses: Addresses = Box::new(move || {
        let mut v: Vec<std::net::IpAddr> = slices
            .state()
            .iter()
            .flat_map(|s| s.endpoints.iter())
            // Not ready: still an endpoint the node may be sent to; keep it protected
            // unless it is explicitly terminating.
            .filter(|e| e.conditions.as_ref().and_then(|c| c.terminating) != Some(true))
            .flat_map(|e| e.addresses.iter())
            .filter_map(|a| a.parse().ok())
            .chain(
                endpoints
                    .state()
                    .iter()
                    .flat_map(|e| e.subsets.iter().flatten())
                    .flat_map(|s| s.addresses.iter().flatten())
                    .filter_map(|a| a.ip.parse().ok()),
            )
            .collect();
        v.sort();
        v.dedup();
        v
    });
    (events, addresses)
}

/// Does the API server serve discovery.k8s.io/v1 EndpointSlices? Asked until it answers.
async fn serves_endpoint_slices(client: &Client) -> bool {
    let mut wait = std::time::Duration::from_millis(500);
    loop {
        match client.list_api_group_resources("discovery.k8s.io/v1").await {
            Ok(list) => return list.resources.iter().any(|r| r.name == "endpointslices"),
            Err(kube::Error::Api(s)) if s.code == 404 => return false,
            Err(e) => {
                warn!(error = %e, retry_in = ?wait, "cannot ask the API server which APIs it serves; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(std::time::Duration::from_secs(2));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock_api;

    #[tokio::test]
    async fn endpoint_slices_are_used_where_served_and_asked_again_on_errors() {
        let (client, mut handle) = mock_api::client();
        let ask = tokio::spawn({
            let c = client.clone();
            async move { serves_endpoint_slices(&c).await }
        });
        let unavailable = serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "unavailable", "reason": "ServiceUnavailable", "code": 503});
        let (_, uri, _) = mock_api::next(&mut handle, 503, unavailable).await;
        assert_eq!(uri, "/apis/discovery.k8s.io/v1");
        let list = serde_json::json!({"kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": "discovery.k8s.io/v1", "resources": [{"name": "endpointslices",
            "singularName": "endpointslice", "namespaced": true, "kind": "EndpointSlice",
            "verbs": ["list", "watch"]}]});
        mock_api::next(&mut handle, 200, list).await;
        assert!(ask.await.unwrap());

        let ask = tokio::spawn(async move { serves_endpoint_slices(&client).await });
        let gone = serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "the server could not find the requested resource", "reason": "NotFound", "code": 404});
        mock_api::next(&mut handle, 404, gone).await;
        assert!(!ask.await.unwrap(), "a 1.20 server: core/v1 Endpoints");
    }
}
