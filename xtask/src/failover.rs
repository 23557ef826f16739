//! `cargo xtask bench failover`: for each failure face, repeated trials of: 12 long-lived
//! connections and a stream of 10 new connections per second through an ECMP route over
//! 3 gateways; one gateway fails; time to its withdrawal from the kernel route, attempts
//! that failed meanwhile, share of the long-lived connections on the healthy gateways that
//! survived; then the gateway heals; time to its return to the route. The same with the
//! `RTA_MULTIPATH` dataplane and without flow pinning (forwarding-dropped face), and the
//! kernel alone (`--no-ebpf`: routes, no health), as the baseline.
//!
//! Times are read from the kernel (the route's gateways, polled every 20 ms), not from the
//! agent's report. Measures, never asserts.
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::Result;
use routing_agent_tests::*;

const POLL: Duration = Duration::from_millis(20);

fn gateways(lab: &Lab) -> Vec<String> {
    lab.route_gateways("a", DEST_V4).unwrap_or_default()
}

fn wait_gateways(lab: &Lab, f: impl Fn(&[String]) -> bool, limit: Duration) -> Option<Instant> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f(&gateways(lab)) {
            return Some(Instant::now());
        }
        std::thread::sleep(POLL);
    }
    None
}

#[derive(Default)]
struct Trials {
    detect: Vec<f64>,
    restore: Vec<f64>,
    failed: Vec<usize>,
    after_failed: usize,
    survived: usize,
    healthy: usize,
    missed: usize,
}

/// Percentile `p` of unsorted `v` (NaN when empty).
fn pct(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    crate::bench::pct(&s, p)
}

struct Setup {
    lab: Lab,
    agent: Agent,
}

/// Routes of 5 destinations, `prefixes` in all, over the lab's three gateways (next to the
/// measured Route, through the same group).
fn other_prefixes(dir: &std::path::Path, prefixes: usize) -> Result<()> {
    if prefixes == 0 {
        return Ok(());
    }
    let gws: Vec<String> = (1..=3).map(gateway_v4).collect();
    std::fs::write(
        dir.join("vpn.yaml"),
        scale_routes_yaml("vpn", prefixes.div_ceil(5), 0, &gws),
    )?;
    Ok(())
}

fn setup(args: &[&str], prefixes: usize) -> Result<Setup> {
    let lab = Lab::new(LabSpec::default())?;
    let dir = lab.ecmp_routes(3)?;
    other_prefixes(&dir, prefixes)?;
    let mut agent = Agent::launch(&lab, "a", &dir, args, prefixes == 0)?;
    if prefixes == 0 {
        agent.wait_settled(1)?;
    } else {
        // No status file at scale (it would be most of the agent's work): the kernel says.
        wait_for("every route installed", Duration::from_secs(120), || {
            (lab.route(
                "a",
                &format!(
                    "100.{}.{}.0/24",
                    64 + (prefixes - 1) / 256,
                    (prefixes - 1) % 256
                ),
            )
            .ok()??
            .is_object()
                && lab.route("a", DEST_V4).ok()?.is_some())
            .then_some(())
        })?;
        std::thread::sleep(Duration::from_secs(2));
        return Ok(Setup { lab, agent });
    }
    if !args.contains(&"--no-ebpf") {
        agent.wait_resolved(3)?;
    }
    Ok(Setup { lab, agent })
}

/// `n` trials of `face` with the agent acting.
fn trials(s: &mut Setup, face: Failure, n: usize) -> Result<Trials> {
    let lab = &s.lab;
    let echo: IpAddr = ECHO_V4.parse()?;
    let mut t = Trials::default();
    for k in 0..n {
        let i = (k % 3) as u8 + 1;
        let gw = gateway_v4(i);
        if wait_gateways(lab, |g| g.len() == 3, Duration::from_secs(60)).is_none() {
            anyhow::bail!("the route did not get its 3 gateways back");
        }
        std::thread::sleep(Duration::from_millis(500));
        let mut held: Vec<Held> = (0..12).filter_map(|_| lab.hold("a", echo).ok()).collect();
        let stream = lab.stream("a", echo, 10);
        std::thread::sleep(Duration::from_secs(1));
        lab.fail(i, face)?;
        let t0 = Instant::now();
        let Some(gone) = wait_gateways(lab, |g| !g.contains(&gw), Duration::from_secs(15)) else {
            t.missed += 1;
            drop(stream);
            lab.heal(i, face)?;
            continue;
        };
        t.detect.push((gone - t0).as_secs_f64());
        std::thread::sleep(Duration::from_secs(2));
        let attempts = stream.stop();
        t.failed.push(
            attempts
                .iter()
                .filter(|a| a.started <= gone && a.result.is_err())
                .count(),
        );
        t.after_failed += attempts
            .iter()
            .filter(|a| a.started > gone && a.result.is_err())
            .count();
        for h in held.iter_mut().filter(|h| h.via != public_v4(i)) {
            t.healthy += 1;
            t.survived += usize::from(h.alive());
        }
        drop(held);
        lab.heal(i, face)?;
        let t1 = Instant::now();
        match wait_gateways(lab, |g| g.contains(&gw), Duration::from_secs(60)) {
            Some(back) => t.restore.push((back - t1).as_secs_f64()),
            None => anyhow::bail!("{gw} not restored within 60 s after healing"),
        }
        eprint!(".");
    }
    eprintln!();
    s.agent.check_alive()?;
    Ok(t)
}

/// A lab without any agent: the ECMP route installed by hand, as a resilient nexthop group
/// (`nexthop`) or an `RTA_MULTIPATH` route (`multipath`), L4 hash, `use_neigh=1`.
fn kernel_alone(dp: &str) -> Result<Lab> {
    let lab = Lab::new(LabSpec::default())?;
    let ns = lab.node_ns("a");
    let (g1, g2, g3) = (gateway_v4(1), gateway_v4(2), gateway_v4(3));
    let route = if dp == "nexthop" {
        format!(
            "ip nexthop add id 1 via {g1} dev eth1 && ip nexthop add id 2 via {g2} dev eth1 && \
             ip nexthop add id 3 via {g3} dev eth1 && \
             ip nexthop add id 10 group 1/2/3 type resilient buckets 128 && \
             ip route add {DEST_V4} nhid 10"
        )
    } else {
        format!(
            "ip route add {DEST_V4} nexthop via {g1} dev eth1 nexthop via {g2} dev eth1 \
             nexthop via {g3} dev eth1"
        )
    };
    lab.sh(
        &ns,
        &format!(
            "sysctl -qw net.ipv4.fib_multipath_hash_policy=1 net.ipv4.fib_multipath_use_neigh=1 && {route}"
        ),
    )?;
    Ok(lab)
}

/// The kernel alone: for `window`, the share of new connections that failed, and when the
/// last failure started (the kernel "avoided" the gateway after it, if ever).
fn baseline(lab: &Lab, face: Failure, n: usize, window: Duration) -> Result<(f64, Vec<f64>)> {
    let echo: IpAddr = ECHO_V4.parse()?;
    let (mut total, mut failed) = (0usize, 0usize);
    let mut last = Vec::new();
    for k in 0..n {
        let i = (k % 3) as u8 + 1;
        std::thread::sleep(Duration::from_secs(1));
        let stream = lab.stream("a", echo, 10);
        std::thread::sleep(Duration::from_secs(1));
        lab.fail(i, face)?;
        let t0 = Instant::now();
        std::thread::sleep(window);
        let attempts = stream.stop();
        lab.heal(i, face)?;
        let during: Vec<&Attempt> = attempts.iter().filter(|a| a.started >= t0).collect();
        total += during.len();
        failed += during.iter().filter(|a| a.result.is_err()).count();
        let l = during
            .iter()
            .filter(|a| a.result.is_err())
            .map(|a| (a.started - t0).as_secs_f64())
            .fold(0.0, f64::max);
        last.push(l);
        eprint!(".");
    }
    eprintln!();
    Ok((failed as f64 / total.max(1) as f64, last))
}

fn print_results(results: &[(String, Trials)], prefixes: usize) {
    println!();
    let others = if prefixes > 0 {
        format!(", {prefixes} other prefixes on the same group")
    } else {
        String::new()
    };
    println!(
        "| face, dataplane (agent, 3 gateways, 10 new conn/s, 12 long-lived{others}) | trials | withdrawal after the failure p50 / p90 / p99 / max | attempts failed before it, mean | failed after it | long-lived on healthy gateways alive | back in the route after healing p50 / max (probe every 5 s) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, t) in results {
        row(name, t);
    }
}

fn row(name: &str, t: &Trials) {
    let failed: Vec<f64> = t.failed.iter().map(|&f| f as f64).collect();
    println!(
        "| {name} | {} | {:.2} / {:.2} / {:.2} / {:.2} s | {:.1} (max {:.0}) | {} | {}/{} ({:.0} %) | {:.2} / {:.2} s |",
        t.detect.len() + t.missed,
        pct(&t.detect, 0.5),
        pct(&t.detect, 0.9),
        pct(&t.detect, 0.99),
        pct(&t.detect, 1.0),
        failed.iter().sum::<f64>() / failed.len().max(1) as f64,
        pct(&failed, 1.0),
        t.after_failed,
        t.survived,
        t.healthy,
        100.0 * t.survived as f64 / t.healthy.max(1) as f64,
        pct(&t.restore, 0.5),
        pct(&t.restore, 1.0),
    );
    if t.missed > 0 {
        println!(
            "|  ({} trials: not withdrawn within 15 s) | | | | | | |",
            t.missed
        );
    }
}

pub fn run(n: usize, baseline_trials: usize, prefixes: usize) -> Result<()> {
    let faces = [
        (
            "forwarding dropped (ARP, ping answer)",
            Failure::ForwardingDropped,
        ),
        ("gateway removed (link down)", Failure::Removed),
        ("100 % loss (both ways)", Failure::Loss),
        ("uplink cut", Failure::UplinkCut),
    ];
    // Damping off for the bench (each trial starts at penalty 0); probes every 5 s, so that
    // a gateway that answers ping while it fails is not restored during the 2 s after its
    // withdrawal that are measured (the restore time below is bounded by this interval).
    let agent_args = ["--probe-interval", "5s", "--flap-window", "1s"];
    let mut results = Vec::new();
    {
        let mut s = setup(&agent_args, prefixes)?;
        for (name, face) in faces {
            eprintln!("resilient group, {name}: {n} trials");
            results.push((format!("{name}, resilient group"), trials(&mut s, face, n)?));
        }
    }
    if prefixes > 0 {
        // At scale: the faces with the resilient group only, no baseline.
        print_results(&results, prefixes);
        return Ok(());
    }
    {
        let mut args = agent_args.to_vec();
        args.extend(["--dataplane", "multipath"]);
        let mut s = setup(&args, 0)?;
        eprintln!("RTA_MULTIPATH, forwarding dropped: {n} trials");
        results.push((
            "forwarding dropped, `RTA_MULTIPATH`".into(),
            trials(&mut s, Failure::ForwardingDropped, n)?,
        ));
    }
    for dp in ["nexthop", "multipath"] {
        let mut args = agent_args.to_vec();
        args.extend(["--dataplane", dp, "--flow-pinning", "false"]);
        let mut s = setup(&args, 0)?;
        eprintln!("{dp}, no flow pinning, forwarding dropped: {n} trials");
        let what = if dp == "nexthop" {
            "resilient group"
        } else {
            "`RTA_MULTIPATH`"
        };
        results.push((
            format!("forwarding dropped, {what}, `--flow-pinning false`"),
            trials(&mut s, Failure::ForwardingDropped, n)?,
        ));
    }

    let window = Duration::from_secs(30);
    let mut base = Vec::new();
    for dp in ["nexthop", "multipath"] {
        for (name, face) in faces {
            // A fresh lab per face: no neighbour state carried over from the last one.
            let lab = kernel_alone(dp)?;
            eprintln!("kernel alone ({dp}), {name}: {baseline_trials} trials of {window:?}");
            let (share, last) = baseline(&lab, face, baseline_trials, window)?;
            base.push((dp, name, share, last));
        }
    }

    print_results(&results, 0);
    println!();
    println!(
        "| kernel alone (no agent; L4 hash, `fib_multipath_use_neigh=1`), {} s after the failure | dataplane | new connections failed | last failure started after (per trial) |",
        window.as_secs()
    );
    println!("|---|---|---|---|");
    for (dp, name, share, last) in &base {
        let dp = if *dp == "nexthop" {
            "resilient group"
        } else {
            "`RTA_MULTIPATH`"
        };
        let last: Vec<String> = last.iter().map(|l| format!("{l:.1} s")).collect();
        println!(
            "| {name} | {dp} | {:.0} % | {} |",
            share * 100.0,
            last.join(", ")
        );
    }
    println!();
    Ok(())
}

/// `cargo xtask bench loss`: `n` trials per rule of a healthy gateway on a lossy path. A
/// fresh lab and agent, 30 s of clean traffic (the agent has a clean history, so the loss
/// starts at the lowest threshold: the hard case), then 2 % of the packets lost at random
/// both ways on gateway 2's VPC side for `LOSSY` under 10 new connections/s; every
/// withdrawal of gateway 2 from the kernel route (polled every 50 ms) is a false one. Then
/// gateway 2 black-holes on top of its loss: time to its withdrawal. The rules: the
/// adaptive threshold (defaults), and a fixed "2 in a row" (`--failure-threshold-max 2`)
/// as the control.
pub fn loss(n: usize) -> Result<()> {
    const LOSSY: Duration = Duration::from_secs(120);
    let echo: IpAddr = ECHO_V4.parse()?;
    let gw2 = gateway_v4(2);
    let rules: [(&str, &[&str]); 2] = [
        ("adaptive (defaults)", &[]),
        (
            "fixed 2 in a row (control)",
            &["--failure-threshold-max", "2"],
        ),
    ];
    /// One rule's trials, added up.
    #[derive(Default)]
    struct Row {
        false_w: usize,
        attempts: usize,
        through: usize,
        lost: u64,
        detect: Vec<f64>,
        thresholds: Vec<u64>,
    }
    let mut rows = Vec::new();
    for (name, extra) in rules {
        let mut r = Row::default();
        for k in 0..n {
            eprintln!("loss, {name}: trial {} of {n}", k + 1);
            let mut args = vec!["--probe-interval", "5s"];
            args.extend_from_slice(extra);
            let s = setup(&args, 0)?;
            let lab = &s.lab;
            let stream = lab.stream("a", echo, 10);
            std::thread::sleep(Duration::from_secs(30));
            let before = s
                .agent
                .gateway(&gw2)
                .map(|g| g["counters"]["failed"].as_u64().unwrap_or(0))
                .unwrap_or(0);
            lab.fail(2, Failure::RandomLoss(20))?;
            let start = Instant::now();
            let mut was_in = true;
            while start.elapsed() < LOSSY {
                let now_in = gateways(lab).contains(&gw2);
                r.false_w += usize::from(was_in && !now_in);
                was_in = now_in;
                std::thread::sleep(Duration::from_millis(50));
            }
            let g = s.agent.gateway(&gw2).unwrap_or_default();
            r.lost += g["counters"]["failed"].as_u64().unwrap_or(0) - before;
            r.thresholds
                .push(g["failureThreshold"].as_u64().unwrap_or(0));
            if wait_gateways(lab, |g| g.contains(&gw2), Duration::from_secs(30)).is_none() {
                anyhow::bail!("gateway 2 did not come back before the black hole");
            }
            lab.fail(2, Failure::ForwardingDropped)?;
            let t0 = Instant::now();
            if let Some(gone) = wait_gateways(lab, |g| !g.contains(&gw2), Duration::from_secs(15)) {
                r.detect.push((gone - t0).as_secs_f64());
            }
            let log = stream.stop();
            let lossy: Vec<&Attempt> = log
                .iter()
                .filter(|a| a.started >= start && a.started < start + LOSSY)
                .collect();
            r.attempts += lossy.len();
            r.through += lossy
                .iter()
                .filter(|a| a.result.as_ref().is_ok_and(|v| *v == public_v4(2)))
                .count();
        }
        rows.push((name, r));
    }
    println!();
    println!(
        "| rule | trials × {} s lossy | new connections (through gateway 2) | gateway 2's attempts that failed at first | false withdrawals of gateway 2 | per gateway-hour | its threshold at the end | black hole on the lossy gateway: withdrawal p50 / max |",
        LOSSY.as_secs()
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (name, r) in rows {
        let hours = n as f64 * LOSSY.as_secs_f64() / 3600.0;
        println!(
            "| {name} | {n} | {} ({}) | {} ({:.1} %) | {} | {:.1} | {:?} | {:.2} / {:.2} s ({} of {n}) |",
            r.attempts,
            r.through,
            r.lost,
            100.0 * r.lost as f64 / r.through.max(1) as f64,
            r.false_w,
            r.false_w as f64 / hours,
            r.thresholds,
            pct(&r.detect, 0.5),
            pct(&r.detect, 1.0),
            r.detect.len(),
        );
    }
    println!();
    Ok(())
}

/// `cargo xtask bench link-flap`: `n` flaps of the node's interface towards the gateways
/// (down 2 s, then up) under 10 new connections/s, in a lab with the node's public side:
/// connections answered with the node's own public address (left by its uplink, the leak
/// fail-closed prevents), connections refused, and the time from the link coming up to the
/// route carrying its three gateways again. The same with `--fail-mode open`, the control.
pub fn link_flaps(n: usize) -> Result<()> {
    let mut rows = Vec::new();
    for mode in ["closed", "open"] {
        let lab = Lab::new(LabSpec {
            public: true,
            ..LabSpec::default()
        })?;
        let dir = lab.ecmp_routes(3)?;
        let mut agent = Agent::start(&lab, "a", &dir, &["--fail-mode", mode])?;
        agent.wait_settled(1)?;
        agent.wait_resolved(3)?;
        let ns = lab.node_ns("a");
        let public: IpAddr = node_public_v4(2).parse()?;
        let echo: IpAddr = ECHO_V4.parse()?;
        let (mut leaked, mut refused, mut total) = (0, 0, 0);
        let mut restore = Vec::new();
        eprintln!("fail-mode {mode}: {n} link flaps");
        for _ in 0..n {
            let stream = lab.stream("a", echo, 10);
            std::thread::sleep(Duration::from_secs(1));
            lab.ip(&ns, "link set dev eth1 down")?;
            std::thread::sleep(Duration::from_secs(2));
            lab.ip(&ns, "link set dev eth1 up")?;
            let up = Instant::now();
            let back = wait_gateways(&lab, |g| g.len() == 3, Duration::from_secs(30))
                .ok_or_else(|| anyhow::anyhow!("the route did not come back"))?;
            restore.push((back - up).as_secs_f64());
            std::thread::sleep(Duration::from_secs(1));
            let attempts = stream.stop();
            total += attempts.len();
            leaked += attempts
                .iter()
                .filter(|a| a.result.as_ref().is_ok_and(|v| *v == public))
                .count();
            refused += attempts.iter().filter(|a| a.result.is_err()).count();
            eprint!(".");
        }
        eprintln!();
        agent.check_alive()?;
        rows.push((mode, n, total, leaked, refused, restore));
    }
    println!();
    println!(
        "| `--fail-mode` | link flaps (down 2 s) | connections (10/s) | answered from the node's own public address | refused or failed | link up → route back with its 3 gateways p50 / max |"
    );
    println!("|---|---|---|---|---|---|");
    for (mode, n, total, leaked, refused, restore) in rows {
        println!(
            "| {mode} | {n} | {total} | {leaked} | {refused} | {:.2} / {:.2} s |",
            pct(&restore, 0.5),
            pct(&restore, 1.0)
        );
    }
    println!();
    Ok(())
}
