//! The network-namespace lab shared by the integration tests, the benchmarks and the demo
//! (`../shared/lab.md`): a `fabric` namespace with the bridges, gateways that masquerade
//! to their own public address, an `inet` namespace with an echo server that answers with
//! the client's source address, and node namespaces where the agent runs.
//!
//! Nothing is created in the root network namespace: every `ip` call names the namespace
//! it acts in (`ip -n`), veth pairs are created inside a lab namespace with their peer
//! moved straight into another one. Every name carries the run's prefix (`ra<pid>x<n>`);
//! `Drop` deletes the namespaces, pin directories and scratch files, and every new lab first
//! sweeps what crashed earlier runs (whose pid is gone) left behind.
use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};

pub mod kube;

pub const ECHO_PORT: u16 = 7;
/// The isp (the nodes' original default gateway) and what only it reaches.
pub const ISP_V4: &str = "192.0.2.1";
pub const ISP_V6: &str = "2001:db8:2::1";
pub const METADATA_V4: &str = "169.254.169.254";
pub const NAMESERVER_V4: &str = "198.18.0.53";
pub const NAMESERVER_V6: &str = "2001:db8:53::53";
/// One more address only the isp reaches (a `--protected-cidr` in the tests).
pub const PRIVATE_SERVICE_V4: &str = "198.18.2.1";
/// Port of the inbound server on each node's public address (symmetric routing tests).
pub const INBOUND_PORT: u16 = 8080;
/// The hold server (same addresses as the echo server): answers with the client's source
/// address, then echoes every line until the client closes. For long-lived connections.
pub const HOLD_PORT: u16 = 9;
pub const ECHO_V4: &str = "198.51.100.10";
pub const ECHO_V6: &str = "2001:db8:198::10";
pub const DEST_V4: &str = "198.51.100.0/24";
pub const DEST_V6: &str = "2001:db8:198::/64";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Runs a command, returning stdout; the error carries the command and its stderr.
pub fn run(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawning {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `f` every 50 ms until it returns `Some`, or fails after `limit` naming `what`.
/// The limit only stops a hung test; it is not what a test asserts.
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The agent binary: `$ROUTING_AGENT_BIN`, else the workspace's debug build.
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ROUTING_AGENT_BIN") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/routing-agent");
    assert!(
        p.exists(),
        "{} is missing: build it first (`cargo build -p routing-agent`; `cargo xtask test` does)",
        p.display()
    );
    p
}

/// A node namespace of the lab.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub name: String,
    /// Host part of its VPC address (10.114.0.H, fd00:114::H).
    pub host: u8,
}

/// Shape of a lab.
#[derive(Clone, Debug)]
pub struct LabSpec {
    pub gateways: u8,
    pub nodes: Vec<NodeSpec>,
    /// The public side: an `isp` router on `br-pub` (192.0.2.1, 2001:db8:2::1), each node's
    /// `eth0` on it (192.0.2.(8+H), 2001:db8:2::H) with its default routes via the isp;
    /// behind the isp only (the internet has no route to them): the metadata address, a
    /// nameserver and, with `control_plane()`, the API server. The internet routes the
    /// nodes' public addresses via the isp.
    pub public: bool,
}

impl Default for LabSpec {
    fn default() -> Self {
        LabSpec {
            gateways: 3,
            nodes: vec![NodeSpec {
                name: "a".into(),
                host: 2,
            }],
            public: false,
        }
    }
}

impl LabSpec {
    /// Nodes a (10.114.0.2) and b (10.114.0.6), with `gateways` gateways.
    pub fn two_nodes(gateways: u8) -> Self {
        LabSpec {
            public: false,
            gateways,
            nodes: vec![
                NodeSpec {
                    name: "a".into(),
                    host: 2,
                },
                NodeSpec {
                    name: "b".into(),
                    host: 6,
                },
            ],
        }
    }
}

/// The running kernel's (major, minor) version.
pub fn kernel_version() -> (u32, u32) {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split(['.', '-', '+']);
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (major, minor)
}

/// Whether the running kernel has TCX (Linux ≥ 6.6): the agent attaches through it
/// there, through clsact + cls_bpf (netlink) before.
pub fn kernel_has_tcx() -> bool {
    kernel_version() >= (6, 6)
}

/// Whether the running kernel spreads locally originated IPv6 TCP connections whose source
/// port it picks itself over a multipath route, as measured (`cargo xtask vm-test --kernel
/// debian-6.1 --kernel debian-6.12 --kernel host --test dataplane --filter ecmp`):
/// Debian's 6.1 and 6.12 look the route up before they choose the port and hash port 0,
/// so every such connection to one address and port takes the same gateway; 6.18 spreads
/// them. `None` for the kernels in between, not measured.
pub fn kernel_spreads_local_v6_connections() -> Option<bool> {
    match kernel_version() {
        v if v <= (6, 12) => Some(false),
        v if v >= (6, 18) => Some(true),
        _ => None,
    }
}

/// Gateway `i` (1-based): VPC address 10.114.0.(2+i), public 203.0.113.i.
pub fn gateway_v4(i: u8) -> String {
    format!("10.114.0.{}", 2 + i)
}
pub fn gateway_v6(i: u8) -> String {
    format!("fd00:114::{:x}", 2 + i)
}
pub fn public_v4(i: u8) -> IpAddr {
    format!("203.0.113.{i}").parse().unwrap()
}
/// Node `host`'s public (`eth0`) addresses.
pub fn node_public_v4(host: u8) -> String {
    format!("192.0.2.{}", 8 + host)
}
pub fn node_public_v6(host: u8) -> String {
    format!("2001:db8:2::{host:x}")
}
pub fn public_v6(i: u8) -> IpAddr {
    format!("2001:db8:113::{i:x}").parse().unwrap()
}

/// The lab's addresses of one IP family, for tests that run in both.
#[derive(Clone, Copy, Debug)]
pub struct LabFamily {
    pub v6: bool,
    /// The echo servers' network (a Route's destination) and the echo server in it.
    pub dest: &'static str,
    pub echo: &'static str,
    /// Gateway `i`'s VPC address and public (masquerade) address.
    pub gateway: fn(u8) -> String,
    pub public: fn(u8) -> IpAddr,
}

pub const IPV4: LabFamily = LabFamily {
    v6: false,
    dest: DEST_V4,
    echo: ECHO_V4,
    gateway: gateway_v4,
    public: public_v4,
};

pub const IPV6: LabFamily = LabFamily {
    v6: true,
    dest: DEST_V6,
    echo: ECHO_V6,
    gateway: gateway_v6,
    public: public_v6,
};

impl LabFamily {
    /// The VPC addresses of gateways 1..=n.
    pub fn gateways(&self, n: u8) -> Vec<String> {
        (1..=n).map(self.gateway).collect()
    }

    pub fn echo_addr(&self) -> IpAddr {
        self.echo.parse().expect("a lab address")
    }
}

pub struct Lab {
    pub prefix: String,
    pub spec: LabSpec,
    pub scratch: PathBuf,
    namespaces: Vec<String>,
    stop: Arc<AtomicBool>,
    servers: Vec<JoinHandle<()>>,
}

/// The faces of a black-holing gateway (`../shared/lab.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Forwarding dropped (nft) while the gateway still answers ARP and ping.
    ForwardingDropped,
    /// The gateway is gone (its VPC link down).
    Removed,
    /// 100 % packet loss on its VPC side, both ways.
    Loss,
    /// Its uplink is cut: the gateway is up, the internet unreachable through it.
    UplinkCut,
}

/// A long-lived connection to the hold server.
pub struct Held {
    pub stream: TcpStream,
    /// The egress gateway's public address, as the server saw it.
    pub via: IpAddr,
}

impl Held {
    /// Sends a line and reads it back: the connection still carries traffic.
    pub fn alive(&mut self) -> bool {
        let msg = b"still there?\n";
        if self.stream.write_all(msg).is_err() {
            return false;
        }
        let mut buf = [0u8; 13];
        self.stream.read_exact(&mut buf).is_ok() && &buf[..] == msg
    }
}

/// One connection attempt of a `Stream`.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub started: Instant,
    /// The egress gateway's public address, or why it failed.
    pub result: std::result::Result<IpAddr, String>,
}

/// A steady stream of new connections (see `Lab::stream`).
pub struct Stream {
    stop: Arc<AtomicBool>,
    log: Arc<std::sync::Mutex<Vec<Attempt>>>,
    handle: Option<JoinHandle<()>>,
}

impl Stream {
    /// The attempts finished so far.
    pub fn attempts(&self) -> Vec<Attempt> {
        self.log.lock().unwrap().clone()
    }

    /// Stops starting connections and waits for those in flight.
    pub fn stop(mut self) -> Vec<Attempt> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.attempts()
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Deletes what labs of dead processes left: namespaces, pins, scratch directories.
pub fn sweep_stale() {
    let stale = |name: &str| -> bool {
        let Some(rest) = name.strip_prefix("ra") else {
            return false;
        };
        let Some((pid, _)) = rest.split_once('x') else {
            return false;
        };
        pid.parse::<u32>().is_ok_and(|p| !pid_alive(p))
    };
    if let Ok(rd) = fs::read_dir("/run/netns") {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if stale(&n) {
                let _ = run(&["ip", "netns", "del", &n]);
            }
        }
    }
    if let Ok(rd) = fs::read_dir("/sys/fs/bpf") {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if let Some(rest) = n.strip_prefix("routing-agent-")
                && stale(rest)
            {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    if let Ok(rd) = fs::read_dir(std::env::temp_dir()) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if let Some(rest) = n.strip_prefix("routing-agent-lab-")
                && stale(rest)
            {
                kill_users_of(&e.path());
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Kills the processes whose command line names `dir` (agents, etcd and kube-apiserver of
/// a lab whose test process died: they all take paths in the lab's scratch directory).
fn kill_users_of(dir: &Path) {
    let needle = dir.display().to_string();
    let Ok(rd) = fs::read_dir("/proc") else {
        return;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmd) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmd).contains(&needle) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Lab {
    pub fn new(spec: LabSpec) -> Result<Lab> {
        sweep_stale();
        let prefix = format!(
            "ra{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let scratch = std::env::temp_dir().join(format!("routing-agent-lab-{prefix}"));
        fs::create_dir_all(&scratch)?;
        let mut lab = Lab {
            prefix,
            spec: spec.clone(),
            scratch,
            namespaces: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            servers: Vec::new(),
        };
        lab.build()
            .with_context(|| format!("building lab {}", lab.prefix))?;
        Ok(lab)
    }

    /// Full namespace name of a lab member (`fabric`, `inet`, `gw1`, `node-a`).
    pub fn ns(&self, short: &str) -> String {
        format!("{}-{short}", self.prefix)
    }

    pub fn node_ns(&self, node: &str) -> String {
        self.ns(&format!("node-{node}"))
    }

    /// bpffs pin directory for an agent on `node` of this lab.
    pub fn pin_dir(&self, node: &str) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/routing-agent-{}-{node}", self.prefix))
    }

    fn add_ns(&mut self, short: &str) -> Result<String> {
        let name = self.ns(short);
        run(&["ip", "netns", "add", &name])?;
        self.namespaces.push(name.clone());
        self.ip(&name, "link set lo up")?;
        Ok(name)
    }

    /// `ip -n NS <args>`.
    pub fn ip(&self, ns: &str, args: &str) -> Result<String> {
        let mut v = vec!["ip", "-n", ns];
        v.extend(args.split_whitespace());
        run(&v)
    }

    /// A shell command inside `ns` (entered with nsenter, so bpffs stays visible).
    pub fn sh(&self, ns: &str, cmd: &str) -> Result<String> {
        run(&[
            "nsenter",
            &format!("--net=/run/netns/{ns}"),
            "sh",
            "-c",
            cmd,
        ])
    }

    /// A veth pair `a_if` in `a_ns` ↔ `b_if` in `b_ns`, both up.
    pub fn veth(&self, a_ns: &str, a_if: &str, b_ns: &str, b_if: &str) -> Result<()> {
        self.ip(
            a_ns,
            &format!("link add {a_if} type veth peer name {b_if} netns {b_ns}"),
        )?;
        self.ip(a_ns, &format!("link set dev {a_if} up"))?;
        self.ip(b_ns, &format!("link set dev {b_if} up"))?;
        Ok(())
    }

    fn bridge_port(&self, ns_short: &str, if_name: &str, fab_if: &str, bridge: &str) -> Result<()> {
        let fab = self.ns("fabric");
        self.veth(&self.ns(ns_short), if_name, &fab, fab_if)?;
        self.ip(&fab, &format!("link set dev {fab_if} master {bridge}"))?;
        Ok(())
    }

    fn build(&mut self) -> Result<()> {
        let fab = self.add_ns("fabric")?;
        for br in ["br-vpc", "br-up"] {
            self.ip(&fab, &format!("link add {br} type bridge mcast_snooping 0"))?;
            self.ip(&fab, &format!("link set dev {br} up"))?;
        }
        // The internet: a router for the gateways' uplinks and the echo server.
        let inet = self.add_ns("inet")?;
        self.bridge_port("inet", "up0", "inet-up", "br-up")?;
        self.ip(&inet, "addr add 203.0.113.254/24 dev up0")?;
        self.ip(&inet, "addr add 2001:db8:113::fe/64 dev up0 nodad")?;
        // Server addresses on loopback (the lab kernel may lack the dummy driver).
        self.ip(&inet, &format!("addr add {ECHO_V4}/32 dev lo"))?;
        self.ip(&inet, &format!("addr add {ECHO_V6}/128 dev lo nodad"))?;
        for i in 1..=self.spec.gateways {
            let gw = self.add_ns(&format!("gw{i}"))?;
            self.bridge_port(&format!("gw{i}"), "vpc", &format!("gw{i}-vpc"), "br-vpc")?;
            self.bridge_port(&format!("gw{i}"), "uplink", &format!("gw{i}-up"), "br-up")?;
            self.ip(&gw, &format!("addr add {}/20 dev vpc", gateway_v4(i)))?;
            self.ip(&gw, &format!("addr add {}/64 dev vpc nodad", gateway_v6(i)))?;
            self.ip(&gw, &format!("addr add {}/24 dev uplink", public_v4(i)))?;
            self.ip(
                &gw,
                &format!("addr add {}/64 dev uplink nodad", public_v6(i)),
            )?;
            self.ip(&gw, "route add default via 203.0.113.254")?;
            self.ip(&gw, "-6 route add default via 2001:db8:113::fe")?;
            self.sh(
                &gw,
                "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 && \
                 nft add table inet nat && \
                 nft add chain inet nat post '{ type nat hook postrouting priority 100 ; }' && \
                 nft add rule inet nat post oifname uplink masquerade",
            )?;
        }
        for n in self.spec.nodes.clone() {
            self.add_node_ns(&n)?;
        }
        self.start_echo_server("inet", ECHO_PORT)?;
        self.start_hold_server()?;
        if self.spec.public {
            self.build_public()?;
        }
        Ok(())
    }

    /// The public side (see [`LabSpec::public`]).
    fn build_public(&mut self) -> Result<()> {
        let fab = self.ns("fabric");
        self.ip(&fab, "link add br-pub type bridge mcast_snooping 0")?;
        self.ip(&fab, "link set dev br-pub up")?;
        let isp = self.add_ns("isp")?;
        self.bridge_port("isp", "pub0", "isp-pub", "br-pub")?;
        self.bridge_port("isp", "up0", "isp-up", "br-up")?;
        self.ip(&isp, &format!("addr add {ISP_V4}/24 dev pub0"))?;
        self.ip(&isp, &format!("addr add {ISP_V6}/64 dev pub0 nodad"))?;
        self.ip(&isp, "addr add 203.0.113.253/24 dev up0")?;
        self.ip(&isp, "addr add 2001:db8:113::fd/64 dev up0 nodad")?;
        self.ip(&isp, "route add default via 203.0.113.254")?;
        self.ip(&isp, "-6 route add default via 2001:db8:113::fe")?;
        for a in [METADATA_V4, NAMESERVER_V4, PRIVATE_SERVICE_V4] {
            self.ip(&isp, &format!("addr add {a}/32 dev lo"))?;
        }
        self.ip(&isp, &format!("addr add {NAMESERVER_V6}/128 dev lo nodad"))?;
        self.sh(
            &isp,
            "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1",
        )?;
        let inet = self.ns("inet");
        self.ip(&inet, "route add 192.0.2.0/24 via 203.0.113.253")?;
        self.ip(&inet, "-6 route add 2001:db8:2::/64 via 2001:db8:113::fd")?;
        self.start_echo_server("isp", ECHO_PORT)?;
        for n in self.spec.nodes.clone() {
            self.add_node_public(&n)?;
        }
        Ok(())
    }

    fn add_node_public(&mut self, n: &NodeSpec) -> Result<()> {
        let short = format!("node-{}", n.name);
        let ns = self.ns(&short);
        self.bridge_port(&short, "eth0", &format!("{}-pub", n.name), "br-pub")?;
        self.ip(
            &ns,
            &format!("addr add {}/24 dev eth0", node_public_v4(n.host)),
        )?;
        self.ip(
            &ns,
            &format!("addr add {}/64 dev eth0 nodad", node_public_v6(n.host)),
        )?;
        self.ip(
            &ns,
            &format!("route add default via {ISP_V4} dev eth0 proto static"),
        )?;
        self.ip(
            &ns,
            &format!("-6 route add default via {ISP_V6} dev eth0 proto static"),
        )?;
        // The inbound server on the node's public addresses.
        self.start_echo_server(&short, INBOUND_PORT)?;
        Ok(())
    }

    fn add_node_ns(&mut self, n: &NodeSpec) -> Result<()> {
        let ns = self.add_ns(&format!("node-{}", n.name))?;
        self.bridge_port(
            &format!("node-{}", n.name),
            "eth1",
            &format!("{}-vpc", n.name),
            "br-vpc",
        )?;
        self.ip(&ns, &format!("addr add 10.114.0.{}/20 dev eth1", n.host))?;
        self.ip(
            &ns,
            &format!("addr add fd00:114::{:x}/64 dev eth1 nodad", n.host),
        )?;
        Ok(())
    }

    /// The echo server: a thread inside namespace `short` answering every TCP connection
    /// on `port` (v4 and v6) with the client's source address.
    fn start_echo_server(&mut self, short: &str, port: u16) -> Result<()> {
        let ns = self.ns(short);
        let stop = self.stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || {
            let listener = in_netns(&ns, move || TcpListener::bind(("::", port)));
            let listener = match listener {
                Ok(Ok(l)) => l,
                Ok(Err(e)) | Err(e) => {
                    let _ = ready_tx.send(Err(anyhow!("echo server: {e}")));
                    return;
                }
            };
            listener.set_nonblocking(true).expect("nonblocking");
            let _ = ready_tx.send(Ok(()));
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, peer)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = writeln!(s, "{}", peer.ip().to_canonical());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        ready_rx.recv()??;
        self.servers.push(handle);
        Ok(())
    }

    fn start_hold_server(&mut self) -> Result<()> {
        let ns = self.ns("inet");
        let stop = self.stop.clone();
        let listener = in_netns(&ns, || TcpListener::bind(("::", HOLD_PORT)))??;
        listener.set_nonblocking(true)?;
        let handle = std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, peer)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(120)));
                        std::thread::spawn(move || {
                            if writeln!(s, "{}", peer.ip().to_canonical()).is_err() {
                                return;
                            }
                            let mut buf = [0u8; 256];
                            while let Ok(n) = s.read(&mut buf) {
                                if n == 0 || s.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        self.servers.push(handle);
        Ok(())
    }

    /// Opens a long-lived connection from `node` to the hold server at `dst`; returns it
    /// with the egress gateway's public address.
    pub fn hold(&self, node: &str, dst: IpAddr) -> Result<Held> {
        let ns = self.node_ns(node);
        let addr = SocketAddr::new(dst, HOLD_PORT);
        in_netns(&ns, move || -> Result<Held> {
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            let mut r = &s;
            while r.read(&mut b)? == 1 && b[0] != b'\n' {
                line.push(b[0]);
            }
            let via = String::from_utf8(line)?.trim().parse()?;
            Ok(Held { stream: s, via })
        })?
    }

    /// Applies a failure face to gateway `i` (see `Failure`).
    pub fn fail(&self, i: u8, f: Failure) -> Result<()> {
        let gw = self.ns(&format!("gw{i}"));
        match f {
            Failure::ForwardingDropped => self.sh(
                &gw,
                "nft add table inet ra_fail && \
                 nft add chain inet ra_fail ra_fwd '{ type filter hook forward priority 0 ; policy drop ; }'",
            )?,
            Failure::Removed => self.ip(&gw, "link set dev vpc down")?,
            // Every packet both ways (netem would do the same; not every lab kernel has
            // sch_netem, nftables' netdev hooks are everywhere).
            Failure::Loss => self.sh(
                &gw,
                "nft add table netdev ra_loss && \
                 nft add chain netdev ra_loss ra_in '{ type filter hook ingress device vpc priority 0 ; policy drop ; }' && \
                 nft add chain netdev ra_loss ra_out '{ type filter hook egress device vpc priority 0 ; policy drop ; }'",
            )?,
            Failure::UplinkCut => self.ip(&gw, "link set dev uplink down")?,
        };
        Ok(())
    }

    /// Undoes `fail`.
    pub fn heal(&self, i: u8, f: Failure) -> Result<()> {
        let gw = self.ns(&format!("gw{i}"));
        match f {
            Failure::ForwardingDropped => self.sh(&gw, "nft delete table inet ra_fail")?,
            Failure::Removed => self.ip(&gw, "link set dev vpc up")?,
            Failure::Loss => self.sh(&gw, "nft delete table netdev ra_loss")?,
            Failure::UplinkCut => {
                self.ip(&gw, "link set dev uplink up")?;
                // IPv6 addresses are flushed on link down (keep_addr_on_down=0).
                self.ip(
                    &gw,
                    &format!("addr replace {}/64 dev uplink nodad", public_v6(i)),
                )?;
                // The connected routes come back with the carrier, a moment later.
                wait_for("gateway uplink routes back", Duration::from_secs(5), || {
                    (self
                        .ip(&gw, "route replace default via 203.0.113.254")
                        .is_ok()
                        && self
                            .ip(&gw, "-6 route replace default via 2001:db8:113::fe")
                            .is_ok())
                    .then_some(())
                })?;
                String::new()
            }
        };
        Ok(())
    }

    /// Starts `per_second` new connections per second from `node` to the echo server at
    /// `dst`, each on its own thread, until the returned stream is stopped.
    pub fn stream(&self, node: &str, dst: IpAddr, per_second: u32) -> Stream {
        let ns = self.node_ns(node);
        let stop = Arc::new(AtomicBool::new(false));
        let log: Arc<std::sync::Mutex<Vec<Attempt>>> = Arc::default();
        let (stop2, log2) = (stop.clone(), log.clone());
        let every = Duration::from_secs(1) / per_second.max(1);
        let handle = std::thread::spawn(move || {
            let mut workers = Vec::new();
            let mut next = Instant::now();
            let addr = SocketAddr::new(dst, ECHO_PORT);
            while !stop2.load(Ordering::Relaxed) {
                let log = log2.clone();
                let worker = spawn_in_netns(&ns, move || {
                    let started = Instant::now();
                    let result = echo(addr).map_err(|e| e.to_string());
                    log.lock().unwrap().push(Attempt { started, result });
                });
                match worker {
                    Ok(w) => workers.push(w),
                    Err(e) => log2.lock().unwrap().push(Attempt {
                        started: Instant::now(),
                        result: Err(format!("entering {ns}: {e}")),
                    }),
                }
                next += every;
                if let Some(d) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
            }
            for w in workers {
                let _ = w.join();
            }
        });
        Stream {
            stop,
            log,
            handle: Some(handle),
        }
    }

    /// Opens a TCP connection from `node` to the echo server at `dst` and returns the
    /// source address the server saw (the egress gateway's public address).
    pub fn connect(&self, node: &str, dst: IpAddr) -> Result<IpAddr> {
        self.connect_from(&self.node_ns(node), dst)
    }

    /// Like [`Lab::connect`], but the socket is bound to an ephemeral port before it
    /// connects (`bind(port 0)`), so the kernel knows the source port at route lookup.
    pub fn connect_bound(&self, node: &str, dst: IpAddr) -> Result<IpAddr> {
        let addr = SocketAddr::new(dst, ECHO_PORT);
        in_netns(&self.node_ns(node), move || echo_bound(addr))?
            .with_context(|| format!("connecting (bound) from node {node} to {addr}"))
    }

    /// A pod behind node `node`: namespace `pod-<node>` on a veth (`eth0` in the pod,
    /// `pod0` on the node), 10.244.H.2/24 and fd00:244:H::2/64 with the node (.1, ::1) as
    /// default gateway; the node forwards and masquerades the pod's traffic out of `eth1`
    /// to its own address, as a CNI does for egress. Returns the pod's namespace.
    pub fn add_pod(&mut self, node: &str) -> Result<String> {
        let host = self.node_host(node)?;
        let node_ns = self.node_ns(node);
        let pod = self.add_ns(&format!("pod-{node}"))?;
        self.veth(&pod, "eth0", &node_ns, "pod0")?;
        self.ip(&pod, &format!("addr add 10.244.{host}.2/24 dev eth0"))?;
        self.ip(
            &pod,
            &format!("addr add fd00:244:{host:x}::2/64 dev eth0 nodad"),
        )?;
        self.ip(&pod, &format!("route add default via 10.244.{host}.1"))?;
        self.ip(
            &pod,
            &format!("-6 route add default via fd00:244:{host:x}::1"),
        )?;
        self.ip(&node_ns, &format!("addr add 10.244.{host}.1/24 dev pod0"))?;
        self.ip(
            &node_ns,
            &format!("addr add fd00:244:{host:x}::1/64 dev pod0 nodad"),
        )?;
        self.sh(
            &node_ns,
            "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 && \
             nft add table inet podnat && \
             nft add chain inet podnat post '{ type nat hook postrouting priority 100 ; }' && \
             nft add rule inet podnat post iifname pod0 oifname eth1 masquerade",
        )?;
        Ok(pod)
    }

    /// Opens a TCP connection from namespace `ns` (full name) to the echo server at `dst`:
    /// the source address the server saw.
    pub fn connect_from(&self, ns: &str, dst: IpAddr) -> Result<IpAddr> {
        let addr = SocketAddr::new(dst, ECHO_PORT);
        in_netns(ns, move || echo(addr))?.with_context(|| format!("connecting from {ns} to {addr}"))
    }

    fn node_host(&self, node: &str) -> Result<u8> {
        Ok(self
            .spec
            .nodes
            .iter()
            .find(|n| n.name == node)
            .ok_or_else(|| anyhow!("no node {node}"))?
            .host)
    }

    /// Waits until every interface of node `node` but lo has its IPv6 link-local address,
    /// past duplicate address detection (the kernel adds it after the link comes up, and
    /// its local route with it: a slow machine would see it appear mid-test).
    pub fn wait_ipv6_settled(&self, node: &str) -> Result<()> {
        let ns = self.node_ns(node);
        wait_for(
            &format!("IPv6 link-local addresses of node {node}"),
            Duration::from_secs(30),
            || {
                let links = self.ip(&ns, "-o link show").ok()?;
                let want = links.lines().filter(|l| !l.contains(" lo:")).count();
                let addrs = self.ip(&ns, "-o -6 addr show scope link").ok()?;
                let ready = addrs.lines().filter(|l| !l.contains("tentative")).count();
                (ready >= want).then_some(())
            },
        )
    }

    /// An inbound connection from the internet to node `node`'s public address (v4 or v6)
    /// on [`INBOUND_PORT`]: the source address the node saw.
    pub fn connect_inbound(&self, node: &str, v6: bool) -> Result<IpAddr> {
        let host = self.node_host(node)?;
        let dst: IpAddr = if v6 {
            node_public_v6(host).parse()?
        } else {
            node_public_v4(host).parse()?
        };
        let addr = SocketAddr::new(dst, INBOUND_PORT);
        in_netns(&self.ns("inet"), move || echo(addr))?
            .with_context(|| format!("connecting from the internet to {addr}"))
    }

    /// Runs `routing-agent cleanup` in `node`'s namespace, with its pin directory.
    pub fn cleanup(&self, node: &str) -> Result<String> {
        run(&[
            "nsenter",
            &format!("--net=/run/netns/{}", self.node_ns(node)),
            agent_bin().to_str().unwrap(),
            "cleanup",
            "--bpf-pin-dir",
            self.pin_dir(node).to_str().unwrap(),
        ])
    }

    /// `count` connections; the set of source addresses the server saw, with counts.
    pub fn spread(&self, node: &str, dst: IpAddr, count: usize) -> Result<BTreeMap<IpAddr, usize>> {
        tally(count, || self.connect(node, dst))
    }

    /// `ip -j` output of a node, parsed.
    pub fn ip_json(&self, node: &str, args: &str) -> Result<serde_json::Value> {
        let out = self.ip(&self.node_ns(node), &format!("-j {args}"))?;
        if out.trim().is_empty() {
            return Ok(serde_json::Value::Array(vec![]));
        }
        Ok(serde_json::from_str(&out)?)
    }

    /// The node's route to `dst` in the main table, if any.
    pub fn route(&self, node: &str, dst: &str) -> Result<Option<serde_json::Value>> {
        let fam = if dst.contains(':') { "-6" } else { "-4" };
        let v = self.ip_json(node, &format!("{fam} route show exact {dst}"))?;
        Ok(v.as_array().and_then(|a| a.first().cloned()))
    }

    /// Gateways of the node's route to `dst`, resolved through its nexthop group.
    pub fn route_gateways(&self, node: &str, dst: &str) -> Result<Vec<String>> {
        let Some(r) = self.route(node, dst)? else {
            return Ok(vec![]);
        };
        let mut gws = Vec::new();
        if let Some(hops) = r["nexthops"].as_array() {
            gws.extend(
                hops.iter()
                    .filter_map(|h| h["gateway"].as_str().map(String::from)),
            );
        } else if let Some(g) = r["gateway"].as_str() {
            gws.push(g.to_string());
        } else if let Some(id) = r["nhid"].as_u64() {
            let nh = self.ip_json(node, &format!("nexthop show id {id}"))?;
            for m in nh[0]["group"].as_array().into_iter().flatten() {
                let m = self.ip_json(node, &format!("nexthop show id {}", m["id"]))?;
                if let Some(g) = m[0]["gateway"].as_str() {
                    gws.push(g.to_string());
                }
            }
            if let Some(g) = nh[0]["gateway"].as_str() {
                gws.push(g.to_string());
            }
        }
        gws.sort();
        Ok(gws)
    }

    /// Adds a node namespace after the lab was built.
    pub fn add_node(&mut self, n: NodeSpec) -> Result<()> {
        self.add_node_ns(&n)?;
        self.spec.nodes.push(n);
        Ok(())
    }

    /// A fresh directory for Route manifests.
    pub fn routes_dir(&self, name: &str) -> Result<PathBuf> {
        let d = self.scratch.join(name);
        fs::create_dir_all(&d)?;
        Ok(d)
    }

    /// A routes directory holding one Route, `ecmp`: `DEST_V4` over gateways 1..=`n`.
    pub fn ecmp_routes(&self, n: u8) -> Result<PathBuf> {
        self.ecmp_routes_of(IPV4, n)
    }

    /// [`Lab::ecmp_routes`] for family `f`.
    pub fn ecmp_routes_of(&self, f: LabFamily, n: u8) -> Result<PathBuf> {
        let dir = self.routes_dir("routes")?;
        let gws = f.gateways(n);
        let g: Vec<&str> = gws.iter().map(String::as_str).collect();
        write_atomic(
            &dir.join("r.yaml"),
            &route_yaml("ecmp", &[f.dest], &g, None),
        )?;
        Ok(dir)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in std::mem::take(&mut self.servers) {
            let _ = h.join();
        }
        for ns in self.namespaces.iter().rev() {
            let _ = run(&["ip", "netns", "del", ns]);
        }
        for n in &self.spec.nodes {
            let _ = fs::remove_dir_all(self.pin_dir(&n.name));
        }
        let _ = fs::remove_dir_all(&self.scratch);
    }
}

/// Starts `f` on a thread that has entered network namespace `ns` (setns is per thread).
pub fn spawn_in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<JoinHandle<std::io::Result<T>>> {
    let file = fs::File::open(format!("/run/netns/{ns}"))?;
    Ok(std::thread::spawn(move || -> std::io::Result<T> {
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::from)?;
        Ok(f())
    }))
}

/// Runs `f` on a thread that has entered network namespace `ns`, and waits for it.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<T> {
    spawn_in_netns(ns, f)?
        .join()
        .map_err(|_| std::io::Error::other("thread panicked"))?
}

/// `GET path` on the agent's health port (127.0.0.1:9977) inside node `node`'s namespace:
/// (status code, body).
pub fn health_get(lab: &Lab, node: &str, path: &str) -> Result<(u16, String)> {
    let request = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
    let text = in_netns(&lab.node_ns(node), move || -> Result<String> {
        let mut s = TcpStream::connect_timeout(&"127.0.0.1:9977".parse()?, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.write_all(request.as_bytes())?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    })??;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("not an HTTP answer: {text:?}"))?;
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    Ok((code, body))
}

/// One exchange with the echo server at `addr` (from the calling thread's namespace):
/// the source address it saw.
fn echo(addr: SocketAddr) -> Result<IpAddr> {
    echo_answer(TcpStream::connect_timeout(&addr, Duration::from_secs(3))?)
}

/// [`echo`] from a socket bound to an ephemeral port before it connects.
fn echo_bound(addr: SocketAddr) -> Result<IpAddr> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    let any: SocketAddr = if addr.is_ipv6() {
        "[::]:0".parse()?
    } else {
        "0.0.0.0:0".parse()?
    };
    s.bind(&any.into())?;
    s.connect_timeout(&addr.into(), Duration::from_secs(3))?;
    echo_answer(s.into())
}

/// The echo server's answer on a connected stream: the source address it saw.
fn echo_answer(mut s: TcpStream) -> Result<IpAddr> {
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text.trim().parse()?)
}

/// Runs `open` (one connection to an echo server) `count` times: how many times each
/// source address was seen.
pub fn tally(
    count: usize,
    mut open: impl FnMut() -> Result<IpAddr>,
) -> Result<BTreeMap<IpAddr, usize>> {
    let mut seen = BTreeMap::new();
    for _ in 0..count {
        *seen.entry(open()?).or_insert(0) += 1;
    }
    Ok(seen)
}

/// A Route manifest.
pub fn route_yaml(
    name: &str,
    destinations: &[&str],
    gateways: &[&str],
    node_selector: Option<&str>,
) -> String {
    let list = |v: &[&str]| {
        v.iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut y = format!(
        "apiVersion: networking.doks.digitalocean.com/v1alpha1\nkind: Route\nmetadata:\n  name: {name}\nspec:\n  destinations: [{}]\n  gateways: [{}]\n",
        list(destinations),
        list(gateways)
    );
    if let Some(sel) = node_selector {
        y.push_str("  nodeSelector:\n");
        for line in sel.lines() {
            y.push_str("    ");
            y.push_str(line);
            y.push('\n');
        }
    }
    y
}

/// Writes a file atomically (rename), as editors and config management do.
pub fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name().unwrap().to_string_lossy()
    ));
    fs::write(&tmp, text)?;
    fs::rename(&tmp, path)?;
    Ok(())
}

/// The agent running in standalone mode inside a node namespace.
pub struct Agent {
    child: Option<Child>,
    pub node: String,
    pub log: PathBuf,
    pub status: PathBuf,
    args: Vec<String>,
    ns: String,
}

impl Agent {
    /// Starts the agent on `node` of `lab` with Routes from `dir`, plus `extra` flags,
    /// writing a status file the test can read.
    pub fn start(lab: &Lab, node: &str, dir: &Path, extra: &[&str]) -> Result<Agent> {
        Self::launch(lab, node, dir, extra, true)
    }

    /// Like [`Agent::start`]; without `status_file` the agent writes none (benchmarks).
    pub fn launch(
        lab: &Lab,
        node: &str,
        dir: &Path,
        extra: &[&str],
        status_file: bool,
    ) -> Result<Agent> {
        let source = ["--routes-dir".to_string(), dir.display().to_string()];
        Self::launch_with(lab, node, &source, extra, status_file)
    }

    /// Starts the agent on `node` following the Kubernetes API server of `kubeconfig`.
    pub fn start_kube(lab: &Lab, node: &str, kubeconfig: &Path, extra: &[&str]) -> Result<Agent> {
        let source = [
            "--kube".to_string(),
            "--kubeconfig".into(),
            kubeconfig.display().to_string(),
        ];
        Self::launch_with(lab, node, &source, extra, true)
    }

    fn launch_with(
        lab: &Lab,
        node: &str,
        source: &[String],
        extra: &[&str],
        status_file: bool,
    ) -> Result<Agent> {
        if !lab.spec.nodes.iter().any(|n| n.name == node) {
            bail!("no node {node} in the lab");
        }
        let mut args = vec!["run".to_string()];
        args.extend(source.iter().cloned());
        args.extend([
            "--node-name".into(),
            format!("node-{node}"),
            "--bpf-pin-dir".into(),
            lab.pin_dir(node).display().to_string(),
        ]);
        if status_file {
            args.push("--status-file".into());
            args.push(
                lab.scratch
                    .join(format!("status-{node}.json"))
                    .display()
                    .to_string(),
            );
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut a = Agent {
            child: None,
            node: node.into(),
            log: lab.scratch.join(format!("agent-{node}.log")),
            status: lab.scratch.join(format!("status-{node}.json")),
            args,
            ns: lab.node_ns(node),
        };
        a.spawn()?;
        Ok(a)
    }

    fn spawn(&mut self) -> Result<()> {
        // The agent only ever runs inside a lab namespace.
        assert!(
            self.ns.starts_with("ra"),
            "refusing to run the agent outside the lab"
        );
        let _ = fs::remove_file(&self.status);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns))
            .arg(agent_bin())
            .args(&self.args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// Stops the agent with SIGTERM (routes stay) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        // The next status read must come from the new process.
        let _ = fs::remove_file(&self.status);
        self.spawn()
    }

    /// Fails if the process exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(c) = &mut self.child
            && let Some(st) = c.try_wait()?
        {
            bail!(
                "agent on {} exited ({st}); log:\n{}",
                self.node,
                self.log_text()
            );
        }
        Ok(())
    }

    /// Process id of the running agent.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn status(&self) -> Option<serde_json::Value> {
        serde_json::from_str(&fs::read_to_string(&self.status).ok()?).ok()
    }

    /// Waits until the status file satisfies `pred`.
    pub fn wait_status(
        &mut self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let r = wait_for(what, Duration::from_secs(20), || {
            if self.check_alive().is_err() {
                return Some(Err(anyhow!("agent exited")));
            }
            self.status().filter(|s| pred(s)).map(Ok)
        });
        match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) | Err(e) => Err(e.context(format!("agent log:\n{}", self.log_text()))),
        }
    }

    /// Waits until the agent reports a reconcile with `n` installed routes and no change
    /// pending (its last pass found the kernel as desired).
    /// Waits until the agent knows the MAC address of `n` gateways (so their traffic is
    /// attributed by the TC programs).
    pub fn wait_resolved(&mut self, n: usize) -> Result<serde_json::Value> {
        self.wait_status(&format!("{n} gateway MACs known"), |s| {
            s["gateways"]
                .as_array()
                .is_some_and(|g| g.iter().filter(|g| g["mac"].is_string()).count() >= n)
        })
    }

    /// The health entry of `gateway` in the status file.
    pub fn gateway(&self, gateway: &str) -> Option<serde_json::Value> {
        self.status()?["gateways"]
            .as_array()?
            .iter()
            .find(|g| g["address"] == gateway)
            .cloned()
    }

    pub fn wait_settled(&mut self, n: usize) -> Result<serde_json::Value> {
        self.wait_status(&format!("{n} routes installed, settled"), |s| {
            s["routes"].as_array().is_some_and(|r| r.len() == n) && s["lastChanges"] == 0
        })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}
