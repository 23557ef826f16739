//! `cargo xtask lab`: the lab demo. Builds, creates the namespace lab, runs the agent in
//! standalone mode with an ECMP Route, shows the kernel state and which gateway each
//! connection used, edits the Route live, and tears everything down.
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::Result;
use routing_agent_tests::*;

struct Timeline(Instant);

impl Timeline {
    fn say(&self, what: &str) {
        eprintln!(
            "\x1b[1m[{:>6.2}s]\x1b[0m {what}",
            self.0.elapsed().as_secs_f64()
        );
    }
}

fn show(title: &str, text: &str) {
    eprintln!("    ┌─ {title}");
    for l in text.lines() {
        eprintln!("    │ {l}");
    }
    eprintln!("    └─");
}

fn spread_table(seen: &BTreeMap<IpAddr, usize>, total: usize) {
    let gw_of = |ip: &IpAddr| (1..=3u8).find(|i| public_v4(*i) == *ip || public_v6(*i) == *ip);
    for (ip, n) in seen {
        let gw = gw_of(ip)
            .map(|i| format!("gw{i} ({})", gateway_v4(i)))
            .unwrap_or_default();
        eprintln!(
            "      {gw:<20} egress {ip:<16} {n:>3} flows {}",
            "█".repeat(n * 40 / total.max(1))
        );
    }
}

pub fn run() -> Result<()> {
    let t = Timeline(Instant::now());
    t.say("set-up (installs what this machine lacks)");
    crate::setup::setup()?;
    t.say("building the agent and its eBPF programs (cargo shows progress)");
    crate::cmd("cargo", &["build", "-p", "routing-agent"])?;

    t.say("creating the lab: fabric bridges, 3 NAT gateways, the internet with an echo server, node-a");
    let lab = Lab::new(LabSpec::default())?;
    t.say(&format!(
        "lab {} ready (namespaces {}-*)",
        lab.prefix, lab.prefix
    ));

    let dir = lab.routes_dir("routes")?;
    let manifest = route_yaml(
        "egress-ecmp",
        &[DEST_V4],
        &[&gateway_v4(1), &gateway_v4(2), &gateway_v4(3)],
        None,
    );
    std::fs::write(dir.join("egress.yaml"), &manifest)?;
    show("routes/egress.yaml", &manifest);

    t.say("starting routing-agent (standalone mode) inside node-a, probing withdrawn gateways every 2 s (default 30 s)");
    let mut agent = Agent::start(&lab, "a", &dir, &["--probe-interval", "2s"])?;
    agent.wait_settled(1)?;
    t.say("routes installed");
    let ns = lab.node_ns("a");
    show(
        "ip route show proto 196 (node-a)",
        &lab.ip(&ns, "route show proto 196")?,
    );
    show("ip nexthop show (node-a)", &lab.ip(&ns, "nexthop show")?);

    let n = 30;
    t.say(&format!("{n} TCP connections from node-a to the echo server {ECHO_V4}; it answers with the source it saw"));
    let seen = lab.spread("a", ECHO_V4.parse()?, n)?;
    spread_table(&seen, n);

    t.say("editing the Route live: gw2 removed from its gateways");
    let edited = route_yaml(
        "egress-ecmp",
        &[DEST_V4],
        &[&gateway_v4(1), &gateway_v4(3)],
        None,
    );
    let start = Instant::now();
    write_atomic(&dir.join("egress.yaml"), &edited)?;
    wait_for("the edit in the kernel", Duration::from_secs(20), || {
        (lab.route_gateways("a", DEST_V4).ok()? == vec![gateway_v4(1), gateway_v4(3)]).then_some(())
    })?;
    t.say(&format!(
        "kernel updated {:.0} ms after the file changed",
        start.elapsed().as_secs_f64() * 1e3
    ));
    show(
        "ip route show proto 196 (node-a)",
        &lab.ip(&ns, "route show proto 196")?,
    );
    let seen = lab.spread("a", ECHO_V4.parse()?, n)?;
    spread_table(&seen, n);

    let packets = routing_agent_tests::run(&[
        "bpftool",
        "map",
        "dump",
        "pinned",
        lab.pin_dir("a").join("RA_GW_STATS").to_str().unwrap(),
    ])?;
    let lines: Vec<&str> = packets
        .lines()
        .filter(|l| l.contains("packets"))
        .take(4)
        .collect();
    show(
        "bpftool map dump pinned …/RA_GW_STATS (first CPUs)",
        &lines.join("\n"),
    );

    // A gateway breaks.
    agent.wait_resolved(2)?;
    t.say("gw1 goes away (its VPC link goes down); node-a keeps opening 10 connections/s");
    let stream = lab.stream("a", ECHO_V4.parse()?, 10);
    std::thread::sleep(Duration::from_secs(2));
    lab.fail(1, Failure::Removed)?;
    let broken = Instant::now();
    wait_for("gw1 withdrawn", Duration::from_secs(30), || {
        (lab.route_gateways("a", DEST_V4).ok()? == vec![gateway_v4(3)]).then_some(())
    })?;
    t.say(&format!(
        "gw1 withdrawn {:.2} s after it broke (failed connection attempts seen by the TC program, a peer gateway succeeding)",
        broken.elapsed().as_secs_f64()
    ));
    std::thread::sleep(Duration::from_secs(2));
    let attempts = stream.stop();
    let after: Vec<_> = attempts.iter().filter(|a| a.started > broken).collect();
    let failed = after.iter().filter(|a| a.result.is_err()).count();
    t.say(&format!(
        "{} connection attempts since the break: {failed} failed (those in flight before the withdrawal), the rest through gw3",
        after.len()
    ));
    show(
        "routing-agent status (node-a; reads the kernel and the pinned maps)",
        &lab.sh(
            &ns,
            &format!(
                "{} status --bpf-pin-dir {}",
                crate::workspace()
                    .join("target/debug/routing-agent")
                    .display(),
                lab.pin_dir("a").display()
            ),
        )?,
    );
    t.say("gw1 is probed with ICMP every 2 s while withdrawn; its link comes back");
    std::thread::sleep(Duration::from_secs(3));
    lab.heal(1, Failure::Removed)?;
    let healed = Instant::now();
    wait_for("gw1 restored", Duration::from_secs(60), || {
        (lab.route_gateways("a", DEST_V4).ok()? == vec![gateway_v4(1), gateway_v4(3)]).then_some(())
    })?;
    t.say(&format!(
        "gw1 back in the route {:.2} s after it was healed (the next answered probe)",
        healed.elapsed().as_secs_f64()
    ));
    let (_, metrics) = health_get(&lab, "a", "/metrics")?;
    let lines: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            l.contains(&gateway_v4(1))
                && (l.starts_with("routing_agent_gateway_withdrawals")
                    || l.starts_with("routing_agent_gateway_restores")
                    || l.starts_with("routing_agent_gateway_up")
                    || l.starts_with("routing_agent_gateway_probes")
                    || l.contains("outcome=\"failed\""))
        })
        .collect();
    show("curl :9977/metrics (gw1)", &lines.join("\n"));
    let log = agent.log_text();
    let story: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("gateway down")
                || l.contains("gateway up")
                || l.contains("probe of a withdrawn")
        })
        .take(6)
        .collect();
    show(
        "agent log (state changes, one line each with the reason)",
        &story.join("\n"),
    );

    t.say("stopping the agent and tearing the lab down");
    drop(agent);
    drop(lab);
    t.say("done: no namespace, pin or process left behind");
    Ok(())
}

fn deploy_file(name: &str) -> String {
    crate::workspace()
        .join("deploy")
        .join(name)
        .display()
        .to_string()
}

/// `cargo xtask lab --kube`: the same lab with a real kube-apiserver + etcd, two nodes, the
/// controller and an agent per node, all with the identities and RBAC of `deploy/`.
pub fn run_kube() -> Result<()> {
    use routing_agent_tests::kube::ControlPlane;
    let t = Timeline(Instant::now());
    t.say("set-up (installs what this machine lacks; builds kube-apiserver once, ~10 min)");
    crate::setup::setup()?;
    crate::setup::kube()?;
    t.say("building the agent and its eBPF programs");
    crate::cmd("cargo", &["build", "-p", "routing-agent"])?;

    t.say("creating the lab: fabric, 3 NAT gateways, the internet, node-a and node-b");
    let mut lab = Lab::new(LabSpec::two_nodes(3))?;
    t.say("starting etcd + kube-apiserver v1.20.2 in the lab's cp namespace (10.114.0.250:6443)");
    let mut cp: ControlPlane = lab.control_plane()?;
    cp.kubectl(&["apply", "--validate=false", "-f", &deploy_file("crd.yaml")])?;
    cp.kubectl(&["apply", "-f", &deploy_file("rbac.yaml")])?;
    cp.kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/routes.networking.doks.digitalocean.com",
    ])?;
    cp.apply(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\n  labels: {egress: \"yes\"}\n---\napiVersion: v1\nkind: Node\nmetadata:\n  name: node-b\n",
    )?;
    cp.start_controller(&[])?;
    let mut agents = [
        Agent::start_kube(&lab, "a", &cp.agent, &[])?,
        Agent::start_kube(&lab, "b", &cp.agent, &[])?,
    ];
    t.say("controller and both agents running with their ServiceAccount identities");

    let manifest = route_yaml(
        "egress-ecmp",
        &[DEST_V4],
        &[&gateway_v4(1), &gateway_v4(2), &gateway_v4(3)],
        Some(
            "nodeSelectorTerms:\n  - matchExpressions:\n      - {key: egress, operator: In, values: [\"yes\"]}",
        ),
    );
    show("kubectl apply -f egress.yaml", &manifest);
    cp.apply(&manifest)?;
    let nodes = |want: &str| -> Result<()> {
        wait_for(&format!("NODES {want}"), Duration::from_secs(30), || {
            let out = cp
                .kubectl(&[
                    "get",
                    "route",
                    "egress-ecmp",
                    "-o",
                    "jsonpath={.status.nodes}",
                ])
                .ok()?;
            (out.trim() == want).then_some(())
        })
    };
    nodes("1/1")?;
    show("kubectl get routes", &cp.kubectl(&["get", "routes"])?);
    show(
        "kubectl get noderoutestatuses",
        &cp.kubectl(&["get", "nrs"])?,
    );
    show(
        "ip route show proto 196 (node-a; node-b has none: not labelled)",
        &lab.ip(&lab.node_ns("a"), "route show proto 196")?,
    );
    let n = 30;
    t.say(&format!(
        "{n} TCP connections from node-a to the echo server"
    ));
    let seen = lab.spread("a", ECHO_V4.parse()?, n)?;
    spread_table(&seen, n);

    t.say("kubectl label node node-b egress=yes");
    let start = Instant::now();
    cp.kubectl(&["label", "node", "node-b", "egress=yes"])?;
    wait_for("the route on node-b", Duration::from_secs(30), || {
        (lab.route_gateways("b", DEST_V4).ok()?.len() == 3).then_some(())
    })?;
    t.say(&format!(
        "node-b routes it {:.0} ms later",
        start.elapsed().as_secs_f64() * 1e3
    ));
    nodes("2/2")?;
    show("kubectl get routes", &cp.kubectl(&["get", "routes"])?);

    t.say("gw1 starts dropping forwarded traffic (it still answers ARP and ping); node-a keeps connecting");
    agents[0].wait_resolved(3)?;
    let stream = lab.stream("a", ECHO_V4.parse()?, 10);
    std::thread::sleep(Duration::from_secs(1));
    lab.fail(1, Failure::ForwardingDropped)?;
    let start = Instant::now();
    wait_for("gw1 withdrawn on node-a", Duration::from_secs(30), || {
        (lab.route_gateways("a", DEST_V4).ok()? == vec![gateway_v4(2), gateway_v4(3)]).then_some(())
    })?;
    t.say(&format!(
        "node-a withdrew gw1 {:.1} s after it failed",
        start.elapsed().as_secs_f64()
    ));
    std::thread::sleep(Duration::from_secs(1));
    show(
        "kubectl get events (the Route's)",
        &cp.kubectl(&[
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=egress-ecmp",
        ])?,
    );
    show("kubectl get nrs", &cp.kubectl(&["get", "nrs"])?);
    let attempts = stream.stop();
    let failed = attempts.iter().filter(|a| a.result.is_err()).count();
    t.say(&format!(
        "{} connection attempts meanwhile, {failed} failed",
        attempts.len()
    ));
    lab.heal(1, Failure::ForwardingDropped)?;

    t.say("kubectl delete route egress-ecmp (returns once both nodes removed it)");
    let start = Instant::now();
    cp.kubectl(&["delete", "route", "egress-ecmp"])?;
    t.say(&format!(
        "deleted in {:.0} ms; node-a routes: {:?}, node-b routes: {:?}",
        start.elapsed().as_secs_f64() * 1e3,
        lab.route_gateways("a", DEST_V4)?,
        lab.route_gateways("b", DEST_V4)?
    ));

    t.say("stopping everything and tearing the lab down");
    for a in agents.iter_mut() {
        a.stop();
    }
    drop(agents);
    drop(cp);
    drop(lab);
    t.say("done: no namespace, pin or process left behind");
    Ok(())
}
