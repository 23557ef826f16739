//! `cargo xtask bench dataplane`: the agent at scale, standalone and in Kubernetes mode
//! (release build, eBPF on). For 1,000, 5,000, 10,000 and 20,000 prefixes (Routes of 5
//! destinations), with one shared gateway set (3 gateways) and with many (each Route over
//! one of the 35 two- and three-gateway sets of 6 gateways):
//!
//! - cold start: agent start → every prefix's route in the kernel;
//! - a pass with nothing to change: the agent's own `reconcile_duration_seconds` (from
//!   `/metrics`) over fresh passes triggered by a foreign route added and removed next to
//!   it (it reads the kernel back, diffs, applies nothing);
//! - one new Route (5 prefixes) → its routes in the kernel, p50 / p99;
//! - CPU used over 60 s with nothing changing (at 10,000 prefixes);
//! - peak RSS.
//!
//! Kubernetes mode, at the same sizes with one gateway set: the Routes in a real API
//! server, cold start and one new Route (POSTed through `kubectl proxy`, so no kubectl
//! start is counted) → kernel. Times come from route notifications read on a
//! netlink socket inside the node namespace, so they measure the kernel, not the agent's
//! report. Measures, never asserts.
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use routing_agent_tests::kube::ControlPlane;
use routing_agent_tests::*;

const PER_ROUTE: usize = 5;
const ADDS: usize = 40;

fn manifest(name: &str, first: usize, gateways: &[String]) -> String {
    let dsts: Vec<String> = (0..PER_ROUTE).map(|j| scale_prefix(first + j)).collect();
    let d: Vec<&str> = dsts.iter().map(String::as_str).collect();
    let g: Vec<&str> = gateways.iter().map(String::as_str).collect();
    route_yaml(name, &d, &g, None)
}

/// `n` new Routes, each added by `add(i)`: how long until its 5 routes are in the kernel
/// (ms), one at a time.
fn measure_adds(
    events: &mut RouteEvents,
    n: usize,
    mut add: impl FnMut(usize) -> Result<()>,
) -> Result<Vec<f64>> {
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        add(i)?;
        let done = events.wait(PER_ROUTE, Duration::from_secs(30))?;
        lat.push((done - t).as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(300));
        events.drain();
    }
    Ok(lat)
}

/// A lab with a control plane (CRD, RBAC, node-a's Node) holding `routes` Routes of 5
/// destinations over the three gateways.
fn cluster_with_routes(routes: usize) -> Result<(Lab, ControlPlane)> {
    let mut lab = Lab::new(LabSpec::default())?;
    let cp = lab.control_plane()?;
    cp.kubectl(&[
        "apply",
        "--validate=false",
        "-f",
        &workspace_file("deploy/crd.yaml"),
    ])?;
    cp.kubectl(&["apply", "-f", &workspace_file("deploy/rbac.yaml")])?;
    cp.apply("apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\n")?;
    let gws = &Shape::One.sets()[0];
    let file = lab.scratch.join("routes.yaml");
    std::fs::write(&file, scale_routes_yaml("r", routes, 0, gws))?;
    eprintln!("  creating {routes} Routes in the API server");
    cp.kubectl(&["create", "-f", file.to_str().unwrap()])?;
    Ok((lab, cp))
}

/// The gateway sets of a shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// Every Route over gateways 1–3.
    One,
    /// Route `r` over the `r mod 35`-th of the 2- and 3-subsets of gateways 1–6.
    Many,
}

impl Shape {
    fn gateways(self) -> u8 {
        match self {
            Shape::One => 3,
            Shape::Many => 6,
        }
    }

    fn sets(self) -> Vec<Vec<String>> {
        match self {
            Shape::One => vec![(1..=3).map(gateway_v4).collect()],
            Shape::Many => {
                let mut out = Vec::new();
                for a in 1..=6u8 {
                    for b in a + 1..=6 {
                        out.push(vec![gateway_v4(a), gateway_v4(b)]);
                        for c in b + 1..=6 {
                            out.push(vec![gateway_v4(a), gateway_v4(b), gateway_v4(c)]);
                        }
                    }
                }
                out
            }
        }
    }
}

/// Route notifications (RTM_NEWROUTE, protocol 196, type unicast: the real routes, not
/// the standby ones) seen since the last call.
pub struct RouteEvents {
    socket: Socket,
    buf: Vec<u8>,
    overflowed: bool,
}

impl RouteEvents {
    pub fn open(lab: &Lab) -> Result<Self> {
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

    /// Counts the notifications waiting on the socket.
    pub fn drain(&mut self) -> usize {
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
                        // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type
                        let (protocol, kind) = (self.buf[off + 16 + 5], self.buf[off + 16 + 7]);
                        if mtype == 24 && protocol == 196 && kind == 1 {
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
    pub fn wait(&mut self, want: usize, limit: Duration) -> Result<Instant> {
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

fn proc_stat(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// CPU time (user + system) of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = s.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks as f64 / hz)
}

/// `sum` and `count` of the agent's reconcile histogram.
fn reconcile_histogram(lab: &Lab) -> Result<(f64, f64)> {
    let (_, text) = health_get(lab, "a", "/metrics")?;
    let value = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok((
        value("routing_agent_reconcile_duration_seconds_sum"),
        value("routing_agent_reconcile_duration_seconds_count"),
    ))
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    crate::bench::pct(v, p)
}

struct Row {
    mode: &'static str,
    shape: Shape,
    prefixes: usize,
    cold_ms: f64,
    pass_ms: f64,
    add_p50: f64,
    add_p99: f64,
    idle_cpu_s: Option<f64>,
    rss_mib: f64,
    /// Resident at the end (after the adds and the idle minute).
    steady_mib: f64,
    /// Of the RSS at the end, the file-backed part (the binary's and libraries' pages).
    file_mib: f64,
    /// The eBPF loader process's peak (it runs once at start, then exits), from its log line.
    loader_rss_mib: Option<f64>,
}

/// The eBPF loader's peak RSS, from the `peak_rss_kib=` of its last log line.
fn loader_rss_mib(agent: &Agent) -> Option<f64> {
    let log = agent.log_text();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("eBPF loader: object loaded"))?;
    let kib: f64 = line
        .split("peak_rss_kib=")
        .nth(1)?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// Fresh passes with nothing to change: a foreign route next to the agent's, added and
/// removed (each wakes the agent, which reads the kernel back and finds nothing to do).
fn nothing_to_change(lab: &Lab, passes: usize) -> Result<f64> {
    let ns = lab.node_ns("a");
    std::thread::sleep(Duration::from_secs(1));
    let (s0, c0) = reconcile_histogram(lab)?;
    for i in 0..passes {
        let op = if i % 2 == 0 { "add" } else { "del" };
        lab.ip(
            &ns,
            &format!(
                "route {op} 192.0.2.128/25 via {} proto static",
                gateway_v4(1)
            ),
        )?;
        std::thread::sleep(Duration::from_millis(400));
    }
    let (s1, c1) = reconcile_histogram(lab)?;
    if c1 <= c0 {
        bail!("no reconcile counted");
    }
    Ok((s1 - s0) / (c1 - c0) * 1e3)
}

fn standalone(shape: Shape, prefixes: usize, idle: bool) -> Result<Row> {
    let lab = Lab::new(LabSpec {
        gateways: shape.gateways(),
        ..LabSpec::default()
    })?;
    let dir = lab.routes_dir("routes")?;
    let sets = shape.sets();
    let routes = prefixes / PER_ROUTE;
    for r in 0..routes {
        let text = manifest(&format!("r{r:05}"), r * PER_ROUTE, &sets[r % sets.len()]);
        std::fs::write(dir.join(format!("r{r:05}.yaml")), text)?;
    }
    let mut events = RouteEvents::open(&lab)?;
    let t0 = Instant::now();
    let mut agent = Agent::launch(&lab, "a", &dir, &["--log-level", "info"], false)?;
    let done = events.wait(prefixes, Duration::from_secs(180))?;
    let cold = done - t0;
    std::thread::sleep(Duration::from_secs(2));
    events.drain();
    let pass_ms = nothing_to_change(&lab, 6)?;
    events.drain();
    let mut lat = measure_adds(&mut events, ADDS, |i| {
        let text = manifest(
            &format!("n{i:03}"),
            (routes + i) * PER_ROUTE,
            &sets[i % sets.len()],
        );
        write_atomic(&dir.join(format!("n{i:03}.yaml")), &text)
    })?;
    let pid = agent.pid().unwrap_or(0);
    let idle_cpu_s = if idle {
        std::thread::sleep(Duration::from_secs(2));
        let c0 = cpu_seconds(pid).unwrap_or(0.0);
        std::thread::sleep(Duration::from_secs(60));
        Some(cpu_seconds(pid).unwrap_or(0.0) - c0)
    } else {
        None
    };
    agent.check_alive()?;
    let rss = proc_stat(pid, "VmHWM:").unwrap_or(0) as f64 / 1024.0;
    let steady_mib = proc_stat(pid, "VmRSS:").unwrap_or(0) as f64 / 1024.0;
    let file_mib = proc_stat(pid, "RssFile:").unwrap_or(0) as f64 / 1024.0;
    let loader_rss_mib = loader_rss_mib(&agent);
    Ok(Row {
        mode: "standalone",
        shape,
        prefixes,
        cold_ms: cold.as_secs_f64() * 1e3,
        pass_ms,
        add_p50: pct(&mut lat, 0.5),
        add_p99: pct(&mut lat, 0.99),
        idle_cpu_s,
        rss_mib: rss,
        steady_mib,
        file_mib,
        loader_rss_mib,
    })
}

fn kubernetes(prefixes: usize) -> Result<Row> {
    let routes = prefixes / PER_ROUTE;
    let (lab, mut cp) = cluster_with_routes(routes)?;
    let sets = Shape::One.sets();
    let mut events = RouteEvents::open(&lab)?;
    let t0 = Instant::now();
    // As the DaemonSet runs it: no status file.
    let mut agent = Agent::launch_kube(&lab, "a", &cp.agent, &[], false)?;
    let done = events.wait(prefixes, Duration::from_secs(300))?;
    let cold = done - t0;
    std::thread::sleep(Duration::from_secs(2));
    events.drain();
    let pass_ms = nothing_to_change(&lab, 6)?;
    events.drain();
    // Created through `kubectl proxy`: the time is the API server's and the agent's, not
    // a kubectl start's.
    cp.start_proxy()?;
    let mut lat = measure_adds(&mut events, ADDS / 2, |i| {
        let text = manifest(&format!("n{i:03}"), (routes + i) * PER_ROUTE, &sets[0]);
        cp.post(
            "/apis/networking.doks.digitalocean.com/v1alpha1/routes",
            &text,
        )
    })?;
    // For comparison with runs before the proxy: the same through `kubectl apply`, whose
    // start (a Go binary, its discovery) is then part of the time.
    let mut with_kubectl = measure_adds(&mut events, ADDS / 4, |i| {
        let i = ADDS / 2 + i;
        let text = manifest(&format!("n{i:03}"), (routes + i) * PER_ROUTE, &sets[0]);
        cp.apply(&text).map(drop)
    })?;
    eprintln!(
        "  {prefixes} prefixes: through `kubectl apply` (its start included): p50 {:.1} ms over {}",
        pct(&mut with_kubectl, 0.5),
        ADDS / 4
    );
    agent.check_alive()?;
    let rss = proc_stat(agent.pid().unwrap_or(0), "VmHWM:").unwrap_or(0) as f64 / 1024.0;
    let steady_mib = proc_stat(agent.pid().unwrap_or(0), "VmRSS:").unwrap_or(0) as f64 / 1024.0;
    let file_mib = proc_stat(agent.pid().unwrap_or(0), "RssFile:").unwrap_or(0) as f64 / 1024.0;
    let loader_rss_mib = loader_rss_mib(&agent);
    Ok(Row {
        mode: "Kubernetes",
        shape: Shape::One,
        prefixes,
        cold_ms: cold.as_secs_f64() * 1e3,
        pass_ms,
        add_p50: pct(&mut lat, 0.5),
        add_p99: pct(&mut lat, 0.99),
        idle_cpu_s: None,
        rss_mib: rss,
        steady_mib,
        file_mib,
        loader_rss_mib,
    })
}

fn workspace_file(p: &str) -> String {
    crate::workspace().join(p).display().to_string()
}

/// Which modes `bench dataplane` measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Modes {
    All,
    /// Standalone, one shared gateway set.
    StandaloneOne,
    /// Standalone, 35 gateway sets.
    StandaloneMany,
    Kubernetes,
}

/// `only`: one size (0: every size).
pub fn run(only: usize, modes: Modes) -> Result<()> {
    let sizes: Vec<usize> = match only {
        0 => vec![1_000, 5_000, 10_000, 20_000],
        n => vec![n],
    };
    let mut rows = Vec::new();
    for (shape, mode) in [
        (Shape::One, Modes::StandaloneOne),
        (Shape::Many, Modes::StandaloneMany),
    ] {
        if !matches!(modes, Modes::All) && modes != mode {
            continue;
        }
        for &prefixes in &sizes {
            eprintln!("standalone, {shape:?} gateway set(s), {prefixes} prefixes");
            rows.push(standalone(shape, prefixes, prefixes == 10_000)?);
        }
    }
    if matches!(modes, Modes::All | Modes::Kubernetes) {
        for &prefixes in &sizes {
            eprintln!("Kubernetes mode, one gateway set, {prefixes} prefixes");
            rows.push(kubernetes(prefixes)?);
        }
    }
    println!();
    println!(
        "| mode | gateway sets | prefixes | cold start to all in the kernel | pass with nothing to change (agent's own time) | one new Route → kernel p50 / p99 (over {ADDS}, Kubernetes {}) | CPU over 60 s idle | peak RSS | RSS at the end (of it file-backed) | eBPF loader's peak RSS (once, at start) |",
        ADDS / 2
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    // (RSS at the end: the whole, then its file-backed part in parentheses.)
    for r in rows {
        println!(
            "| {} | {} | {} | {:.0} ms | {:.1} ms | {:.1} / {:.1} ms | {} | {:.1} MiB | {:.1} MiB ({:.1}) | {} |",
            r.mode,
            match r.shape {
                Shape::One => "1",
                Shape::Many => "35",
            },
            r.prefixes,
            r.cold_ms,
            r.pass_ms,
            r.add_p50,
            r.add_p99,
            r.idle_cpu_s
                .map(|c| format!("{:.0} ms", c * 1e3))
                .unwrap_or_else(|| "-".into()),
            r.rss_mib,
            r.steady_mib,
            r.file_mib,
            r.loader_rss_mib
                .map(|m| format!("{m:.1} MiB"))
                .unwrap_or_else(|| "-".into())
        );
    }
    println!();
    Ok(())
}

/// `cargo xtask bench api-outage`: the API server killed for 60 s (`trials` times) while
/// the agent runs with 2,000 Routes; each time, a Route created once it is back: time from
/// its `/readyz` to the new routes in the kernel, and whether any route went meanwhile.
pub fn api_outage(trials: usize) -> Result<()> {
    let routes = 2000;
    let (lab, mut cp) = cluster_with_routes(routes)?;
    let sets = Shape::One.sets();
    let mut events = RouteEvents::open(&lab)?;
    let mut agent = Agent::start_kube(&lab, "a", &cp.agent, &[])?;
    events.wait(routes * PER_ROUTE, Duration::from_secs(300))?;
    let count = |lab: &Lab| -> usize {
        lab.ip_json("a", "route show proto 196 type unicast")
            .ok()
            .and_then(|v| v.as_array().map(Vec::len))
            .unwrap_or(0)
    };
    let mut back = Vec::new();
    let mut kept = true;
    for t in 0..trials {
        eprintln!("  outage {}: 60 s", t + 1);
        let before = count(&lab);
        cp.stop_apiserver();
        std::thread::sleep(Duration::from_secs(60));
        kept &= count(&lab) == before;
        cp.start_apiserver()?;
        cp.wait_ready()?;
        let ready = Instant::now();
        events.drain();
        let text = manifest(&format!("after{t}"), (routes + t) * PER_ROUTE, &sets[0]);
        cp.apply(&text)?;
        let done = events.wait(PER_ROUTE, Duration::from_secs(120))?;
        back.push((done - ready).as_secs_f64());
    }
    agent.check_alive()?;
    println!();
    println!(
        "| API server killed for 60 s, 10,000 prefixes installed | trials | a Route created once it is back → kernel (from its /readyz), per trial | routes kept throughout |"
    );
    println!("|---|---|---|---|");
    let b: Vec<String> = back.iter().map(|s| format!("{s:.2} s")).collect();
    println!(
        "| agent in Kubernetes mode | {trials} | {} | {} |",
        b.join(", "),
        if kept { "yes" } else { "NO" }
    );
    println!();
    Ok(())
}
