//! Overriding the default route without losing the node (lab with a public side: the node's
//! `eth0` and its `isp` default gateway, the metadata address and a nameserver reachable
//! through the isp only). Needs root; every test builds and deletes its own lab.
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Result, ensure};
use routing_agent_tests::*;

fn public_lab() -> Result<Lab> {
    let lab = Lab::new(LabSpec {
        public: true,
        ..LabSpec::default()
    })?;
    // The routing dumps compare before and after: let the kernel finish its own first.
    lab.wait_ipv6_settled("a")?;
    Ok(lab)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The lab itself, before any agent: egress through the isp with the node's public
/// address; the isp-only services reachable; inbound connections answered.
#[test]
fn the_public_lab_routes_through_the_isp() -> Result<()> {
    let lab = public_lab()?;
    ensure!(lab.connect("a", ip(ECHO_V4))? == ip(&node_public_v4(2)));
    ensure!(lab.connect("a", ip(ECHO_V6))? == ip(&node_public_v6(2)));
    ensure!(lab.connect("a", ip(METADATA_V4))? == ip(&node_public_v4(2)));
    ensure!(lab.connect("a", ip(NAMESERVER_V6))? == ip(&node_public_v6(2)));
    ensure!(lab.connect_inbound("a", false)? == ip("203.0.113.254"));
    ensure!(lab.connect_inbound("a", true)? == ip("2001:db8:113::fe"));
    Ok(())
}

/// Everything of the node's routing a test compares: routes of every table, rules and
/// nexthop objects, both families.
fn routing_dump(lab: &Lab, node: &str) -> Result<String> {
    let ns = lab.node_ns(node);
    let mut out = String::new();
    for cmd in [
        "route show table all",
        "-6 route show table all",
        "rule show",
        "-6 rule show",
        "nexthop show",
    ] {
        out.push_str(&format!("## ip {cmd}\n{}\n", lab.ip(&ns, cmd)?));
    }
    Ok(out)
}

fn resolv_conf(lab: &Lab) -> Result<String> {
    let path = lab.scratch.join("resolv.conf");
    std::fs::write(
        &path,
        format!(
            "search lab.example\nnameserver 127.0.0.53\nnameserver {NAMESERVER_V4}\nnameserver {NAMESERVER_V6}\n"
        ),
    )?;
    Ok(path.display().to_string())
}

/// Waits until the agent, settled, reports Route `egress` refused with `kind`; returns the
/// problem's message.
fn refused(agent: &mut Agent, kind: &str) -> Result<String> {
    let status = agent.wait_status(&format!("the override refused ({kind})"), |s| {
        s["problems"].as_array().is_some_and(|p| {
            p.iter()
                .any(|p| p["kind"] == kind && p["route"] == "egress")
        }) && s["lastChanges"] == 0
    })?;
    Ok(status["problems"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["route"] == "egress"))
        .map(|p| p["message"].to_string())
        .unwrap_or_default())
}

fn override_routes(dir: &std::path::Path) -> Result<()> {
    std::fs::write(
        dir.join("egress.yaml"),
        route_yaml(
            "egress",
            &["0.0.0.0/0"],
            &[&gateway_v4(1), &gateway_v4(2)],
            None,
        ) + "---\n"
            + &route_yaml("egress6", &["::/0"], &[&gateway_v6(1)], None),
    )?;
    Ok(())
}

/// With `0.0.0.0/0` and `::/0` through the NAT gateways: the internet sees the gateways;
/// the metadata service, the nameservers and a protected CIDR stay reached through the
/// isp; an inbound connection to the public address is answered through eth0; removing the
/// override restores the node's routing exactly.
#[test]
fn a_default_override_moves_egress_and_keeps_the_node_reachable() -> Result<()> {
    let lab = public_lab()?;
    let before = routing_dump(&lab, "a")?;
    let resolv = resolv_conf(&lab)?;
    let dir = lab.routes_dir("routes")?;
    override_routes(&dir)?;
    let mut agent = Agent::start(
        &lab,
        "a",
        &dir,
        &[
            "--no-ebpf",
            "--resolv-conf",
            &resolv,
            "--protected-cidr",
            PRIVATE_SERVICE_V4,
        ],
    )?;
    agent.wait_settled(4)?;
    let me4 = ip(&node_public_v4(2));
    let me6 = ip(&node_public_v6(2));
    // Egress through the gateways.
    let via = lab.connect("a", ip(ECHO_V4))?;
    ensure!(via == public_v4(1) || via == public_v4(2), "echo saw {via}");
    ensure!(lab.connect("a", ip(ECHO_V6))? == public_v6(1));
    // Protected: through the isp, with the node's own address.
    for (dst, me) in [
        (METADATA_V4, me4),
        (NAMESERVER_V4, me4),
        (PRIVATE_SERVICE_V4, me4),
        (NAMESERVER_V6, me6),
    ] {
        ensure!(
            lab.connect("a", ip(dst))? == me,
            "{dst} not reached through the isp"
        );
    }
    // Symmetric routing: inbound connections answered through eth0.
    ensure!(lab.connect_inbound("a", false)? == ip("203.0.113.254"));
    ensure!(lab.connect_inbound("a", true)? == ip("2001:db8:113::fe"));
    let ns = lab.node_ns("a");
    let rules = lab.ip(&ns, "rule show")?;
    ensure!(
        rules.contains(&format!("15135:\tfrom {me4} lookup 135 proto 196")),
        "{rules}"
    );
    let table = lab.ip(&ns, "route show table 135")?;
    ensure!(
        table.contains(&format!("default via {ISP_V4} dev eth0 proto 196")),
        "{table}"
    );
    // The node's own default route is untouched.
    ensure!(
        lab.ip(&ns, "route show default")?
            .contains(&format!("default via {ISP_V4} dev eth0 proto static"))
    );
    // The status says what stays on the isp.
    let st = agent.status().unwrap_or_default();
    let v4 = st["defaultRoute"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["family"] == "IPv4"))
        .cloned()
        .unwrap_or_default();
    ensure!(v4["originalGateway"] == ISP_V4, "{st:#}");
    let protected: Vec<&str> = v4["protected"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p.as_str())
        .collect();
    ensure!(
        protected
            == [
                format!("{METADATA_V4}/32"),
                format!("{NAMESERVER_V4}/32"),
                format!("{PRIVATE_SERVICE_V4}/32")
            ]
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        "{v4:#}"
    );
    ensure!(
        v4["symmetricRules"] == serde_json::json!([format!("15135: from {me4} lookup 135")]),
        "{v4:#}"
    );
    // Loopback nameserver: not protected (no /32 route for it).
    ensure!(!lab.ip(&ns, "route show proto 196")?.contains("127.0.0.53"));

    // The override goes: everything back as it was.
    std::fs::remove_file(dir.join("egress.yaml"))?;
    agent.wait_settled(0)?;
    let after = routing_dump(&lab, "a")?;
    ensure!(
        after == before,
        "not restored exactly:\n--- before\n{before}\n--- after\n{after}"
    );
    ensure!(lab.connect("a", ip(ECHO_V4))? == me4);
    agent.check_alive()?;
    Ok(())
}

/// The override with eBPF on: one of its gateways black-holes under a stream of new
/// connections. It is withdrawn from the override (the new connections and the long-lived
/// ones on the other gateway go on), the protected routes, the symmetric-routing rule and
/// table stay exactly as they were, and the control plane, metadata and DNS stay reachable
/// through the isp. After healing it returns.
#[test]
fn override_gateways_fail_over_with_ebpf_and_the_protected_routes_stay() -> Result<()> {
    let lab = public_lab()?;
    let resolv = resolv_conf(&lab)?;
    let dir = lab.routes_dir("routes")?;
    override_routes(&dir)?;
    let mut agent = Agent::start(
        &lab,
        "a",
        &dir,
        &[
            "--resolv-conf",
            &resolv,
            "--protected-cidr",
            PRIVATE_SERVICE_V4,
            "--probe-interval",
            "1s",
        ],
    )?;
    agent.wait_settled(4)?;
    agent.wait_resolved(3)?;
    let ns = lab.node_ns("a");
    let kept = |lab: &Lab| -> Result<String> {
        // The agent's routes but the override's own halves (0.0.0.0/1, 128.0.0.0/1, their
        // nexthops and their standbys): the protected destinations.
        let routes: Vec<String> = lab
            .ip(&ns, "-4 route show proto 196")?
            .lines()
            .filter(|l| l.starts_with(|c: char| c.is_ascii_digit()) && !l.contains(".0.0.0/1"))
            .map(String::from)
            .collect();
        // The rules but the forwarding probe's own (fwmark, there only while a probe runs).
        let rules: Vec<String> = lab
            .ip(&ns, "rule show")?
            .lines()
            .filter(|l| !l.contains("fwmark"))
            .map(String::from)
            .collect();
        Ok(format!(
            "{}\n{}\n{}",
            routes.join("\n"),
            rules.join("\n"),
            lab.ip(&ns, "route show table 135")?
        ))
    };
    let before = kept(&lab)?;
    ensure!(
        before
            .lines()
            .any(|l| l.starts_with(METADATA_V4) && l.contains(&format!("via {ISP_V4}"))),
        "{before}"
    );
    // The override is the two halves of the address space; the low one is followed here.
    let half = "0.0.0.0/1";
    ensure!(lab.route_gateways("a", half)?.len() == 2);
    let echo = ip(ECHO_V4);
    let mut held: Vec<Held> = (0..8).map(|_| lab.hold("a", echo)).collect::<Result<_>>()?;
    let stream = lab.stream("a", echo, 10);
    std::thread::sleep(Duration::from_secs(2));
    lab.fail(1, Failure::ForwardingDropped)?;
    agent.wait_status("gateway 1 down", |s| {
        s["gateways"].as_array().is_some_and(|g| {
            g.iter()
                .any(|g| g["address"] == gateway_v4(1).as_str() && g["state"] == "down")
        })
    })?;
    wait_for(
        "gateway 1 out of the override",
        Duration::from_secs(5),
        || (lab.route_gateways("a", half).ok()? == vec![gateway_v4(2)]).then_some(()),
    )?;
    let withdrawn_at = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let attempts = stream.stop();
    let after: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| a.started > withdrawn_at)
        .collect();
    ensure!(after.len() >= 20, "{} attempts", after.len());
    for a in &after {
        ensure!(
            a.result.as_ref().is_ok_and(|v| *v == public_v4(2)),
            "after the withdrawal: {:?}",
            a.result
        );
    }
    for h in held.iter_mut().filter(|h| h.via == public_v4(2)) {
        ensure!(h.alive(), "a long-lived connection via gateway 2 died");
    }
    ensure!(
        held.iter().any(|h| h.via == public_v4(2)),
        "none held via gateway 2"
    );
    // Protected routes, rule and table: untouched; the node keeps its services.
    let during = kept(&lab)?;
    ensure!(
        during == before,
        "changed:\n--- before\n{before}\n--- during\n{during}"
    );
    let me4 = ip(&node_public_v4(2));
    for dst in [METADATA_V4, NAMESERVER_V4, PRIVATE_SERVICE_V4] {
        ensure!(
            lab.connect("a", ip(dst))? == me4,
            "{dst} not reached through the isp"
        );
    }
    ensure!(lab.connect_inbound("a", false)? == ip("203.0.113.254"));
    lab.heal(1, Failure::ForwardingDropped)?;
    wait_for(
        "gateway 1 back in the override",
        Duration::from_secs(30),
        || (lab.route_gateways("a", half).ok()?.len() == 2).then_some(()),
    )?;
    ensure!(kept(&lab)? == before);
    agent.check_alive()?;
    Ok(())
}

/// The control: without symmetric routing, the reply to an inbound connection leaves
/// through the NAT gateway and the connection fails.
#[test]
fn without_symmetric_routing_inbound_connections_break() -> Result<()> {
    let lab = public_lab()?;
    let dir = lab.routes_dir("routes")?;
    override_routes(&dir)?;
    let mut agent = Agent::start(
        &lab,
        "a",
        &dir,
        &["--no-ebpf", "--symmetric-routing", "false"],
    )?;
    agent.wait_settled(4)?;
    ensure!(lab.connect("a", ip(ECHO_V4))? != ip(&node_public_v4(2)));
    ensure!(
        lab.connect_inbound("a", false).is_err(),
        "answered without the rule"
    );
    ensure!(
        lab.connect_inbound("a", true).is_err(),
        "answered without the rule (v6)"
    );
    ensure!(!lab.ip(&lab.node_ns("a"), "rule show")?.contains("15135"));
    agent.check_alive()?;
    Ok(())
}

/// A rule the agent does not own at priority 15135: it refuses the IPv4 override with a
/// clear message and changes nothing of it; the IPv6 one (no foreign rule) goes ahead.
#[test]
fn a_foreign_rule_at_the_symmetric_priority_refuses_the_override() -> Result<()> {
    let lab = public_lab()?;
    let ns = lab.node_ns("a");
    lab.ip(
        &ns,
        &format!(
            "rule add priority 15135 from {} lookup 200",
            node_public_v4(2)
        ),
    )?;
    let rules_before = lab.ip(&ns, "rule show")?;
    let dir = lab.routes_dir("routes")?;
    override_routes(&dir)?;
    let mut agent = Agent::start(&lab, "a", &dir, &["--no-ebpf"])?;
    let msg = refused(&mut agent, "SymmetricRoutingConflict")?;
    ensure!(
        msg.contains("15135") && msg.contains(&format!("from {} lookup 200", node_public_v4(2))),
        "{msg}"
    );
    ensure!(
        lab.ip(&ns, "rule show")? == rules_before,
        "the rules changed"
    );
    ensure!(
        lab.route_gateways("a", "128.0.0.0/1")?.is_empty(),
        "the override went in"
    );
    ensure!(
        lab.connect("a", ip(ECHO_V4))? == ip(&node_public_v4(2)),
        "egress moved"
    );
    // IPv6 has no foreign rule: overridden.
    ensure!(lab.connect("a", ip(ECHO_V6))? == public_v6(1));
    // The foreign rule goes: the override goes in (a rule change re-plans at once).
    lab.ip(
        &ns,
        &format!(
            "rule del priority 15135 from {} lookup 200",
            node_public_v4(2)
        ),
    )?;
    wait_for(
        "the IPv4 override in place",
        std::time::Duration::from_secs(20),
        || (lab.route_gateways("a", "128.0.0.0/1").ok()?.len() == 2).then_some(()),
    )?;
    agent.check_alive()?;
    Ok(())
}

/// A route the agent does not own in table 135 refuses the override just the same.
#[test]
fn a_foreign_route_in_the_symmetric_table_refuses_the_override() -> Result<()> {
    let lab = public_lab()?;
    let ns = lab.node_ns("a");
    lab.ip(
        &ns,
        &format!("route add 203.0.113.0/24 via {ISP_V4} dev eth0 table 135"),
    )?;
    let before = routing_dump(&lab, "a")?;
    let dir = lab.routes_dir("routes")?;
    std::fs::write(
        dir.join("egress.yaml"),
        route_yaml("egress", &["0.0.0.0/0"], &[&gateway_v4(1)], None),
    )?;
    let mut agent = Agent::start(&lab, "a", &dir, &["--no-ebpf"])?;
    let msg = refused(&mut agent, "SymmetricRoutingConflict")?;
    ensure!(msg.contains("203.0.113.0/24"), "{msg}");
    ensure!(routing_dump(&lab, "a")? == before, "something changed");
    agent.check_alive()?;
    Ok(())
}

/// Kubernetes mode, the API server behind the isp (reached through the node's own default
/// route only): with a default override active, the agent keeps reaching it (a later edit
/// still lands), the `kubernetes` endpoints get protected routes through the isp, and a
/// change of the endpoints moves them.
#[test]
fn the_control_plane_stays_reachable_and_its_endpoints_are_followed() -> Result<()> {
    use routing_agent_tests::kube::CP_PUBLIC_ADDR;
    let mut lab = public_lab()?;
    let cp = lab.control_plane()?;
    let deploy = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
    cp.kubectl(&[
        "apply",
        "--validate=false",
        "-f",
        &format!("{deploy}/crd.yaml"),
    ])?;
    cp.kubectl(&["apply", "-f", &format!("{deploy}/rbac.yaml")])?;
    cp.kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/routes.networking.doks.digitalocean.com",
    ])?;
    let endpoints = |addr: &str| {
        format!(
            "apiVersion: v1\nkind: Endpoints\nmetadata:\n  name: kubernetes\n  namespace: default\nsubsets:\n  - addresses: [{{ip: \"{addr}\"}}]\n    ports: [{{name: https, port: 6443, protocol: TCP}}]\n"
        )
    };
    cp.apply(&endpoints("198.18.3.1"))?;
    cp.apply("apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\n")?;
    let mut agent = Agent::start_kube(&lab, "a", &cp.agent, &["--no-ebpf"])?;
    cp.apply(&route_yaml(
        "egress",
        &["0.0.0.0/0"],
        &[&gateway_v4(1)],
        None,
    ))?;
    let ns = lab.node_ns("a");
    // A protected route: the agent's own host route through the isp.
    let protected = |addr: &str| -> bool {
        lab.route("a", &format!("{addr}/32"))
            .ok()
            .flatten()
            .is_some_and(|r| r["protocol"] == "196" || r["protocol"] == 196)
            && lab
                .route_gateways("a", &format!("{addr}/32"))
                .is_ok_and(|g| g == [ISP_V4])
    };
    wait_for(
        "the override and the protected endpoint",
        std::time::Duration::from_secs(30),
        || {
            (lab.route_gateways("a", "128.0.0.0/1").ok()? == [gateway_v4(1)]
                && protected("198.18.3.1")
                && protected(CP_PUBLIC_ADDR))
            .then_some(())
        },
    )
    .map_err(|e| e.context(agent.log_text()))?;
    let via = lab.connect("a", ip(ECHO_V4))?;
    ensure!(via == public_v4(1), "egress not through the gateway: {via}");
    // The API server is still reached: an edit made now lands.
    cp.apply(&route_yaml(
        "egress",
        &["0.0.0.0/0"],
        &[&gateway_v4(2)],
        None,
    ))?;
    wait_for("the edit", std::time::Duration::from_secs(30), || {
        (lab.route_gateways("a", "128.0.0.0/1").ok()? == [gateway_v4(2)]).then_some(())
    })?;
    // The endpoints move: so does the protected route.
    cp.apply(&endpoints("198.18.3.2"))?;
    wait_for(
        "the protected route moved",
        std::time::Duration::from_secs(30),
        || (protected("198.18.3.2") && !protected("198.18.3.1")).then_some(()),
    )?;
    ensure!(
        protected(CP_PUBLIC_ADDR),
        "the configured API server host stays protected"
    );
    // kubectl shows it: the node's status lists the protected destinations.
    wait_for(
        "the node status shows the protection",
        std::time::Duration::from_secs(30),
        || {
            let nrs = cp
                .kubectl(&[
                    "get",
                    "noderoutestatus",
                    "node-a",
                    "-o",
                    "jsonpath={.status.defaultRoute[0].protected}",
                ])
                .ok()?;
            (nrs.contains("198.18.3.2/32") && nrs.contains(&format!("{CP_PUBLIC_ADDR}/32")))
                .then_some(())
        },
    )?;
    // Without the override, no protected route is left.
    cp.kubectl(&["delete", "route", "egress"])?;
    wait_for(
        "protected routes gone",
        std::time::Duration::from_secs(30),
        || {
            lab.ip(&ns, "route show proto 196")
                .ok()?
                .trim()
                .is_empty()
                .then_some(())
        },
    )?;
    agent.check_alive()?;
    Ok(())
}

/// The original gateway is the node's own default route as the kernel has it: an agent
/// restart adopts everything without a change, and when the node's default route moves to
/// another gateway, the protected routes and the symmetric table follow.
#[test]
fn restart_adopts_and_a_changed_node_default_route_is_followed() -> Result<()> {
    let lab = public_lab()?;
    let isp = lab.ns("isp");
    lab.ip(&isp, "addr add 192.0.2.2/24 dev pub0")?;
    let dir = lab.routes_dir("routes")?;
    override_routes(&dir)?;
    let args = ["--no-ebpf", "--protected-cidr", PRIVATE_SERVICE_V4];
    let mut agent = Agent::start(&lab, "a", &dir, &args)?;
    agent.wait_settled(4)?;
    let before = routing_dump(&lab, "a")?;
    agent.restart()?;
    agent.wait_settled(4)?;
    // The new process's first reconcile changed nothing (adopted, no flap).
    let log = agent.log_text();
    let since_restart = log
        .rsplit("routing-agent starting")
        .next()
        .unwrap_or_default();
    let first = since_restart
        .lines()
        .find(|l| l.contains("reconciled"))
        .unwrap_or_default();
    ensure!(
        first.contains("changes=0"),
        "first reconcile after the restart: {first}"
    );
    ensure!(
        routing_dump(&lab, "a")? == before,
        "a restart changed the routing"
    );

    let ns = lab.node_ns("a");
    lab.ip(
        &ns,
        "route replace default via 192.0.2.2 dev eth0 proto static",
    )?;
    wait_for(
        "protected route and table 135 via the new gateway",
        std::time::Duration::from_secs(20),
        || {
            let gws = lab
                .route_gateways("a", &format!("{PRIVATE_SERVICE_V4}/32"))
                .ok()?;
            let table = lab.ip(&ns, "route show table 135").ok()?;
            (gws == ["192.0.2.2"] && table.contains("default via 192.0.2.2 dev eth0")).then_some(())
        },
    )?;
    ensure!(lab.connect("a", ip(PRIVATE_SERVICE_V4))? == ip(&node_public_v4(2)));
    ensure!(lab.connect_inbound("a", false)? == ip("203.0.113.254"));
    agent.check_alive()?;
    Ok(())
}

/// `routing-agent cleanup` removes the override with everything that came with it
/// (protected routes, table 135, the rules): the node's routing is as it was.
#[test]
fn cleanup_removes_the_override_and_its_rules() -> Result<()> {
    let lab = public_lab()?;
    let before = routing_dump(&lab, "a")?;
    let dir = lab.routes_dir("routes")?;
    override_routes(&dir)?;
    let mut agent = Agent::start(
        &lab,
        "a",
        &dir,
        &["--no-ebpf", "--protected-cidr", PRIVATE_SERVICE_V4],
    )?;
    agent.wait_settled(4)?;
    ensure!(
        lab.ip(&lab.node_ns("a"), "rule show")?
            .contains("lookup 135")
    );
    agent.stop();
    // Stopping leaves everything in place (a restart must not cut traffic) ...
    ensure!(routing_dump(&lab, "a")? != before);
    // ... cleanup removes it all.
    lab.cleanup("a")?;
    let after = routing_dump(&lab, "a")?;
    ensure!(
        after == before,
        "not restored exactly:\n--- before\n{before}\n--- after\n{after}"
    );
    Ok(())
}

/// A node whose own default route names no gateway (a device route here): nothing could be
/// kept on it, so the override is refused rather than installed unprotected.
#[test]
fn a_default_route_without_a_gateway_refuses_the_override() -> Result<()> {
    let lab = public_lab()?;
    let ns = lab.node_ns("a");
    lab.ip(&ns, "route replace default dev eth0 proto static")?;
    let before = routing_dump(&lab, "a")?;
    let dir = lab.routes_dir("routes")?;
    std::fs::write(
        dir.join("egress.yaml"),
        route_yaml("egress", &["0.0.0.0/0"], &[&gateway_v4(1)], None),
    )?;
    let mut agent = Agent::start(&lab, "a", &dir, &["--no-ebpf"])?;
    refused(&mut agent, "UnknownUplink")?;
    ensure!(routing_dump(&lab, "a")? == before, "something changed");
    agent.check_alive()?;
    Ok(())
}
