//! `cargo xtask bench dataplane`: cold start to 10,000 prefixes (2,000 Routes × 5
//! destinations, 3 gateways), one Route edit to kernel over 100 edits, agent peak RSS.
//! Times come from route notifications read on a netlink socket opened inside the node
//! namespace, so they measure the kernel state, not the agent's own report.
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use routing_agent_tests::*;

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Which {
    Dataplane,
    Failover,
    /// Fail-closed egress across link flaps of the gateways' interface.
    LinkFlap,
    TcCost,
}

const ROUTES: usize = 2000;
const PER_ROUTE: usize = 5;
const EDITS: usize = 100;

fn destination(k: usize) -> String {
    format!("100.{}.{}.0/24", k / 256, k % 256)
}

fn manifest(r: usize, gateways: &[String]) -> String {
    let dsts: Vec<String> = (0..PER_ROUTE)
        .map(|j| destination(r * PER_ROUTE + j))
        .collect();
    let d: Vec<&str> = dsts.iter().map(String::as_str).collect();
    let g: Vec<&str> = gateways.iter().map(String::as_str).collect();
    route_yaml(&format!("r{r:04}"), &d, &g, None)
}

/// Route notifications with the agent's protocol (196) seen since the last call.
struct RouteEvents {
    socket: Socket,
    buf: Vec<u8>,
    overflowed: bool,
}

impl RouteEvents {
    fn open(lab: &Lab) -> Result<Self> {
        let socket = in_netns(&lab.node_ns("a"), || -> std::io::Result<Socket> {
            let mut s = Socket::new(NETLINK_ROUTE)?;
            s.bind(&SocketAddr::new(0, 1 << (7 - 1)))?; // RTNLGRP_IPV4_ROUTE
            Ok(s)
        })??;
        socket.set_rx_buf_sz(64 << 20)?;
        socket.set_non_blocking(true)?;
        Ok(RouteEvents {
            socket,
            buf: vec![0; 1 << 20],
            overflowed: false,
        })
    }

    /// Counts RTM_NEWROUTE messages of protocol 196 waiting on the socket.
    fn drain(&mut self) -> usize {
        let mut n = 0;
        loop {
            match self.socket.recv(&mut &mut self.buf[..], 0) {
                Ok(len) => {
                    let mut off = 0;
                    while off + 16 + 8 <= len {
                        let mlen =
                            u32::from_ne_bytes(self.buf[off..off + 4].try_into().unwrap()) as usize;
                        let mtype =
                            u16::from_ne_bytes(self.buf[off + 4..off + 6].try_into().unwrap());
                        if mlen < 16 {
                            break;
                        }
                        // struct rtmsg: family, dst_len, src_len, tos, table, protocol, ...
                        if mtype == 24 && self.buf[off + 16 + 5] == 196 {
                            n += 1;
                        }
                        off += (mlen + 3) & !3;
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => self.overflowed = true,
                Err(_) => return n,
            }
        }
    }

    /// Waits until `want` notifications arrived; returns when the last one did.
    fn wait(&mut self, want: usize, limit: Duration) -> Result<Instant> {
        let start = Instant::now();
        let mut got = 0;
        while got < want {
            got += self.drain();
            if self.overflowed {
                bail!("route notifications overflowed the socket buffer");
            }
            if start.elapsed() > limit {
                bail!("only {got} of {want} route notifications after {limit:?}");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(Instant::now())
    }
}

fn rss_peak_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Percentile `p` (0..=1) of `sorted`, nearest rank.
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

pub fn run(which: Which, trials: usize, baseline_trials: usize) -> Result<()> {
    crate::setup::setup()?;
    crate::cmd("cargo", &["build", "--release", "-p", "routing-agent"])?;
    // SAFETY: single-threaded at this point; the lab library reads it when starting agents.
    unsafe {
        std::env::set_var(
            "ROUTING_AGENT_BIN",
            crate::workspace().join("target/release/routing-agent"),
        )
    };
    match which {
        Which::Dataplane => dataplane(),
        Which::Failover => crate::failover::run(trials, baseline_trials),
        Which::LinkFlap => crate::failover::link_flaps(trials),
        Which::TcCost => crate::tccost::run(),
    }
}

fn dataplane() -> Result<()> {
    let lab = Lab::new(LabSpec::default())?;
    let dir = lab.routes_dir("routes")?;
    let all: Vec<String> = (1..=3).map(gateway_v4).collect();
    for r in 0..ROUTES {
        std::fs::write(dir.join(format!("r{r:04}.yaml")), manifest(r, &all))?;
    }
    let mut events = RouteEvents::open(&lab)?;

    eprintln!("cold start: {ROUTES} Routes x {PER_ROUTE} destinations, 3 gateways (ECMP)");
    let t0 = Instant::now();
    // Extra agent flags for experiments, e.g. RA_BENCH_ARGS="--no-ebpf".
    let extra_env = std::env::var("RA_BENCH_ARGS").unwrap_or_default();
    let mut extra: Vec<&str> = vec!["--log-level", "info"];
    extra.extend(extra_env.split_whitespace());
    let mut agent = Agent::launch(&lab, "a", &dir, &extra, false)?;
    let done = events.wait(ROUTES * PER_ROUTE, Duration::from_secs(120))?;
    let cold = done - t0;

    // Let the follow-up reconcile (woken by its own notifications) finish.
    std::thread::sleep(Duration::from_secs(2));
    events.drain();

    let two: Vec<String> = all[..2].to_vec();
    let mut lat = Vec::with_capacity(EDITS);
    for i in 0..EDITS {
        let gws = if i % 2 == 0 { &two } else { &all };
        let t = Instant::now();
        write_atomic(&dir.join("r0000.yaml"), &manifest(0, gws))?;
        let done = events.wait(PER_ROUTE, Duration::from_secs(20))?;
        lat.push((done - t).as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(150));
        events.drain();
    }
    agent.check_alive()?;
    let log = agent.log_text();
    let took: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("took_ms"))
        .map(|l| l.rsplit("took_ms=").next().unwrap_or(""))
        .take(3)
        .collect::<Vec<_>>();
    eprintln!("agent's own reconcile times (first three, ms): {took:?}");
    let rss = agent.pid().and_then(rss_peak_kib).unwrap_or(0);
    lat.sort_by(f64::total_cmp);

    println!();
    println!(
        "| dataplane benchmark (3 gateways, resilient nexthop group, release build) | measured | target |"
    );
    println!("|---|---|---|");
    println!(
        "| cold start to {} prefixes installed ({ROUTES} Routes x {PER_ROUTE}) | {:.0} ms | <= 1000 ms |",
        ROUTES * PER_ROUTE,
        cold.as_secs_f64() * 1e3
    );
    println!(
        "| one Route edit ({PER_ROUTE} prefixes) to kernel, p50 over {EDITS} | {:.1} ms | |",
        pct(&lat, 0.5)
    );
    println!(
        "| one Route edit ({PER_ROUTE} prefixes) to kernel, p99 over {EDITS} | {:.1} ms | <= 100 ms |",
        pct(&lat, 0.99)
    );
    println!(
        "| agent peak RSS (VmHWM) | {:.1} MiB | <= 25 MiB |",
        rss as f64 / 1024.0
    );
    println!();
    drop(agent);
    drop(lab);
    Ok(())
}
