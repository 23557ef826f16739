//! `cargo xtask bench tc-cost`: what the TC programs cost. TCP throughput (iperf3, 10 s
//! runs, alternating) from node a to gateway 1 over the lab's veth + bridge, with the
//! agent's programs attached and without them (agent stopped: its TCX links go with it);
//! and the programs' own time per packet from the kernel's BPF run-time statistics
//! (`run_time_ns / run_cnt`, enabled through `BPF_ENABLE_STATS` for the duration of the
//! benchmark only: no global sysctl is touched). Traffic to the gateway itself takes the
//! programs' full path: MAC attribution, counters, TCP parsing and the flow-pinning lookup.
use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use routing_agent_tests::*;

const ROUNDS: usize = 3;
const SECONDS: u32 = 10;

/// (run_time_ns, run_cnt) per program name, summed over the loaded programs of that name.
fn prog_stats() -> Result<BTreeMap<String, (u64, u64)>> {
    let out = routing_agent_tests::run(&["bpftool", "-j", "prog", "show"])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let mut m: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for p in v.as_array().into_iter().flatten() {
        let Some(name) = p["name"].as_str() else {
            continue;
        };
        if name != "ra_egress" && name != "ra_ingress" {
            continue;
        }
        let e = m.entry(name.to_owned()).or_default();
        e.0 += p["run_time_ns"].as_u64().unwrap_or(0);
        e.1 += p["run_cnt"].as_u64().unwrap_or(0);
    }
    Ok(m)
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn iperf(lab: &Lab) -> Result<f64> {
    let out = lab.sh(
        &lab.node_ns("a"),
        &format!("iperf3 -J -c {} -t {SECONDS}", gateway_v4(1)),
    )?;
    let v: serde_json::Value = serde_json::from_str(&out).context("iperf3 -J output")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .context("no sum_received in iperf3's output")
}

pub fn run() -> Result<()> {
    let lab = Lab::new(LabSpec::default())?;
    let dir = lab.ecmp_routes(3)?;
    let _server = Server(
        Command::new("nsenter")
            .args([
                &format!("--net=/run/netns/{}", lab.ns("gw1")),
                "iperf3",
                "-s",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    std::thread::sleep(Duration::from_millis(500));
    let mut agent = Agent::start(&lab, "a", &dir, &[])?;
    agent.wait_settled(1)?;
    agent.wait_resolved(3)?;

    // First, without run-time statistics (they cost two clock reads per run).
    let hot = hot_loop(&lab)?;
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("BPF_ENABLE_STATS (needs root)")?;
    println!();
    println!(
        "| TC programs' cost (TCX, iperf3 node a → gateway 1, {ROUNDS} × {SECONDS} s with and without, alternating) | measured | target |"
    );
    println!("|---|---|---|");
    for (segs, what) in [
        (65535, "veth defaults (GSO: one skb carries up to 64 KiB)"),
        (
            1,
            "`gso_max_segs 1` on eth1 (one skb per MTU-sized segment)",
        ),
    ] {
        lab.ip(
            &lab.node_ns("a"),
            &format!("link set dev eth1 gso_max_segs {segs}"),
        )?;
        measure(&lab, &mut agent, what)?;
    }
    for (what, ns) in hot {
        println!(
            "| `ra_egress` alone, hot loop (`bpftool prog run`, 1,000,000 repeats): {what} | {ns} ns | <= 60 ns |"
        );
    }
    println!();
    Ok(())
}

fn measure(lab: &Lab, agent: &mut Agent, what: &str) -> Result<()> {
    let (mut with, mut without) = (Vec::new(), Vec::new());
    let mut per_packet: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for r in 0..ROUNDS {
        let before = prog_stats()?;
        with.push(iperf(lab)?);
        let after = prog_stats()?;
        for (name, (t, c)) in &after {
            let (t0, c0) = before.get(name).copied().unwrap_or_default();
            let e = per_packet.entry(name.clone()).or_default();
            e.0 += t - t0;
            e.1 += c - c0;
        }
        agent.stop();
        let before = prog_stats()?;
        without.push(iperf(lab)?);
        let ran: u64 = prog_stats()?.values().map(|v| v.1).sum::<u64>()
            - before.values().map(|v| v.1).sum::<u64>();
        if ran > 0 {
            bail!("the programs ran {ran} times with the agent stopped: still attached?");
        }
        agent.restart()?;
        agent.wait_settled(1)?;
        agent.wait_resolved(3)?;
        eprintln!(
            "{what}, round {}: with {:.2} Gbit/s, without {:.2} Gbit/s",
            r + 1,
            with[r],
            without[r]
        );
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    for (name, (t, c)) in &per_packet {
        println!(
            "| {what}: `{name}` run time per packet ({c} packets) | {:.1} ns | <= 60 ns |",
            *t as f64 / (*c).max(1) as f64
        );
    }
    println!(
        "| {what}: throughput with the programs / without | {:.2} / {:.2} Gbit/s = {:.1} % | >= 97 % |",
        mean(&with),
        mean(&without),
        100.0 * mean(&with) / mean(&without)
    );
    Ok(())
}

/// An Ethernet + IPv4 + TCP packet from node a (eth1) to the echo server, 64 bytes of
/// payload (checksums do not matter to the programs).
fn packet(dst_mac: [u8; 6], src_mac: [u8; 6], flags: u8, sport: u16) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend(dst_mac);
    p.extend(src_mac);
    p.extend([0x08, 0x00]);
    let total = (20 + 20 + 64) as u16;
    p.extend([0x45, 0]);
    p.extend(total.to_be_bytes());
    p.extend([0, 1, 0x40, 0, 64, 6, 0, 0]);
    p.extend([10, 114, 0, 2, 198, 51, 100, 10]);
    p.extend(sport.to_be_bytes());
    p.extend(7u16.to_be_bytes());
    p.extend(1000u32.to_be_bytes());
    p.extend(2000u32.to_be_bytes());
    p.extend([5 << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
    p.extend([b'x'; 64]);
    p
}

fn mac(s: &str) -> Result<[u8; 6]> {
    let v: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()?;
    v.try_into().map_err(|_| anyhow::anyhow!("bad MAC {s}"))
}

/// The egress program's own cost per run through `BPF_PROG_TEST_RUN` (in node a's
/// namespace, the skb on eth1): hot caches, run before the statistics are enabled.
fn hot_loop(lab: &Lab) -> Result<Vec<(&'static str, String)>> {
    let ns = lab.node_ns("a");
    let link: serde_json::Value = serde_json::from_str(&lab.ip(&ns, "-j link show eth1")?)?;
    let ifindex = link[0]["ifindex"].as_u64().context("eth1 ifindex")? as u32;
    let own = mac(link[0]["address"].as_str().context("eth1 address")?)?;
    let neigh: serde_json::Value = serde_json::from_str(&routing_agent_tests::run(&[
        "bpftool",
        "-j",
        "map",
        "dump",
        "pinned",
        &lab.pin_dir("a").join("RA_NEIGH").display().to_string(),
    ])?)?;
    let gw: Vec<u8> = neigh[0]["formatted"]["key"]["mac"]
        .as_array()
        .context("no RA_NEIGH entry")?
        .iter()
        .map(|b| b.as_u64().unwrap_or(0) as u8)
        .collect();
    let gw: [u8; 6] = gw
        .try_into()
        .map_err(|_| anyhow::anyhow!("bad MAC in RA_NEIGH"))?;
    let progs: serde_json::Value = serde_json::from_str(&routing_agent_tests::run(&[
        "bpftool", "-j", "prog", "show",
    ])?)?;
    let id = progs
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["name"] == "ra_egress")
        .filter_map(|p| p["id"].as_u64())
        .max()
        .context("ra_egress not loaded")?;
    // struct __sk_buff: ifindex at offset 40.
    let mut ctx = vec![0u8; 192];
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    let dir = std::env::temp_dir();
    let ctx_path = dir.join(format!("ra-bench-ctx-{}", std::process::id()));
    std::fs::write(&ctx_path, &ctx)?;
    let mut out = Vec::new();
    for (what, pkt) in [
        (
            "packet to a non-gateway MAC",
            packet([2, 0, 0, 0, 0, 1], own, 0x10, 40000),
        ),
        ("TCP ACK through a gateway", packet(gw, own, 0x10, 40000)),
    ] {
        let path = dir.join(format!("ra-bench-pkt-{}", std::process::id()));
        std::fs::write(&path, &pkt)?;
        let text = lab.sh(
            &ns,
            &format!(
                "bpftool prog run id {id} data_in {} ctx_in {} repeat 1000000",
                path.display(),
                ctx_path.display()
            ),
        )?;
        let _ = std::fs::remove_file(&path);
        let ns_per = text
            .rsplit("duration (average): ")
            .next()
            .and_then(|t| t.trim().strip_suffix("ns"))
            .context("no duration in bpftool prog run's output")?
            .to_owned();
        out.push((what, ns_per));
    }
    let _ = std::fs::remove_file(&ctx_path);
    Ok(out)
}
