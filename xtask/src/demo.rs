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

    t.say("starting routing-agent (standalone mode) inside node-a");
    let mut agent = Agent::start(&lab, "a", &dir, &[])?;
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

    t.say("stopping the agent and tearing the lab down");
    drop(agent);
    drop(lab);
    t.say("done: no namespace, pin or process left behind");
    Ok(())
}
