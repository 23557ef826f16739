//! Fail-closed egress through the real kernel: while no gateway of a destination can be
//! used, its traffic is refused and never leaves through the node's own uplink. A lab with
//! a public side: the node's `eth0` and its `isp` default gateway, so that a connection
//! that leaks is answered with the node's public address (the gateways masquerade to their
//! own). For every face, a plain prefix and a `0.0.0.0/0` / `::/0` override, IPv4 and
//! IPv6, under 10 new connections/s: **no connection is answered with the node's public
//! address**, the agent reports the destination failing closed with the face's reason,
//! and after the repair the traffic goes through the gateways again. Controls: with
//! `--fail-mode open` the same face leaks. Needs root; every test builds its own lab.
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use routing_agent_tests::*;

/// A second destination, over all three gateways (its traffic through gateway 3 is what
/// makes gateways 1 and 2 judged down when they black-hole).
const SECOND: LabDest = LabDest {
    v4: ("198.51.101.10", "198.51.101.0/24"),
    v6: ("2001:db8:199::10", "2001:db8:199::/64"),
};
/// A destination whose gateway is on no connected network of the node, until the repair
/// gives the node an address there.
const FAR: LabDest = LabDest {
    v4: ("198.51.102.10", "198.51.102.0/24"),
    v6: ("2001:db8:19a::10", "2001:db8:19a::/64"),
};
/// Gateway 4's second address, on a network the node is not on at first. (A gateway of its
/// own: the TC programs tell gateways apart by MAC, so two addresses of one box are one
/// gateway to them.)
const FAR_GATEWAY: (&str, &str) = ("10.114.16.3", "fd00:116::3");
const FAR_NODE: (&str, &str) = ("10.114.16.2/24", "fd00:116::2/64");

#[derive(Clone, Copy)]
struct LabDest {
    v4: (&'static str, &'static str),
    v6: (&'static str, &'static str),
}

impl LabDest {
    fn server(&self, v6: bool) -> IpAddr {
        (if v6 { self.v6.0 } else { self.v4.0 }).parse().unwrap()
    }
    fn net(&self, v6: bool) -> &'static str {
        if v6 { self.v6.1 } else { self.v4.1 }
    }
}

/// How the kernel or the health verdicts leave a Route without a usable gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Face {
    /// The node's interface towards the gateways goes down.
    InterfaceDown,
    /// Its address on the gateways' network is removed.
    AddressFlushed,
    /// The connected route of the gateways' network is deleted.
    ConnectedRouteDeleted,
    /// Gateways 1 and 2 stop answering anything, ARP/ND included: their neighbour
    /// entries turn FAILED.
    NeighboursFailed,
    /// Gateways 1 and 2 drop what they forward (ARP and ping answered): the health
    /// verdicts take them down, while gateway 3 carries the second destination.
    AllDownByHealth,
}

impl Face {
    /// The reason the agent gives for it.
    fn reason(self) -> &'static str {
        match self {
            Face::InterfaceDown => "InterfaceDown",
            Face::AddressFlushed | Face::ConnectedRouteDeleted => "GatewayUnreachable",
            Face::NeighboursFailed | Face::AllDownByHealth => "AllGatewaysDown",
        }
    }
}

const ALL_FACES: [Face; 5] = [
    Face::InterfaceDown,
    Face::AddressFlushed,
    Face::ConnectedRouteDeleted,
    Face::NeighboursFailed,
    Face::AllDownByHealth,
];

struct World {
    lab: Lab,
    agent: Agent,
    v6: bool,
    /// The Route `egress`'s kernel destinations (a default route's two halves).
    egress: Vec<String>,
    /// The node's public address: what a leaked connection is answered with.
    public: IpAddr,
}

fn node_address(v6: bool) -> &'static str {
    if v6 {
        "fd00:114::2/64"
    } else {
        "10.114.0.2/20"
    }
}

/// The lab, with the servers of the extra destinations and gateway 1's far address; the
/// agent running with Routes `egress` (the family's test prefix, or the default route,
/// via gateways 1 and 2), `second` (via all three) and `far` (via the far gateway).
fn world(v6: bool, default_route: bool, extra: &[&str]) -> Result<World> {
    let lab = Lab::new(LabSpec {
        public: true,
        gateways: 4,
        ..LabSpec::default()
    })?;
    lab.wait_ipv6_settled("a")?;
    // A node that routes pods forwards (the uplink guard looks routes up as a router).
    lab.sh(
        &lab.node_ns("a"),
        "sysctl -qw net.ipv6.conf.all.forwarding=1",
    )?;
    let inet = lab.ns("inet");
    for d in [SECOND, FAR] {
        lab.ip(&inet, &format!("addr add {}/32 dev lo", d.v4.0))?;
        lab.ip(&inet, &format!("addr add {}/128 dev lo nodad", d.v6.0))?;
    }
    let gw4 = lab.ns("gw4");
    lab.ip(&gw4, &format!("addr add {}/24 dev vpc", FAR_GATEWAY.0))?;
    lab.ip(
        &gw4,
        &format!("addr add {}/64 dev vpc nodad", FAR_GATEWAY.1),
    )?;
    let f = if v6 { IPV6 } else { IPV4 };
    let gws = f.gateways(3);
    let g = |i: usize| gws[i].as_str();
    let (dest, egress) = match (default_route, v6) {
        (false, _) => (f.dest, vec![f.dest.to_string()]),
        (true, false) => ("0.0.0.0/0", vec!["0.0.0.0/1".into(), "128.0.0.0/1".into()]),
        (true, true) => ("::/0", vec!["::/1".into(), "8000::/1".into()]),
    };
    let far_gw = if v6 { FAR_GATEWAY.1 } else { FAR_GATEWAY.0 };
    let dir = lab.routes_dir("routes")?;
    std::fs::write(
        dir.join("r.yaml"),
        [
            route_yaml("egress", &[dest], &[g(0), g(1)], None),
            route_yaml("second", &[SECOND.net(v6)], &[g(0), g(1), g(2)], None),
            route_yaml("far", &[FAR.net(v6)], &[far_gw], None),
        ]
        .join("---\n"),
    )?;
    let resolv = lab.scratch.join("resolv.conf");
    std::fs::write(
        &resolv,
        format!("nameserver {NAMESERVER_V4}\nnameserver {NAMESERVER_V6}\n"),
    )?;
    let mut args = vec![
        "--probe-interval",
        "1s",
        // Every face starts undamped.
        "--flap-window",
        "1s",
        "--resolv-conf",
        resolv.to_str().unwrap(),
    ];
    args.extend(extra);
    let mut agent = Agent::start(&lab, "a", &dir, &args)?;
    let want = egress.len() + 1;
    agent.wait_status("egress and second installed", |s| {
        s["routes"].as_array().is_some_and(|r| r.len() == want) && s["lastChanges"] == 0
    })?;
    agent.wait_resolved(3)?;
    let public = if v6 {
        node_public_v6(2)
    } else {
        node_public_v4(2)
    }
    .parse()?;
    Ok(World {
        lab,
        agent,
        v6,
        egress,
        public,
    })
}

/// Destination → reason of what the agent reports failing closed.
fn failing_closed(agent: &Agent) -> BTreeMap<String, String> {
    let Some(s) = agent.status() else {
        return BTreeMap::new();
    };
    s["failingClosed"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| {
            Some((
                d["destination"].as_str()?.to_string(),
                d["reason"].as_str()?.to_string(),
            ))
        })
        .collect()
}

impl World {
    fn ns(&self) -> String {
        self.lab.node_ns("a")
    }

    fn echo(&self) -> IpAddr {
        if self.v6 { IPV6 } else { IPV4 }.echo_addr()
    }

    /// The family's `ip` flag.
    fn fam(&self) -> &'static str {
        if self.v6 { "-6" } else { "-4" }
    }

    fn apply(&self, face: Face) -> Result<()> {
        let (ns, fam) = (self.ns(), self.fam());
        match face {
            Face::InterfaceDown => self.lab.ip(&ns, "link set dev eth1 down").map(drop),
            Face::AddressFlushed => self
                .lab
                .ip(
                    &ns,
                    &format!("{fam} addr del {} dev eth1", node_address(self.v6)),
                )
                .map(drop),
            Face::ConnectedRouteDeleted => {
                let net = if self.v6 {
                    "fd00:114::/64"
                } else {
                    "10.114.0.0/20"
                };
                self.lab
                    .ip(&ns, &format!("{fam} route del {net} dev eth1"))
                    .map(drop)
            }
            Face::NeighboursFailed => {
                for i in [1, 2] {
                    self.lab.fail(i, Failure::Loss)?;
                }
                Ok(())
            }
            Face::AllDownByHealth => {
                for i in [1, 2] {
                    self.lab.fail(i, Failure::ForwardingDropped)?;
                }
                Ok(())
            }
        }
    }

    fn repair(&self, face: Face) -> Result<()> {
        let (ns, fam) = (self.ns(), self.fam());
        match face {
            Face::InterfaceDown => {
                self.lab.ip(&ns, "link set dev eth1 up")?;
                // IPv6 addresses go with the link (keep_addr_on_down=0), as on a node
                // whose address then comes back by SLAAC or DHCP.
                self.lab.ip(
                    &ns,
                    &format!("-6 addr replace {} dev eth1 nodad", node_address(true)),
                )?;
            }
            Face::AddressFlushed => {
                let nodad = if self.v6 { " nodad" } else { "" };
                self.lab.ip(
                    &ns,
                    &format!("{fam} addr add {} dev eth1{nodad}", node_address(self.v6)),
                )?;
            }
            Face::ConnectedRouteDeleted => {
                let route = if self.v6 {
                    "-6 route add fd00:114::/64 dev eth1 proto kernel"
                } else {
                    "-4 route add 10.114.0.0/20 dev eth1 proto kernel scope link src 10.114.0.2"
                };
                self.lab.ip(&ns, route)?;
            }
            Face::NeighboursFailed => {
                for i in [1, 2] {
                    self.lab.heal(i, Failure::Loss)?;
                }
            }
            Face::AllDownByHealth => {
                for i in [1, 2] {
                    self.lab.heal(i, Failure::ForwardingDropped)?;
                }
            }
        }
        Ok(())
    }

    /// Which gateway answered: a gateway's public address, the node's own (a leak), or
    /// nothing.
    fn leaks(&self, attempts: &[Attempt]) -> usize {
        attempts
            .iter()
            .filter(|a| a.result.as_ref().is_ok_and(|via| *via == self.public))
            .count()
    }

    fn gateway_publics(&self) -> Vec<IpAddr> {
        (1..=4)
            .map(|i| if self.v6 { public_v6(i) } else { public_v4(i) })
            .collect()
    }

    /// One face under 10 new connections/s to the Route's destination (and 10/s to the
    /// second one): refused, never leaked; reported with its reason; back after repair.
    fn face(&mut self, face: Face) -> Result<()> {
        let echo = self.echo();
        // Bound sockets: the node's own IPv6 connections spread over the gateways on 6.1 and
        // 6.12 too, so that every gateway of a face carries traffic to be judged by.
        let main = self.lab.stream_with("a", echo, 10, true);
        let second = self.lab.stream_with("a", SECOND.server(self.v6), 10, true);
        std::thread::sleep(Duration::from_secs(1));
        self.apply(face)?;
        let egress = self.egress.clone();
        let reason = face.reason();
        let reported = wait_for(
            &format!("{face:?}: the agent reports {egress:?} failing closed ({reason})"),
            Duration::from_secs(30),
            || {
                let fc = failing_closed(&self.agent);
                egress
                    .iter()
                    .all(|d| fc.get(d).map(String::as_str) == Some(reason))
                    .then_some(fc)
            },
        )
        .with_context(|| self.agent.log_text())?;
        // The report can come a moment before the kernel (the status of a health tick,
        // the withdrawal applied right after it; seen under TCG on 6.1): wait for it.
        for d in &egress {
            let left = wait_for(
                &format!("{face:?}: {d}: only the standby route left"),
                Duration::from_secs(10),
                || {
                    (self.lab.route("a", d).ok()?.is_none()
                        && self.lab.standby("a", d).ok()?.is_some())
                    .then_some(())
                },
            );
            ensure!(
                left.is_ok(),
                "{face:?}: {d}: only the standby route should be left: {:?}",
                self.lab.routes_to("a", d)?
            );
        }
        // Refused while it lasts: a local connection fails at once.
        let refused = self.lab.connect("a", echo);
        ensure!(refused.is_err(), "{face:?}: connected: {refused:?}");
        if self.egress.len() == 2 && !self.v6 {
            // The node stays in its cluster: the metadata service and the nameserver are
            // still reached through its own uplink.
            ensure!(self.lab.connect("a", METADATA_V4.parse()?)? == self.public);
            ensure!(self.lab.connect("a", NAMESERVER_V4.parse()?)? == self.public);
        }
        if self.egress.len() == 2 && self.v6 {
            ensure!(self.lab.connect("a", NAMESERVER_V6.parse()?)? == self.public);
        }
        std::thread::sleep(Duration::from_secs(2));
        self.repair(face)?;
        wait_for(
            &format!("{face:?}: forwarding again after the repair"),
            Duration::from_secs(40),
            || {
                let fc = failing_closed(&self.agent);
                let back = egress.iter().all(|d| {
                    !fc.contains_key(d) && self.lab.route("a", d).ok().flatten().is_some()
                });
                back.then_some(())
            },
        )
        .with_context(|| self.agent.log_text())?;
        let via = wait_for(
            &format!("{face:?}: a connection through a gateway"),
            Duration::from_secs(20),
            || self.lab.connect("a", echo).ok(),
        )?;
        ensure!(
            self.gateway_publics().contains(&via),
            "{face:?}: after the repair, egress through {via}"
        );
        std::thread::sleep(Duration::from_millis(500));
        let main = main.stop();
        let second = second.stop();
        let (leaked, refused_n) = (
            self.leaks(&main),
            main.iter().filter(|a| a.result.is_err()).count(),
        );
        eprintln!(
            "{face:?} ({}): {} attempts, {refused_n} refused, {leaked} leaked; reported {reported:?}",
            if self.egress.len() == 2 {
                "default route"
            } else {
                "prefix"
            },
            main.len()
        );
        ensure!(
            leaked == 0,
            "{face:?}: {leaked} connections left through the node's own uplink"
        );
        ensure!(
            self.leaks(&second) == 0,
            "{face:?}: the second destination leaked"
        );
        ensure!(refused_n > 0, "{face:?}: nothing was refused (no face?)");
        self.agent.check_alive()
    }

    /// The Route whose gateway is on no connected network from the start: refused, never
    /// leaked; the node gets an address there and it is installed.
    fn unreachable_from_the_start(&mut self) -> Result<()> {
        let far = FAR.net(self.v6);
        let fc = failing_closed(&self.agent);
        ensure!(
            fc.get(far).map(String::as_str) == Some("GatewayUnreachable"),
            "{fc:?}"
        );
        ensure!(self.lab.route("a", far)?.is_none() && self.lab.standby("a", far)?.is_some());
        let stream = self.lab.stream("a", FAR.server(self.v6), 10);
        std::thread::sleep(Duration::from_secs(2));
        let (addr, nodad) = if self.v6 {
            (FAR_NODE.1, " nodad")
        } else {
            (FAR_NODE.0, "")
        };
        self.lab
            .ip(&self.ns(), &format!("addr add {addr} dev eth1{nodad}"))?;
        wait_for("the far route installed", Duration::from_secs(40), || {
            self.lab.route("a", far).ok()?
        })?;
        let via = wait_for(
            "a connection to the far server",
            Duration::from_secs(20),
            || self.lab.connect("a", FAR.server(self.v6)).ok(),
        )?;
        let gw4 = if self.v6 { public_v6(4) } else { public_v4(4) };
        ensure!(via == gw4, "far: egress through {via}");
        let attempts = stream.stop();
        ensure!(
            self.leaks(&attempts) == 0,
            "far: {} connections left through the node's own uplink",
            self.leaks(&attempts)
        );
        ensure!(!failing_closed(&self.agent).contains_key(far));
        Ok(())
    }
}

fn every_face(v6: bool, default_route: bool) -> Result<()> {
    let mut w = world(v6, default_route, &[])?;
    w.unreachable_from_the_start()?;
    for face in ALL_FACES {
        w.face(face)?;
    }
    Ok(())
}

#[test]
fn every_face_fails_closed_for_a_prefix_v4() -> Result<()> {
    every_face(false, false)
}

#[test]
fn every_face_fails_closed_for_a_prefix_v6() -> Result<()> {
    every_face(true, false)
}

#[test]
fn every_face_fails_closed_for_a_default_route_override_v4() -> Result<()> {
    every_face(false, true)
}

#[test]
fn every_face_fails_closed_for_a_default_route_override_v6() -> Result<()> {
    every_face(true, true)
}

/// The control: failing open, the same face sends the destination out of the node's own
/// uplink (the leak the default prevents), and says so.
#[test]
fn failing_open_falls_through_to_the_uplink() -> Result<()> {
    let w = world(false, false, &["--fail-mode", "open"])?;
    ensure!(w.lab.standby("a", DEST_V4)?.is_none(), "no standby route");
    w.apply(Face::InterfaceDown)?;
    let via = wait_for("a leaked connection", Duration::from_secs(20), || {
        w.lab.connect("a", ECHO_V4.parse().ok()?).ok()
    })?;
    ensure!(via == w.public, "fail-open: answered with {via}");
    let mut agent = w.agent;
    agent.wait_status("falling through reported", |s| {
        s["fallingThrough"]
            .as_array()
            .is_some_and(|d| d.iter().any(|d| d["destination"] == DEST_V4))
    })?;
    Ok(())
}

/// A Route's annotation chooses fail-open for it alone.
#[test]
fn the_fail_mode_annotation_overrides_the_flag() -> Result<()> {
    let w = world(false, false, &[])?;
    let dir = w.lab.scratch.join("routes");
    let mut text = std::fs::read_to_string(dir.join("r.yaml"))?;
    text = text.replacen(
        "  name: second\n",
        "  name: second\n  annotations:\n    networking.doks.digitalocean.com/fail-mode: open\n",
        1,
    );
    write_atomic(&dir.join("r.yaml"), &text)?;
    wait_for("second's standby gone", Duration::from_secs(20), || {
        w.lab
            .standby("a", SECOND.net(false))
            .ok()?
            .is_none()
            .then_some(())
    })?;
    ensure!(
        w.lab.standby("a", DEST_V4)?.is_some(),
        "egress still fails closed"
    );
    Ok(())
}

/// Link flaps under 10 new connections/s: not one connection leaves through the uplink,
/// and the route is back after each.
#[test]
fn a_link_flap_leaks_nothing() -> Result<()> {
    let w = world(false, false, &[])?;
    let stream = w.lab.stream("a", ECHO_V4.parse()?, 10);
    for _ in 0..3 {
        w.apply(Face::InterfaceDown)?;
        std::thread::sleep(Duration::from_secs(1));
        w.repair(Face::InterfaceDown)?;
        wait_for("the route back", Duration::from_secs(20), || {
            w.lab.route("a", DEST_V4).ok()?
        })?;
        std::thread::sleep(Duration::from_secs(1));
    }
    let attempts = stream.stop();
    let leaked = w.leaks(&attempts);
    let ok = attempts
        .iter()
        .filter(|a| {
            a.result
                .as_ref()
                .is_ok_and(|v| w.gateway_publics().contains(v))
        })
        .count();
    eprintln!(
        "link flaps: {} attempts, {ok} through gateways, {leaked} leaked",
        attempts.len()
    );
    ensure!(
        leaked == 0,
        "{leaked} connections left through the node's own uplink"
    );
    ensure!(ok > 0);
    Ok(())
}

/// An agent restarted (SIGTERM, then SIGKILL) while a destination fails closed adopts the
/// standby route: no route event, nothing leaks; the route returns after the repair.
#[test]
fn a_restart_while_failing_closed_adopts_the_standby() -> Result<()> {
    let mut w = world(false, false, &[])?;
    w.apply(Face::InterfaceDown)?;
    wait_for("failing closed", Duration::from_secs(20), || {
        (failing_closed(&w.agent).get(DEST_V4).map(String::as_str) == Some("InterfaceDown"))
            .then_some(())
    })?;
    let monitor = w.lab.monitor("a", &["route"])?;
    let stream = w.lab.stream("a", ECHO_V4.parse()?, 10);
    for kill in [false, true] {
        if kill {
            w.agent.kill();
            w.agent.restart()?;
        } else {
            w.agent.restart()?;
        }
        w.agent
            .wait_status("failing closed after the restart", |s| {
                s["failingClosed"]
                    .as_array()
                    .is_some_and(|d| d.iter().any(|d| d["destination"] == DEST_V4))
                    && s["lastChanges"] == 0
            })
            .map_err(|e| anyhow::anyhow!("kill={kill}: {e:#}"))?;
    }
    std::thread::sleep(Duration::from_millis(500));
    let events = monitor.events()?;
    let touched: Vec<&str> = events.lines().filter(|l| l.contains(DEST_V4)).collect();
    ensure!(
        touched.is_empty(),
        "the restarts changed the destination's routes:\n{events}"
    );
    w.repair(Face::InterfaceDown)?;
    wait_for("the route back", Duration::from_secs(30), || {
        w.lab.route("a", DEST_V4).ok()?
    })?;
    let attempts = stream.stop();
    ensure!(w.leaks(&attempts) == 0, "leaked during the restarts");
    Ok(())
}

/// `routing-agent cleanup` removes the standby routes with the rest.
#[test]
fn cleanup_removes_the_standby_routes() -> Result<()> {
    let mut w = world(false, false, &[])?;
    ensure!(w.lab.standby("a", DEST_V4)?.is_some());
    w.agent.stop();
    w.lab.cleanup("a")?;
    let left = w.lab.ip(&w.ns(), "route show proto 196")?;
    ensure!(left.trim().is_empty(), "left: {left}");
    let left6 = w.lab.ip(&w.ns(), "-6 route show proto 196")?;
    if !left6.trim().is_empty() {
        bail!("left: {left6}");
    }
    Ok(())
}
