//! Which object a share of the plan comes from. The planner, the status and the metrics
//! name an owner by one string, its key: a `Route` by its name, a `StaticRoute` (the
//! static route operator's kind, honoured for users moving over) by `StaticRoute/<name>`.
//! No Kubernetes object name contains `/`, so the two never collide.
use crate::logic::crd::{Route, RouteSpec, StaticRoute};

/// The kinds of object the agent plans from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Route,
    StaticRoute,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Route => "Route",
            Kind::StaticRoute => "StaticRoute",
        }
    }
}

const STATIC_PREFIX: &str = "StaticRoute/";

/// The key of the object `name` of `kind`.
pub fn key(kind: Kind, name: &str) -> String {
    match kind {
        Kind::Route => name.to_string(),
        Kind::StaticRoute => format!("{STATIC_PREFIX}{name}"),
    }
}

/// The kind and name a key stands for.
pub fn parse(key: &str) -> (Kind, &str) {
    match key.strip_prefix(STATIC_PREFIX) {
        Some(name) => (Kind::StaticRoute, name),
        None => (Kind::Route, key),
    }
}

/// How a message names the owner: `Route basic`, `StaticRoute primary`.
pub fn describe(key: &str) -> String {
    let (kind, name) = parse(key);
    format!("{} {name}", kind.as_str())
}

/// The field a message names, as the owner's kind spells it: a StaticRoute has one
/// `spec.gateway` where a Route has `spec.gateways[i]`.
pub fn field(key: &str, route_field: &str) -> String {
    match parse(key).0 {
        Kind::StaticRoute if route_field.starts_with("spec.gateways") => "spec.gateway".into(),
        _ => route_field.to_string(),
    }
}

/// A StaticRoute as the planner takes it: a Route keyed `StaticRoute/<name>` with the
/// same destinations, its one gateway and no node selector (every node), as the static
/// route operator applied it. The metadata the planner and the status read
/// (timestamps, generation, annotations, uid) is kept.
pub fn from_static(sr: &StaticRoute) -> Route {
    let m = &sr.metadata;
    let mut r = Route::new(
        &key(Kind::StaticRoute, m.name.as_deref().unwrap_or_default()),
        RouteSpec {
            destinations: sr.spec.destinations.clone(),
            gateways: vec![sr.spec.gateway.clone()],
            node_selector: None,
        },
    );
    r.metadata.uid = m.uid.clone();
    r.metadata.generation = m.generation;
    r.metadata.creation_timestamp = m.creation_timestamp.clone();
    r.metadata.deletion_timestamp = m.deletion_timestamp.clone();
    r.metadata.annotations = m.annotations.clone();
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logic::crd::StaticRouteSpec;

    #[test]
    fn keys_name_the_kind_and_never_collide() {
        assert_eq!(key(Kind::Route, "a"), "a");
        assert_eq!(key(Kind::StaticRoute, "a"), "StaticRoute/a");
        assert_ne!(key(Kind::Route, "a"), key(Kind::StaticRoute, "a"));
        assert_eq!(parse("StaticRoute/a"), (Kind::StaticRoute, "a"));
        assert_eq!(parse("a"), (Kind::Route, "a"));
        assert_eq!(describe("StaticRoute/primary"), "StaticRoute primary");
        assert_eq!(describe("basic"), "Route basic");
        assert_eq!(field("StaticRoute/p", "spec.gateways[0]"), "spec.gateway");
        assert_eq!(field("p", "spec.gateways[0]"), "spec.gateways[0]");
        assert_eq!(
            field("StaticRoute/p", "spec.destinations[1]"),
            "spec.destinations[1]"
        );
    }

    #[test]
    fn a_static_route_becomes_a_route_to_every_node_through_its_one_gateway() {
        let mut sr = StaticRoute::new(
            "static-route-ifconfig.me",
            StaticRouteSpec {
                destinations: vec!["34.160.111.145".into()],
                gateway: "10.116.0.5".into(),
            },
        );
        sr.metadata.generation = Some(3);
        sr.metadata.uid = Some("u-1".into());
        let r = from_static(&sr);
        assert_eq!(
            r.metadata.name.as_deref(),
            Some("StaticRoute/static-route-ifconfig.me")
        );
        assert_eq!(r.spec.destinations, vec!["34.160.111.145".to_string()]);
        assert_eq!(r.spec.gateways, vec!["10.116.0.5".to_string()]);
        assert_eq!(r.spec.node_selector, None);
        assert_eq!(r.metadata.generation, Some(3));
        assert_eq!(r.metadata.uid.as_deref(), Some("u-1"));
    }
}
