//! The Kubernetes side against a real API server (kube-apiserver v1.20 + etcd in the lab's
//! `cp` namespace): the generated CRD is accepted and enforces its schema, Routes written
//! for the DigitalOcean agent apply unchanged, and RBAC is enforced for the agent's
//! ServiceAccount identity. Needs root and `cargo xtask setup` (builds the API server once).
use anyhow::{Result, ensure};
use routing_agent_tests::kube::ControlPlane;
use routing_agent_tests::*;

fn crd_path() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/crd.yaml").to_string()
}

fn with_crd() -> Result<(Lab, ControlPlane)> {
    let mut lab = Lab::new(LabSpec::default())?;
    let cp = lab.control_plane()?;
    cp.kubectl(&["apply", "-f", &crd_path()])?;
    cp.kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=30s",
        "crd/routes.networking.doks.digitalocean.com",
    ])?;
    Ok((lab, cp))
}

const BASIC: &str = "apiVersion: networking.doks.digitalocean.com/v1alpha1
kind: Route
metadata:
  name: basic
spec:
  destinations:
    - \"1.2.3.4/5\"
  gateways:
    - \"10.114.0.3\"
    - \"10.114.0.4\"
  nodeSelector:
    nodeSelectorTerms:
      - matchExpressions:
          - key: kubernetes.io/hostname
            operator: In
            values: [node-a]
";

#[test]
fn the_generated_crd_serves_routes_written_for_the_doks_agent() -> Result<()> {
    let (_lab, cp) = with_crd()?;
    cp.apply(BASIC)?;
    let got: serde_json::Value =
        serde_json::from_str(&cp.kubectl(&["get", "routes", "basic", "-o", "json"])?)?;
    ensure!(got["spec"]["gateways"] == serde_json::json!(["10.114.0.3", "10.114.0.4"]));
    ensure!(got["spec"]["destinations"] == serde_json::json!(["1.2.3.4/5"]));
    // The printer columns come from the Rust types too.
    let table = cp.kubectl(&["get", "routes"])?;
    ensure!(
        table.contains("DESTINATIONS") && table.contains("GATEWAYS") && table.contains("basic"),
        "{table}"
    );
    Ok(())
}

#[test]
fn the_crd_schema_rejects_a_route_without_gateways() -> Result<()> {
    let (_lab, cp) = with_crd()?;
    let bad = BASIC.replace(
        "  gateways:\n    - \"10.114.0.3\"\n    - \"10.114.0.4\"\n",
        "  gateways: []\n",
    );
    let err = cp
        .apply(&bad)
        .expect_err("the API server accepted an empty gateway list");
    let msg = format!("{err:#}");
    ensure!(msg.contains("spec.gateways"), "{msg}");
    ensure!(
        cp.kubectl(&["get", "routes", "-o", "name"])?
            .trim()
            .is_empty()
    );
    Ok(())
}

#[test]
fn rbac_applies_to_the_agent_identity() -> Result<()> {
    let (_lab, cp) = with_crd()?;
    // No binding yet: the ServiceAccount identity may not list Routes.
    let err = cp
        .kubectl_as(&cp.agent, &["get", "routes"])
        .expect_err("the agent identity listed routes without any RBAC");
    ensure!(format!("{err:#}").contains("forbidden"), "{err:#}");
    Ok(())
}
