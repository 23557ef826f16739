//! Gateway health through the real kernel: each face of a black-holing gateway under a
//! steady stream of new TCP connections; withdrawal, survival of long-lived connections on
//! healthy gateways, fail-closed single-gateway routes, restore by ICMP probe, damping, a
//! destination down on every gateway, and the TC attachment paths (TCX and netlink).
//! Needs root; every test builds and deletes its own lab.
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use routing_agent_tests::*;

/// A second server address, routed through gateway 1 only.
const SINGLE_V4: &str = "198.51.100.20";

fn lab_with_routes() -> Result<(Lab, PathBuf)> {
    let lab = Lab::new(LabSpec::default())?;
    lab.ip(&lab.ns("inet"), &format!("addr add {SINGLE_V4}/32 dev lo"))?;
    let dir = lab.routes_dir("routes")?;
    std::fs::write(
        dir.join("r.yaml"),
        route_yaml(
            "ecmp",
            &[DEST_V4],
            &[&gateway_v4(1), &gateway_v4(2), &gateway_v4(3)],
            None,
        ) + "---\n"
            + &route_yaml(
                "single",
                &[&format!("{SINGLE_V4}/32")],
                &[&gateway_v4(1)],
                None,
            ),
    )?;
    Ok((lab, dir))
}

fn start(lab: &Lab, dir: &std::path::Path, extra: &[&str]) -> Result<Agent> {
    let mut args = extra.to_vec();
    if !extra.contains(&"--probe-interval") {
        args.extend(["--probe-interval", "1s"]);
    }
    let mut agent = Agent::start(lab, "a", dir, &args)?;
    agent.wait_settled(2)?;
    agent.wait_resolved(3)?;
    Ok(agent)
}

fn state(agent: &Agent, gw: u8) -> Option<(String, u64)> {
    let g = agent.gateway(&gateway_v4(gw))?;
    Some((g["state"].as_str()?.to_string(), g["penalty"].as_u64()?))
}

fn wait_state(agent: &mut Agent, gw: u8, want: &str, limit: Duration) -> Result<u64> {
    let what = format!("gateway {} {want}", gateway_v4(gw));
    let addr = gateway_v4(gw);
    let g = wait_for(&what, limit, || {
        agent
            .gateway(&addr)
            .filter(|g| g["state"] == want)
            .map(|g| g["penalty"].as_u64().unwrap_or(0))
    })?;
    Ok(g)
}

/// Every attempt started after `since` succeeded through one of `through`; at least `min`
/// of them.
fn all_through(
    attempts: &[Attempt],
    since: Instant,
    through: &[IpAddr],
    min: usize,
    what: &str,
) -> Result<()> {
    let after: Vec<&Attempt> = attempts.iter().filter(|a| a.started > since).collect();
    ensure!(
        after.len() >= min,
        "{what}: only {} attempts after the withdrawal",
        after.len()
    );
    for a in &after {
        match &a.result {
            Ok(via) => ensure!(
                through.contains(via),
                "{what}: connection left through {via}"
            ),
            Err(e) => anyhow::bail!("{what}: a connection after the withdrawal failed: {e}"),
        }
    }
    Ok(())
}

/// Where the measured traffic comes from.
#[derive(Clone, Copy, Debug, PartialEq)]
enum From {
    /// The node's own sockets.
    Node,
    /// A lab pod behind the node: connections the node forwards (and masquerades, as a
    /// CNI does), the only traffic through the gateways.
    Pod,
}

/// One failure face on gateway 1 of three.
fn failover(face: Failure) -> Result<()> {
    failover_from(face, From::Node)
}

fn failover_from(face: Failure, from: From) -> Result<()> {
    let (mut lab, dir) = lab_with_routes()?;
    let ns = match from {
        From::Node => lab.node_ns("a"),
        From::Pod => lab.add_pod("a")?,
    };
    // Probes every 8 s: long enough that a gateway that answers ping while failing is not
    // restored (and damped) within the assertions below.
    let mut agent = start(&lab, &dir, &["--probe-interval", "8s"])?;
    let echo: IpAddr = ECHO_V4.parse()?;

    // Long-lived connections, spread over the gateways by the L4 hash.
    let mut held: Vec<Held> = (0..12)
        .map(|_| lab.hold_from(&ns, echo))
        .collect::<Result<_>>()?;
    let stream = lab.stream_from(&ns, echo, 10, false);
    std::thread::sleep(Duration::from_secs(2));

    lab.fail(1, face)?;
    let failed_at = Instant::now();
    wait_state(&mut agent, 1, "down", Duration::from_secs(20))?;
    let detected = failed_at.elapsed();
    wait_for(
        "gateway 1 withdrawn from the ECMP route",
        Duration::from_secs(5),
        || {
            (lab.route_gateways("a", DEST_V4).ok()? == vec![gateway_v4(2), gateway_v4(3)])
                .then_some(())
        },
    )?;
    let withdrawn_at = Instant::now();
    // Fail-closed: the route whose only gateway this is has no gateway left; its traffic is
    // refused by the standby route (never sent out of the node's own default route).
    let single = format!("{SINGLE_V4}/32");
    wait_for(
        "the single-gateway route refusing",
        Duration::from_secs(5),
        || lab.route("a", &single).ok()?.is_none().then_some(()),
    )?;
    ensure!(
        lab.standby("a", &single)?.is_some(),
        "{face:?}: no standby route"
    );
    let refused = lab.connect("a", SINGLE_V4.parse()?);
    ensure!(refused.is_err(), "{face:?}: {refused:?}");
    let status = agent.status().unwrap();
    let ecmp = status["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["destination"] == DEST_V4)
        .unwrap();
    assert_eq!(ecmp["withdrawn"], serde_json::json!([gateway_v4(1)]));

    // Afterwards every new connection succeeds, through the remaining gateways.
    std::thread::sleep(Duration::from_secs(4));
    let attempts = stream.stop();
    all_through(
        &attempts,
        withdrawn_at,
        &[public_v4(2), public_v4(3)],
        20,
        &format!("{face:?}"),
    )?;
    let after: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| a.started > withdrawn_at)
        .collect();
    let failed_before = attempts
        .iter()
        .filter(|a| a.started <= withdrawn_at && a.result.is_err())
        .count();
    // (Attempts in flight at the withdrawal usually survive: their retransmitted SYN
    // takes the new group. So no assertion on this count; it is reported below.)

    if face == Failure::ForwardingDropped {
        // The verdict came from the measured connections (the node's or the pod's).
        let g1 = agent.gateway(&gateway_v4(1)).expect("gateway 1");
        ensure!(
            g1["counters"]["failed"].as_u64().unwrap_or(0) > 0,
            "{from:?}: no failed attempt counted: {g1}"
        );
    }
    // Long-lived connections on the healthy gateways are all still alive (flow pinning).
    let mut healthy = 0;
    for h in held.iter_mut().filter(|h| h.via != public_v4(1)) {
        healthy += 1;
        ensure!(
            h.alive(),
            "{face:?}: a long-lived connection via {} died",
            h.via
        );
    }
    ensure!(
        healthy > 0,
        "no long-lived connection landed on a healthy gateway"
    );

    // Recovery: a probe answers, the gateway rejoins.
    lab.heal(1, face)?;
    wait_state(&mut agent, 1, "up", Duration::from_secs(40))?;
    wait_for(
        "gateway 1 back in the ECMP route",
        Duration::from_secs(5),
        || (lab.route_gateways("a", DEST_V4).ok()?.len() == 3).then_some(()),
    )?;
    wait_for(
        "the single-gateway route forwarding again",
        Duration::from_secs(5),
        || (lab.route_gateways("a", &single).ok()? == vec![gateway_v4(1)]).then_some(()),
    )?;
    ensure!(lab.connect("a", SINGLE_V4.parse()?)? == public_v4(1));
    eprintln!(
        "{face:?} ({from:?}): detected after {detected:?}, {failed_before} attempts failed before the withdrawal, \
         {} after, {healthy}/{healthy} long-lived connections on healthy gateways survived",
        after.len()
    );
    agent.check_alive()?;
    Ok(())
}

#[test]
fn failover_forwarding_dropped_while_arp_and_ping_answer() -> Result<()> {
    failover(Failure::ForwardingDropped)
}

#[test]
fn failover_gateway_removed() -> Result<()> {
    failover(Failure::Removed)
}

#[test]
fn failover_total_loss() -> Result<()> {
    failover(Failure::Loss)
}

#[test]
fn failover_uplink_cut() -> Result<()> {
    failover(Failure::UplinkCut)
}

/// With ICMP echo probes only, a gateway that answers ping but keeps dropping forwarded
/// traffic is restored by the probe, fails again, and each time waits longer before the
/// next restore.
#[test]
fn damping_grows_on_repeated_failure() -> Result<()> {
    let (lab, dir) = lab_with_routes()?;
    // ICMP echoes only: they are what restores a gateway that answers ping.
    let mut agent = start(
        &lab,
        &dir,
        &["--max-restore-delay", "4s", "--forwarding-probes", "false"],
    )?;
    let stream = lab.stream("a", ECHO_V4.parse()?, 10);
    lab.fail(1, Failure::ForwardingDropped)?;
    let mut penalties = Vec::new();
    let mut down_for = Vec::new();
    for _ in 0..3 {
        let p = wait_state(&mut agent, 1, "down", Duration::from_secs(30))?;
        let since = Instant::now();
        wait_state(&mut agent, 1, "up", Duration::from_secs(30))?;
        penalties.push(p);
        down_for.push(since.elapsed());
    }
    assert_eq!(penalties, vec![0, 1, 2], "penalty per withdrawal");
    // Penalty 1: not restored before 2 probe intervals; penalty 2: 4 s (the cap).
    assert!(down_for[1] >= Duration::from_millis(1500), "{down_for:?}");
    assert!(down_for[2] >= Duration::from_millis(3500), "{down_for:?}");
    lab.heal(1, Failure::ForwardingDropped)?;
    drop(stream);
    Ok(())
}

/// A gateway that answers ARP and ping but forwards nothing: the forwarding probes (a TCP
/// connection through it to the destination its peers reach) keep it withdrawn, every
/// probe interval, with no flap; once it forwards again the next one restores it, and the
/// status and metrics say which kind of probe did. Probe rules exist only during a probe.
fn forwarding_probes_keep_a_ping_answering_black_hole_out(f: LabFamily) -> Result<()> {
    let lab = Lab::new(LabSpec::default())?;
    let dir = lab.ecmp_routes_of(f, 3)?;
    let mut agent = Agent::start(&lab, "a", &dir, &["--probe-interval", "1s"])?;
    agent.wait_settled(1)?;
    agent.wait_resolved(3)?;
    let gw1 = (f.gateway)(1);
    // Bound sockets: IPv6 connections spread over the gateways on 6.1 and 6.12 too.
    let stream = lab.stream_with("a", f.echo_addr(), 10, true);
    std::thread::sleep(Duration::from_secs(2));
    lab.fail(1, Failure::ForwardingDropped)?;
    let down = |a: &Agent| a.gateway(&gw1).is_some_and(|g| g["state"] == "down");
    wait_for("gateway 1 down", Duration::from_secs(20), || {
        down(&agent).then_some(())
    })?;
    // The gateway still answers ping (an echo probe would restore it at once), where
    // this machine has ping.
    if std::path::Path::new("/usr/bin/ping").exists() {
        let ping = if f.v6 { "ping -6" } else { "ping" };
        lab.sh(&lab.node_ns("a"), &format!("{ping} -c 1 -W 2 {gw1}"))
            .map_err(|e| anyhow::anyhow!("gateway 1 answers no ping: {e:#}"))?;
    }
    // Probes of both kinds would be due every second: several forwarding probes go out,
    // none is answered, and the gateway stays down throughout.
    let probes = |lab: &Lab, answered: bool| -> f64 {
        let (_, m) = health_get(lab, "a", "/metrics").unwrap_or_default();
        let l = format!("gateway=\"{gw1}\",kind=\"tcp\",answered=\"{answered}\"");
        sample(&m, "routing_agent_gateway_probes_total", &l).unwrap_or(0.0)
    };
    let mut rules_seen = false;
    let started = Instant::now();
    while probes(&lab, false) < 4.0 {
        ensure!(
            down(&agent),
            "gateway 1 restored while it forwards nothing: {}",
            agent.gateway(&gw1).unwrap_or_default()
        );
        ensure!(
            started.elapsed() < Duration::from_secs(30),
            "fewer than 4 forwarding probes in 30 s"
        );
        let rules = lab.ip(&lab.node_ns("a"), if f.v6 { "-6 rule" } else { "rule" })?;
        rules_seen |= rules.contains("fwmark");
        std::thread::sleep(Duration::from_millis(100));
    }
    ensure!(down(&agent), "gateway 1 restored while it forwards nothing");
    ensure!(probes(&lab, true) == 0.0, "a forwarding probe was answered");
    let g = agent.gateway(&gw1).unwrap();
    ensure!(g["lastProbe"]["kind"] == "tcp", "{g}");
    let target = g["lastProbe"]["target"].as_str().unwrap_or("").to_string();
    ensure!(
        target.contains(f.echo),
        "probe target {target}: not the echo server"
    );
    ensure!(g["lastProbeAnswered"] == false, "{g}");
    ensure!(
        lab.route_gateways("a", f.dest)? == vec![(f.gateway)(2), (f.gateway)(3)],
        "gateway 1 back in the route"
    );
    // (Without this, the check below that none stays behind could not fail.)
    ensure!(rules_seen, "no fwmark rule seen while the probes ran");

    lab.heal(1, Failure::ForwardingDropped)?;
    wait_for("gateway 1 up", Duration::from_secs(15), || {
        (!down(&agent)).then_some(())
    })?;
    let g = agent.gateway(&gw1).unwrap();
    let reason = g["reason"].as_str().unwrap_or("");
    ensure!(reason.contains("TCP probe"), "restored by: {reason}");
    ensure!(probes(&lab, true) >= 1.0);
    wait_for(
        "gateway 1 back in the route",
        Duration::from_secs(5),
        || (lab.route_gateways("a", f.dest).ok()?.len() == 3).then_some(()),
    )?;
    // No probe rule or route stays behind.
    std::thread::sleep(Duration::from_secs(2));
    let rules = lab.ip(&lab.node_ns("a"), if f.v6 { "-6 rule" } else { "rule" })?;
    ensure!(!rules.contains("fwmark"), "a probe rule stayed: {rules}");
    let _ = stream.stop();
    agent.check_alive()?;
    Ok(())
}

#[test]
fn forwarding_probes_keep_a_ping_answering_black_hole_withdrawn() -> Result<()> {
    forwarding_probes_keep_a_ping_answering_black_hole_out(IPV4)
}

#[test]
fn forwarding_probes_keep_a_ping_answering_black_hole_withdrawn_v6() -> Result<()> {
    forwarding_probes_keep_a_ping_answering_black_hole_out(IPV6)
}

/// The destination itself stops answering: every gateway fails alike, nothing is
/// withdrawn (while the failures are counted on every gateway).
/// Pod traffic: connections the node *forwards* (from a lab pod, masqueraded to the node's
/// address as a CNI does) are the only traffic. The TC programs judge the gateways by
/// them alone: a gateway that drops forwarded traffic is withdrawn, every pod connection
/// after that succeeds through the others, and the pod's long-lived connections on the
/// healthy gateways survive.
#[test]
fn pod_connections_fail_over_and_keep_their_gateway() -> Result<()> {
    failover_from(Failure::ForwardingDropped, From::Pod)
}

/// A gateway that no other gateway shares a route with is judged alone: its black hole is
/// reported (down, probed, back), but its route keeps it (withdrawing its only gateway
/// would only refuse the traffic sooner, and with no peer the destination may as well be
/// at fault).
#[test]
fn a_single_gateway_is_judged_and_reported_but_never_withdrawn() -> Result<()> {
    let lab = Lab::new(LabSpec::default())?;
    lab.ip(&lab.ns("inet"), &format!("addr add {SINGLE_V4}/32 dev lo"))?;
    let dir = lab.routes_dir("routes")?;
    let single = format!("{SINGLE_V4}/32");
    std::fs::write(
        dir.join("r.yaml"),
        route_yaml("ecmp", &[DEST_V4], &[&gateway_v4(1), &gateway_v4(2)], None)
            + "---\n"
            + &route_yaml("single", &[&single], &[&gateway_v4(3)], None),
    )?;
    let mut agent = Agent::start(&lab, "a", &dir, &["--probe-interval", "1s"])?;
    agent.wait_settled(2)?;
    agent.wait_resolved(3)?;
    let stream = lab.stream("a", SINGLE_V4.parse()?, 10);
    std::thread::sleep(Duration::from_secs(2));
    lab.fail(3, Failure::ForwardingDropped)?;
    wait_state(&mut agent, 3, "down", Duration::from_secs(20))?;
    let g3 = agent.gateway(&gateway_v4(3)).expect("gateway 3");
    ensure!(g3["withdrawn"] == false, "{g3}");
    ensure!(
        g3["reason"]
            .as_str()
            .unwrap_or("")
            .contains("not withdrawn"),
        "{g3}"
    );
    // Its route keeps it, and no standby takes over; probes (ICMP: no peer learned a
    // target) keep running.
    for _ in 0..20 {
        ensure!(lab.route_gateways("a", &single)? == vec![gateway_v4(3)]);
        std::thread::sleep(Duration::from_millis(100));
    }
    agent.wait_status("gateway 3 probed", |s| {
        s["gateways"].as_array().is_some_and(|g| {
            g.iter()
                .any(|g| g["address"] == gateway_v4(3).as_str() && g["lastProbe"]["kind"] == "icmp")
        })
    })?;
    ensure!(agent.log_text().contains("not withdrawn"));
    // The ECMP route's gateways were never touched.
    ensure!(lab.route_gateways("a", DEST_V4)?.len() == 2);
    drop(stream);
    lab.heal(3, Failure::ForwardingDropped)?;
    wait_state(&mut agent, 3, "up", Duration::from_secs(20))?;
    ensure!(lab.connect("a", SINGLE_V4.parse()?)? == public_v4(3));
    agent.check_alive()?;
    Ok(())
}

/// A dual-stack gateway (one box, its IPv4 and IPv6 addresses on one MAC) is two gateways
/// with two slots: each family's connections count in its own. (Keyed by MAC alone, one
/// address took the other's traffic, and the other was never judged.)
#[test]
fn a_dual_stack_gateways_families_are_counted_apart() -> Result<()> {
    let lab = Lab::new(LabSpec::default())?;
    let dir = lab.routes_dir("routes")?;
    let v4: Vec<String> = (1..=2).map(gateway_v4).collect();
    let v6: Vec<String> = (1..=2).map(gateway_v6).collect();
    std::fs::write(
        dir.join("r.yaml"),
        route_yaml("v4", &[DEST_V4], &[&v4[0], &v4[1]], None)
            + "---\n"
            + &route_yaml("v6", &[DEST_V6], &[&v6[0], &v6[1]], None),
    )?;
    let mut agent = Agent::start(&lab, "a", &dir, &[])?;
    agent.wait_settled(2)?;
    agent.wait_resolved(4)?;
    let sent = |gw: &str| -> u64 {
        agent
            .gateway(gw)
            .map_or(0, |g| g["counters"]["synSent"].as_u64().unwrap_or(0))
    };
    let all = || -> Vec<u64> { v4.iter().chain(&v6).map(|g| sent(g)).collect() };
    let seen = lab.spread("a", ECHO_V4.parse()?, 20)?;
    ensure!(seen.len() == 2, "{seen:?}");
    // The status follows the counters within a health tick.
    let after_v4 = wait_for("20 IPv4 attempts counted", Duration::from_secs(5), || {
        let c = all();
        (c[0] + c[1] >= 20).then_some(c)
    })?;
    ensure!(after_v4[0] > 0 && after_v4[1] > 0, "{after_v4:?}");
    ensure!(
        after_v4[2] == 0 && after_v4[3] == 0,
        "IPv4 attempts on the IPv6 slots: {after_v4:?}"
    );
    let echo6: IpAddr = ECHO_V6.parse()?;
    for _ in 0..20 {
        lab.connect_bound("a", echo6)?;
    }
    let after_v6 = wait_for("20 IPv6 attempts counted", Duration::from_secs(5), || {
        let c = all();
        (c[2] + c[3] >= 20).then_some(c)
    })?;
    ensure!(
        after_v6[..2] == after_v4[..2],
        "IPv6 attempts on the IPv4 slots: {after_v6:?}"
    );
    Ok(())
}

/// UDP datagrams to a closed port draw ICMP port unreachables, which come back through the
/// gateway each datagram left by: counted per gateway (`udpUnreachable`), and no TCP
/// verdict is drawn from them.
#[test]
fn icmp_unreachables_for_udp_are_counted_per_gateway() -> Result<()> {
    let (lab, dir) = lab_with_routes()?;
    let agent = start(&lab, &dir, &[])?;
    let dst: std::net::SocketAddr = format!("{ECHO_V4}:9999").parse()?;
    // One socket each (its own source port: spread over the gateways), a little apart:
    // the destination rate-limits its ICMP errors per source.
    for _ in 0..12 {
        in_netns(&lab.node_ns("a"), move || -> Result<()> {
            let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
            s.send_to(b"hello", dst)?;
            Ok(())
        })??;
        std::thread::sleep(Duration::from_millis(50));
    }
    let counts = wait_for("UDP unreachables counted", Duration::from_secs(5), || {
        let c: Vec<u64> = (1..=3)
            .map(|i| {
                agent
                    .gateway(&gateway_v4(i))
                    .map_or(0, |g| g["counters"]["udpUnreachable"].as_u64().unwrap_or(0))
            })
            .collect();
        (c.iter().sum::<u64>() >= 3).then_some(c)
    })?;
    eprintln!("UDP unreachables per gateway: {counts:?}");
    for i in 1..=3 {
        let g = agent.gateway(&gateway_v4(i)).expect("gateway");
        ensure!(g["counters"]["failed"] == 0 && g["state"] == "up", "{g}");
        ensure!(
            g["counters"]["icmpUnreachable"].as_u64() >= g["counters"]["udpUnreachable"].as_u64(),
            "{g}"
        );
    }
    Ok(())
}

/// A healthy gateway on a lossy path: 2 % of the packets it forwards lost at random, both
/// ways (about 4 % of the connection attempts). Under a steady stream of new connections
/// for a minute it is never withdrawn, and its measured loss raises its threshold; a black
/// hole on top of the loss is still withdrawn.
#[test]
fn a_gateway_with_2_percent_loss_is_never_withdrawn() -> Result<()> {
    let (lab, dir) = lab_with_routes()?;
    let mut agent = start(&lab, &dir, &[])?;
    let echo: IpAddr = ECHO_V4.parse()?;
    lab.fail(2, Failure::RandomLoss(20))?;
    let stream = lab.stream("a", echo, 10);
    let until = Instant::now() + Duration::from_secs(60);
    let mut polls = 0;
    while Instant::now() < until {
        // The kernel's route, read all along: a withdrawal of any length would show.
        let gws = lab.route_gateways("a", DEST_V4)?;
        ensure!(gws.len() == 3, "a gateway was withdrawn: {gws:?}");
        polls += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let attempts = stream.stop();
    let g2 = agent
        .gateway(&gateway_v4(2))
        .expect("gateway 2 in the status");
    let failed = g2["counters"]["failed"].as_u64().unwrap_or(0);
    let through = attempts
        .iter()
        .filter(|a| a.result.as_ref().is_ok_and(|v| *v == public_v4(2)))
        .count();
    eprintln!(
        "lossy gateway: {} attempts, {through} through it, {failed} of them failed at first, \
         {} failed in the end; loss rate {}, threshold {}; {polls} route reads",
        attempts.len(),
        attempts.iter().filter(|a| a.result.is_err()).count(),
        g2["lossRate"],
        g2["failureThreshold"],
    );
    // 2 % each way fails about 4 % of ~190 attempts (8 expected; 2, 6 and 10 seen): none
    // at all has a chance of 0.96^190 < 0.1 %, "at least 3" failed one run in about 70.
    ensure!(failed >= 1, "the loss was not real: {g2}");
    ensure!(through >= 100, "gateway 2 carried {through} connections");
    assert_eq!(g2["state"], "up", "{g2}");
    ensure!(
        g2["failureThreshold"].as_u64().unwrap_or(0) >= 3,
        "the measured loss did not raise the threshold: {g2}"
    );
    ensure!(!agent.log_text().contains("gateway down"));

    // A black hole on the lossy gateway is still found (at its raised threshold).
    let stream = lab.stream("a", echo, 10);
    lab.fail(2, Failure::ForwardingDropped)?;
    wait_state(&mut agent, 2, "down", Duration::from_secs(20))?;
    drop(stream);
    lab.heal(2, Failure::ForwardingDropped)?;
    lab.heal(2, Failure::RandomLoss(20))?;
    agent.check_alive()?;
    Ok(())
}

/// A server whose allow-list lacks gateway 2's public address.
const ALLOW_LISTED_V4: &str = "198.51.100.11";

/// Serves [`ALLOW_LISTED_V4`] in `inet`, dropping what comes from gateway 2's address.
fn allow_list_without_gateway_2(lab: &Lab) -> Result<()> {
    let inet = lab.ns("inet");
    lab.ip(&inet, &format!("addr add {ALLOW_LISTED_V4}/32 dev lo"))?;
    lab.sh(
        &inet,
        &format!(
            "nft add table inet ra_allow && \
             nft add chain inet ra_allow ra_in '{{ type filter hook input priority 0 ; }}' && \
             nft add rule inet ra_allow ra_in ip saddr {} ip daddr {ALLOW_LISTED_V4} drop",
            public_v4(2)
        ),
    )?;
    Ok(())
}

/// What the agent does when one destination refuses one gateway (a remote allow-list
/// without its address) while that gateway forwards everything else: it keeps the gateway
/// (README, "One destination that refuses one gateway"). A third of the node's new
/// connections go to that destination; the refused share of gateway 2's attempts is
/// measured as its loss, which raises its threshold. After a warm-up (a run of refused
/// attempts may withdraw it at the onset; its forwarding probe brings it back) it stays in
/// the route; only the connections to that destination through gateway 2 fail. The fix is
/// the operator's: a Route for that destination without gateway 2, after which they all
/// succeed.
#[test]
fn a_destination_refusing_one_gateway_leaves_that_gateway_in() -> Result<()> {
    let (lab, dir) = lab_with_routes()?;
    allow_list_without_gateway_2(&lab)?;
    let mut agent = start(&lab, &dir, &[])?;
    let (echo, listed): (IpAddr, IpAddr) = (ECHO_V4.parse()?, ALLOW_LISTED_V4.parse()?);
    let others = lab.stream("a", echo, 6);
    let refusing = lab.stream("a", listed, 3);
    let count_withdrawals = |secs: u64, must_stay: bool| -> Result<usize> {
        let (mut n, mut was_in) = (0, true);
        let until = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < until {
            let now_in = lab.route_gateways("a", DEST_V4)?.contains(&gateway_v4(2));
            ensure!(
                now_in || !must_stay,
                "gateway 2 withdrawn after the warm-up"
            );
            n += usize::from(was_in && !now_in);
            was_in = now_in;
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(n)
    };
    let onset = count_withdrawals(30, false)?;
    let steady_from = Instant::now();
    count_withdrawals(45, true)?;
    let (others, refusing) = (others.stop(), refusing.stop());
    let g = |i: u8| agent.gateway(&gateway_v4(i)).expect("in the status");
    let (g1, g2, g3) = (g(1), g(2), g(3));
    let loss = |g: &serde_json::Value| g["lossRate"].as_f64().unwrap_or(0.0);
    eprintln!(
        "allow-list: {onset} withdrawals at the onset; gateway 2 loss {:.3} threshold {}; \
         peers {:.4} / {:.4}; to {ALLOW_LISTED_V4}: {} of {} failed",
        loss(&g2),
        g2["failureThreshold"],
        loss(&g1),
        loss(&g3),
        refusing.iter().filter(|a| a.result.is_err()).count(),
        refusing.len(),
    );
    // The other destinations never noticed.
    let steady: Vec<&Attempt> = others.iter().filter(|a| a.started > steady_from).collect();
    ensure!(steady.len() > 200, "{} attempts", steady.len());
    ensure!(
        steady.iter().all(|a| a.result.is_ok()),
        "a connection to {ECHO_V4} failed"
    );
    ensure!(
        steady
            .iter()
            .any(|a| a.result.as_ref().is_ok_and(|v| *v == public_v4(2))),
        "gateway 2 carried nothing"
    );
    // The refused destination: failures (through gateway 2 only), successes through the
    // others.
    ensure!(
        refusing.iter().any(|a| a.result.is_err()),
        "nothing was refused"
    );
    for a in &refusing {
        if let Ok(via) = &a.result {
            ensure!(
                *via != public_v4(2),
                "{ALLOW_LISTED_V4} answered through gateway 2"
            );
        }
    }
    for other in [&g1, &g3] {
        ensure!(other["counters"]["failed"] == 0, "a peer failed: {other}");
    }
    ensure!(
        loss(&g2) > 0.1,
        "the refused share is not in the loss rate: {g2}"
    );
    ensure!(g2["failureThreshold"].as_u64().unwrap_or(0) >= 6, "{g2}");
    assert_eq!(g2["state"], "up", "{g2}");

    // The operator's fix: the destination gets a Route of its own, without gateway 2.
    write_atomic(
        &dir.join("allow-listed.yaml"),
        &route_yaml(
            "allow-listed",
            &[&format!("{ALLOW_LISTED_V4}/32")],
            &[&gateway_v4(1), &gateway_v4(3)],
            None,
        ),
    )?;
    wait_for(
        "the allow-listed Route in the kernel",
        Duration::from_secs(10),
        || {
            (lab.route_gateways("a", &format!("{ALLOW_LISTED_V4}/32"))
                .ok()?
                .len()
                == 2)
                .then_some(())
        },
    )?;
    // Nothing goes through gateway 2 any more: its packet counters stand still (the
    // streams are over, nothing else uses it), and every answer comes through 1 or 3.
    let tx2 = |agent: &Agent| {
        agent
            .gateway(&gateway_v4(2))
            .and_then(|g| g["counters"]["txPackets"].as_u64())
            .unwrap_or(0)
    };
    std::thread::sleep(Duration::from_millis(500));
    let tx_before = tx2(&agent);
    let (mut seen, mut timed_out) = (std::collections::BTreeMap::new(), Vec::new());
    for _ in 0..30 {
        match lab.connect("a", listed) {
            Ok(via) => *seen.entry(via).or_insert(0) += 1,
            Err(e) => timed_out.push(e.to_string()),
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let tx_after = tx2(&agent);
    eprintln!("after the fix Route: {seen:?}, unanswered {timed_out:?}");
    ensure!(
        tx_after == tx_before,
        "gateway 2 still carried packets: {tx_before} -> {tx_after}"
    );
    ensure!(
        seen.keys()
            .all(|v| *v == public_v4(1) || *v == public_v4(3)),
        "{seen:?}"
    );
    // Two CI runs lost connections here (one timed out; once 2 of 30, with gateway 2's
    // counters moving): new connections that reused the source port of an old refused
    // attempt were pinned to that attempt's gateway. The TC program now tells them apart
    // by the initial sequence number; the margin of 2 stays for the lab's own rare loss.
    ensure!(seen.values().sum::<usize>() >= 28, "{seen:?} {timed_out:?}");
    agent.check_alive()?;
    Ok(())
}

/// A new connection on the 4-tuple of an old, refused attempt is a new connection: after a
/// Route edit that dropped the attempt's gateway, it goes where the Route now says, not
/// back to that gateway (flow pinning keeps only retransmissions of the same attempt, told
/// by its initial sequence number). Deterministic: the same source port both times.
#[test]
fn a_new_connection_on_an_old_attempts_port_follows_the_edited_route() -> Result<()> {
    let (lab, dir) = lab_with_routes()?;
    allow_list_without_gateway_2(&lab)?;
    let listed_route = |gateway: u8| {
        write_atomic(
            &dir.join("listed.yaml"),
            &route_yaml(
                "listed",
                &[&format!("{ALLOW_LISTED_V4}/32")],
                &[&gateway_v4(gateway)],
                None,
            ),
        )
    };
    let mut agent = start(&lab, &dir, &[])?;
    listed_route(2)?;
    let prefix = format!("{ALLOW_LISTED_V4}/32");
    let via = |gateway: u8| {
        let want = vec![gateway_v4(gateway)];
        wait_for(
            "the listed Route in the kernel",
            Duration::from_secs(10),
            || (lab.route_gateways("a", &prefix).ok()? == want).then_some(()),
        )
    };
    via(2)?;
    let listed: IpAddr = ALLOW_LISTED_V4.parse()?;
    const PORT: u16 = 40_111;
    // Refused through gateway 2: the SYN is retransmitted, the attempt recorded as failed.
    ensure!(
        lab.connect_from_port("a", listed, PORT).is_err(),
        "{ALLOW_LISTED_V4} answered through gateway 2"
    );
    let failed = agent
        .gateway(&gateway_v4(2))
        .and_then(|g| g["counters"]["failed"].as_u64())
        .unwrap_or(0);
    listed_route(1)?;
    via(1)?;
    // Gateway 2 is still up (it serves the ECMP route), so a pin to it would be obeyed.
    assert_eq!(
        agent.gateway(&gateway_v4(2)).expect("status")["state"],
        "up"
    );
    let answer = lab.connect_from_port("a", listed, PORT)?;
    assert_eq!(answer, public_v4(1), "the new connection on port {PORT}");
    ensure!(failed >= 1, "the refused attempt was not recorded");
    agent.check_alive()?;
    Ok(())
}

#[test]
fn destination_down_on_all_gateways_withdraws_nothing() -> Result<()> {
    let (lab, dir) = lab_with_routes()?;
    let mut agent = start(&lab, &dir, &[])?;
    lab.sh(
        &lab.ns("inet"),
        "nft add table inet ra_dst && \
         nft add chain inet ra_dst ra_in '{ type filter hook input priority 0 ; }' && \
         nft add rule inet ra_dst ra_in tcp dport 7 drop",
    )?;
    let stream = lab.stream("a", ECHO_V4.parse()?, 10);
    std::thread::sleep(Duration::from_secs(6));
    let attempts = stream.stop();
    assert!(attempts.iter().all(|a| a.result.is_err()));
    let status = agent.wait_status("failures counted on every gateway", |s| {
        s["gateways"].as_array().is_some_and(|g| {
            g.iter()
                .filter(|g| g["address"] != SINGLE_V4)
                .all(|g| g["counters"]["failed"].as_u64().unwrap_or(0) > 0)
        })
    })?;
    for g in status["gateways"].as_array().unwrap() {
        assert_eq!(g["state"], "up", "{g}");
    }
    assert_eq!(lab.route_gateways("a", DEST_V4)?.len(), 3);
    assert!(!agent.log_text().contains("gateway down"));
    Ok(())
}

/// The agent's programs on `dev`, as tc (cls_bpf filters) and bpftool (netlink and
/// TCX attachments where this bpftool lists them) show them.
fn tc_programs(lab: &Lab, dev: &str) -> Result<String> {
    lab.sh(
        &lab.node_ns("a"),
        &format!("bpftool -j net show dev {dev}; tc filter show dev {dev} ingress; tc filter show dev {dev} egress"),
    )
}

/// cls_bpf filters named `prog` on `dev` (both directions).
fn filters(lab: &Lab, dev: &str, prog: &str) -> Result<usize> {
    let out = lab.sh(
        &lab.node_ns("a"),
        &format!("tc filter show dev {dev} ingress; tc filter show dev {dev} egress"),
    )?;
    Ok(out
        .lines()
        .filter(|l| l.contains(&format!("{prog} direct-action")))
        .count())
}

fn attach_paths(mode: &str) -> Result<()> {
    let (lab, dir) = lab_with_routes()?;
    let ns = lab.node_ns("a");
    // Another owner's clsact qdisc and filter on the same interface.
    lab.sh(
        &ns,
        "tc qdisc add dev eth1 clsact && \
         tc filter add dev eth1 ingress pref 60000 protocol all u32 match u32 0 0 classid 1:1",
    )?;
    let foreign = |lab: &Lab| -> Result<bool> {
        Ok(lab
            .sh(&ns, "tc filter show dev eth1 ingress")?
            .contains("u32"))
    };
    let mut agent = start(&lab, &dir, &["--tc-attach", mode])?;
    // `auto` picks TCX where the kernel has it, clsact + cls_bpf before (6.1).
    let netlink = mode == "netlink" || !kernel_has_tcx();
    let log = agent.log_text();
    let chosen = if netlink {
        "attach=\"netlink\""
    } else {
        "attach=\"tcx\""
    };
    assert!(log.contains(chosen), "expected {chosen}:\n{log}");
    let attached = agent.status().unwrap()["attached"].clone();
    assert_eq!(attached, serde_json::json!(["eth1"]));
    // cls_bpf filters exactly when attached through netlink (TCX links are not filters).
    let want = usize::from(netlink);
    assert_eq!(filters(&lab, "eth1", "ra_egress")?, want);
    assert_eq!(filters(&lab, "eth1", "ra_ingress")?, want);
    // Traffic through a gateway is counted per gateway.
    lab.connect("a", ECHO_V4.parse()?)?;
    agent.wait_status("traffic counted", |s| {
        s["gateways"].as_array().is_some_and(|g| {
            g.iter()
                .any(|g| g["counters"]["established"].as_u64().unwrap_or(0) > 0)
        })
    })?;

    // No route left through eth1: the programs are detached, the foreign filter stays.
    std::fs::remove_file(dir.join("r.yaml"))?;
    agent.wait_settled(0)?;
    agent.wait_status("nothing attached", |s| {
        s["attached"] == serde_json::json!([])
    })?;
    wait_for("programs detached", Duration::from_secs(5), || {
        (!tc_programs(&lab, "eth1").ok()?.contains("ra_")).then_some(())
    })?;
    assert!(foreign(&lab)?, "foreign filter kept");

    // Back, then a restart: still exactly one pair.
    lab_with_routes_into(&dir)?;
    agent.wait_settled(2)?;
    agent.restart()?;
    agent.wait_settled(2)?;
    assert_eq!(filters(&lab, "eth1", "ra_egress")?, want, "no duplicate");
    assert_eq!(filters(&lab, "eth1", "ra_ingress")?, want, "no duplicate");
    agent.stop();
    // A graceful stop detaches both kinds (aya detaches its links when dropped).
    assert_eq!(filters(&lab, "eth1", "ra_ingress")?, 0);

    // Cleanup removes the agent's filters and pins, nothing else.
    let pin = lab.pin_dir("a");
    lab.cleanup("a")?;
    let shown = tc_programs(&lab, "eth1")?;
    assert!(!shown.contains("ra_"), "{shown}");
    assert!(foreign(&lab)?, "foreign filter kept");
    assert!(!pin.exists(), "pins removed");
    Ok(())
}

fn lab_with_routes_into(dir: &std::path::Path) -> Result<()> {
    write_atomic(
        &dir.join("r.yaml"),
        &(route_yaml(
            "ecmp",
            &[DEST_V4],
            &[&gateway_v4(1), &gateway_v4(2), &gateway_v4(3)],
            None,
        ) + "---\n"
            + &route_yaml(
                "single",
                &[&format!("{SINGLE_V4}/32")],
                &[&gateway_v4(1)],
                None,
            )),
    )
}

/// `--tc-attach auto` (the default): TCX links on ≥ 6.6, clsact + cls_bpf on older kernels,
/// chosen by the agent on its own.
#[test]
fn tc_attach_auto_picks_the_kernels_path() -> Result<()> {
    attach_paths("auto")
}

#[test]
fn tc_attach_netlink_clsact_fallback() -> Result<()> {
    attach_paths("netlink")
}

/// Counters, slots and verdicts live in pinned maps: a restarted agent keeps them.
#[test]
fn restart_keeps_counters_and_verdicts() -> Result<()> {
    let (lab, dir) = lab_with_routes()?;
    // Long probe interval: the gateway answers ping, it must not be restored meanwhile.
    let mut agent = start(&lab, &dir, &["--probe-interval", "60s"])?;
    let stream = lab.stream("a", ECHO_V4.parse()?, 10);
    lab.fail(1, Failure::ForwardingDropped)?;
    wait_state(&mut agent, 1, "down", Duration::from_secs(20))?;
    drop(stream);
    let before: u64 = agent.gateway(&gateway_v4(2)).unwrap()["counters"]["established"]
        .as_u64()
        .unwrap();
    assert!(before > 0);
    agent.restart()?;
    // Down from the start (no new detection needed), counters continue. The route whose
    // only gateway it is refuses traffic: one route installed.
    agent.wait_settled(1)?;
    // The loader process handed the programs over through pins the agent took and
    // removed: only the maps stay pinned.
    let mut pins: Vec<String> = std::fs::read_dir(lab.pin_dir("a"))?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    pins.sort();
    assert_eq!(
        pins,
        [
            "RA_FLOWS",
            "RA_GATEWAYS",
            "RA_GW_STATS",
            "RA_NEIGH",
            "RA_TARGETS",
            "RA_UPLINK"
        ],
        "what stays pinned"
    );
    let (st, _) = state(&agent, 1).expect("gateway 1 in the status");
    assert_eq!(st, "down");
    assert_eq!(
        lab.route_gateways("a", DEST_V4)?,
        vec![gateway_v4(2), gateway_v4(3)],
        "the new agent never put the bad gateway back"
    );
    agent.wait_status("counters read from the pinned map", |s| {
        s["gateways"].as_array().is_some_and(|g| {
            g.iter().any(|g| {
                g["address"] == gateway_v4(2)
                    && g["counters"]["established"].as_u64() >= Some(before)
            })
        })
    })?;
    lab.heal(1, Failure::ForwardingDropped)?;
    Ok(())
}

/// Holds 24 connections over an ECMP route through gateways 1 and 2, then adds gateway 3
/// to the route (which moves about a third of the resilient group's buckets, and makes
/// every established socket look its route up again). Returns (alive, held) afterwards and
/// the agent's `steeredBack` count (packets the TC program sent back to their gateway).
fn hold_across_gateway_added(pinning: bool, v6: bool) -> Result<(usize, usize, u64)> {
    let lab = Lab::new(LabSpec::default())?;
    let f = if v6 { IPV6 } else { IPV4 };
    let dir = lab.ecmp_routes_of(f, 2)?;
    let pin = if pinning { "true" } else { "false" };
    let mut agent = Agent::start(&lab, "a", &dir, &["--flow-pinning", pin])?;
    agent.wait_settled(1)?;
    agent.wait_resolved(2)?;
    let echo = f.echo_addr();
    let mut held: Vec<Held> = (0..24)
        .map(|_| lab.hold("a", echo))
        .collect::<Result<_>>()?;
    lab.ecmp_routes_of(f, 3)?;
    wait_for("gateway 3 in the route", Duration::from_secs(10), || {
        (lab.route_gateways("a", f.dest).ok()?.len() == 3).then_some(())
    })?;
    agent.wait_resolved(3)?;
    let alive = held.iter_mut().map(|h| h.alive()).filter(|&a| a).count();
    // New connections do use the new gateway (bound ones: see
    // `kernel_spreads_local_v6_connections` for why, in IPv6 on older kernels).
    // Without pinning, a new connection opened right after the change can be reset too
    // (about one run in eight on the host: the breakage this shows); with pinning, none may.
    let mut spread = std::collections::BTreeMap::new();
    for _ in 0..30 {
        match lab.connect_bound("a", echo) {
            Ok(via) => *spread.entry(via).or_insert(0) += 1,
            Err(e) if !pinning => println!("without pinning, a new connection failed: {e:#}"),
            Err(e) => return Err(e),
        }
    }
    ensure!(
        spread.contains_key(&(f.public)(3)),
        "no new connection through gateway 3: {spread:?}"
    );
    agent.check_alive()?;
    let steered = |agent: &Agent| -> u64 {
        (1..=3)
            .filter_map(|i| agent.gateway(&(f.gateway)(i)))
            .filter_map(|g| g["counters"]["steeredBack"].as_u64())
            .sum()
    };
    // The status is rewritten every health tick: give it a few to show the count.
    let n = wait_for(
        "steered packets in the status",
        Duration::from_secs(2),
        || Some(steered(&agent)).filter(|&n| n > 0),
    )
    .unwrap_or_else(|_| steered(&agent));
    Ok((alive, held.len(), n))
}

/// Whether the kernel alone moves established connections of this family when a gateway
/// is added (`None`: a kernel not measured). Every FIB change makes established sockets
/// look their route up again by the 5-tuple hash; the connections move where the path
/// `connect()` chose was not the one that hash gives:
/// - IPv4 on 6.18: connect() with a kernel-chosen source port did not pick its path by
///   that hash (6 of 24 matched `ip route get … sport … dport …`), so about two thirds move;
///   Debian's 6.1 and 6.12 look the route up again once the port is chosen: nothing moves.
/// - IPv6 on 6.1 and 6.12: connect() hashed source port 0 (see
///   [`kernel_spreads_local_v6_connections`]), so the re-lookup spreads them and about two
///   thirds move; on 6.18 as IPv4.
fn kernel_moves_established(v6: bool) -> Option<bool> {
    let spreads = kernel_spreads_local_v6_connections()?;
    Some(if v6 { true } else { spreads })
}

/// Established connections keep their gateway across a route change: the TC program pins
/// them. Where the kernel alone would move them (see [`kernel_moves_established`]), some
/// packets were steered back.
fn pinning_keeps_established(v6: bool) -> Result<()> {
    let (alive, held, steered) = hold_across_gateway_added(true, v6)?;
    println!("with pinning: {alive}/{held} connections survived, {steered} packets steered back");
    ensure!(alive == held, "only {alive}/{held} connections survived");
    if kernel_moves_established(v6) == Some(true) {
        ensure!(steered > 0, "no packet was steered back");
    }
    Ok(())
}

/// The control for the test above: with `--flow-pinning false`, where the kernel moves
/// established connections, some of the 24 break (each moves with probability ≥ 1/3, so
/// all 24 staying has a probability below 1e-4), which shows that the pinning is what keeps
/// them; where it does not, all survive.
fn unpinned_across_gateway_added(v6: bool) -> Result<()> {
    let (alive, held, steered) = hold_across_gateway_added(false, v6)?;
    ensure!(steered == 0, "{steered} packets steered with pinning off");
    println!("without pinning: {alive}/{held} connections survived");
    match kernel_moves_established(v6) {
        Some(true) => ensure!(
            alive < held,
            "all {held} connections survived without pinning"
        ),
        Some(false) => ensure!(alive == held, "only {alive}/{held} survived on this kernel"),
        None => {}
    }
    Ok(())
}

#[test]
fn established_connections_keep_their_gateway_when_one_is_added() -> Result<()> {
    pinning_keeps_established(false)
}

#[test]
fn established_connections_keep_their_gateway_when_one_is_added_v6() -> Result<()> {
    pinning_keeps_established(true)
}

#[test]
fn without_flow_pinning_a_route_change_breaks_connections() -> Result<()> {
    unpinned_across_gateway_added(false)
}

#[test]
fn without_flow_pinning_a_route_change_breaks_connections_v6() -> Result<()> {
    unpinned_across_gateway_added(true)
}

/// Gateway 1 of three is removed, withdrawn, and restored under a steady stream of new
/// connections, with `unbalanced` as `--resilient-unbalanced-timer`. Connections opened
/// while it was out are held across the restore. Returns gateway 1's buckets (of 128) some
/// seconds after the restore, how many of the new connections after that went through it,
/// and the packets the TC program steered back. Fails if a held connection broke or a new
/// one failed after the restore.
fn share_after_restore(unbalanced: &str) -> Result<(usize, usize, u64)> {
    let (lab, dir) = lab_with_routes()?;
    let mut agent = start(
        &lab,
        &dir,
        &[
            "--probe-interval",
            "1s",
            "--resilient-unbalanced-timer",
            unbalanced,
        ],
    )?;
    let echo: IpAddr = ECHO_V4.parse()?;
    // 30 new connections a second keep the buckets busy: a bucket is used every 4 s or so,
    // never idle for the 120 s of the idle timer.
    let stream = lab.stream("a", echo, 30);
    // Gone (not one that still answers ping: the ICMP probe would restore that one while
    // it is still broken).
    lab.fail(1, Failure::Removed)?;
    wait_state(&mut agent, 1, "down", Duration::from_secs(20))?;
    wait_for("gateway 1 withdrawn", Duration::from_secs(5), || {
        (lab.route_gateways("a", DEST_V4).ok()? == vec![gateway_v4(2), gateway_v4(3)]).then_some(())
    })?;
    let mut held: Vec<Held> = (0..24)
        .map(|_| lab.hold("a", echo))
        .collect::<Result<_>>()?;
    // Out for 10 s: the buckets that left gateway 1 are marked idle when they move, and
    // would go straight back if it returned at once; by now traffic has used nearly all
    // of them on the peers (each one unused for 10 s: about e^-2.3, 10 %).
    std::thread::sleep(Duration::from_secs(10));
    lab.heal(1, Failure::Removed)?;
    wait_state(&mut agent, 1, "up", Duration::from_secs(40))?;
    wait_for("gateway 1 back", Duration::from_secs(5), || {
        (lab.route_gateways("a", DEST_V4).ok()?.len() == 3).then_some(())
    })?;
    let restored_at = Instant::now();
    // The kernel's upkeep runs at most every few seconds past the timer: 15 s is ample for
    // a 3 s timer, and a control with none shows what staying unbalanced looks like.
    let balanced = |s: &std::collections::BTreeMap<String, usize>| {
        s.len() == 3 && s.values().all(|&n| (42..=43).contains(&n))
    };
    let _ = wait_for("the group balanced", Duration::from_secs(15), || {
        lab.bucket_share("a", DEST_V4).ok().filter(|s| balanced(s))
    });
    let share = lab.bucket_share("a", DEST_V4)?;
    let measured_at = Instant::now();
    std::thread::sleep(Duration::from_secs(4));
    let attempts = stream.stop();
    for a in attempts.iter().filter(|a| a.started > restored_at) {
        if let Err(e) = &a.result {
            anyhow::bail!("a new connection after the restore failed: {e}");
        }
    }
    let through_1 = attempts
        .iter()
        .filter(|a| a.started > measured_at && a.result.as_ref().ok() == Some(&public_v4(1)))
        .count();
    let alive = held.iter_mut().map(|h| h.alive()).filter(|&a| a).count();
    ensure!(
        alive == held.len(),
        "only {alive}/{} connections held across the restore survived",
        held.len()
    );
    let steered: u64 = (1..=3)
        .filter_map(|i| agent.gateway(&gateway_v4(i)))
        .filter_map(|g| g["counters"]["steeredBack"].as_u64())
        .sum();
    agent.check_alive()?;
    let mine = share.get(&gateway_v4(1)).copied().unwrap_or(0);
    println!(
        "unbalanced timer {unbalanced}: buckets {share:?}; {through_1} new connections through gateway 1; \
         {alive}/{alive} held connections survived; {steered} packets steered back"
    );
    Ok((mine, through_1, steered))
}

/// A restored gateway gets its share of the buckets back although every bucket stays busy
/// (forced by the group's unbalanced timer), takes new connections again, and the
/// connections that started on its peers while it was out keep their gateway.
#[test]
fn a_restored_gateway_gets_its_share_back_without_breaking_connections() -> Result<()> {
    let (mine, through_1, _) = share_after_restore("3")?;
    ensure!(
        (42..=43).contains(&mine),
        "gateway 1 holds {mine} of 128 buckets"
    );
    ensure!(through_1 > 0, "no new connection through gateway 1");
    Ok(())
}

/// The control: with no unbalanced timer (the kernel's default, and this agent's without
/// flow pinning), the busy buckets stay on the peers and gateway 1 stays short of its share.
#[test]
fn without_an_unbalanced_timer_a_restored_gateway_stays_short_of_its_share() -> Result<()> {
    let (mine, _, _) = share_after_restore("0")?;
    ensure!(mine < 42, "gateway 1 holds {mine} of 128 buckets");
    Ok(())
}

/// The value of the sample `name{labels}` in a Prometheus text exposition.
fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    let key = format!("{name}{{{labels}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
}

/// `/metrics` after a failover and a restore: the gauges and counters moved as they should.
#[test]
fn metrics_tell_the_failover_and_the_restore() -> Result<()> {
    let (lab, dir) = lab_with_routes()?;
    let mut agent = start(&lab, &dir, &[])?;
    let (code, _) = health_get(&lab, "a", "/readyz")?;
    ensure!(
        code == 200,
        "not ready after the first reconcile with the programs attached"
    );
    let stream = lab.stream("a", ECHO_V4.parse()?, 10);
    std::thread::sleep(Duration::from_secs(2));
    lab.fail(1, Failure::ForwardingDropped)?;
    wait_state(&mut agent, 1, "down", Duration::from_secs(20))?;
    let metrics = |lab: &Lab| -> Result<String> {
        let (code, body) = health_get(lab, "a", "/metrics")?;
        ensure!(code == 200);
        Ok(body)
    };
    let g = |i: u8| format!("gateway=\"{}\"", gateway_v4(i));
    let m = wait_for("metrics of the withdrawal", Duration::from_secs(10), || {
        let m = metrics(&lab).ok()?;
        (sample(&m, "routing_agent_gateway_up", &g(1)) == Some(0.0)).then_some(m)
    })?;
    ensure!(
        sample(&m, "routing_agent_gateway_withdrawals_total", &g(1)) == Some(1.0),
        "{m}"
    );
    ensure!(
        sample(&m, "routing_agent_gateway_up", &g(2)) == Some(1.0),
        "{m}"
    );
    let failed = sample(
        &m,
        "routing_agent_gateway_connections_total",
        &format!("{},outcome=\"failed\"", g(1)),
    );
    ensure!(failed.is_some_and(|f| f >= 1.0), "{m}");
    let est = sample(
        &m,
        "routing_agent_gateway_connections_total",
        &format!("{},outcome=\"established\"", g(2)),
    );
    ensure!(est.is_some_and(|e| e >= 1.0), "{m}");
    ensure!(
        sample(
            &m,
            "routing_agent_gateway_last_change_timestamp_seconds",
            &g(1)
        )
        .is_some_and(|t| t > 1.7e9),
        "{m}"
    );
    ensure!(
        sample(&m, "routing_agent_route_applied", "route=\"ecmp\"") == Some(1.0),
        "{m}"
    );
    ensure!(
        m.contains("routing_agent_reconcile_duration_seconds_count"),
        "{m}"
    );
    ensure!(m.contains("routing_agent_build_info{version="), "{m}");
    let _ = stream.stop();

    lab.heal(1, Failure::ForwardingDropped)?;
    wait_state(&mut agent, 1, "up", Duration::from_secs(20))?;
    let m = wait_for("metrics of the restore", Duration::from_secs(10), || {
        let m = metrics(&lab).ok()?;
        (sample(&m, "routing_agent_gateway_up", &g(1)) == Some(1.0)).then_some(m)
    })?;
    ensure!(
        sample(&m, "routing_agent_gateway_restores_total", &g(1)) == Some(1.0),
        "{m}"
    );
    ensure!(
        sample(
            &m,
            "routing_agent_gateway_probes_total",
            &format!("{},kind=\"tcp\",answered=\"true\"", g(1))
        )
        .is_some_and(|n| n >= 1.0),
        "{m}"
    );
    agent.check_alive()?;
    Ok(())
}

/// `routing-agent status --json` in the node's namespace.
fn node_status(lab: &Lab) -> Result<serde_json::Value> {
    let out = lab.sh(
        &lab.node_ns("a"),
        &format!(
            "{} status --json --bpf-pin-dir {}",
            agent_bin().display(),
            lab.pin_dir("a").display()
        ),
    )?;
    Ok(serde_json::from_str(&out)?)
}

/// `routing-agent status` matches the kernel and the agent's view, while the agent runs and
/// after it stopped (it reads the kernel and the pinned maps).
#[test]
fn the_status_command_matches_the_kernel_while_running_and_after_stop() -> Result<()> {
    let (lab, dir) = lab_with_routes()?;
    let mut agent = start(&lab, &dir, &[])?;
    let st = node_status(&lab)?;
    let routes = st["routes"].as_array().cloned().unwrap_or_default();
    ensure!(routes.len() == 2, "{st:#}");
    for r in &routes {
        let dst = r["destination"].as_str().unwrap_or_default();
        let gws: Vec<String> = r["gateways"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|g| g.as_str().map(String::from))
            .collect();
        ensure!(gws == lab.route_gateways("a", dst)?, "{dst}: {gws:?}");
    }
    let agent_view = agent.status().unwrap_or_default();
    for i in 1..=3u8 {
        let g = st["gateways"]
            .as_array()
            .and_then(|g| g.iter().find(|g| g["address"] == gateway_v4(i).as_str()))
            .cloned()
            .unwrap_or_default();
        let mine = agent.gateway(&gateway_v4(i)).unwrap_or_default();
        ensure!(g["state"] == "up" && g["interface"] == "eth1", "{g:#}");
        ensure!(
            g["mac"] == mine["mac"] && g["slot"] == mine["slot"],
            "{g:#} vs {mine:#}"
        );
    }
    ensure!(agent_view["routes"].as_array().map(Vec::len) == Some(2));
    // TCX links where the kernel has them (>= 6.6), else the cls_bpf filters.
    let want = if kernel_has_tcx() {
        serde_json::json!(["eth1 egress (tcx)", "eth1 ingress (tcx)"])
    } else {
        serde_json::json!(["eth1 egress (cls_bpf)", "eth1 ingress (cls_bpf)"])
    };
    ensure!(st["attachments"] == want, "{st:#}");
    // A gateway goes down: the status says so, with the time.
    lab.fail(1, Failure::Removed)?;
    let stream = lab.stream("a", ECHO_V4.parse()?, 10);
    wait_state(&mut agent, 1, "down", Duration::from_secs(20))?;
    let _ = stream.stop();
    let st = wait_for(
        "status shows gateway 1 down",
        Duration::from_secs(10),
        || {
            let st = node_status(&lab).ok()?;
            let g1 = st["gateways"]
                .as_array()?
                .iter()
                .find(|g| g["address"] == gateway_v4(1).as_str())?
                .clone();
            (g1["state"] == "down" && g1["downSince"].is_string() && g1["nextProbe"].is_string())
                .then_some(st)
        },
    )?;
    let g1 = st["gateways"]
        .as_array()
        .and_then(|g| g.iter().find(|g| g["address"] == gateway_v4(1).as_str()))
        .cloned()
        .unwrap_or_default();
    ensure!(g1["lastChange"] == g1["downSince"], "{g1:#}");
    let st = wait_for(
        "status shows the single-gateway route refusing",
        Duration::from_secs(10),
        || {
            let st = node_status(&lab).ok()?;
            st["routes"]
                .as_array()?
                .iter()
                .all(|r| {
                    if r["destination"] == format!("{SINGLE_V4}/32").as_str() {
                        r["state"] == "refusing"
                            && r["standby"] == true
                            && r["reason"] == "AllGatewaysDown"
                    } else {
                        r["state"] == "ok" && r["standby"] == true
                    }
                })
                .then_some(st)
        },
    )?;
    // After the agent stopped: the same, from the kernel and the pins (but the reasons,
    // which only the running agent knows).
    agent.stop();
    let after = node_status(&lab)?;
    let without_reasons = |v: &serde_json::Value| {
        let mut v = v["routes"].clone();
        for r in v.as_array_mut().into_iter().flatten() {
            r.as_object_mut().map(|o| o.remove("reason"));
        }
        v
    };
    ensure!(without_reasons(&after) == without_reasons(&st), "{after:#}");
    ensure!(after["agentAnswered"] == false && st["agentAnswered"] == true);
    ensure!(
        after["attachments"] == serde_json::json!([]),
        "the attachments go with the agent"
    );
    ensure!(
        after["gateways"].as_array().map(Vec::len) == Some(3),
        "{after:#}"
    );
    let table = lab.sh(
        &lab.node_ns("a"),
        &format!(
            "{} status --bpf-pin-dir {}",
            agent_bin().display(),
            lab.pin_dir("a").display()
        ),
    )?;
    ensure!(
        table.contains("ROUTES")
            && table.contains(DEST_V4)
            && table.contains("down")
            && table.contains("refusing"),
        "{table}"
    );
    Ok(())
}

/// A killed agent (SIGKILL: no detach, no cleanup) leaves its cls_bpf filters behind (they
/// outlive the process, unlike TCX links); a new agent adopts the kernel state: no route
/// event, exactly one filter per direction, the verdicts kept. `cleanup` afterwards removes
/// the filters too. Netlink attach on every kernel (what 6.1 always uses).
#[test]
fn a_killed_agent_is_adopted_without_flap_or_duplicate_filters() -> Result<()> {
    let (lab, dir) = lab_with_routes()?;
    // The kernel's own IPv6 link-local routes first (they would show in the monitor).
    lab.wait_ipv6_settled("a")?;
    let mut agent = start(&lab, &dir, &["--tc-attach", "netlink"])?;
    assert_eq!(filters(&lab, "eth1", "ra_egress")?, 1);
    let routes_before = lab.ip(&lab.node_ns("a"), "route show proto 196")?;
    let monitor = lab.monitor("a", &["route", "nexthop"])?;
    let stream = lab.stream("a", ECHO_V4.parse()?, 10);
    std::thread::sleep(Duration::from_secs(1));
    agent.kill();
    ensure!(
        filters(&lab, "eth1", "ra_egress")? == 1 && filters(&lab, "eth1", "ra_ingress")? == 1,
        "the killed agent's filters are still there"
    );
    agent.restart()?;
    agent.wait_settled(2)?;
    ensure!(
        filters(&lab, "eth1", "ra_egress")? == 1 && filters(&lab, "eth1", "ra_ingress")? == 1,
        "no duplicate filter after the restart:\n{}",
        tc_programs(&lab, "eth1")?
    );
    std::thread::sleep(Duration::from_millis(500));
    let attempts = stream.stop();
    let events = monitor.events()?;
    ensure!(
        events.trim().is_empty(),
        "route/nexthop events across the kill and restart:\n{events}"
    );
    ensure!(lab.ip(&lab.node_ns("a"), "route show proto 196")? == routes_before);
    let failed = attempts.iter().filter(|a| a.result.is_err()).count();
    ensure!(
        failed == 0,
        "{failed} of {} connections failed across the kill",
        attempts.len()
    );
    // cleanup after a kill: routes, nexthops, filters, pins.
    agent.kill();
    lab.cleanup("a")?;
    ensure!(filters(&lab, "eth1", "ra_egress")? == 0 && filters(&lab, "eth1", "ra_ingress")? == 0);
    ensure!(
        lab.ip(&lab.node_ns("a"), "route show proto 196")?
            .trim()
            .is_empty()
    );
    ensure!(!lab.pin_dir("a").exists());
    Ok(())
}

/// The failover of `failover()` with 10,000 other prefixes on the same gateways: the
/// withdrawal is one group replace, however many routes use the group; later connections
/// succeed and flows on the healthy gateways survive. (How fast is a benchmark figure:
/// `cargo xtask bench failover --prefixes 10000`.)
#[test]
fn failover_with_10000_other_prefixes_on_the_same_gateways() -> Result<()> {
    let (lab, dir) = lab_with_routes()?;
    let gws = [gateway_v4(1), gateway_v4(2), gateway_v4(3)];
    std::fs::write(
        dir.join("vpn.yaml"),
        scale_routes_yaml("vpn", 2000, 0, &gws),
    )?;
    let mut agent = Agent::start(&lab, "a", &dir, &["--probe-interval", "8s"])?;
    agent.wait_settled(10_002)?;
    agent.wait_resolved(3)?;
    let echo: IpAddr = ECHO_V4.parse()?;
    let group = |lab: &Lab, dst: &str| -> Result<u64> {
        Ok(lab.route("a", dst)?.unwrap()["nhid"].as_u64().unwrap())
    };
    let vpn = "100.64.0.0/24";
    ensure!(
        group(&lab, vpn)? == group(&lab, DEST_V4)?,
        "one shared group"
    );
    let mut held: Vec<Held> = (0..12)
        .map(|_| lab.hold("a", echo))
        .collect::<Result<_>>()?;
    let stream = lab.stream("a", echo, 10);
    std::thread::sleep(Duration::from_secs(2));
    let changes = |lab: &Lab| -> Result<f64> {
        let (_, text) = health_get(lab, "a", "/metrics")?;
        Ok(text
            .lines()
            .find(|l| l.starts_with("routing_agent_kernel_changes_total"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(f64::NAN))
    };
    let before = changes(&lab)?;
    lab.fail(1, Failure::ForwardingDropped)?;
    let failed_at = Instant::now();
    wait_state(&mut agent, 1, "down", Duration::from_secs(60))?;
    eprintln!("withdrawn {:?} after the failure", failed_at.elapsed());
    wait_for(
        "gateway 1 out of the shared group",
        Duration::from_secs(10),
        || (lab.route_gateways("a", vpn).ok()? == vec![gateway_v4(2), gateway_v4(3)]).then_some(()),
    )?;
    let withdrawn_at = Instant::now();
    ensure!(lab.route_gateways("a", DEST_V4)? == vec![gateway_v4(2), gateway_v4(3)]);
    std::thread::sleep(Duration::from_secs(3));
    // The shared group replaced, the withdrawn gateway's member nexthop deleted, and the
    // single-gateway route (no gateway left: its standby refuses) and its group: four
    // changes, none of the 10,000 routes.
    let made = changes(&lab)? - before;
    ensure!(
        made <= 4.0,
        "the withdrawal made {made} kernel changes (one group replace expected)"
    );
    let attempts = stream.stop();
    all_through(
        &attempts,
        withdrawn_at,
        &[public_v4(2), public_v4(3)],
        15,
        "at 10,000 prefixes",
    )?;
    for h in held.iter_mut().filter(|h| h.via != public_v4(1)) {
        ensure!(h.alive(), "a long-lived connection via {} died", h.via);
    }
    lab.heal(1, Failure::ForwardingDropped)?;
    wait_state(&mut agent, 1, "up", Duration::from_secs(60))?;
    wait_for(
        "gateway 1 back in the shared group",
        Duration::from_secs(10),
        || (lab.route_gateways("a", vpn).ok()?.len() == 3).then_some(()),
    )?;
    agent.check_alive()
}
