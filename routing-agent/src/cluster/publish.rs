//! Adapter: publishes what this node did to the API server. Its [`NodeRouteStatus`] (named
//! after the node, owned by its Node so that it goes with it) by server-side apply, only
//! when the content changed (never on a timer), and Events on the Routes, rate-limited.
//!
//! The agent sends [`Report`]s; a slow or unreachable API server never blocks the agent:
//! the latest status wins and is retried with back-off.
use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, ObjectReference};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource as _};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::cluster::events::Events;
use crate::logic::crd::{API_VERSION, NodeRouteStatus, NodeRoutes, Route};
use crate::logic::report::{self, Note};

/// Field manager of the agent's writes.
pub const MANAGER: &str = "routing-agent";

/// What the agent hands over after a reconcile that changed its report.
#[derive(Debug)]
pub struct Report {
    /// Shared with the agent, which compares the next report with it (one copy of a
    /// status that lists every destination, not one per holder).
    pub status: std::sync::Arc<NodeRoutes>,
    pub notes: Vec<Note>,
    /// Route name → reference (for Events).
    pub refs: BTreeMap<String, ObjectReference>,
}

/// The wall clock as RFC 3339, to the second (status timestamps).
pub fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// The references of `routes`, for [`Report::refs`] (by owner key): a StaticRoute's
/// Events are about the StaticRoute itself.
pub fn refs<R: std::borrow::Borrow<Route>>(routes: &[R]) -> BTreeMap<String, ObjectReference> {
    use crate::logic::owner::{self, Kind};
    routes
        .iter()
        .map(|r| r.borrow())
        .filter_map(|r| {
            let key = r.metadata.name.clone()?;
            let reference = match owner::parse(&key) {
                (Kind::Route, _) => r.object_ref(&()),
                (Kind::StaticRoute, name) => ObjectReference {
                    api_version: Some(crate::logic::crd::STATIC_API_VERSION.into()),
                    kind: Some("StaticRoute".into()),
                    name: Some(name.to_string()),
                    uid: r.metadata.uid.clone(),
                    ..Default::default()
                },
            };
            Some((key, reference))
        })
        .collect()
}

/// Starts the publisher for node `node`. Reports that cannot be queued are dropped by the
/// sender (the next one carries the state anyway).
pub fn spawn(
    client: Client,
    node: String,
    metrics: std::sync::Arc<crate::ops::metrics::Metrics>,
) -> mpsc::Sender<Report> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(run(client, node, rx, metrics));
    tx
}

/// The shortest time between two writes of this node's NodeRouteStatus.
const WRITE_GAP: Duration = Duration::from_secs(1);

async fn run(
    client: Client,
    node: String,
    mut rx: mpsc::Receiver<Report>,
    metrics: std::sync::Arc<crate::ops::metrics::Metrics>,
) {
    let api: Api<NodeRouteStatus> = Api::all(client.clone());
    let events = Events::new(client.clone(), MANAGER, Some(node.clone()));
    let mut created = false;
    let mut written: Option<std::sync::Arc<NodeRoutes>> = None;
    let mut pending: Option<std::sync::Arc<NodeRoutes>> = None;
    let mut refs: BTreeMap<String, ObjectReference> = BTreeMap::new();
    let mut backoff = Duration::from_secs(1);
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut last_write: Option<tokio::time::Instant> = None;
    loop {
        let retry = async {
            match retry_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        let mut notes = Vec::new();
        tokio::select! {
            r = rx.recv() => {
                let Some(r) = r else { return };
                let mut r = r;
                // Coalesce: the latest status wins; every note is kept.
                loop {
                    notes.extend(std::mem::take(&mut r.notes));
                    refs.extend(std::mem::take(&mut r.refs));
                    match rx.try_recv() {
                        Ok(next) => r = next,
                        Err(_) => break,
                    }
                }
                pending = Some(r.status);
            }
            _ = retry => retry_at = None,
        }
        for n in notes {
            if let Some(r) = refs.get(&n.route) {
                events
                    .publish(r, &n.key, n.warning, &n.reason, n.note)
                    .await;
            }
        }
        if retry_at.is_some() {
            continue;
        }
        let Some(status) = pending.take() else {
            continue;
        };
        if written.as_ref().is_some_and(|w| report::same(w, &status)) {
            continue;
        }
        // At most one write per WRITE_GAP: changes in between are coalesced into the next
        // (the object lists every destination: at 10,000 a write costs the API server far
        // more than the agent's edit that caused it).
        if let Some(t) = last_write.filter(|t| t.elapsed() < WRITE_GAP) {
            pending = Some(status);
            retry_at = Some(t + WRITE_GAP);
            continue;
        }
        last_write = Some(tokio::time::Instant::now());
        let result = async {
            if !created {
                create(&client, &api, &node).await?;
                created = true;
            }
            write(&api, &node, &status).await
        }
        .await;
        match result {
            Ok(()) => {
                debug!(
                    applied = status.applied,
                    failed = status.failed,
                    "node status written"
                );
                written = Some(status);
                backoff = Duration::from_secs(1);
            }
            Err(e) => {
                metrics
                    .api_errors
                    .get_or_create(&crate::ops::metrics::ComponentLabels {
                        component: "status".into(),
                    })
                    .inc();
                if matches!(&e, kube::Error::Api(s) if s.code == 404) {
                    created = false;
                }
                warn!(error = %e, retry_in = ?backoff, "cannot write this node's NodeRouteStatus; will retry");
                pending = Some(status);
                retry_at = Some(tokio::time::Instant::now() + backoff);
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
        }
    }
}

/// Creates (or adopts) the object, owned by the Node when the Node is there.
async fn create(client: &Client, api: &Api<NodeRouteStatus>, node: &str) -> kube::Result<()> {
    let owner = match Api::<Node>::all(client.clone()).get_opt(node).await? {
        Some(n) => n.controller_owner_ref(&()).map(|mut o| {
            o.controller = None;
            o.block_owner_deletion = None;
            o
        }),
        None => None,
    };
    let mut meta = serde_json::json!({"name": node});
    if let Some(o) = owner {
        meta["ownerReferences"] = serde_json::json!([o]);
    }
    let obj = serde_json::json!({
        "apiVersion": API_VERSION,
        "kind": "NodeRouteStatus",
        "metadata": meta,
        "spec": {"nodeName": node},
    });
    api.patch(
        node,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&obj),
    )
    .await?;
    info!(node, "NodeRouteStatus in place");
    Ok(())
}

async fn write(api: &Api<NodeRouteStatus>, node: &str, status: &NodeRoutes) -> kube::Result<()> {
    let obj = serde_json::json!({
        "apiVersion": API_VERSION,
        "kind": "NodeRouteStatus",
        "status": status,
    });
    api.patch_status(
        node,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&obj),
    )
    .await?;
    Ok(())
}

/// The fast tier: the publisher against a mock API server (tower-test).
#[cfg(test)]
mod tests {
    use super::*;
    use crate::logic::crd::{NodeRoute, RouteSpec};
    use crate::mock_api;

    /// What the API server answers to a write of the node's object.
    fn obj() -> serde_json::Value {
        serde_json::json!({"apiVersion": API_VERSION, "kind": "NodeRouteStatus",
            "metadata": {"name": "node-a"}, "spec": {"nodeName": "node-a"}})
    }

    fn status(applied: u32) -> NodeRoutes {
        NodeRoutes {
            applied,
            routes: (0..applied)
                .map(|i| NodeRoute {
                    name: format!("r{i}"),
                    state: crate::logic::crd::APPLIED.into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn body_of_event() -> serde_json::Value {
        serde_json::json!({"apiVersion": "v1", "kind": "Event", "metadata": {"name": "e"},
            "involvedObject": {}})
    }

    fn report(applied: u32, notes: Vec<Note>) -> Report {
        let r = Route::new(
            "r0",
            RouteSpec {
                destinations: vec!["1.0.0.0/8".into()],
                gateways: vec!["10.0.0.1".into()],
                node_selector: None,
            },
        );
        Report {
            status: std::sync::Arc::new(status(applied)),
            notes,
            refs: refs(&[r]),
        }
    }

    #[tokio::test]
    async fn creates_once_then_writes_the_status_only_when_it_changes() {
        let (client, mut handle) = mock_api::client();
        let tx = spawn(client, "node-a".into(), Default::default());
        tx.send(report(1, vec![])).await.unwrap();
        let node = serde_json::json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node-a", "uid": "u-1"}});
        let (m, uri, _) = mock_api::next(&mut handle, 200, node).await;
        assert_eq!((m.as_str(), uri.as_str()), ("GET", "/api/v1/nodes/node-a"));
        let (m, uri, body) = mock_api::next(&mut handle, 200, obj()).await;
        assert_eq!(m, "PATCH");
        assert!(
            uri.starts_with(
                "/apis/networking.doks.digitalocean.com/v1alpha1/noderoutestatuses/node-a?"
            ),
            "{uri}"
        );
        assert_eq!(body["metadata"]["ownerReferences"][0]["uid"], "u-1");
        assert_eq!(body["spec"]["nodeName"], "node-a");
        let (m, uri, body) = mock_api::next(&mut handle, 200, obj()).await;
        assert_eq!(m, "PATCH");
        assert!(
            uri.contains("/noderoutestatuses/node-a/status?")
                && uri.contains("fieldManager=routing-agent"),
            "{uri}"
        );
        assert_eq!(body["status"]["applied"], 1);

        // The same status again: nothing is sent. A note: one Event, still no status write.
        tx.send(report(1, vec![])).await.unwrap();
        let note = Note {
            route: "r0".into(),
            warning: true,
            reason: "GatewayWithdrawn".into(),
            note: "node node-a: gateway 10.0.0.1 withdrawn".into(),
            key: "r0/GatewayWithdrawn/10.0.0.1".into(),
        };
        tx.send(report(1, vec![note])).await.unwrap();
        let (m, uri, body) = mock_api::next(&mut handle, 201, body_of_event()).await;
        assert_eq!(
            (m.as_str(), uri.as_str()),
            ("POST", "/api/v1/namespaces/default/events?")
        );
        assert_eq!(body["reason"], "GatewayWithdrawn");
        assert_eq!(body["involvedObject"]["kind"], "Route");
        assert_eq!(body["source"]["host"], "node-a");
        // Changes: written, at most one write per WRITE_GAP (the latest of those between).
        tx.send(report(2, vec![])).await.unwrap();
        tx.send(report(3, vec![])).await.unwrap();
        let (m, uri, body) = mock_api::next(&mut handle, 200, obj()).await;
        assert!(m == "PATCH" && uri.contains("/status?"), "{m} {uri}");
        assert_eq!(body["status"]["applied"], 3);
        // Nothing else pending.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), handle.next_request())
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn a_failed_write_is_retried_with_the_latest_status() {
        let (client, mut handle) = mock_api::client();
        let tx = spawn(client, "node-a".into(), Default::default());
        tx.send(report(1, vec![])).await.unwrap();
        let gone = serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "nodes \"node-a\" not found", "reason": "NotFound", "code": 404});
        let (m, _, _) = mock_api::next(&mut handle, 404, gone).await;
        assert_eq!(m, "GET");
        let (_, _, body) = mock_api::next(&mut handle, 200, obj()).await;
        assert!(
            body["metadata"].get("ownerReferences").is_none(),
            "no Node, no owner"
        );
        let unavailable = serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "etcd down", "reason": "ServiceUnavailable", "code": 503});
        let (m, uri, _) = mock_api::next(&mut handle, 503, unavailable).await;
        assert!(m == "PATCH" && uri.contains("/status?"));
        // Meanwhile the status changed: the retry carries the new one.
        tx.send(report(3, vec![])).await.unwrap();
        let (m, uri, body) = mock_api::next(&mut handle, 200, obj()).await;
        assert!(m == "PATCH" && uri.contains("/status?"), "{m} {uri}");
        assert_eq!(body["status"]["applied"], 3);
    }
}
