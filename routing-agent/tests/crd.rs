//! deploy/crd.yaml is generated from the Rust types; this fails when it is stale.
use kube::CustomResourceExt as _;
use routing_agent::logic::crd::Route;

#[test]
fn committed_crd_matches_the_rust_types() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/crd.yaml");
    let committed = std::fs::read_to_string(path).expect("deploy/crd.yaml exists");
    let body: String = committed
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    let generated = routing_agent::logic::crd::yaml();
    assert!(
        body == generated,
        "deploy/crd.yaml is stale: run `cargo xtask gen-crd` and commit it"
    );
}

/// Every `format` in the committed CRDs is one Kubernetes knows (an unknown one, e.g.
/// schemars' `uint32`, makes every CRD create answer with a warning).
#[test]
fn the_crds_use_only_formats_kubernetes_knows() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/crd.yaml");
    let text = std::fs::read_to_string(path).expect("deploy/crd.yaml exists");
    // The formats of k8s.io/kube-openapi's strfmt registry that apply to CRD schemas.
    let known = [
        "int32",
        "int64",
        "float",
        "double",
        "byte",
        "binary",
        "date",
        "date-time",
        "duration",
        "password",
        "uuid",
        "email",
        "hostname",
        "ipv4",
        "ipv6",
        "cidr",
        "mac",
        "uri",
    ];
    let formats: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("format: "))
        .collect();
    assert!(!formats.is_empty(), "the CRDs have some formats");
    for f in formats {
        assert!(
            known.contains(&f),
            "format {f:?} is not one Kubernetes knows"
        );
    }
}

#[test]
fn crd_is_cluster_scoped_v1alpha1_with_the_doks_group() {
    let crd = Route::crd();
    assert_eq!(crd.spec.group, "networking.doks.digitalocean.com");
    assert_eq!(crd.spec.scope, "Cluster");
    assert_eq!(crd.spec.names.kind, "Route");
    assert_eq!(crd.spec.versions[0].name, "v1alpha1");
}

/// The CEL rules (`x-kubernetes-validations`, enforced by API servers ≥ 1.25; the 1.20 test
/// server drops them) evaluated client-side on the committed CRD's schema.
mod cel {
    use kube::core::cel::Validator;
    use serde_json::{Value, json};

    fn route_schema() -> Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/crd.yaml");
        let text = std::fs::read_to_string(path).expect("deploy/crd.yaml exists");
        let route: Value = serde_yaml::Deserializer::from_str(&text)
            .map(|d| serde::Deserialize::deserialize(d).expect("YAML"))
            .find(|d: &Value| d["spec"]["names"]["kind"] == "Route")
            .expect("the Route CRD");
        route["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
    }

    fn check(destinations: &[&str], gateways: &[&str]) -> Result<(), String> {
        let obj = json!({
            "apiVersion": "networking.doks.digitalocean.com/v1alpha1",
            "kind": "Route",
            "metadata": {"name": "r"},
            "spec": {"destinations": destinations, "gateways": gateways},
        });
        Validator::new()
            .validate(&route_schema(), &obj, None)
            .map_err(|e| format!("{e:?}"))
    }

    #[test]
    fn rules_are_in_the_committed_crd() {
        let s = route_schema();
        let rules = s["properties"]["spec"]["x-kubernetes-validations"]
            .as_array()
            .expect("rules on spec");
        assert_eq!(rules.len(), 2);
    }

    #[test]
    fn one_family_routes_pass() {
        check(&["1.2.3.4/5"], &["10.114.0.3", "10.114.0.4"]).unwrap();
        check(&["0.0.0.0/0", "192.0.2.1"], &["10.114.0.3"]).unwrap();
        check(&["2001:db8::/32", "::/0"], &["fd00::3", "fd00::4"]).unwrap();
    }

    /// An empty `gateways` is minItems' to report (the API server does); the rules must not
    /// add a CEL runtime error (`index out of bounds: 0`) to it.
    #[test]
    fn no_gateways_is_not_a_cel_runtime_error() {
        check(&["10.0.0.0/8"], &[]).unwrap();
        check(&["2001:db8::/32"], &[]).unwrap();
    }

    #[test]
    fn mixed_gateways_fail_naming_the_field() {
        let e = check(&["10.0.0.0/8"], &["10.0.0.1", "fd00::1"]).unwrap_err();
        assert!(e.contains("spec.gateways: all of one family"), "{e}");
    }

    #[test]
    fn destinations_of_the_other_family_fail_naming_the_field() {
        let e = check(&["2001:db8::/32"], &["10.0.0.1"]).unwrap_err();
        assert!(
            e.contains("spec.destinations: must be of the gateways' family"),
            "{e}"
        );
        let e = check(&["10.0.0.0/8"], &["fd00::1"]).unwrap_err();
        assert!(e.contains("spec.destinations"), "{e}");
    }
}
