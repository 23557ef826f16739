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

use crate::crd::{API_VERSION, NodeRouteStatus, NodeRoutes, Route};
use crate::events::Events;
use crate::report::{self, Note};

/// Field manager of the agent's writes.
pub const MANAGER: &str = "routing-agent";

/// What the agent hands over after a reconcile that changed its report.
#[derive(Debug)]
pub struct Report {
    pub status: NodeRoutes,
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

/// The references of `routes`, for [`Report::refs`].
pub fn refs(routes: &[Route]) -> BTreeMap<String, ObjectReference> {
    routes
        .iter()
        .filter_map(|r| Some((r.metadata.name.clone()?, r.object_ref(&()))))
        .collect()
}

/// Starts the publisher for node `node`. Reports that cannot be queued are dropped by the
/// sender (the next one carries the state anyway).
pub fn spawn(client: Client, node: String) -> mpsc::Sender<Report> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(run(client, node, rx));
    tx
}

async fn run(client: Client, node: String, mut rx: mpsc::Receiver<Report>) {
    let api: Api<NodeRouteStatus> = Api::all(client.clone());
    let events = Events::new(client.clone(), MANAGER, Some(node.clone()));
    let mut created = false;
    let mut written: Option<NodeRoutes> = None;
    let mut pending: Option<NodeRoutes> = None;
    let mut refs: BTreeMap<String, ObjectReference> = BTreeMap::new();
    let mut backoff = Duration::from_secs(1);
    let mut retry_at: Option<tokio::time::Instant> = None;
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
