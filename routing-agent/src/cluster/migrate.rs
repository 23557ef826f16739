//! `routing-agent migrate`: the static route operator's StaticRoutes (from the cluster or
//! from files) as Route manifests; with `apply`, the Routes created, waited for until the
//! controller says each is Ready on every node it selects, then the StaticRoutes deleted.
//! What each Route is and when it may take over is the pure [`crate::logic::migrate`].
use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures::future::join_all;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::wait::await_condition;
use kube::{Api, Client, ResourceExt as _};

use crate::logic::crd::{Route, StaticRoute};
use crate::logic::migrate::{self, Step};
use crate::source::dir::{Document, parse_documents};

/// The field manager of what `migrate` writes.
const MANAGER: &str = "routing-agent-migrate";

/// What `migrate --apply` does besides creating the Routes.
pub struct ApplyOptions {
    /// Keep the StaticRoutes (the Route wins on every node; they are reported in conflict).
    pub keep: bool,
    /// How long to wait for the Routes to be Ready.
    pub timeout: Duration,
}

/// The StaticRoutes of the cluster (none when the old operator's CRD is not served).
pub async fn list(client: &Client) -> anyhow::Result<Vec<StaticRoute>> {
    let api: Api<StaticRoute> = Api::all(client.clone());
    match api.list(&Default::default()).await {
        Ok(l) => Ok(l.items),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(Vec::new()),
        Err(e) => Err(e).context("listing StaticRoutes"),
    }
}

/// The StaticRoutes of manifest files (`-` is standard input; a directory: its `*.yaml`
/// and `*.yml`). Other kinds are skipped; a `kind: List` is read item by item.
pub fn read_files(paths: &[PathBuf]) -> anyhow::Result<Vec<StaticRoute>> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("reading {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|e| matches!(e.extension().and_then(|x| x.to_str()), Some("yaml" | "yml")))
                .collect();
            entries.sort();
            files.extend(entries);
        } else {
            files.push(p.clone());
        }
    }
    let mut out = Vec::new();
    for f in files {
        let text = if f == Path::new("-") {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading standard input")?;
            s
        } else {
            std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?
        };
        for d in parse_documents(&f, &text).map_err(|e| anyhow::anyhow!("{e}"))? {
            if let Document::StaticRoute(sr) = d {
                out.push(sr);
            }
        }
    }
    Ok(out)
}

/// Keeps the StaticRoutes named in `names` (all when it is empty); a name that is not
/// there is an error.
pub fn select(mut statics: Vec<StaticRoute>, names: &[String]) -> anyhow::Result<Vec<StaticRoute>> {
    statics.sort_by_key(|s| s.name_any());
    if names.is_empty() {
        return Ok(statics);
    }
    for n in names {
        if !statics.iter().any(|s| &s.name_any() == n) {
            bail!("no StaticRoute {n}");
        }
    }
    Ok(statics
        .into_iter()
        .filter(|s| names.contains(&s.name_any()))
        .collect())
}

/// What to do about each StaticRoute, against the cluster's Routes (`None`: files, no
/// cluster to compare with).
pub async fn steps(
    client: Option<&Client>,
    statics: &[StaticRoute],
) -> anyhow::Result<Vec<(StaticRoute, Step)>> {
    let mut existing = BTreeMap::new();
    if let Some(c) = client {
        let api: Api<Route> = Api::all(c.clone());
        for r in api
            .list(&Default::default())
            .await
            .context("listing Routes")?
        {
            existing.insert(r.name_any(), r);
        }
    }
    Ok(statics
        .iter()
        .map(|s| (s.clone(), migrate::step(s, existing.get(&s.name_any()))))
        .collect())
}

/// The manifest of the Routes the steps create (or find already there, as they are
/// wanted), and the refusals, one line each.
pub fn manifest(steps: &[(StaticRoute, Step)]) -> (String, Vec<String>) {
    let mut routes = Vec::new();
    let mut refused = Vec::new();
    for (sr, step) in steps {
        match step {
            Step::Create(r) => routes.push((**r).clone()),
            Step::Exists => routes.extend(migrate::route_for(sr).ok()),
            Step::Refuse(why) => refused.push(why.clone()),
        }
    }
    (migrate::manifest(&routes), refused)
}

/// Creates the Routes, waits for each to be Ready on every node it selects, then deletes
/// its StaticRoute (kopf's finalizer removed first, see [`migrate::KOPF_FINALIZER`])
/// unless `keep`. One line per step on `say`. Returns the StaticRoutes not moved, with why.
pub async fn apply(
    client: &Client,
    steps: Vec<(StaticRoute, Step)>,
    opts: &ApplyOptions,
    say: &mut impl FnMut(String),
) -> anyhow::Result<Vec<String>> {
    let routes: Api<Route> = Api::all(client.clone());
    let statics: Api<StaticRoute> = Api::all(client.clone());
    let mut failed = Vec::new();
    let mut waiting = Vec::new();
    for (sr, step) in steps {
        let name = sr.name_any();
        match step {
            Step::Refuse(why) => failed.push(why),
            Step::Exists => {
                say(format!(
                    "Route {name} already asks for what StaticRoute {name} does: not created again"
                ));
                waiting.push(sr);
            }
            Step::Create(r) => {
                let pp = PostParams {
                    field_manager: Some(MANAGER.into()),
                    ..Default::default()
                };
                match routes.create(&pp, &r).await {
                    Ok(_) => {
                        say(format!("Route {name} created"));
                        waiting.push(sr);
                    }
                    Err(e) => failed.push(format!(
                        "Route {name}: not created ({e}); StaticRoute {name} is left as it is"
                    )),
                }
            }
        }
    }
    // Every Route waited for at once, each bounded by the same deadline.
    let waits = waiting.iter().map(|sr| {
        let routes = routes.clone();
        let name = sr.name_any();
        async move {
            let ready = |r: Option<&Route>| r.is_some_and(migrate::ready);
            let done =
                tokio::time::timeout(opts.timeout, await_condition(routes.clone(), &name, ready))
                    .await;
            match done {
                Ok(Ok(Some(r))) => Ok(r),
                Ok(Ok(None)) => Err(format!("Route {name} is gone")),
                Ok(Err(e)) => Err(format!("Route {name}: watching it failed ({e})")),
                Err(_) => {
                    let now = routes.get_opt(&name).await.ok().flatten();
                    Err(format!(
                        "Route {name} not Ready after {}s: {}",
                        opts.timeout.as_secs(),
                        now.as_ref()
                            .map(migrate::progress)
                            .unwrap_or_else(|| "gone".into())
                    ))
                }
            }
        }
    });
    let results = join_all(waits).await;
    for (sr, res) in waiting.into_iter().zip(results) {
        let name = sr.name_any();
        let r = match res {
            Ok(r) => r,
            Err(why) => {
                failed.push(format!("{why}; StaticRoute {name} is left as it is"));
                continue;
            }
        };
        say(format!(
            "Route {name} Ready: {}",
            r.status.as_ref().map(|s| s.nodes.as_str()).unwrap_or("")
        ));
        if opts.keep {
            say(format!(
                "StaticRoute {name} kept (--keep): the Route wins its destinations on every node, \
                 where the StaticRoute is reported in conflict until it is deleted"
            ));
            continue;
        }
        match delete_static(&statics, &sr).await {
            Ok(line) => say(line),
            Err(e) => failed.push(format!("StaticRoute {name}: {e:#}")),
        }
    }
    Ok(failed)
}

/// Deletes one StaticRoute as it was read: kopf's finalizer removed first (a patch that
/// fails if the object changed since), then the delete, preconditioned on its uid and
/// resource version. A StaticRoute edited since it was read is left (run again).
async fn delete_static(api: &Api<StaticRoute>, sr: &StaticRoute) -> anyhow::Result<String> {
    let name = sr.name_any();
    let mut rv = sr.resource_version();
    let mut how = "";
    if let Some(keep) = migrate::finalizers_to_keep(sr) {
        let patch = serde_json::json!({
            "metadata": {"finalizers": keep, "resourceVersion": rv}
        });
        let after = api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .context("removing kopf's finalizer (changed since it was read? run again)")?;
        rv = after.resource_version();
        how = " (kopf's finalizer removed first: the old operator's delete handler does not run)";
    }
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid: sr.uid(),
            resource_version: rv,
        }),
        ..Default::default()
    };
    api.delete(&name, &dp)
        .await
        .context("not deleted (changed since it was read? run again)")?;
    Ok(format!("StaticRoute {name} deleted{how}"))
}
