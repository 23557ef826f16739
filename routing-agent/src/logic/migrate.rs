//! `routing-agent migrate`'s core (pure): the Route that takes over from a StaticRoute of
//! the static route operator's, what to do when a Route of that name is already there,
//! and when a Route that took over is ready for its StaticRoute to go.
//!
//! The Route keeps the StaticRoute's name, destinations and one gateway, with no node
//! selector (every node, as the old operator applied it). The agent plans both to the same
//! kernel route, so ownership moves from `StaticRoute/<name>` to `<name>` with an empty
//! diff: the kernel does not change (tested with `ip monitor`).
use std::collections::BTreeMap;

use crate::logic::crd::{Route, RouteSpec, StaticRoute};
use crate::logic::owner;
use crate::logic::route::{self, InvalidRoute};

/// Names, on a Route `migrate` created, the StaticRoute it took over from.
pub const MIGRATED_FROM_ANNOTATION: &str = "networking.doks.digitalocean.com/migrated-from";
/// The agent's own annotations (e.g. the fail mode): carried over from the StaticRoute.
/// The agent's own annotations (the fail mode, migrated-from) begin with this.
pub const OWN_ANNOTATION_PREFIX: &str = "networking.doks.digitalocean.com/";
/// The old operator is a kopf operator with a delete handler, so kopf put this finalizer
/// on every StaticRoute it handled. While its pods run, a deletion runs its handler
/// (`ip route del DST via GW` on every node: the route the agent now holds); once they
/// are gone, the finalizer would hold the deletion forever. `migrate` removes it (and no
/// other finalizer) before it deletes a StaticRoute.
pub const KOPF_FINALIZER: &str = "kopf.zalando.org/KopfFinalizerMarker";
/// A label that says which tool manages an object (Helm, Argo CD...): not copied, the
/// Route is not that tool's.
const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

/// The Route that takes over from `sr`, or why there is none (the error the agent reports
/// for the StaticRoute: kind, name and field).
pub fn route_for(sr: &StaticRoute) -> Result<Route, InvalidRoute> {
    // Validated as the agent plans it, so the errors name the StaticRoute's own fields.
    route::validate(&owner::from_static(sr))?;
    let name = sr.metadata.name.clone().unwrap_or_default();
    let mut r = Route::new(
        &name,
        RouteSpec {
            destinations: sr.spec.destinations.clone(),
            gateways: vec![sr.spec.gateway.clone()],
            node_selector: None,
        },
    );
    let labels: BTreeMap<String, String> = sr
        .metadata
        .labels
        .iter()
        .flatten()
        .filter(|(k, _)| k.as_str() != MANAGED_BY_LABEL)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if !labels.is_empty() {
        r.metadata.labels = Some(labels);
    }
    let mut annotations: BTreeMap<String, String> = sr
        .metadata
        .annotations
        .iter()
        .flatten()
        .filter(|(k, _)| k.starts_with(OWN_ANNOTATION_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    annotations.insert(
        MIGRATED_FROM_ANNOTATION.into(),
        owner::key(owner::Kind::StaticRoute, &name),
    );
    r.metadata.annotations = Some(annotations);
    Ok(r)
}

/// What `migrate` does about one StaticRoute.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Create this Route.
    Create(Box<Route>),
    /// A Route of that name already asks for exactly this (a run before, or by hand):
    /// nothing to create; wait for it as for a created one.
    Exists,
    /// Leave the StaticRoute as it is, for this reason.
    Refuse(String),
}

/// What to do about `sr`, given the Route of the same name if there is one.
pub fn step(sr: &StaticRoute, existing: Option<&Route>) -> Step {
    let want = match route_for(sr) {
        Ok(r) => r,
        Err(e) => return Step::Refuse(format!("{e}; it is left as it is")),
    };
    let name = sr.metadata.name.as_deref().unwrap_or_default();
    let Some(have) = existing else {
        return Step::Create(Box::new(want));
    };
    if have.metadata.deletion_timestamp.is_some() {
        return Step::Refuse(format!(
            "Route {name} is being deleted; StaticRoute {name} is left as it is (run again once it is gone)"
        ));
    }
    if same_routing(have, &want) {
        Step::Exists
    } else {
        Step::Refuse(format!(
            "Route {name} already exists and asks for something else (destinations {:?}, gateways {:?}, {}); \
             StaticRoute {name} is left as it is: delete or rename that Route, or move this one by hand",
            have.spec.destinations,
            have.spec.gateways,
            if have.spec.node_selector.is_some() {
                "a node selector"
            } else {
                "every node"
            }
        ))
    }
}

/// Whether two Routes route the same: the same destinations and gateways once parsed
/// (order, duplicates and spelling aside), both on every node. An invalid one never is.
fn same_routing(a: &Route, b: &Route) -> bool {
    let norm = |r: &Route| {
        let v = route::validate(r).ok()?;
        let mut d = v.destinations;
        let mut g = v.gateways;
        d.sort();
        g.sort();
        Some((d, g, r.spec.node_selector.is_none()))
    };
    match (norm(a), norm(b)) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

/// Whether a Route is ready for its StaticRoute to go: the controller's summary of this
/// generation says Ready on every node it selects.
pub fn ready(r: &Route) -> bool {
    let Some(st) = &r.status else {
        return false;
    };
    st.observed_generation.is_some()
        && st.observed_generation == r.metadata.generation
        && st.selected > 0
        && st.ready == st.selected
        && st
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// How far a Route is (for the progress line while waiting).
pub fn progress(r: &Route) -> String {
    match &r.status {
        None => "no status yet (is `routing-agent controller` running?)".into(),
        Some(st) if st.observed_generation != r.metadata.generation => {
            "status of an older generation".into()
        }
        Some(st) => {
            let why = st
                .conditions
                .iter()
                .find(|c| c.type_ == "Ready")
                .map(|c| format!("{}: {}", c.reason, c.message))
                .unwrap_or_default();
            format!("{} nodes ready ({why})", st.nodes)
        }
    }
}

/// The finalizers a StaticRoute keeps when `migrate` deletes it: all but kopf's.
pub fn finalizers_to_keep(sr: &StaticRoute) -> Option<Vec<String>> {
    let f = sr.metadata.finalizers.as_ref()?;
    f.iter()
        .any(|x| x == KOPF_FINALIZER)
        .then(|| f.iter().filter(|x| *x != KOPF_FINALIZER).cloned().collect())
}

/// The Routes as one multi-document YAML manifest (`kubectl apply -f` takes it).
pub fn manifest(routes: &[Route]) -> String {
    routes
        .iter()
        .map(|r| serde_yaml::to_string(r).expect("a Route serialises"))
        .collect::<Vec<_>>()
        .join("---\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logic::crd::{Condition, RouteStatus, StaticRouteSpec};
    use k8s_openapi::api::core::v1::NodeSelector;

    fn sr(name: &str, dst: &[&str], gw: &str) -> StaticRoute {
        StaticRoute::new(
            name,
            StaticRouteSpec {
                destinations: dst.iter().map(|s| s.to_string()).collect(),
                gateway: gw.into(),
            },
        )
    }

    fn route(name: &str, dst: &[&str], gws: &[&str]) -> Route {
        Route::new(
            name,
            RouteSpec {
                destinations: dst.iter().map(|s| s.to_string()).collect(),
                gateways: gws.iter().map(|s| s.to_string()).collect(),
                node_selector: None,
            },
        )
    }

    #[test]
    fn the_route_keeps_name_destinations_and_gateway_for_every_node() {
        let mut s = sr(
            "static-route-ifconfig.me",
            &["34.160.111.145"],
            "10.116.0.5",
        );
        s.metadata.labels = Some(BTreeMap::from([
            ("team".to_string(), "net".to_string()),
            (MANAGED_BY_LABEL.to_string(), "Helm".to_string()),
        ]));
        s.metadata.annotations = Some(BTreeMap::from([
            (
                "networking.doks.digitalocean.com/fail-mode".to_string(),
                "open".to_string(),
            ),
            ("meta.helm.sh/release-name".to_string(), "x".to_string()),
        ]));
        let r = route_for(&s).unwrap();
        assert_eq!(r.metadata.name.as_deref(), Some("static-route-ifconfig.me"));
        assert_eq!(r.spec.destinations, vec!["34.160.111.145".to_string()]);
        assert_eq!(r.spec.gateways, vec!["10.116.0.5".to_string()]);
        assert_eq!(r.spec.node_selector, None);
        assert_eq!(
            r.metadata.labels,
            Some(BTreeMap::from([("team".to_string(), "net".to_string())]))
        );
        let a = r.metadata.annotations.unwrap();
        assert_eq!(
            a.get(MIGRATED_FROM_ANNOTATION).map(String::as_str),
            Some("StaticRoute/static-route-ifconfig.me")
        );
        assert_eq!(
            a.get("networking.doks.digitalocean.com/fail-mode")
                .map(String::as_str),
            Some("open")
        );
        assert!(!a.contains_key("meta.helm.sh/release-name"));
    }

    #[test]
    fn the_manifest_applies_as_routes_and_carries_no_status_or_server_fields() {
        let mut s = sr("a", &["34.117.59.81"], "10.116.0.5");
        s.metadata.uid = Some("u".into());
        s.metadata.resource_version = Some("7".into());
        s.metadata.finalizers = Some(vec![KOPF_FINALIZER.into()]);
        let text = manifest(&[
            route_for(&s).unwrap(),
            route_for(&sr("b", &["fd00::/64"], "fd00:1::5")).unwrap(),
        ]);
        let docs: Vec<Route> = text
            .split("---\n")
            .map(|d| serde_yaml::from_str(d).unwrap())
            .collect();
        assert_eq!(docs.len(), 2, "{text}");
        assert!(text.contains("apiVersion: networking.doks.digitalocean.com/v1alpha1"));
        assert!(text.contains("kind: Route"));
        for f in ["uid", "resourceVersion", "finalizers", "status"] {
            assert!(!text.contains(f), "{f} in {text}");
        }
        assert_eq!(docs[1].spec.gateways, vec!["fd00:1::5".to_string()]);
    }

    #[test]
    fn an_invalid_static_route_is_refused_naming_its_kind_and_field() {
        // The old operator's `spec.clusterservice` (a DNS name) leaves the gateway empty.
        let Step::Refuse(why) = step(&sr("dns", &["1.2.3.4"], ""), None) else {
            panic!()
        };
        assert!(why.starts_with("StaticRoute dns: spec.gateway: "), "{why}");
        assert!(why.contains("clusterservice"), "{why}");
        let Step::Refuse(why) = step(&sr("bad", &["1.2.3.400"], "10.0.0.1"), None) else {
            panic!()
        };
        assert!(
            why.starts_with("StaticRoute bad: spec.destinations[0]: "),
            "{why}"
        );
    }

    #[test]
    fn an_existing_route_of_that_name_is_reused_only_when_it_routes_the_same() {
        let s = sr("a", &["34.117.59.81", "10.0.0.0/8"], "10.116.0.5");
        assert!(matches!(step(&s, None), Step::Create(_)));
        // Spelled otherwise, in another order: the same routing.
        let same = route("a", &["10.1.0.0/8", "34.117.59.81/32"], &["10.116.0.5"]);
        assert_eq!(step(&s, Some(&same)), Step::Exists);
        for other in [
            route("a", &["34.117.59.81"], &["10.116.0.5"]),
            route("a", &["34.117.59.81", "10.0.0.0/8"], &["10.116.0.6"]),
            route(
                "a",
                &["34.117.59.81", "10.0.0.0/8"],
                &["10.116.0.5", "10.116.0.6"],
            ),
            route("a", &["34.117.59.81", "10.0.0.0/8"], &["bad"]),
        ] {
            let Step::Refuse(why) = step(&s, Some(&other)) else {
                panic!("{other:?}")
            };
            assert!(why.contains("Route a already exists"), "{why}");
            assert!(why.contains("StaticRoute a is left as it is"), "{why}");
        }
        let mut selective = same.clone();
        selective.spec.node_selector = Some(NodeSelector::default());
        assert!(
            matches!(step(&s, Some(&selective)), Step::Refuse(w) if w.contains("a node selector"))
        );
        let mut going = same;
        going.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Default::default()),
        );
        assert!(matches!(step(&s, Some(&going)), Step::Refuse(w) if w.contains("being deleted")));
    }

    #[test]
    fn ready_means_this_generation_ready_on_every_selected_node() {
        let mut r = route("a", &["1.2.3.4"], &["10.0.0.1"]);
        r.metadata.generation = Some(2);
        assert!(!ready(&r));
        assert!(progress(&r).contains("controller"));
        let cond = |status: &str| Condition {
            type_: "Ready".into(),
            status: status.into(),
            reason: "Applied".into(),
            message: String::new(),
            last_transition_time: String::new(),
        };
        let st = |generation, ready, selected, c: &str| RouteStatus {
            observed_generation: Some(generation),
            nodes: format!("{ready}/{selected}"),
            selected,
            ready,
            conditions: vec![cond(c)],
            ..Default::default()
        };
        r.status = Some(st(2, 3, 3, "True"));
        assert!(ready(&r));
        r.status = Some(st(1, 3, 3, "True"));
        assert!(!ready(&r), "an older generation's summary");
        assert!(progress(&r).contains("older generation"));
        r.status = Some(st(2, 2, 3, "False"));
        assert!(!ready(&r));
        assert!(progress(&r).starts_with("2/3 nodes ready"));
        r.status = Some(st(2, 0, 0, "False"));
        assert!(!ready(&r), "no node selected");
    }

    #[test]
    fn only_kopfs_finalizer_is_removed() {
        let mut s = sr("a", &["1.2.3.4"], "10.0.0.1");
        assert_eq!(finalizers_to_keep(&s), None);
        s.metadata.finalizers = Some(vec![KOPF_FINALIZER.into(), "example.com/keep".into()]);
        assert_eq!(
            finalizers_to_keep(&s),
            Some(vec!["example.com/keep".to_string()])
        );
        s.metadata.finalizers = Some(vec!["example.com/keep".into()]);
        assert_eq!(finalizers_to_keep(&s), None, "nothing to remove");
    }
}
