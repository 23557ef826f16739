//! `routing-agent controller`: the cluster-wide side, one replica (a Deployment).
//!
//! - Summarises each Route's status from the nodes' [`NodeRouteStatus`] objects and the
//!   Nodes ([`crate::logic::summary`]): selected / ready / failed / pending, conditions, the first
//!   failures. Written by server-side apply, only when it changed.
//! - Holds the one finalizer of every Route ([`FINALIZER`], kube-runtime's `finalizer`):
//!   a Route being deleted keeps it until no existing node's report lists the Route any
//!   more, or until `--deletion-timeout` since the deletion was asked (a node whose agent
//!   is stopped or unreachable then cleans up when its agent next lists the Routes: a Route
//!   that no longer exists is garbage for it). One finalizer per Route, whatever the
//!   number of nodes.
//! - One Event per Route when it becomes invalid (rather than one per node), and one when
//!   a deletion gave up waiting.
//!
//! Everything is level-based and idempotent: a second replica running for a moment (a
//! rollout) writes the same thing.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource as _};
use tracing::{info, warn};

use crate::cluster::events::Events;
use crate::logic::crd::{
    API_VERSION, FINALIZER, KIND, NodeRouteStatus, NodeRoutes, Route, RouteStatus,
};
use crate::logic::selector::NodeInfo;
use crate::logic::summary::{self, Deletion};

/// Field manager of the controller's writes.
pub const MANAGER: &str = "routing-agent-controller";

#[derive(Clone, Debug)]
pub struct Config {
    /// How long a Route being deleted waits for nodes that still list it.
    pub deletion_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Kube(#[from] kube::Error),
    /// Not an error: a deletion waiting for nodes (kube-runtime's finalizer keeps the
    /// finalizer while the cleanup does not succeed).
    #[error("waiting for nodes {nodes:?} to remove the route")]
    Waiting { nodes: Vec<String>, left: Duration },
}

struct Ctx {
    routes: Api<Route>,
    reports: Store<NodeRouteStatus>,
    nodes: Store<PartialObjectMeta<Node>>,
    events: Events,
    cfg: Config,
}

impl Ctx {
    fn nodes(&self) -> Vec<NodeInfo> {
        let mut v: Vec<NodeInfo> = self
            .nodes
            .state()
            .iter()
            .filter_map(|n| {
                Some(NodeInfo {
                    name: n.metadata.name.clone()?,
                    labels: n.metadata.labels.clone().unwrap_or_default(),
                })
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    fn reports(&self) -> BTreeMap<String, NodeRoutes> {
        self.reports
            .state()
            .iter()
            .filter_map(|r| Some((r.metadata.name.clone()?, r.status.clone()?)))
            .collect()
    }

    async fn event(&self, route: &Route, warning: bool, reason: &str, note: String) {
        let key = format!(
            "{}/{reason}",
            route.metadata.name.as_deref().unwrap_or_default()
        );
        self.events
            .publish(&route.object_ref(&()), &key, warning, reason, note)
            .await;
    }
}

/// Runs until the process is stopped.
pub async fn run(
    client: Client,
    cfg: Config,
    probes: Arc<crate::ops::http::Probes>,
) -> anyhow::Result<()> {
    let (reports, reports_writer) = reflector::store::<NodeRouteStatus>();
    let (nodes, nodes_writer) = reflector::store::<PartialObjectMeta<Node>>();
    let report_changes = reflector::reflector(
        reports_writer,
        watcher(
            Api::<NodeRouteStatus>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .map(|e| e.map(|_| ()).map_err(|e| e.to_string()));
    // Labels are what matters of a Node here; their status churn is filtered out.
    let node_changes = reflector::reflector(
        nodes_writer,
        watcher(
            Api::<PartialObjectMeta<Node>>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .map(|e| e.map(|_| ()).map_err(|e| e.to_string()));
    let triggers = stream::select(report_changes, node_changes).filter_map(|r| async move {
        match r {
            Ok(()) => Some(()),
            Err(e) => {
                warn!(error = %e, "watching NodeRouteStatus/Node failed; retrying");
                None
            }
        }
    });
    probes.beat();
    {
        let (reports, nodes) = (reports.clone(), nodes.clone());
        tokio::spawn(async move {
            if reports.wait_until_ready().await.is_ok() && nodes.wait_until_ready().await.is_ok() {
                probes.set_ready();
            }
        });
    }
    let routes: Api<Route> = Api::all(client.clone());
    let ctx = Arc::new(Ctx {
        routes: routes.clone(),
        reports,
        nodes,
        events: Events::new(client.clone(), MANAGER, std::env::var("POD_NAME").ok()),
        cfg,
    });
    info!("routing-agent controller starting");
    Controller::new(routes, watcher::Config::default())
        .reconcile_all_on(triggers)
        .with_config(controller::Config::default().debounce(Duration::from_millis(300)))
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            match r {
                Ok(_) => {}
                Err(kube::runtime::controller::Error::ReconcilerFailed(e, obj)) => {
                    tracing::debug!(route = %obj.name, "{e}");
                }
                Err(e) => warn!(error = %e, "controller"),
            }
        })
        .await;
    Ok(())
}

async fn reconcile(route: Arc<Route>, ctx: Arc<Ctx>) -> Result<Action, finalizer::Error<Error>> {
    // Count nodes and reports only once both lists are complete.
    let _ = ctx.nodes.wait_until_ready().await;
    let _ = ctx.reports.wait_until_ready().await;
    let api = ctx.routes.clone();
    finalizer(&api, FINALIZER, route, |event| async {
        match event {
            finalizer::Event::Apply(r) => apply(&r, &ctx).await,
            finalizer::Event::Cleanup(r) => cleanup(&r, &ctx).await,
        }
    })
    .await
}

fn error_policy(_route: Arc<Route>, e: &finalizer::Error<Error>, _ctx: Arc<Ctx>) -> Action {
    match e {
        finalizer::Error::CleanupFailed(Error::Waiting { left, .. }) => {
            Action::requeue((*left).clamp(Duration::from_millis(200), Duration::from_secs(1)))
        }
        e => {
            warn!(error = %e, "reconciling a Route failed; retrying");
            Action::requeue(Duration::from_secs(5))
        }
    }
}

async fn apply(route: &Route, ctx: &Ctx) -> Result<Action, Error> {
    let name = route.metadata.name.clone().unwrap_or_default();
    let prev = route.status.as_ref();
    let status = summary::summarize(
        route,
        &ctx.nodes(),
        &ctx.reports(),
        prev,
        &crate::cluster::publish::now(),
    );
    if prev == Some(&status) {
        return Ok(Action::await_change());
    }
    let was_invalid = prev.and_then(valid_message);
    if let Some(msg) = valid_message(&status)
        && was_invalid.as_deref() != Some(msg.as_str())
    {
        ctx.event(route, true, "Invalid", msg).await;
    }
    write_status(&ctx.routes, &name, &status).await?;
    info!(route = %name, nodes = %status.nodes, failed = status.failed, pending = status.pending, "route status");
    Ok(Action::await_change())
}

/// The message of a `Valid=False` condition.
fn valid_message(s: &RouteStatus) -> Option<String> {
    s.conditions
        .iter()
        .find(|c| c.type_ == "Valid" && c.status == "False")
        .map(|c| c.message.clone())
}

async fn write_status(api: &Api<Route>, name: &str, status: &RouteStatus) -> kube::Result<()> {
    let obj = serde_json::json!({
        "apiVersion": API_VERSION,
        "kind": KIND,
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&obj),
    )
    .await?;
    Ok(())
}

async fn cleanup(route: &Route, ctx: &Ctx) -> Result<Action, Error> {
    let name = route.metadata.name.clone().unwrap_or_default();
    let asked = route
        .metadata
        .deletion_timestamp
        .as_ref()
        .map(|t| t.0)
        .unwrap_or_else(k8s_openapi::jiff::Timestamp::now);
    let waited = k8s_openapi::jiff::Timestamp::now()
        .duration_since(asked)
        .unsigned_abs();
    let carriers = summary::still_carried_by(&name, &ctx.nodes(), &ctx.reports());
    match summary::deletion(carriers, waited, ctx.cfg.deletion_timeout) {
        Deletion::Done => {
            info!(route = %name, "no node carries the route any more; releasing it");
            Ok(Action::await_change())
        }
        Deletion::Wait(nodes) => Err(Error::Waiting {
            nodes,
            left: ctx.cfg.deletion_timeout.saturating_sub(waited),
        }),
        Deletion::GaveUp(nodes) => {
            let msg = format!(
                "deleted after {}s without confirmation from nodes {}: their agent removes the \
                 route when it runs again",
                ctx.cfg.deletion_timeout.as_secs(),
                nodes.join(", ")
            );
            warn!(route = %name, nodes = ?nodes, "{msg}");
            ctx.event(route, true, "DeletedWithoutConfirmation", msg)
                .await;
            Ok(Action::await_change())
        }
    }
}

/// The fast tier: the controller's writes against a mock API server (tower-test): what it
/// sends, and what it does not.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::logic::crd::{NodeRoute, NodeRouteStatusSpec, RouteSpec};
    use crate::mock_api;
    use kube::runtime::watcher::Event as WatchEvent;
    use std::time::Duration;

    fn route(deleting: bool) -> Route {
        let mut r = Route::new(
            "r",
            RouteSpec {
                destinations: vec!["1.0.0.0/8".into()],
                gateways: vec!["10.0.0.1".into()],
                node_selector: None,
            },
        );
        r.metadata.generation = Some(1);
        r.metadata.finalizers = Some(vec![FINALIZER.into()]);
        if deleting {
            r.metadata.deletion_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::now(),
                ));
        }
        r
    }

    /// A context whose stores hold Node `node-a` and its report (listing `carried`).
    fn ctx(client: Client, carried: &[&str], timeout: Duration) -> Arc<Ctx> {
        let (reports, mut rw) = reflector::store::<NodeRouteStatus>();
        let (nodes, mut nw) = reflector::store::<PartialObjectMeta<Node>>();
        let mut nrs = NodeRouteStatus::new(
            "node-a",
            NodeRouteStatusSpec {
                node_name: "node-a".into(),
            },
        );
        nrs.status = Some(NodeRoutes {
            applied: carried.len() as u32,
            routes: carried
                .iter()
                .map(|n| NodeRoute {
                    name: n.to_string(),
                    generation: Some(1),
                    state: crate::logic::crd::APPLIED.into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        });
        rw.apply_watcher_event(&WatchEvent::Init);
        rw.apply_watcher_event(&WatchEvent::InitApply(nrs));
        rw.apply_watcher_event(&WatchEvent::InitDone);
        let mut node = PartialObjectMeta::<Node>::default();
        node.metadata.name = Some("node-a".into());
        nw.apply_watcher_event(&WatchEvent::Init);
        nw.apply_watcher_event(&WatchEvent::InitApply(node));
        nw.apply_watcher_event(&WatchEvent::InitDone);
        Arc::new(Ctx {
            routes: Api::all(client.clone()),
            reports,
            nodes,
            events: Events::new(client, MANAGER, None),
            cfg: Config {
                deletion_timeout: timeout,
            },
        })
    }

    /// Answers the next request with `reply` and returns (method, URI, body).

    #[tokio::test]
    async fn the_status_is_applied_once_then_not_written_while_it_holds() {
        let (client, mut handle) = mock_api::client();
        let ctx = ctx(client, &["r"], Duration::from_secs(15));
        let r = route(false);
        let task = tokio::spawn({
            let (ctx, r) = (ctx.clone(), r.clone());
            async move { apply(&r, &ctx).await }
        });
        let (method, uri, body) =
            mock_api::next(&mut handle, 200, serde_json::to_value(&r).unwrap()).await;
        assert_eq!(method, "PATCH");
        assert!(uri.contains("/routes/r/status"), "{uri}");
        assert!(
            uri.contains("fieldManager=routing-agent-controller") && uri.contains("force=true"),
            "{uri}"
        );
        assert_eq!(body["status"]["nodes"], "1/1");
        assert_eq!(body["status"]["observedGeneration"], 1);
        task.await.unwrap().unwrap();

        // The object now carries that status: nothing to write.
        let mut written = r.clone();
        written.status = Some(serde_json::from_value(body["status"].clone()).unwrap());
        tokio::time::timeout(Duration::from_secs(2), apply(&written, &ctx))
            .await
            .expect("no request was made (none is answered)")
            .unwrap();
    }

    #[tokio::test]
    async fn a_deletion_waits_while_a_node_carries_the_route() {
        let (client, _handle) = mock_api::client();
        let ctx = ctx(client, &["r"], Duration::from_secs(15));
        let e = tokio::time::timeout(
            Duration::from_secs(2),
            reconcile(Arc::new(route(true)), ctx),
        )
        .await
        .expect("no request while waiting")
        .unwrap_err();
        match e {
            finalizer::Error::CleanupFailed(Error::Waiting { nodes, left }) => {
                assert_eq!(nodes, vec!["node-a".to_string()]);
                assert!(left > Duration::from_secs(10));
            }
            e => panic!("{e}"),
        }
    }

    #[tokio::test]
    async fn the_finalizer_is_removed_once_no_node_carries_the_route() {
        let (client, mut handle) = mock_api::client();
        let ctx = ctx(client, &["other"], Duration::from_secs(15));
        let r = route(true);
        let task = tokio::spawn(reconcile(Arc::new(r.clone()), ctx));
        let (method, uri, body) =
            mock_api::next(&mut handle, 200, serde_json::to_value(&r).unwrap()).await;
        assert_eq!(method, "PATCH");
        assert!(uri.ends_with("/routes/r?"), "{uri}");
        assert_eq!(body[1]["op"], "remove");
        assert_eq!(body[1]["path"], "/metadata/finalizers/0");
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn after_the_timeout_the_finalizer_goes_with_an_event_naming_the_node() {
        let (client, mut handle) = mock_api::client();
        let ctx = ctx(client, &["r"], Duration::ZERO);
        let r = route(true);
        let task = tokio::spawn(reconcile(Arc::new(r.clone()), ctx));
        let (method, uri, body) = mock_api::next(&mut handle, 200, serde_json::json!({})).await;
        assert_eq!(method, "POST");
        assert!(
            uri.starts_with("/api/v1/namespaces/default/events"),
            "{uri}"
        );
        assert_eq!(body["reason"], "DeletedWithoutConfirmation");
        assert!(body["message"].as_str().unwrap().contains("node-a"));
        assert_eq!(body["involvedObject"]["name"], "r");
        let (method, _, body) =
            mock_api::next(&mut handle, 200, serde_json::to_value(&r).unwrap()).await;
        assert_eq!(method, "PATCH");
        assert_eq!(body[1]["op"], "remove");
        task.await.unwrap().unwrap();
    }
}
