//! deploy/crd.yaml is generated from the Rust types; this fails when it is stale.
use kube::CustomResourceExt as _;
use routing_agent::crd::Route;

#[test]
fn committed_crd_matches_the_rust_types() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/crd.yaml");
    let committed = std::fs::read_to_string(path).expect("deploy/crd.yaml exists");
    let body: String = committed
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    let generated = serde_yaml::to_string(&Route::crd()).unwrap();
    assert!(
        body == generated,
        "deploy/crd.yaml is stale: run `cargo xtask gen-crd` and commit it"
    );
}

#[test]
fn crd_is_cluster_scoped_v1alpha1_with_the_doks_group() {
    let crd = Route::crd();
    assert_eq!(crd.spec.group, "networking.doks.digitalocean.com");
    assert_eq!(crd.spec.scope, "Cluster");
    assert_eq!(crd.spec.names.kind, "Route");
    assert_eq!(crd.spec.versions[0].name, "v1alpha1");
}
