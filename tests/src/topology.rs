//! The lab's shape: namespaces (fabric with the bridges, inet, the gateways, the nodes, the
//! public side), links and addresses, and the `Lab` that owns and deletes them.
use std::fs;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;

use anyhow::{Context as _, Result, anyhow};

use crate::{route_yaml, run, run_input, write_atomic};

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

/// `ip` lines gathered per namespace while a lab is built, then run as one
/// `ip -n NS -batch -` per namespace, in the order the namespaces were first named. A lab
/// is some 70 ip commands and a process costs about 0.1 s under TCG (the VM tier), where
/// building labs one command at a time was most of each test's time. Every link is created
/// from the namespace that is named first (the fabric; the node for a pod), so the later
/// namespaces' lines only configure what already exists.
#[derive(Default)]
pub(crate) struct Batch {
    lines: Vec<(String, Vec<String>)>,
}

impl Batch {
    pub(crate) fn ip(&mut self, ns: &str, line: impl Into<String>) {
        let line = line.into();
        match self.lines.iter_mut().find(|(n, _)| n == ns) {
            Some((_, l)) => l.push(line),
            None => self.lines.push((ns.to_string(), vec![line])),
        }
    }

    /// A veth pair created in `a_ns` (`a_if`) with its peer `b_if` in `b_ns`, both up.
    pub(crate) fn veth(&mut self, a_ns: &str, a_if: &str, b_ns: &str, b_if: &str) {
        self.ip(
            a_ns,
            format!("link add {a_if} type veth peer name {b_if} netns {b_ns}"),
        );
        self.ip(a_ns, format!("link set dev {a_if} up"));
        self.ip(b_ns, format!("link set dev {b_if} up"));
    }

    pub(crate) fn run(self) -> Result<()> {
        for (ns, lines) in self.lines {
            run_input(
                &["ip", "-n", &ns, "-batch", "-"],
                &(lines.join("\n") + "\n"),
            )?;
        }
        Ok(())
    }
}

/// Forwarding on, and `nft` (a ruleset, as `nft -f` reads it) in namespace `ns`: the
/// sysctls written from a thread inside it, nft started from that thread (one process).
fn router(ns: &str, nft: &'static str) -> Result<()> {
    in_netns(ns, move || -> Result<()> {
        fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
        fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1")?;
        if !nft.is_empty() {
            run_input(&["nft", "-f", "-"], nft)?;
        }
        Ok(())
    })?
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
    pub(crate) namespaces: Vec<String>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) servers: Vec<JoinHandle<()>>,
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

    pub(crate) fn add_ns(&mut self, b: &mut Batch, short: &str) -> Result<String> {
        let name = self.ns(short);
        run(&["ip", "netns", "add", &name])?;
        self.namespaces.push(name.clone());
        b.ip(&name, "link set lo up");
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
        let mut b = Batch::default();
        b.veth(a_ns, a_if, b_ns, b_if);
        b.run()
    }

    /// Interface `if_name` of `ns_short` on `bridge` of the fabric (as `fab_if` there).
    pub(crate) fn bridge_port(
        &self,
        b: &mut Batch,
        ns_short: &str,
        if_name: &str,
        fab_if: &str,
        bridge: &str,
    ) {
        let fab = self.ns("fabric");
        b.veth(&fab, fab_if, &self.ns(ns_short), if_name);
        b.ip(&fab, format!("link set dev {fab_if} master {bridge}"));
    }

    fn build(&mut self) -> Result<()> {
        let mut b = Batch::default();
        let fab = self.add_ns(&mut b, "fabric")?;
        for br in ["br-vpc", "br-up"] {
            b.ip(&fab, format!("link add {br} type bridge mcast_snooping 0"));
            b.ip(&fab, format!("link set dev {br} up"));
        }
        // The internet: a router for the gateways' uplinks and the echo server.
        let inet = self.add_ns(&mut b, "inet")?;
        self.bridge_port(&mut b, "inet", "up0", "inet-up", "br-up");
        b.ip(&inet, "addr add 203.0.113.254/24 dev up0");
        b.ip(&inet, "addr add 2001:db8:113::fe/64 dev up0 nodad");
        // Server addresses on loopback (the lab kernel may lack the dummy driver).
        b.ip(&inet, format!("addr add {ECHO_V4}/32 dev lo"));
        b.ip(&inet, format!("addr add {ECHO_V6}/128 dev lo nodad"));
        let mut gateways = Vec::new();
        for i in 1..=self.spec.gateways {
            let gw = self.add_ns(&mut b, &format!("gw{i}"))?;
            let short = format!("gw{i}");
            self.bridge_port(&mut b, &short, "vpc", &format!("gw{i}-vpc"), "br-vpc");
            self.bridge_port(&mut b, &short, "uplink", &format!("gw{i}-up"), "br-up");
            b.ip(&gw, format!("addr add {}/20 dev vpc", gateway_v4(i)));
            b.ip(&gw, format!("addr add {}/64 dev vpc nodad", gateway_v6(i)));
            b.ip(&gw, format!("addr add {}/24 dev uplink", public_v4(i)));
            b.ip(
                &gw,
                format!("addr add {}/64 dev uplink nodad", public_v6(i)),
            );
            b.ip(&gw, "route add default via 203.0.113.254");
            b.ip(&gw, "route add ::/0 via 2001:db8:113::fe");
            gateways.push(gw);
        }
        for n in self.spec.nodes.clone() {
            self.add_node_ns(&mut b, &n)?;
        }
        if self.spec.public {
            self.build_public(&mut b)?;
        }
        b.run()?;
        for gw in &gateways {
            router(
                gw,
                "table inet nat {\n  chain post {\n    type nat hook postrouting priority 100;\n    oifname \"uplink\" masquerade\n  }\n}\n",
            )?;
        }
        if self.spec.public {
            router(&self.ns("isp"), "")?;
        }
        self.start_echo_server("inet", ECHO_PORT)?;
        self.start_hold_server()?;
        if self.spec.public {
            self.start_echo_server("isp", ECHO_PORT)?;
            for n in self.spec.nodes.clone() {
                // The inbound server on the node's public addresses.
                self.start_echo_server(&format!("node-{}", n.name), INBOUND_PORT)?;
            }
        }
        Ok(())
    }

    /// The public side (see [`LabSpec::public`]).
    fn build_public(&mut self, b: &mut Batch) -> Result<()> {
        let fab = self.ns("fabric");
        b.ip(&fab, "link add br-pub type bridge mcast_snooping 0");
        b.ip(&fab, "link set dev br-pub up");
        let isp = self.add_ns(b, "isp")?;
        self.bridge_port(b, "isp", "pub0", "isp-pub", "br-pub");
        self.bridge_port(b, "isp", "up0", "isp-up", "br-up");
        b.ip(&isp, format!("addr add {ISP_V4}/24 dev pub0"));
        b.ip(&isp, format!("addr add {ISP_V6}/64 dev pub0 nodad"));
        b.ip(&isp, "addr add 203.0.113.253/24 dev up0");
        b.ip(&isp, "addr add 2001:db8:113::fd/64 dev up0 nodad");
        b.ip(&isp, "route add default via 203.0.113.254");
        b.ip(&isp, "route add ::/0 via 2001:db8:113::fe");
        for a in [METADATA_V4, NAMESERVER_V4, PRIVATE_SERVICE_V4] {
            b.ip(&isp, format!("addr add {a}/32 dev lo"));
        }
        b.ip(&isp, format!("addr add {NAMESERVER_V6}/128 dev lo nodad"));
        let inet = self.ns("inet");
        b.ip(&inet, "route add 192.0.2.0/24 via 203.0.113.253");
        b.ip(&inet, "route add 2001:db8:2::/64 via 2001:db8:113::fd");
        for n in self.spec.nodes.clone() {
            self.add_node_public(b, &n);
        }
        Ok(())
    }

    fn add_node_public(&mut self, b: &mut Batch, n: &NodeSpec) {
        let short = format!("node-{}", n.name);
        let ns = self.ns(&short);
        self.bridge_port(b, &short, "eth0", &format!("{}-pub", n.name), "br-pub");
        b.ip(
            &ns,
            format!("addr add {}/24 dev eth0", node_public_v4(n.host)),
        );
        b.ip(
            &ns,
            format!("addr add {}/64 dev eth0 nodad", node_public_v6(n.host)),
        );
        b.ip(
            &ns,
            format!("route add default via {ISP_V4} dev eth0 proto static"),
        );
        b.ip(
            &ns,
            format!("route add ::/0 via {ISP_V6} dev eth0 proto static"),
        );
    }

    fn add_node_ns(&mut self, b: &mut Batch, n: &NodeSpec) -> Result<()> {
        let short = format!("node-{}", n.name);
        let ns = self.add_ns(b, &short)?;
        self.bridge_port(b, &short, "eth1", &format!("{}-vpc", n.name), "br-vpc");
        b.ip(&ns, format!("addr add 10.114.0.{}/20 dev eth1", n.host));
        b.ip(
            &ns,
            format!("addr add fd00:114::{:x}/64 dev eth1 nodad", n.host),
        );
        Ok(())
    }

    /// A pod behind node `node`: namespace `pod-<node>` on a veth (`eth0` in the pod,
    /// `pod0` on the node), 10.244.H.2/24 and fd00:244:H::2/64 with the node (.1, ::1) as
    /// default gateway; the node forwards and masquerades the pod's traffic out of `eth1`
    /// to its own address, as a CNI does for egress. Returns the pod's namespace.
    pub fn add_pod(&mut self, node: &str) -> Result<String> {
        let host = self.node_host(node)?;
        let node_ns = self.node_ns(node);
        let mut b = Batch::default();
        // The node's lines first: the veth is created there.
        b.veth(&node_ns, "pod0", &self.ns(&format!("pod-{node}")), "eth0");
        let pod = self.add_ns(&mut b, &format!("pod-{node}"))?;
        b.ip(&pod, format!("addr add 10.244.{host}.2/24 dev eth0"));
        b.ip(
            &pod,
            format!("addr add fd00:244:{host:x}::2/64 dev eth0 nodad"),
        );
        b.ip(&pod, format!("route add default via 10.244.{host}.1"));
        b.ip(&pod, format!("route add ::/0 via fd00:244:{host:x}::1"));
        b.ip(&node_ns, format!("addr add 10.244.{host}.1/24 dev pod0"));
        b.ip(
            &node_ns,
            format!("addr add fd00:244:{host:x}::1/64 dev pod0 nodad"),
        );
        b.run()?;
        router(
            &node_ns,
            "table inet podnat {\n  chain post {\n    type nat hook postrouting priority 100;\n    iifname \"pod0\" oifname \"eth1\" masquerade\n  }\n}\n",
        )?;
        Ok(pod)
    }

    pub(crate) fn node_host(&self, node: &str) -> Result<u8> {
        Ok(self
            .spec
            .nodes
            .iter()
            .find(|n| n.name == node)
            .ok_or_else(|| anyhow!("no node {node}"))?
            .host)
    }

    /// Adds a node namespace after the lab was built.
    pub fn add_node(&mut self, n: NodeSpec) -> Result<()> {
        let mut b = Batch::default();
        self.add_node_ns(&mut b, &n)?;
        b.run()?;
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
        // One process for every namespace (-force: on past one that is already gone).
        let del: String = self
            .namespaces
            .iter()
            .rev()
            .map(|ns| format!("netns del {ns}\n"))
            .collect();
        let _ = run_input(&["ip", "-force", "-batch", "-"], &del);
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
