//! The Kubernetes side against a real API server (kube-apiserver v1.20 + etcd in the lab's
//! `cp` namespace): the generated CRD is accepted and enforces its schema, Routes written
//! for the DigitalOcean agent apply unchanged, and RBAC is enforced for the agent's
//! ServiceAccount identity. Needs root and `cargo xtask setup` (builds the API server once).
use std::time::Duration;

use anyhow::{Result, ensure};
use routing_agent_tests::kube::ControlPlane;
use routing_agent_tests::*;

fn crd_path() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/crd.yaml").to_string()
}

fn rbac_path() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/rbac.yaml").to_string()
}

fn with_crd() -> Result<(Lab, ControlPlane)> {
    with_crd_in(LabSpec::default())
}

fn with_crd_in(spec: LabSpec) -> Result<(Lab, ControlPlane)> {
    let mut lab = Lab::new(spec)?;
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

const EGRESS_SELECTOR: &str = "nodeSelectorTerms:
  - matchExpressions:
      - key: egress
        operator: In
        values: [\"yes\"]";

/// Waits until node a's route to `DEST_V4` has exactly `want` gateways (empty: no route).
fn wait_gateways(lab: &Lab, want: &[String], what: &str) -> Result<()> {
    wait_for(what, Duration::from_secs(30), || {
        let have = lab.route_gateways("a", DEST_V4).ok()?;
        (have == want).then_some(())
    })
}

#[test]
fn routes_from_the_api_server_follow_edits_node_labels_and_deletes() -> Result<()> {
    let (lab, cp) = with_crd()?;
    cp.kubectl(&["apply", "-f", &rbac_path()])?;
    cp.apply(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\n  labels: {egress: \"yes\"}\n",
    )?;
    let mut agent = Agent::start_kube(&lab, "a", &cp.agent, &["--no-ebpf"])?;
    let (g1, g2, g3) = (gateway_v4(1), gateway_v4(2), gateway_v4(3));
    cp.apply(&route_yaml(
        "egress",
        &[DEST_V4],
        &[&g1, &g2],
        Some(EGRESS_SELECTOR),
    ))?;
    wait_gateways(
        &lab,
        &[g1.clone(), g2.clone()],
        "the Route in node a's kernel",
    )?;
    // Edit the gateways.
    cp.apply(&route_yaml(
        "egress",
        &[DEST_V4],
        &[&g3],
        Some(EGRESS_SELECTOR),
    ))?;
    wait_gateways(&lab, std::slice::from_ref(&g3), "the edited gateways")?;
    // The node loses the label: the route goes; it regains it: the route comes back.
    cp.kubectl(&["label", "node", "node-a", "egress-"])?;
    wait_gateways(&lab, &[], "the route removed after the label went")?;
    cp.kubectl(&["label", "node", "node-a", "egress=yes"])?;
    wait_gateways(
        &lab,
        std::slice::from_ref(&g3),
        "the route back with the label",
    )?;
    // Deleted: gone from the kernel.
    cp.kubectl(&["delete", "route", "egress"])?;
    wait_gateways(&lab, &[], "the route removed after the delete")?;
    agent.check_alive()?;
    Ok(())
}

#[test]
fn routes_stay_while_the_api_server_is_gone_and_resync_when_it_is_back() -> Result<()> {
    let (lab, mut cp) = with_crd()?;
    cp.kubectl(&["apply", "-f", &rbac_path()])?;
    cp.apply("apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\n")?;
    let mut agent = Agent::start_kube(&lab, "a", &cp.agent, &["--no-ebpf"])?;
    let (g1, g2) = (gateway_v4(1), gateway_v4(2));
    cp.apply(&route_yaml("keep", &[DEST_V4], &[&g1, &g2], None))?;
    let want = [g1.clone(), g2.clone()];
    wait_gateways(&lab, &want, "the Route in node a's kernel")?;

    cp.stop_apiserver();
    // The agent's watchers fail and retry; the route stays. Observed over several of the
    // watchers' retries (they back off from 800 ms).
    for _ in 0..30 {
        std::thread::sleep(Duration::from_millis(200));
        ensure!(
            lab.route_gateways("a", DEST_V4)? == want,
            "the route changed while the API server was gone"
        );
    }
    agent.check_alive()?;
    // A restart of the agent while the API server is gone changes nothing either.
    agent.restart()?;
    std::thread::sleep(Duration::from_secs(2));
    ensure!(lab.route_gateways("a", DEST_V4)? == want);
    agent.check_alive()?;

    cp.start_apiserver()?;
    cp.wait_ready()?;
    // Back: a change made now reaches the kernel (the watchers relisted).
    cp.kubectl(&["delete", "route", "keep"])?;
    wait_gateways(
        &lab,
        &[],
        "the route removed after the API server came back",
    )?;
    agent.check_alive()?;
    Ok(())
}

/// Every seed example (the DOKS how-to manifests, verbatim), applied with kubectl in turn
/// (they all name the Route `basic`, so each one edits the last), lands on exactly the
/// nodes it selects in a two-node lab: node a is in the `worker-pool` node pool, node b is
/// in none, and no node is called `worker-pool-y`.
#[test]
fn seed_examples_applied_with_kubectl_land_on_the_selected_nodes() -> Result<()> {
    let spec = LabSpec::two_nodes(3);
    let (lab, cp) = with_crd_in(spec)?;
    cp.kubectl(&["apply", "-f", &rbac_path()])?;
    cp.apply(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\n  labels: {doks.digitalocean.com/node-pool: worker-pool}\n---\napiVersion: v1\nkind: Node\nmetadata:\n  name: node-b\n",
    )?;
    let mut agents = [
        Agent::start_kube(&lab, "a", &cp.agent, &["--no-ebpf"])?,
        Agent::start_kube(&lab, "b", &cp.agent, &["--no-ebpf"])?,
    ];
    let (g1, g2) = (gateway_v4(1), gateway_v4(2));
    let fixtures = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../routing-agent/tests/fixtures"
    );
    // (file, destination as the kernel shows it, gateways, nodes that get it)
    let cases: [(&str, &str, Vec<String>, &[&str]); 5] = [
        (
            "01-one-gateway.yaml",
            "0.0.0.0/5",
            vec![g1.clone()],
            &["a", "b"],
        ),
        (
            "02-two-gateways.yaml",
            "0.0.0.0/5",
            vec![g1.clone(), g2.clone()],
            &["a", "b"],
        ),
        (
            "03-default-route.yaml",
            "0.0.0.0/0",
            vec![g1.clone()],
            &["a", "b"],
        ),
        (
            "04-match-expressions.yaml",
            "0.0.0.0/5",
            vec![g1.clone()],
            &["a"],
        ),
        ("05-match-fields.yaml", "0.0.0.0/5", vec![g1.clone()], &[]),
    ];
    for (file, dst, gws, on) in cases {
        cp.kubectl(&["apply", "-f", &format!("{fixtures}/{file}")])?;
        for node in ["a", "b"] {
            let want: Vec<String> = if on.contains(&node) {
                gws.clone()
            } else {
                vec![]
            };
            wait_for(
                &format!("{file}: node {node} has {dst} via {want:?}"),
                Duration::from_secs(30),
                || (lab.route_gateways(node, dst).ok()? == want).then_some(()),
            )?;
        }
        // The other destination of the series is gone wherever this one is not it.
        let other = if dst == "0.0.0.0/0" {
            "0.0.0.0/5"
        } else {
            "0.0.0.0/0"
        };
        for node in ["a", "b"] {
            wait_for(
                &format!("{file}: node {node} has no {other}"),
                Duration::from_secs(30),
                || {
                    lab.route_gateways(node, other)
                        .ok()?
                        .is_empty()
                        .then_some(())
                },
            )?;
        }
    }
    for a in agents.iter_mut() {
        a.check_alive()?;
    }
    Ok(())
}
