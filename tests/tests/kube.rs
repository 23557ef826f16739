//! The Kubernetes side against a real API server (kube-apiserver v1.20 + etcd in the lab's
//! `cp` namespace): the generated CRD is accepted and enforces its schema, Routes written
//! for the DigitalOcean agent apply unchanged, and RBAC is enforced for the agent's
//! ServiceAccount identity. Needs root and `cargo xtask setup` (builds the API server once).
use std::time::{Duration, Instant};

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
    // The CRD carries CEL rules (x-kubernetes-validations, Kubernetes ≥ 1.25): kubectl's
    // client-side validation against a 1.20 server does not know the field, and the server
    // drops it. That is what an operator on a pre-1.25 cluster does too.
    cp.kubectl(&["apply", "--validate=false", "-f", &crd_path()])?;
    cp.kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=30s",
        "crd/routes.networking.doks.digitalocean.com",
        "crd/noderoutestatuses.networking.doks.digitalocean.com",
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
fn the_crd_schema_rejects_a_route_without_gateways_or_with_malformed_addresses() -> Result<()> {
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
    // Patterns: a gateway that is not an address, a prefix length out of range.
    for (from, to, field) in [
        ("\"10.114.0.4\"", "\"gw.example\"", "spec.gateways"),
        ("\"1.2.3.4/5\"", "\"1.2.3.4/33\"", "spec.destinations"),
        ("\"10.114.0.4\"", "\"10.114.0.4/32\"", "spec.gateways"),
    ] {
        let err = cp
            .apply(&BASIC.replace(from, to))
            .expect_err("the API server accepted a malformed address");
        let msg = format!("{err:#}");
        ensure!(
            msg.contains(field) && msg.contains("should match"),
            "{to}: {msg}"
        );
    }
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
    wait_gateways_of(lab, DEST_V4, want, what)
}

/// Waits until node a's route to `dst` has exactly `want` gateways (empty: no route).
fn wait_gateways_of(lab: &Lab, dst: &str, want: &[String], what: &str) -> Result<()> {
    wait_for(what, Duration::from_secs(30), || {
        let have = lab.route_gateways("a", dst).ok()?;
        (have == want).then_some(())
    })
}

/// A second destination of the lab's.
const DEST2_V4: &str = "192.0.2.0/25";

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
    // A restart of the agent while the API server is gone changes nothing either; the
    // agent is live but not ready (it has no complete view of the Routes).
    agent.restart()?;
    std::thread::sleep(Duration::from_secs(2));
    ensure!(lab.route_gateways("a", DEST_V4)? == want);
    agent.check_alive()?;
    ensure!(health_get(&lab, "a", "/healthz")?.0 == 200);
    let (code, body) = health_get(&lab, "a", "/readyz")?;
    ensure!(
        code == 503 && body.contains("no reconcile"),
        "{code} {body}"
    );

    // A longer outage: the watchers' back-off is capped (a few seconds), so how soon the
    // agent is back does not grow with it.
    for _ in 0..60 {
        std::thread::sleep(Duration::from_millis(250));
        ensure!(
            lab.route_gateways("a", DEST_V4)? == want,
            "the route changed"
        );
    }
    cp.start_apiserver()?;
    cp.wait_ready()?;
    let back = Instant::now();
    // Back: a Route created now reaches the kernel (the watchers relisted), and nothing
    // was removed meanwhile.
    cp.apply(&route_yaml("after", &[DEST2_V4], &[&g1], None))?;
    wait_gateways_of(
        &lab,
        DEST2_V4,
        std::slice::from_ref(&g1),
        "the new Route after the outage",
    )?;
    eprintln!(
        "a Route created after a 20 s outage reached the kernel {:?} after the API server was ready",
        back.elapsed()
    );
    ensure!(lab.route_gateways("a", DEST_V4)? == want);
    wait_for("the agent ready", Duration::from_secs(30), || {
        (health_get(&lab, "a", "/readyz").ok()?.0 == 200).then_some(())
    })?;
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
            // A default route is installed as its two halves (see README).
            "128.0.0.0/1",
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
        let other = if dst == "128.0.0.0/1" {
            "0.0.0.0/5"
        } else {
            "128.0.0.0/1"
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

/// A two-node lab with the CRDs, RBAC, both Nodes (`egress=yes`), the controller and an
/// agent per node, all with their ServiceAccount identities. The agents resync every
/// second (a write on a timer would show).
fn two_node_cluster(controller_args: &[&str]) -> Result<(Lab, ControlPlane, [Agent; 2])> {
    let (lab, mut cp) = with_crd_in(LabSpec::two_nodes(3))?;
    cp.kubectl(&["apply", "-f", &rbac_path()])?;
    cp.apply(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\n  labels: {egress: \"yes\"}\n---\napiVersion: v1\nkind: Node\nmetadata:\n  name: node-b\n  labels: {egress: \"yes\"}\n",
    )?;
    cp.start_controller(controller_args)?;
    let agents = [
        Agent::start_kube(
            &lab,
            "a",
            &cp.agent,
            &["--no-ebpf", "--resync-seconds", "1"],
        )?,
        Agent::start_kube(
            &lab,
            "b",
            &cp.agent,
            &["--no-ebpf", "--resync-seconds", "1"],
        )?,
    ];
    Ok((lab, cp, agents))
}

fn get_json(cp: &ControlPlane, what: &[&str]) -> Result<serde_json::Value> {
    let mut args = vec!["get"];
    args.extend(what);
    args.extend(["-o", "json"]);
    Ok(serde_json::from_str(&cp.kubectl(&args)?)?)
}

/// Waits until Route `name`'s status satisfies `pred`; returns it.
fn wait_route_status(
    cp: &ControlPlane,
    name: &str,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value> {
    let mut last = serde_json::Value::Null;
    wait_for(what, Duration::from_secs(30), || {
        last = get_json(cp, &["route", name]).ok()?["status"].clone();
        pred(&last).then(|| last.clone())
    })
    .map_err(|e| {
        e.context(format!(
            "last status: {last:#}\ncontroller log:\n{}",
            cp.controller_log()
        ))
    })
}

/// Write requests (create, update, patch, apply) the API server has served on `resource`
/// (any subresource), from its `apiserver_request_total` counters.
fn writes(cp: &ControlPlane, resource: &str) -> Result<u64> {
    let metrics = cp.kubectl(&["get", "--raw", "/metrics"])?;
    let want = format!("resource=\"{resource}\"");
    Ok(metrics
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{") && l.contains(&want))
        .filter(|l| {
            ["CREATE", "UPDATE", "PATCH", "APPLY"]
                .iter()
                .any(|v| l.contains(&format!("verb=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64)
}

fn condition<'a>(status: &'a serde_json::Value, type_: &str) -> &'a serde_json::Value {
    status["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == type_))
        .unwrap_or(&serde_json::Value::Null)
}

/// Events about Route `name`: (reason, message).
fn events_of(cp: &ControlPlane, name: &str) -> Result<Vec<(String, String)>> {
    let ev = get_json(cp, &["events", "-n", "default"])?;
    Ok(ev["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["involvedObject"]["name"] == name && e["involvedObject"]["kind"] == "Route")
        .map(|e| {
            (
                e["reason"].as_str().unwrap_or_default().to_string(),
                e["message"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect())
}

fn wait_event(cp: &ControlPlane, route: &str, reason: &str, contains: &str) -> Result<String> {
    wait_for(
        &format!("a {reason} event on Route {route} saying {contains:?}"),
        Duration::from_secs(30),
        || {
            events_of(cp, route)
                .ok()?
                .into_iter()
                .find(|(r, m)| r == reason && m.contains(contains))
                .map(|(_, m)| m)
        },
    )
    .map_err(|e| {
        e.context(format!(
            "events: {:?}\ncontroller log:\n{}",
            events_of(cp, route),
            cp.controller_log()
        ))
    })
}

/// Status, printer columns and Events tell the truth: applied on both nodes; an invalid
/// Route that the 1.20 API server admits (mixed families: a CEL rule on ≥ 1.25) is
/// reported without disturbing the others; a conflict and an unreachable gateway are
/// reported per node with their reason.
#[test]
fn status_printer_columns_and_events_show_the_truth() -> Result<()> {
    let (lab, cp, mut agents) = two_node_cluster(&[])?;
    let (g1, g2) = (gateway_v4(1), gateway_v4(2));
    cp.apply(&route_yaml(
        "egress",
        &[DEST_V4],
        &[&g1, &g2],
        Some(EGRESS_SELECTOR),
    ))?;
    let st = wait_route_status(&cp, "egress", "egress ready on 2/2", |s| {
        s["nodes"] == "2/2" && condition(s, "Ready")["status"] == "True"
    })?;
    ensure!(
        st["selected"] == 2 && st["ready"] == 2 && st["failed"] == 0,
        "{st:#}"
    );
    for node in ["a", "b"] {
        ensure!(lab.route_gateways(node, DEST_V4)? == [g1.clone(), g2.clone()]);
    }
    // Printer columns.
    let table = cp.kubectl(&["get", "routes"])?;
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    ensure!(
        header == ["NAME", "DESTINATIONS", "GATEWAYS", "NODES", "AGE"],
        "{table}"
    );
    let row = table
        .lines()
        .find(|l| l.starts_with("egress"))
        .unwrap_or_default();
    ensure!(
        row.contains("2/2") && row.contains(&g1) && row.contains(DEST_V4),
        "{table}"
    );
    // Per-node objects.
    let nrs = get_json(&cp, &["noderoutestatuses", "node-a"])?;
    let entry = &nrs["status"]["routes"][0];
    ensure!(
        entry["name"] == "egress" && entry["state"] == "Applied",
        "{nrs:#}"
    );
    ensure!(
        entry["destinations"] == serde_json::json!([DEST_V4]),
        "{nrs:#}"
    );
    ensure!(
        nrs["status"]["gateways"].as_array().map(Vec::len) == Some(2),
        "{nrs:#}"
    );
    ensure!(
        nrs["metadata"]["ownerReferences"][0]["kind"] == "Node",
        "owned by its Node: {nrs:#}"
    );
    // Written on change only: no write request at all (the API server's own request
    // counters) over several resyncs of a steady state.
    let before = (writes(&cp, "noderoutestatuses")?, writes(&cp, "routes")?);
    ensure!(
        before.0 >= 2 && before.1 >= 1,
        "{before:?}: the counters see the writes"
    );
    std::thread::sleep(Duration::from_secs(4));
    let after = (writes(&cp, "noderoutestatuses")?, writes(&cp, "routes")?);
    ensure!(
        after == before,
        "a steady state was written again: {before:?} -> {after:?}"
    );
    let table = cp.kubectl(&["get", "nrs"])?;
    ensure!(
        table.contains("APPLIED") && table.lines().count() == 3,
        "{table}"
    );

    // Invalid (mixed families), admitted by 1.20.
    cp.apply(&route_yaml(
        "mixed",
        &["192.0.2.0/24"],
        &[&g1, "fd00:114::9"],
        None,
    ))?;
    let st = wait_route_status(&cp, "mixed", "mixed reported invalid", |s| {
        condition(s, "Valid")["status"] == "False"
    })?;
    let msg = condition(&st, "Valid")["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    ensure!(msg.contains("spec.gateways[1]"), "{st:#}");
    wait_event(&cp, "mixed", "Invalid", "spec.gateways[1]")?;
    // One Invalid event for the Route, from the controller, not one per node.
    let n = events_of(&cp, "mixed")?
        .iter()
        .filter(|(r, _)| r == "Invalid")
        .count();
    ensure!(n == 1, "{n} Invalid events");

    // A conflict: a newer Route for the same destination loses on both nodes.
    cp.apply(&route_yaml("newer", &[DEST_V4], &[&gateway_v4(3)], None))?;
    let st = wait_route_status(&cp, "newer", "newer failed on 2/2", |s| s["failed"] == 2)?;
    ensure!(st["nodes"] == "0/2", "{st:#}");
    ensure!(
        st["failures"].as_array().is_some_and(|f| f.len() == 2
            && f.iter().all(|f| f["reason"] == "Conflict"
                && f["message"].as_str().unwrap_or_default().contains("egress"))),
        "{st:#}"
    );
    ensure!(condition(&st, "Ready")["reason"] == "Failed", "{st:#}");
    wait_event(&cp, "newer", "Conflict", "node node-a")?;
    wait_event(&cp, "newer", "Conflict", "node node-b")?;

    // An unreachable gateway (no connected network has it).
    cp.apply(&route_yaml(
        "far",
        &["192.0.2.128/25"],
        &["172.31.255.1"],
        None,
    ))?;
    // Its destination fails closed (refused on the node, never routed out of its own
    // uplink); the message names the gateway.
    let st = wait_route_status(&cp, "far", "far failed", |s| s["failed"] == 2)?;
    ensure!(
        st["failures"][0]["reason"] == "FailingClosed"
            && st["failures"][0]["message"]
                .as_str()
                .is_some_and(|m| m.contains("172.31.255.1")),
        "{st:#}"
    );
    wait_event(
        &cp,
        "far",
        "FailingClosed",
        "192.0.2.128/25 (GatewayUnreachable)",
    )?;
    let nrs = get_json(&cp, &["noderoutestatuses", "node-a"])?;
    ensure!(
        nrs["status"]["failingClosed"] == 1
            && nrs["status"]["routes"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|r| r["name"] == "far"
                    && r["failingClosed"]
                        == serde_json::json!([{"destination": "192.0.2.128/25", "reason": "GatewayUnreachable"}])),
        "{nrs:#}"
    );

    // Through all this, the valid Route stayed as it was.
    let st = get_json(&cp, &["route", "egress"])?["status"].clone();
    ensure!(st["nodes"] == "2/2", "{st:#}");
    for node in ["a", "b"] {
        ensure!(lab.route_gateways(node, DEST_V4)? == [g1.clone(), g2.clone()]);
    }
    // The loser takes over when the winner goes.
    cp.kubectl(&["delete", "route", "egress"])?;
    wait_route_status(&cp, "newer", "newer applied once egress is gone", |s| {
        s["nodes"] == "2/2"
    })?;
    wait_event(&cp, "newer", "Applied", "was failing: Conflict")?;
    for a in agents.iter_mut() {
        a.check_alive()?;
    }
    Ok(())
}

/// Deleting a Route: the controller's one finalizer holds the object until both nodes
/// removed the route, so when `kubectl delete` returns, no kernel has it.
#[test]
fn a_deleted_route_is_gone_from_every_node_before_the_object_is_gone() -> Result<()> {
    let (lab, cp, mut agents) = two_node_cluster(&[])?;
    let g1 = gateway_v4(1);
    cp.apply(&route_yaml("doomed", &[DEST_V4], &[&g1], None))?;
    wait_route_status(&cp, "doomed", "ready on 2/2", |s| s["nodes"] == "2/2")
        .map_err(|e| e.context(agents[0].log_text()))?;
    let meta = get_json(&cp, &["route", "doomed"])?["metadata"].clone();
    ensure!(
        meta["finalizers"] == serde_json::json!(["networking.doks.digitalocean.com/routing-agent"]),
        "exactly one finalizer: {meta:#}"
    );
    // kubectl delete waits until the object is gone.
    cp.kubectl(&["delete", "route", "doomed", "--timeout=60s"])?;
    for node in ["a", "b"] {
        ensure!(
            lab.route_gateways(node, DEST_V4)?.is_empty(),
            "node {node} still has the route after the object is gone"
        );
    }
    ensure!(
        !cp.controller_log().contains("without confirmation"),
        "{}",
        cp.controller_log()
    );
    for a in agents.iter_mut() {
        a.check_alive()?;
    }
    Ok(())
}

/// A node whose agent is stopped cannot confirm: the deletion waits for it only up to
/// --deletion-timeout, says so in an Event, and the node removes the route when its agent
/// starts again.
#[test]
fn deleting_while_an_agent_is_stopped_is_bounded_and_that_node_cleans_up_on_start() -> Result<()> {
    let (lab, cp, mut agents) = two_node_cluster(&["--deletion-timeout", "5s"])?;
    let g1 = gateway_v4(1);
    cp.apply(&route_yaml("doomed", &[DEST_V4], &[&g1], None))?;
    wait_route_status(&cp, "doomed", "ready on 2/2", |s| s["nodes"] == "2/2")?;
    agents[1].stop();
    cp.kubectl(&["delete", "route", "doomed", "--timeout=60s"])?;
    // Gone, after the controller gave up on node b (the Event says so, naming it: it did
    // wait for the timeout rather than release at once).
    let msg = wait_event(&cp, "doomed", "DeletedWithoutConfirmation", "node-b")?;
    ensure!(!msg.contains("node-a"), "{msg}");
    ensure!(
        lab.route_gateways("a", DEST_V4)?.is_empty(),
        "node a kept it"
    );
    ensure!(
        lab.route_gateways("b", DEST_V4)? == [g1.clone()],
        "node b's agent is stopped: its kernel is untouched"
    );
    agents[1].restart()?;
    wait_for("node b cleans up on start", Duration::from_secs(30), || {
        lab.route_gateways("b", DEST_V4)
            .ok()?
            .is_empty()
            .then_some(())
    })?;
    for a in agents.iter_mut() {
        a.check_alive()?;
    }
    Ok(())
}

/// A gateway that black-holes traffic is withdrawn on the node that sees it fail, and the
/// Route says so: a GatewayWithdrawn Event naming the node and the gateway, the gateway
/// `Down` in that node's NodeRouteStatus; when it answers probes again, GatewayRestored
/// and `Up`. The face is total loss, so the gateway stays down (its probes fail) for as
/// long as the test reads the status: with forwarding dropped it answers the next probe,
/// and a slow machine (the VM under TCG) saw it restored before kubectl returned.
#[test]
fn gateway_withdrawal_and_restore_are_reported_as_events_and_node_status() -> Result<()> {
    let (lab, mut cp) = with_crd()?;
    cp.kubectl(&["apply", "-f", &rbac_path()])?;
    cp.apply("apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\n")?;
    cp.start_controller(&[])?;
    let mut agent = Agent::start_kube(&lab, "a", &cp.agent, &["--probe-interval", "1s"])?;
    let gws = [gateway_v4(1), gateway_v4(2), gateway_v4(3)];
    cp.apply(&route_yaml(
        "ecmp",
        &[DEST_V4],
        &[&gws[0], &gws[1], &gws[2]],
        None,
    ))?;
    wait_route_status(&cp, "ecmp", "ready on 1/1", |s| s["nodes"] == "1/1")?;
    agent.wait_resolved(3)?;
    let stream = lab.stream("a", ECHO_V4.parse()?, 10);
    std::thread::sleep(Duration::from_secs(1));
    lab.fail(1, Failure::Loss)?;
    let note = wait_event(&cp, "ecmp", "GatewayWithdrawn", &gws[0])?;
    ensure!(note.contains("node node-a"), "{note}");
    let nrs = get_json(&cp, &["noderoutestatuses", "node-a"])?;
    let g = nrs["status"]["gateways"]
        .as_array()
        .and_then(|g| g.iter().find(|g| g["address"] == gws[0].as_str()))
        .cloned()
        .unwrap_or_default();
    ensure!(g["state"] == "Down" && g["reason"].is_string(), "{nrs:#}");
    ensure!(nrs["status"]["gatewaysDown"] == 1, "{nrs:#}");
    // The route is still applied (through the two others).
    ensure!(get_json(&cp, &["route", "ecmp"])?["status"]["nodes"] == "1/1");
    lab.heal(1, Failure::Loss)?;
    wait_event(&cp, "ecmp", "GatewayRestored", &gws[0])?;
    wait_for(
        "gateway 1 Up in the node status",
        Duration::from_secs(30),
        || {
            let nrs = get_json(&cp, &["noderoutestatuses", "node-a"]).ok()?;
            (nrs["status"]["gatewaysDown"] == 0).then_some(())
        },
    )?;
    drop(stream);
    agent.check_alive()?;
    Ok(())
}

/// `kubectl apply -k deploy/` installs everything on a real API server; the workloads run
/// as the identities the other tests use, and their arguments are ones the binary takes.
#[test]
fn the_deploy_kustomization_applies_and_its_workloads_match_what_is_tested() -> Result<()> {
    let lab = Lab::new(LabSpec::default())?;
    let mut lab = lab;
    let cp = lab.control_plane()?;
    let deploy = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
    let built = cp.kubectl(&["kustomize", deploy])?;
    let docs: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(&built)
        .map(|d| serde::Deserialize::deserialize(d).map_err(anyhow::Error::from))
        .collect::<Result<_>>()?;
    let find = |kind: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind)
            .cloned()
            .unwrap_or_default()
    };
    let kinds: std::collections::BTreeSet<&str> =
        docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for k in [
        "CustomResourceDefinition",
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "DaemonSet",
        "Deployment",
    ] {
        ensure!(kinds.contains(k), "no {k} in deploy/: {kinds:?}");
    }
    // CEL rules: see with_crd_in.
    cp.kubectl(&["apply", "--validate=false", "-k", deploy])?;
    // Everything but the CRDs again, with kubectl's schema validation and a server dry run.
    let rest: Vec<String> = docs
        .iter()
        .filter(|d| d["kind"] != "CustomResourceDefinition")
        .map(serde_yaml::to_string)
        .collect::<Result<_, _>>()?;
    let path = lab.scratch.join("deploy-rest.yaml");
    std::fs::write(&path, rest.join("---\n"))?;
    cp.kubectl(&[
        "apply",
        "--dry-run=server",
        "-f",
        &path.display().to_string(),
    ])?;

    let ds = get_json(&cp, &["-n", "routing-agent", "daemonset", "routing-agent"])?;
    let pod = &ds["spec"]["template"]["spec"];
    ensure!(pod["serviceAccountName"] == routing_agent_tests::kube::AGENT_SERVICE_ACCOUNT);
    ensure!(pod["hostNetwork"] == true && pod["priorityClassName"] == "system-node-critical");
    let agent = &pod["containers"][0];
    ensure!(agent["securityContext"]["privileged"] == false, "{agent:#}");
    ensure!(
        agent["env"][0]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName",
        "{agent:#}"
    );
    let dep = find("Deployment");
    let cpod = &dep["spec"]["template"]["spec"];
    ensure!(cpod["serviceAccountName"] == routing_agent_tests::kube::CONTROLLER_SERVICE_ACCOUNT);

    // The arguments are accepted by the binary: with an unreadable kubeconfig it fails on
    // reading it (exit 1), not on its command line (exit 2). In lab namespaces only.
    let args = |c: &serde_json::Value| -> Vec<String> {
        c["args"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str().map(String::from))
            .collect()
    };
    let bin = agent_bin().display().to_string();
    let mut agent_args = args(agent);
    agent_args.extend([
        "--kubeconfig=/nonexistent".into(),
        "--node-name=node-a".into(),
        format!("--bpf-pin-dir={}", lab.pin_dir("a").display()),
        "--no-ebpf".into(),
    ]);
    let mut controller_args = args(&cpod["containers"][0]);
    controller_args.push("--kubeconfig=/nonexistent".into());
    for (ns, a) in [
        (lab.node_ns("a"), agent_args),
        (lab.ns("cp"), controller_args),
    ] {
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .arg(&bin)
            .args(&a)
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(1) && err.contains("/nonexistent"),
            "{a:?}: {:?}\n{err}",
            out.status
        );
    }
    Ok(())
}

/// The static route operator's CRD, written from what it documents (cluster scoped,
/// `networking.digitalocean.com/v1`, short name `sr`, `spec.destinations` and one
/// `spec.gateway`, its status kept as unknown fields).
const STATIC_ROUTE_CRD: &str = "apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: staticroutes.networking.digitalocean.com
spec:
  group: networking.digitalocean.com
  scope: Cluster
  names: {kind: StaticRoute, plural: staticroutes, singular: staticroute, shortNames: [sr]}
  versions:
    - name: v1
      served: true
      storage: true
      additionalPrinterColumns:
        - {name: Destinations, type: string, jsonPath: .spec.destinations}
        - {name: Gateway, type: string, jsonPath: .spec.gateway}
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              properties:
                destinations: {type: array, items: {type: string}}
                gateway: {type: string}
                # Later versions' DNS form of the gateway (looked up once by the operator).
                clusterservice: {type: string}
            status:
              type: object
              x-kubernetes-preserve-unknown-fields: true
";

fn static_route(name: &str, dst: &str, gateway: &str) -> String {
    format!(
        "apiVersion: networking.digitalocean.com/v1\nkind: StaticRoute\nmetadata:\n  name: {name}\nspec:\n  destinations:\n    - \"{dst}\"\n  gateway: \"{gateway}\"\n"
    )
}

/// StaticRoutes through a real API server: the CRD installed after the agent started is
/// followed; the operator's example shape lands; a gateway edited in place moves the
/// route (the old operator's issue #23); a Route for the same destination wins and the
/// StaticRoute is reported in the NodeRouteStatus; a delete removes the route.
#[test]
fn static_routes_of_the_old_operator_are_honoured_through_the_api_server() -> Result<()> {
    let (lab, cp) = with_crd()?;
    cp.kubectl(&["apply", "-f", &rbac_path()])?;
    cp.apply("apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\n")?;
    let mut agent = Agent::start_kube(&lab, "a", &cp.agent, &["--no-ebpf"])?;
    let (g1, g2, g3) = (gateway_v4(1), gateway_v4(2), gateway_v4(3));
    // A Route first: the agent is running before the StaticRoute CRD exists.
    cp.apply(&route_yaml("other", &[DEST2_V4], &[&g1], None))?;
    wait_gateways_of(&lab, DEST2_V4, std::slice::from_ref(&g1), "a Route")?;
    cp.apply(STATIC_ROUTE_CRD)?;
    cp.kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=30s",
        "crd/staticroutes.networking.digitalocean.com",
    ])?;
    let dst = "198.51.100.7";
    cp.apply(&static_route("static-route-ifconfig.me", dst, &g2))?;
    wait_gateways_of(
        &lab,
        dst,
        std::slice::from_ref(&g2),
        "the StaticRoute in the kernel",
    )?;
    ensure!(
        cp.kubectl(&["get", "sr"])?
            .contains("static-route-ifconfig.me")
    );
    // The gateway edited in place.
    cp.apply(&static_route("static-route-ifconfig.me", dst, &g3))?;
    wait_gateways_of(&lab, dst, std::slice::from_ref(&g3), "the edited gateway")?;
    // A Route for the same destination wins, whatever the ages.
    cp.apply(&route_yaml("winner", &[dst], &[&g1], None))?;
    wait_gateways_of(&lab, dst, std::slice::from_ref(&g1), "the Route winning")?;
    wait_for(
        "the StaticRoute reported in conflict",
        Duration::from_secs(30),
        || {
            let nrs = get_json(&cp, &["noderoutestatuses", "node-a"]).ok()?;
            nrs["status"]["routes"].as_array()?.iter().find(|e| {
                e["name"] == "static-route-ifconfig.me"
                    && e["kind"] == "StaticRoute"
                    && e["reason"] == "Conflict"
                    && e["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("a Route wins over a StaticRoute"))
            })?;
            Some(())
        },
    )?;
    // The Route goes: the StaticRoute's gateway again; the StaticRoute goes: no route.
    cp.kubectl(&["delete", "route", "winner"])?;
    wait_gateways_of(&lab, dst, std::slice::from_ref(&g3), "the StaticRoute back")?;
    cp.kubectl(&["delete", "sr", "static-route-ifconfig.me"])?;
    wait_gateways_of(&lab, dst, &[], "the StaticRoute deleted")?;
    wait_gateways_of(
        &lab,
        DEST2_V4,
        std::slice::from_ref(&g1),
        "the Route untouched",
    )?;
    agent.check_alive()?;
    Ok(())
}

/// `routing-agent migrate` end to end, on two nodes with the controller. The StaticRoutes
/// are as the old operator left them (its kopf finalizer on each; its pods gone, so a plain
/// delete would hang): its two examples, an IPv6 one, one in its DNS form
/// (`spec.clusterservice`, not supported) and one whose name a different Route holds.
/// Printing gives the Routes of the movable ones; `--apply` creates them, waits until each
/// is Ready on both nodes, deletes their StaticRoutes and keeps the other two, with a
/// failure exit naming them. `ip monitor` on both nodes sees no route or nexthop change:
/// ownership moves, the kernel does not.
#[test]
fn migrate_moves_static_routes_to_routes_with_no_kernel_change() -> Result<()> {
    let (lab, cp, mut agents) = two_node_cluster(&[])?;
    cp.apply(STATIC_ROUTE_CRD)?;
    cp.kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=30s",
        "crd/staticroutes.networking.digitalocean.com",
    ])?;
    let (g1, g2, g6) = (gateway_v4(1), gateway_v4(2), gateway_v6(1));
    let left_by_kopf = |yaml: String| {
        yaml.replace(
            "metadata:\n",
            "metadata:\n  finalizers: [kopf.zalando.org/KopfFinalizerMarker]\n",
        )
    };
    let moved = [
        ("static-route-ifconfig.me", "198.51.100.7", g1.clone()),
        ("static-route-ipinfo.io", "198.51.100.8", g1.clone()),
        ("static-route-v6", "2001:db8:198::/64", g6.clone()),
    ];
    for (name, dst, gw) in &moved {
        cp.apply(&left_by_kopf(static_route(name, dst, gw)))?;
    }
    cp.apply(
        "apiVersion: networking.digitalocean.com/v1\nkind: StaticRoute\nmetadata:\n  name: by-dns\nspec:\n  destinations: [\"198.51.100.9\"]\n  clusterservice: nat-gw.default.svc.cluster.local\n",
    )?;
    cp.apply(&static_route("taken", "198.51.100.10", &g2))?;
    cp.apply(&route_yaml("taken", &[DEST2_V4], &[&g1], None))?;
    for node in ["a", "b"] {
        for (_, dst, gw) in &moved {
            wait_for(
                &format!("node {node}: {dst} via {gw} from its StaticRoute"),
                Duration::from_secs(30),
                || (lab.route_gateways(node, dst).ok()? == [gw.clone()]).then_some(()),
            )?;
        }
    }
    let monitors = [
        lab.monitor("a", &["route", "nexthop"])?,
        lab.monitor("b", &["route", "nexthop"])?,
    ];

    // Printed: a Route for each movable one, the others named on stderr.
    let (ok, out, err) = cp.migrate(&[])?;
    ensure!(!ok, "two StaticRoutes cannot move: {out}\n{err}");
    let printed: Vec<serde_json::Value> = out
        .split("---\n")
        .map(serde_yaml::from_str)
        .collect::<Result<_, _>>()?;
    let names: Vec<&str> = printed
        .iter()
        .filter_map(|r| r["metadata"]["name"].as_str())
        .collect();
    ensure!(
        names
            == [
                "static-route-ifconfig.me",
                "static-route-ipinfo.io",
                "static-route-v6"
            ],
        "{out}"
    );
    ensure!(printed[2]["spec"]["gateways"][0] == g6.as_str(), "{out}");
    ensure!(
        err.contains("StaticRoute by-dns: spec.gateway: ") && err.contains("clusterservice"),
        "{err}"
    );
    ensure!(err.contains("Route taken already exists"), "{err}");
    ensure!(
        cp.kubectl(&["get", "routes", "-o", "name"])?.trim()
            == "route.networking.doks.digitalocean.com/taken",
        "printing creates nothing"
    );

    // One applied and kept: its Route wins, the StaticRoute stays (reported in conflict).
    let (ok, out, err) = cp.migrate(&[
        "--apply",
        "--keep",
        "--timeout",
        "60s",
        "static-route-ipinfo.io",
    ])?;
    ensure!(ok, "{out}\n{err}");
    ensure!(
        out.contains("Route static-route-ipinfo.io created")
            && out.contains("Route static-route-ipinfo.io Ready: 2/2")
            && out.contains("StaticRoute static-route-ipinfo.io kept (--keep)"),
        "{out}\n{err}"
    );
    ensure!(
        cp.kubectl(&["get", "sr", "static-route-ipinfo.io", "-o", "name"])
            .is_ok()
    );

    // All applied: the kept one's Route is found as wanted, not created again.
    let (ok, out, err) = cp.migrate(&["--apply", "--timeout", "60s"])?;
    ensure!(!ok, "two StaticRoutes cannot move: {out}\n{err}");
    ensure!(
        out.contains("Route static-route-ipinfo.io already asks for what StaticRoute static-route-ipinfo.io does"),
        "{out}\n{err}"
    );
    for (name, _, _) in &moved {
        if *name != "static-route-ipinfo.io" {
            ensure!(
                out.contains(&format!("Route {name} created")),
                "{out}\n{err}"
            );
        }
        ensure!(
            out.contains(&format!("Route {name} Ready: 2/2")),
            "{out}\n{err}"
        );
        ensure!(
            out.contains(&format!(
                "StaticRoute {name} deleted (kopf's finalizer removed first"
            )),
            "{out}\n{err}"
        );
        let r = get_json(&cp, &["route", name])?;
        ensure!(
            r["metadata"]["annotations"]["networking.doks.digitalocean.com/migrated-from"]
                == format!("StaticRoute/{name}").as_str(),
            "{r:#}"
        );
    }
    ensure!(
        err.contains("StaticRoute by-dns") && err.contains("Route taken already exists"),
        "{err}"
    );
    let left = cp.kubectl(&["get", "sr", "-o", "name"])?;
    let left: Vec<&str> = left.lines().collect();
    ensure!(
        left == [
            "staticroute.networking.digitalocean.com/by-dns",
            "staticroute.networking.digitalocean.com/taken"
        ],
        "{left:?}"
    );
    // Deleted means gone from the agents' view: their reports no longer list them.
    for node in ["node-a", "node-b"] {
        wait_for(
            &format!("{node}'s report without the moved StaticRoutes"),
            Duration::from_secs(30),
            || {
                let nrs = get_json(&cp, &["noderoutestatuses", node]).ok()?;
                let entries = nrs["status"]["routes"].as_array()?;
                let moved_gone = !entries.iter().any(|e| {
                    e["kind"] == "StaticRoute" && moved.iter().any(|(n, _, _)| e["name"] == *n)
                });
                let routes_in = moved.iter().all(|(n, _, _)| {
                    entries
                        .iter()
                        .any(|e| e["name"] == *n && e["kind"].is_null())
                });
                (moved_gone && routes_in).then_some(())
            },
        )?;
    }
    for node in ["a", "b"] {
        for (_, dst, gw) in &moved {
            let have = lab.route_gateways(node, dst)?;
            ensure!(have == [gw.clone()], "node {node}: {dst} via {have:?}");
        }
    }
    for (node, m) in ["a", "b"].into_iter().zip(monitors) {
        let events = m.events()?;
        ensure!(
            events.trim().is_empty(),
            "node {node}: the kernel changed while ownership moved:\n{events}"
        );
    }
    for a in agents.iter_mut() {
        a.check_alive()?;
    }
    Ok(())
}
