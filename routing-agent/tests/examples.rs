//! Every `kind: Route` example of the DOKS routing-agent how-to (fixtures/, verbatim)
//! parses and plans as that document describes.
use std::net::IpAddr;
use std::path::Path;

use routing_agent::logic::plan::{DesiredState, plan};
use routing_agent::logic::selector::NodeInfo;
use routing_agent::source::dir::parse_file;

fn load(name: &str) -> Vec<routing_agent::logic::crd::Route> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    parse_file(&path, &text).unwrap_or_else(|e| panic!("{e}"))
}

fn node(name: &str, labels: &[(&str, &str)]) -> NodeInfo {
    NodeInfo::new(name, labels)
}

fn gateways(s: &DesiredState, dst: &str) -> Vec<IpAddr> {
    s.routes[&dst.parse().unwrap()].gateways.clone()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn one_gateway_normalises_the_documented_cidr_with_a_warning() {
    let s = plan(&load("01-one-gateway.yaml"), &node("n", &[]));
    assert!(s.problems.is_empty(), "{:?}", s.problems);
    assert_eq!(gateways(&s, "0.0.0.0/5"), vec![ip("10.114.0.3")]);
    assert_eq!(s.warnings.len(), 1);
    assert!(s.warnings[0].contains("\"1.2.3.4/5\"") && s.warnings[0].contains("0.0.0.0/5"));
}

#[test]
fn two_gateways_make_an_ecmp_route() {
    let s = plan(&load("02-two-gateways.yaml"), &node("n", &[]));
    assert_eq!(
        gateways(&s, "0.0.0.0/5"),
        vec![ip("10.114.0.3"), ip("10.114.0.4")]
    );
}

#[test]
fn default_route_override_plans_a_default_route() {
    // As its two halves, more specific than the node's own default route.
    let s = plan(&load("03-default-route.yaml"), &node("n", &[]));
    assert_eq!(gateways(&s, "0.0.0.0/1"), vec![ip("10.114.0.3")]);
    assert_eq!(gateways(&s, "128.0.0.0/1"), vec![ip("10.114.0.3")]);
    assert!(s.routes.values().all(|r| r.from_default));
    assert!(s.warnings.is_empty());
}

#[test]
fn match_expressions_select_by_node_pool_label() {
    let routes = load("04-match-expressions.yaml");
    let pool = ("doks.digitalocean.com/node-pool", "worker-pool");
    assert_eq!(plan(&routes, &node("a", &[pool])).routes.len(), 1);
    assert!(
        plan(
            &routes,
            &node("b", &[("doks.digitalocean.com/node-pool", "other")])
        )
        .routes
        .is_empty()
    );
    assert!(plan(&routes, &node("c", &[])).routes.is_empty());
}

#[test]
fn match_fields_select_by_node_name() {
    let routes = load("05-match-fields.yaml");
    assert_eq!(plan(&routes, &node("worker-pool-y", &[])).routes.len(), 1);
    assert!(plan(&routes, &node("worker-pool-x", &[])).routes.is_empty());
}

/// The route of the Vagrant lab (deploy/vagrant, not run here) parses and plans to the
/// ECMP route its Vagrantfile describes: the echo network over both gateway VMs.
#[test]
fn the_vagrant_labs_route_plans_ecmp_over_its_two_gateways() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/vagrant/routes/egress.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let routes = parse_file(&path, &text).unwrap_or_else(|e| panic!("{e}"));
    let s = plan(&routes, &node("node", &[]));
    assert!(s.problems.is_empty() && s.warnings.is_empty(), "{s:?}");
    assert_eq!(
        gateways(&s, "198.51.100.0/24"),
        vec![ip("10.114.0.3"), ip("10.114.0.4")]
    );
    let lab = path.parent().and_then(Path::parent).unwrap();
    let vagrantfile = std::fs::read_to_string(lab.join("Vagrantfile")).unwrap();
    for address in [
        "10.114.0.#{2 + i}",
        "10.114.0.2",
        "198.51.100.10",
        "--routes-dir /vagrant/deploy/vagrant/routes",
    ] {
        assert!(vagrantfile.contains(address), "Vagrantfile lacks {address}");
    }
}
