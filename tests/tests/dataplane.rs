//! The agent in standalone mode inside lab namespaces, asserted through the kernel
//! (`ip -j`), through traffic (the echo server names the gateway a flow left by) and
//! through its status file. Needs root; every test builds and deletes its own lab.
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use routing_agent_tests::*;

const PROTO: u64 = 196;

fn v4(i: u8) -> String {
    gateway_v4(i)
}
fn v6(i: u8) -> String {
    gateway_v6(i)
}

/// A default lab (3 gateways, node-a) whose routes directory holds `files`.
fn lab_with(files: &[(&str, String)]) -> Result<(Lab, PathBuf)> {
    let lab = Lab::new(LabSpec::default())?;
    let dir = lab.routes_dir("routes")?;
    for (name, text) in files {
        std::fs::write(dir.join(name), text)?;
    }
    Ok((lab, dir))
}

/// A route on node-a that the agent does not own (`proto static`), as an operator adds it.
fn foreign_route(lab: &Lab, dst: &str, gateway: &str) -> Result<()> {
    lab.ip(
        &lab.node_ns("a"),
        &format!("route add {dst} via {gateway} proto static"),
    )?;
    Ok(())
}

/// Packets counted by the TC programs (all gateways, all CPUs, both directions), from
/// the pinned map, read with bpftool (field names from BTF).
fn bpf_packets(lab: &Lab, node: &str) -> Result<u64> {
    let pin = lab.pin_dir(node).join("RA_GW_STATS");
    let out = run(&[
        "bpftool",
        "-j",
        "map",
        "dump",
        "pinned",
        pin.to_str().unwrap(),
    ])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let mut total = 0;
    for entry in v.as_array().into_iter().flatten() {
        for cpu in entry["formatted"]["values"]
            .as_array()
            .into_iter()
            .flatten()
        {
            total += cpu["value"]["tx_packets"].as_u64().unwrap_or(0)
                + cpu["value"]["rx_packets"].as_u64().unwrap_or(0);
        }
    }
    Ok(total)
}

#[test]
fn single_gateway_v4_and_v6_through_kernel_and_traffic() -> Result<()> {
    let (lab, dir) = lab_with(&[(
        "r.yaml",
        route_yaml("v4", &[DEST_V4], &[&v4(1)], None)
            + "---\n"
            + &route_yaml("v6", &[DEST_V6], &[&v6(2)], None),
    )])?;
    let root_policy = run(&["sysctl", "-n", "net.ipv4.fib_multipath_hash_policy"])?;
    let mut agent = Agent::start(&lab, "a", &dir, &[])?;
    agent.wait_settled(2)?;

    // ECMP hashes on ports in the agent's namespace; the root namespace is left as it was.
    let ns = lab.node_ns("a");
    for key in [
        "net.ipv4.fib_multipath_hash_policy",
        "net.ipv6.fib_multipath_hash_policy",
        "net.ipv4.fib_multipath_use_neigh",
    ] {
        assert_eq!(
            lab.sh(&ns, &format!("sysctl -n {key}"))?.trim(),
            "1",
            "{key}"
        );
    }
    assert_eq!(
        run(&["sysctl", "-n", "net.ipv4.fib_multipath_hash_policy"])?,
        root_policy
    );

    let r = lab.route("a", DEST_V4)?.expect("v4 route installed");
    // `ip -j` prints a protocol without a name in rt_protos as a string of its number.
    assert_eq!(
        r["protocol"]
            .as_u64()
            .or(r["protocol"].as_str().and_then(|p| p.parse().ok())),
        Some(PROTO),
        "{r}"
    );
    assert!(
        r["nhid"].as_u64().is_some(),
        "route points at a nexthop object: {r}"
    );
    assert_eq!(lab.route_gateways("a", DEST_V4)?, vec![v4(1)]);
    assert_eq!(lab.route_gateways("a", DEST_V6)?, vec![v6(2)]);

    // The agent resolves its gateways itself (one ping each), so that the first
    // connection is already attributed.
    agent.wait_resolved(2)?;
    assert_eq!(lab.connect("a", ECHO_V4.parse()?)?, public_v4(1));
    assert_eq!(lab.connect("a", ECHO_V6.parse()?)?, public_v6(2));

    // The TC programs sit on eth1 and counted that traffic; the map is pinned for bpftool.
    let packets = bpf_packets(&lab, "a")?;
    assert!(packets >= 6, "TC programs counted {packets} packets");
    let status = agent.status().unwrap();
    assert_eq!(status["attached"], serde_json::json!(["eth1"]));
    Ok(())
}

/// A lab whose node a has one Route over three gateways for each family, with the agent
/// running (`extra` flags) and settled.
fn ecmp_lab(extra: &[&str]) -> Result<(Lab, Agent)> {
    let lab = Lab::new(LabSpec::default())?;
    let dir = lab.routes_dir("routes")?;
    for f in [IPV4, IPV6] {
        let gws = f.gateways(3);
        let gw_refs: Vec<&str> = gws.iter().map(String::as_str).collect();
        let name = if f.v6 { "ecmp6" } else { "ecmp4" };
        std::fs::write(
            dir.join(format!("{name}.yaml")),
            route_yaml(name, &[f.dest], &gw_refs, None),
        )?;
    }
    let mut agent = Agent::start(&lab, "a", &dir, extra)?;
    agent.wait_settled(2)?;
    for f in [IPV4, IPV6] {
        let mut gws = f.gateways(3);
        gws.sort();
        assert_eq!(lab.route_gateways("a", f.dest)?, gws);
    }
    Ok((lab, agent))
}

/// Every gateway of family `f` carried some of 60 connections to its echo server opened
/// by `open`.
fn assert_spread(
    f: LabFamily,
    what: &str,
    mut open: impl FnMut(IpAddr) -> Result<IpAddr>,
) -> Result<()> {
    let seen = tally(60, || open(f.echo_addr()))?;
    eprintln!("ECMP spread of 60 {what}: {seen:?}");
    let sources: BTreeSet<IpAddr> = seen.keys().copied().collect();
    assert_eq!(
        sources,
        (1..=3).map(f.public).collect(),
        "every gateway carries {what}"
    );
    Ok(())
}

#[test]
fn ecmp_over_three_gateways_spreads_connections_v4() -> Result<()> {
    let (lab, _agent) = ecmp_lab(&[])?;
    assert_spread(IPV4, "connections", |dst| lab.connect("a", dst))
}

/// Locally originated IPv6 connections spread as far as the kernel lets them: the ones
/// bound to a port before they connect on every kernel; the ones whose port the kernel
/// picks in `connect()` only where the kernel hashes that port (see
/// [`kernel_spreads_local_v6_connections`]). Where it does not (Debian's 6.1 and 6.12),
/// they all take the gateway the kernel's hash gives source port 0, which `ip route get`
/// names: the test pins that down, so a kernel that changes it is noticed.
#[test]
fn ecmp_over_three_gateways_spreads_connections_v6() -> Result<()> {
    let (lab, _agent) = ecmp_lab(&[])?;
    assert_spread(IPV6, "bound connections", |dst| lab.connect_bound("a", dst))?;
    let spreads = kernel_spreads_local_v6_connections();
    eprintln!(
        "kernel {:?}: spreads connections with a kernel-chosen port: {spreads:?}",
        kernel_version()
    );
    match spreads {
        Some(true) => assert_spread(IPV6, "connections", |dst| lab.connect("a", dst))?,
        Some(false) => {
            let seen = lab.spread("a", IPV6.echo_addr(), 30)?;
            let route = lab.ip(
                &lab.node_ns("a"),
                &format!("-6 -j route get {ECHO_V6} ipproto tcp sport 0 dport {ECHO_PORT}"),
            )?;
            let route: serde_json::Value = serde_json::from_str(&route)?;
            let gateway = route[0]["gateway"].as_str().unwrap_or_default().to_string();
            let i = (1..=3)
                .find(|&i| v6(i) == gateway)
                .unwrap_or_else(|| panic!("route get names no lab gateway: {route}"));
            assert_eq!(
                seen,
                BTreeMap::from([(public_v6(i), 30)]),
                "this kernel hashes source port 0: every connection takes gateway {i}"
            );
        }
        None => {
            let seen = lab.spread("a", IPV6.echo_addr(), 30)?;
            eprintln!("not measured on this kernel: {seen:?}");
            assert!(seen.keys().all(|k| (1..=3).any(|i| public_v6(i) == *k)));
        }
    }
    Ok(())
}

/// Pod traffic, forwarded by the node (and masqueraded to its address, as a CNI does), is
/// hashed on its real ports on every kernel: both families spread.
#[test]
fn ecmp_spreads_forwarded_pod_connections() -> Result<()> {
    let (mut lab, _agent) = ecmp_lab(&[])?;
    let pod = lab.add_pod("a")?;
    for f in [IPV4, IPV6] {
        assert_spread(f, "pod connections", |dst| lab.connect_from(&pod, dst))?;
    }
    Ok(())
}

#[test]
fn ecmp_multipath_fallback_mode() -> Result<()> {
    // The path for kernels without nexthop objects, forced here.
    let (lab, agent) = ecmp_lab(&["--dataplane", "multipath"])?;
    assert_spread(IPV4, "connections", |dst| lab.connect("a", dst))?;
    drop((agent, lab));
    let (lab, dir) = lab_with(&[(
        "r.yaml",
        route_yaml("r", &[DEST_V4], &[&v4(1), &v4(2)], None),
    )])?;
    let mut agent = Agent::start(&lab, "a", &dir, &["--dataplane", "multipath"])?;
    agent.wait_settled(1)?;
    let r = lab.route("a", DEST_V4)?.unwrap();
    assert!(
        r["nhid"].is_null(),
        "no nexthop object in multipath mode: {r}"
    );
    assert_eq!(r["nexthops"].as_array().map(Vec::len), Some(2), "{r}");
    assert!(
        lab.ip_json("a", "nexthop show")?
            .as_array()
            .unwrap()
            .is_empty()
    );
    // Edit to one gateway: replaced in place.
    write_atomic(
        &dir.join("r.yaml"),
        &route_yaml("r", &[DEST_V4], &[&v4(3)], None),
    )?;
    wait_for("single gateway route", Duration::from_secs(20), || {
        (lab.route_gateways("a", DEST_V4).ok()? == vec![v4(3)]).then_some(())
    })?;
    assert_eq!(lab.connect("a", ECHO_V4.parse()?)?, public_v4(3));
    Ok(())
}

#[test]
fn edit_gateways_in_place_and_broken_file_keeps_last_good_state() -> Result<()> {
    let lab = Lab::new(LabSpec::default())?;
    let dir = lab.routes_dir("routes")?;
    let file = dir.join("route.yaml");
    std::fs::write(&file, route_yaml("egress", &[DEST_V4], &[&v4(1)], None))?;
    let mut agent = Agent::start(&lab, "a", &dir, &[])?;
    agent.wait_settled(1)?;
    assert_eq!(lab.connect("a", ECHO_V4.parse()?)?, public_v4(1));

    // The case the predecessor operator could not do: change the gateways of a live Route.
    let t = Instant::now();
    write_atomic(
        &file,
        &route_yaml("egress", &[DEST_V4], &[&v4(2), &v4(3)], None),
    )?;
    wait_for("route via gw2+gw3", Duration::from_secs(20), || {
        (lab.route_gateways("a", DEST_V4).ok()? == vec![v4(2), v4(3)]).then_some(())
    })?;
    eprintln!("edit reached the kernel after {:?}", t.elapsed());
    let seen = lab.spread("a", ECHO_V4.parse()?, 30)?;
    assert!(
        !seen.contains_key(&public_v4(1)),
        "gw1 no longer used: {seen:?}"
    );
    // The nexthop of gw1 is garbage-collected.
    let nhs = lab.ip_json("a", "nexthop show")?;
    assert!(
        !nhs.as_array()
            .unwrap()
            .iter()
            .any(|n| n["gateway"] == v4(1).as_str()),
        "stale nexthop left: {nhs}"
    );

    // A file that does not parse changes nothing and is reported with path and line.
    // (Written atomically: a plain write truncates first, and the source may read the
    // empty file, a valid "no Routes", before the broken text arrives.)
    write_atomic(
        &file,
        "apiVersion: networking.doks.digitalocean.com/v1alpha1\nkind: Route\nmetadata: {name: egress}\nspec:\n  destinations: [\n",
    )?;
    wait_for("parse error in the log", Duration::from_secs(20), || {
        agent
            .log_text()
            .contains(&format!("{}:", file.display()))
            .then_some(())
    })?;
    assert!(
        agent.log_text().contains("invalid manifest"),
        "{}",
        agent.log_text()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        lab.route_gateways("a", DEST_V4)?,
        vec![v4(2), v4(3)],
        "last good state kept"
    );
    agent.check_alive()?;
    Ok(())
}

#[test]
fn delete_removes_routes_and_nexthops() -> Result<()> {
    let (lab, dir) = lab_with(&[
        (
            "a.yaml",
            route_yaml("a", &[DEST_V4], &[&v4(1), &v4(2)], None),
        ),
        ("b.yaml", route_yaml("b", &[DEST_V6], &[&v6(1)], None)),
    ])?;
    let mut agent = Agent::start(&lab, "a", &dir, &[])?;
    agent.wait_settled(2)?;
    assert_eq!(
        lab.ip_json("a", "nexthop show")?.as_array().unwrap().len(),
        5,
        "3 gateway nexthops + 2 groups"
    );
    std::fs::remove_file(dir.join("a.yaml"))?;
    wait_for("v4 route removed", Duration::from_secs(20), || {
        lab.route("a", DEST_V4).ok()?.is_none().then_some(())
    })?;
    assert!(lab.route("a", DEST_V6)?.is_some(), "the other Route stays");
    std::fs::remove_file(dir.join("b.yaml"))?;
    wait_for("everything owned removed", Duration::from_secs(20), || {
        (lab.route("a", DEST_V6).ok()?.is_none()
            && lab
                .ip_json("a", "nexthop show")
                .ok()?
                .as_array()?
                .is_empty())
        .then_some(())
    })?;
    Ok(())
}

#[test]
fn restart_adopts_without_flap() -> Result<()> {
    let (lab, dir) = lab_with(&[(
        "r.yaml",
        route_yaml("r", &[DEST_V4], &[&v4(1), &v4(2), &v4(3)], None)
            + "---\n"
            + &route_yaml("s", &[DEST_V6], &[&v6(1)], None),
    )])?;
    // The kernel's own IPv6 link-local routes must be in place before the monitor starts
    // (a slow machine, e.g. the 6.1 VM under TCG, still adds them at this point).
    lab.wait_ipv6_settled("a")?;
    let mut agent = Agent::start(&lab, "a", &dir, &[])?;
    agent.wait_settled(2)?;
    let routes_before = lab.ip(&lab.node_ns("a"), "route show proto 196")?;
    let nh_before = lab.ip(&lab.node_ns("a"), "nexthop show")?;

    // Watch every route and nexthop event across the restart.
    let monitor = lab.monitor("a", &["route", "nexthop"])?;

    agent.stop();
    assert_eq!(
        lab.ip(&lab.node_ns("a"), "route show proto 196")?,
        routes_before,
        "a stopped agent leaves its routes"
    );
    agent.restart()?;
    let status = agent.wait_status("first reconcile after restart", |s| {
        s["reconciles"].as_u64() >= Some(1)
    })?;
    assert_eq!(
        status["lastChanges"], 0,
        "the restarted agent changed nothing: {status}"
    );
    agent.wait_settled(2)?;
    // The same after a SIGKILL under traffic: nothing moves, nothing fails.
    let stream = lab.stream("a", ECHO_V4.parse()?, 10);
    std::thread::sleep(Duration::from_secs(1));
    agent.kill();
    agent.restart()?;
    let status = agent.wait_status("first reconcile after the kill", |s| {
        s["reconciles"].as_u64() >= Some(1)
    })?;
    assert_eq!(status["lastChanges"], 0, "after the kill: {status}");
    agent.wait_settled(2)?;
    std::thread::sleep(Duration::from_millis(500));
    let attempts = stream.stop();
    assert!(
        attempts.iter().all(|a| a.result.is_ok()),
        "connections failed across the kill: {:?}",
        attempts
            .iter()
            .filter(|a| a.result.is_err())
            .collect::<Vec<_>>()
    );
    std::thread::sleep(Duration::from_millis(300));

    let events = monitor.events()?;
    assert!(
        events.trim().is_empty(),
        "route/nexthop events during the restart:\n{events}"
    );
    assert_eq!(
        lab.ip(&lab.node_ns("a"), "nexthop show")?,
        nh_before,
        "same nexthop ids"
    );
    assert_eq!(
        lab.ip(&lab.node_ns("a"), "route show proto 196")?,
        routes_before
    );
    Ok(())
}

#[test]
fn hand_changes_are_repaired_and_foreign_state_is_untouched() -> Result<()> {
    let (lab, dir) = lab_with(&[(
        "r.yaml",
        route_yaml("r", &[DEST_V4], &[&v4(1), &v4(2)], None),
    )])?;
    let ns = lab.node_ns("a");
    // Foreign state: a route, a nexthop inside the agent's id range but of another protocol,
    // one outside the range.
    foreign_route(&lab, "198.51.101.0/24", &v4(1))?;
    lab.ip(
        &ns,
        &format!("nexthop add id 1960000 via {} dev eth1 proto static", v4(2)),
    )?;
    lab.ip(&ns, &format!("nexthop add id 7 via {} dev eth1", v4(3)))?;
    let mut agent = Agent::start(&lab, "a", &dir, &[])?;
    agent.wait_settled(1)?;
    let owned_route = lab.route("a", DEST_V4)?.unwrap();
    assert_ne!(
        owned_route["nhid"].as_u64(),
        Some(1960000),
        "foreign id in the range is skipped"
    );

    // Deleted by hand: repaired.
    let t = Instant::now();
    lab.ip(&ns, &format!("route del {DEST_V4}"))?;
    wait_for("route repaired", Duration::from_secs(20), || {
        lab.route("a", DEST_V4).ok()?
    })?;
    eprintln!("hand-deleted route repaired after {:?}", t.elapsed());
    // Changed by hand (still marked as ours): put back.
    lab.ip(
        &ns,
        &format!("route replace {DEST_V4} via {} proto 196", v4(3)),
    )?;
    wait_for("route restored", Duration::from_secs(20), || {
        (lab.route_gateways("a", DEST_V4).ok()? == vec![v4(1), v4(2)]).then_some(())
    })?;
    // A member nexthop deleted by hand (the kernel drops it from the group): restored.
    let group = lab.route("a", DEST_V4)?.unwrap()["nhid"].as_u64().unwrap();
    let members = lab.ip_json("a", &format!("nexthop show id {group}"))?[0]["group"].clone();
    let first = members[0]["id"].as_u64().unwrap();
    lab.ip(&ns, &format!("nexthop del id {first}"))?;
    wait_for("group restored", Duration::from_secs(20), || {
        (lab.route_gateways("a", DEST_V4).ok()? == vec![v4(1), v4(2)]).then_some(())
    })?;

    // A foreign route added later, and the agent removing its own: the foreign state stays.
    lab.ip(&ns, &format!("route add 198.51.102.0/24 via {}", v4(2)))?;
    std::fs::remove_file(dir.join("r.yaml"))?;
    wait_for("owned route removed", Duration::from_secs(20), || {
        lab.route("a", DEST_V4).ok()?.is_none().then_some(())
    })?;
    std::thread::sleep(Duration::from_millis(300));
    assert!(lab.route("a", "198.51.101.0/24")?.is_some());
    assert!(lab.route("a", "198.51.102.0/24")?.is_some());
    let ids: BTreeSet<u64> = lab
        .ip_json("a", "nexthop show")?
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["id"].as_u64())
        .collect();
    assert_eq!(
        ids,
        [7, 1960000].into_iter().collect(),
        "only the foreign nexthops remain"
    );
    agent.check_alive()?;
    Ok(())
}

#[test]
fn foreign_route_at_the_same_destination_is_reported_not_replaced() -> Result<()> {
    let (lab, dir) = lab_with(&[(
        "r.yaml",
        route_yaml("clash", &[DEST_V4, "192.0.2.0/24"], &[&v4(1)], None),
    )])?;
    foreign_route(&lab, DEST_V4, &v4(3))?;
    let mut agent = Agent::start(&lab, "a", &dir, &[])?;
    let s = agent.wait_status("kernel problem reported", |s| {
        s["problems"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["kind"] == "KernelRefused"))
    })?;
    let msg = s["problems"][0]["message"].as_str().unwrap();
    assert!(
        msg.contains("clash") && msg.contains(DEST_V4) && msg.contains("does not own"),
        "{msg}"
    );
    assert_eq!(
        lab.route_gateways("a", DEST_V4)?,
        vec![v4(3)],
        "foreign route untouched"
    );
    assert!(
        lab.route("a", "192.0.2.0/24")?.is_some(),
        "the Route's other destination is installed"
    );
    Ok(())
}

/// What the static route operator leaves on a node (pyroute2's `proto static`, no
/// metric) is adopted when it is exactly what a StaticRoute asks for: replaced in place by
/// the agent's own route, never deleted first (`ip monitor` sees no deletion), with no
/// connection through it failing on the way. A leftover
/// with another gateway, or another protocol, stays foreign and is reported.
#[test]
fn the_static_route_operators_leftover_routes_are_adopted_in_place() -> Result<()> {
    let static_route = |name: &str, dst: &str, gw: &str| {
        format!(
            "apiVersion: networking.digitalocean.com/v1\nkind: StaticRoute\nmetadata:\n  \
             name: {name}\nspec:\n  destinations:\n    - \"{dst}\"\n  gateway: \"{gw}\"\n"
        )
    };
    let (lab, dir) = lab_with(&[(
        "sr.yaml",
        [
            static_route("left-v4", ECHO_V4, &v4(1)),
            static_route("left-v6", ECHO_V6, &v6(1)),
            static_route("other-gateway", "198.51.100.8", &v4(1)),
            static_route("other-protocol", "198.51.100.9", &v4(1)),
        ]
        .join("---\n"),
    )])?;
    let ns = lab.node_ns("a");
    lab.ip(
        &ns,
        &format!("route add {ECHO_V4} via {} proto static", v4(1)),
    )?;
    lab.ip(
        &ns,
        &format!("-6 route add {ECHO_V6} via {} proto static", v6(1)),
    )?;
    lab.ip(
        &ns,
        &format!("route add 198.51.100.8 via {} proto static", v4(2)),
    )?;
    lab.ip(&ns, &format!("route add 198.51.100.9 via {}", v4(1)))?;
    let monitor = lab.monitor("a", &["route"])?;
    // Traffic through the leftovers from before the agent starts until after it adopted
    // them: not one connection may fail.
    let streams = [
        lab.stream("a", ECHO_V4.parse()?, 10),
        lab.stream("a", ECHO_V6.parse()?, 10),
    ];
    std::thread::sleep(Duration::from_millis(500));
    let mut agent = Agent::start(&lab, "a", &dir, &[])?;
    let s = agent.wait_status("the two foreign routes reported", |s| {
        s["problems"]
            .as_array()
            .is_some_and(|p| p.iter().filter(|p| p["kind"] == "KernelRefused").count() == 2)
    })?;
    for dst in [ECHO_V4, ECHO_V6] {
        let r = lab.route("a", dst)?.expect("the adopted route");
        assert_eq!(r["protocol"], "196", "{dst}: now the agent's: {r}");
    }
    assert_eq!(lab.route_gateways("a", ECHO_V4)?, vec![v4(1)]);
    assert_eq!(lab.route_gateways("a", ECHO_V6)?, vec![v6(1)]);
    std::thread::sleep(Duration::from_millis(500));
    for (fam, stream) in ["IPv4", "IPv6"].into_iter().zip(streams) {
        let attempts = stream.stop();
        let failed: Vec<_> = attempts.iter().filter(|a| a.result.is_err()).collect();
        assert!(
            !attempts.is_empty() && failed.is_empty(),
            "{fam}: {} of {} connections failed across the adoption: {failed:?}",
            failed.len(),
            attempts.len()
        );
    }
    for (dst, gw) in [("198.51.100.8", v4(2)), ("198.51.100.9", v4(1))] {
        let r = lab.route("a", dst)?.expect("the foreign route");
        assert_ne!(r["protocol"], "196", "{dst}: left alone: {r}");
        assert_eq!(lab.route_gateways("a", dst)?, vec![gw]);
    }
    let problems = s["problems"].to_string();
    assert!(
        problems.contains("StaticRoute other-gateway")
            && problems.contains("StaticRoute other-protocol"),
        "{problems}"
    );
    agent.check_alive()?;
    let events = monitor.events()?;
    for dst in [ECHO_V4, ECHO_V6] {
        assert!(
            !events
                .lines()
                .any(|l| l.starts_with("Deleted") && l.contains(&format!("{dst} "))),
            "{dst} was deleted on the way:\n{events}"
        );
    }
    Ok(())
}

#[test]
fn unreachable_gateway_is_reported_then_installed_when_reachable() -> Result<()> {
    let (lab, dir) = lab_with(&[
        (
            "far.yaml",
            route_yaml("far", &["192.0.2.0/24"], &["10.116.0.1"], None),
        ),
        ("near.yaml", route_yaml("near", &[DEST_V4], &[&v4(1)], None)),
    ])?;
    let mut agent = Agent::start(&lab, "a", &dir, &[])?;
    let s = agent.wait_status("unreachable gateway reported", |s| {
        s["problems"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["kind"] == "GatewayUnreachable"))
    })?;
    let p = s["problems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["kind"] == "GatewayUnreachable")
        .unwrap();
    assert_eq!(p["route"], "far");
    assert!(p["message"].as_str().unwrap().contains("10.116.0.1"), "{p}");
    assert!(
        lab.route("a", DEST_V4)?.is_some(),
        "other routes are installed regardless"
    );
    // Fail-closed from the start: refused, not routed out of the node's default route.
    assert!(lab.route("a", "192.0.2.0/24")?.is_none());
    assert!(lab.standby("a", "192.0.2.0/24")?.is_some());
    assert_eq!(
        s["failingClosed"][0]["destination"], "192.0.2.0/24",
        "{s:#}"
    );
    assert_eq!(s["failingClosed"][0]["reason"], "GatewayUnreachable");

    // The node gets a link into 10.116.0.0/24: the agent installs the route on its own.
    let ns = lab.node_ns("a");
    lab.veth(&ns, "eth2", &lab.ns("fabric"), "a-far")?;
    let t = Instant::now();
    lab.ip(&ns, "addr add 10.116.0.2/24 dev eth2")?;
    wait_for(
        "route via the now reachable gateway",
        Duration::from_secs(40),
        || lab.route("a", "192.0.2.0/24").ok()?,
    )?;
    eprintln!(
        "installed {:?} after the gateway became reachable",
        t.elapsed()
    );
    // The TC programs follow the gateway onto the new interface.
    agent.wait_status("TC programs on eth2", |s| {
        s["attached"] == serde_json::json!(["eth1", "eth2"])
    })?;
    agent.wait_status("problem cleared", |s| {
        s["problems"].as_array().is_some_and(|p| p.is_empty())
    })?;
    Ok(())
}

#[test]
fn node_selector_in_a_two_node_lab() -> Result<()> {
    let lab = Lab::new(LabSpec::two_nodes(2))?;
    let dir = lab.routes_dir("routes")?;
    let pool_a = "nodeSelectorTerms:\n  - matchExpressions:\n      - key: doks.digitalocean.com/node-pool\n        operator: In\n        values: [\"pool-a\"]";
    let name_b = "nodeSelectorTerms:\n  - matchFields:\n      - key: metadata.name\n        operator: In\n        values: [\"node-b\"]";
    std::fs::write(
        dir.join("a.yaml"),
        route_yaml("only-a", &[DEST_V4], &[&v4(1)], Some(pool_a)),
    )?;
    std::fs::write(
        dir.join("b.yaml"),
        route_yaml("only-b", &["192.0.2.0/24"], &[&v4(2)], Some(name_b)),
    )?;
    std::fs::write(
        dir.join("all.yaml"),
        route_yaml("all", &[DEST_V6], &[&v6(1)], None),
    )?;
    let mut a = Agent::start(
        &lab,
        "a",
        &dir,
        &["--node-label", "doks.digitalocean.com/node-pool=pool-a"],
    )?;
    let mut b = Agent::start(
        &lab,
        "b",
        &dir,
        &["--node-label", "doks.digitalocean.com/node-pool=pool-b"],
    )?;
    a.wait_settled(2)?;
    b.wait_settled(2)?;
    assert!(lab.route("a", DEST_V4)?.is_some() && lab.route("a", "192.0.2.0/24")?.is_none());
    assert!(lab.route("b", DEST_V4)?.is_none() && lab.route("b", "192.0.2.0/24")?.is_some());
    assert!(lab.route("a", DEST_V6)?.is_some() && lab.route("b", DEST_V6)?.is_some());
    assert_eq!(lab.connect("a", ECHO_V4.parse()?)?, public_v4(1));
    assert_eq!(
        a.status().unwrap()["selected"],
        serde_json::json!(["all", "only-a"])
    );
    assert_eq!(
        b.status().unwrap()["selected"],
        serde_json::json!(["all", "only-b"])
    );
    Ok(())
}

#[test]
fn cleanup_removes_everything_owned() -> Result<()> {
    let (lab, dir) = lab_with(&[(
        "r.yaml",
        route_yaml("r", &[DEST_V4, "192.0.2.0/24"], &[&v4(1), &v4(2)], None),
    )])?;
    let ns = lab.node_ns("a");
    foreign_route(&lab, "198.51.101.0/24", &v4(1))?;
    let mut agent = Agent::start(&lab, "a", &dir, &[])?;
    agent.wait_settled(2)?;
    agent.stop();
    let pin = lab.pin_dir("a");
    for map in ["RA_NEIGH", "RA_GW_STATS", "RA_FLOWS", "RA_GATEWAYS"] {
        assert!(pin.join(map).exists(), "{map} pinned");
    }
    lab.cleanup("a")?;
    assert_eq!(lab.ip(&ns, "route show proto 196")?.trim(), "");
    assert!(
        lab.ip_json("a", "nexthop show")?
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert!(
        lab.route("a", "198.51.101.0/24")?.is_some(),
        "foreign route kept"
    );
    assert!(!pin.exists(), "pins removed");
    Ok(())
}

/// `routing-agent sysctls` (the DaemonSet's privileged init container) sets the ECMP
/// sysctls of the namespace it runs in, and only that one.
#[test]
fn the_sysctls_command_sets_the_ecmp_sysctls() -> Result<()> {
    let lab = Lab::new(LabSpec::two_nodes(1))?;
    let read = |node: &str| -> Result<String> {
        lab.sh(
            &lab.node_ns(node),
            "cat /proc/sys/net/ipv4/fib_multipath_hash_policy /proc/sys/net/ipv6/fib_multipath_hash_policy /proc/sys/net/ipv4/fib_multipath_use_neigh",
        )
    };
    let before = read("a")?;
    anyhow::ensure!(
        before.split_whitespace().collect::<Vec<_>>() == ["0", "0", "0"],
        "{before}"
    );
    let bin = agent_bin().display().to_string();
    lab.sh(&lab.node_ns("a"), &format!("{bin} sysctls"))?;
    let after = read("a")?;
    anyhow::ensure!(
        after.split_whitespace().collect::<Vec<_>>() == ["1", "1", "1"],
        "{after}"
    );
    anyhow::ensure!(read("b")? == before, "node b's namespace was touched");
    Ok(())
}

/// `--dataplane auto` probes what the kernel accepts and says what it chose (resilient
/// groups on every kernel the tests run on); `--dataplane groups`, what a kernel between
/// 5.3 and 5.12 gets, spreads over hash-threshold nexthop groups.
#[test]
fn nexthop_group_kinds_auto_and_hash_threshold() -> Result<()> {
    let lab = Lab::new(LabSpec::default())?;
    let dir = lab.ecmp_routes(3)?;
    let mut agent = Agent::start(&lab, "a", &dir, &["--pending-grace", "0s"])?;
    agent.wait_settled(1)?;
    assert!(
        agent
            .log_text()
            .contains("dataplane: resilient nexthop groups"),
        "{}",
        agent.log_text()
    );
    let group = |lab: &Lab| -> Result<serde_json::Value> {
        let id = lab.route("a", DEST_V4)?.unwrap()["nhid"].as_u64().unwrap();
        Ok(lab.ip_json("a", &format!("nexthop show id {id}"))?[0].clone())
    };
    assert_eq!(group(&lab)?["type"], "resilient", "{}", group(&lab)?);
    agent.stop();
    lab.cleanup("a")?;

    let mut agent = Agent::start(&lab, "a", &dir, &["--dataplane", "groups"])?;
    agent.wait_settled(1)?;
    assert!(agent.log_text().contains("hash-threshold nexthop groups"));
    let g = group(&lab)?;
    assert!(
        g["type"] != "resilient" && g["group"].as_array().map(Vec::len) == Some(3),
        "{g}"
    );
    agent.wait_resolved(3)?;
    let seen = lab.spread("a", ECHO_V4.parse()?, 30)?;
    assert!(seen.len() >= 2, "hash-threshold group spread: {seen:?}");
    Ok(())
}

/// 10,000 prefixes (2,000 Routes × 5 over three gateways): a restart (SIGTERM, then
/// SIGKILL) adopts them without one route event, and `cleanup` removes them all.
#[test]
fn restart_and_cleanup_at_10000_prefixes() -> Result<()> {
    let lab = Lab::new(LabSpec::default())?;
    lab.wait_ipv6_settled("a")?;
    let dir = lab.routes_dir("routes")?;
    std::fs::write(
        dir.join("r.yaml"),
        scale_routes_yaml("r", 2000, 0, &[v4(1), v4(2), v4(3)]),
    )?;
    let mut agent = Agent::start(&lab, "a", &dir, &["--no-ebpf"])?;
    agent.wait_settled(10_000)?;
    let count = |lab: &Lab| -> Result<usize> {
        Ok(lab
            .ip_json("a", "route show proto 196")?
            .as_array()
            .map_or(0, Vec::len))
    };
    ensure_eq(count(&lab)?, 20_000, "real and standby routes")?;
    let monitor = lab.monitor("a", &["route", "nexthop"])?;
    for kill in [false, true] {
        if kill {
            agent.kill();
        }
        agent.restart()?;
        let st = agent.wait_status("first reconcile after the restart", |s| {
            s["reconciles"].as_u64() >= Some(1)
        })?;
        ensure_eq(
            st["lastChanges"].as_u64(),
            Some(0),
            "changes after the restart",
        )?;
        agent.wait_settled(10_000)?;
    }
    let events = monitor.events()?;
    anyhow::ensure!(
        events.trim().is_empty(),
        "route events across the restarts: {} lines",
        events.lines().count()
    );
    agent.stop();
    lab.cleanup("a")?;
    ensure_eq(count(&lab)?, 0, "routes left after cleanup")?;
    anyhow::ensure!(
        lab.ip_json("a", "nexthop show")?
            .as_array()
            .is_some_and(Vec::is_empty)
    );
    Ok(())
}

fn ensure_eq<T: PartialEq + std::fmt::Debug>(got: T, want: T, what: &str) -> Result<()> {
    anyhow::ensure!(got == want, "{what}: {got:?}, want {want:?}");
    Ok(())
}
