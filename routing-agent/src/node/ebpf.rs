//! Loads the TC programs, attaches them to the interfaces that face gateways, and keeps
//! their maps (pinned under the pin directory) in step with the gateways.
//!
//! Attachment goes through aya: TCX links on kernels ≥ 6.6, clsact + cls_bpf through
//! netlink before that (Debian 12: 6.1), or as forced by `--tc-attach`. The agent only ever
//! detaches what it created: its TCX links, and cls_bpf filters carrying its program
//! names. A clsact qdisc that is already there is shared, never replaced.
//!
//! Maps are pinned by name under the pin directory and reused by the next agent (counters,
//! pending handshakes, slots and health verdicts survive a restart). A pinned map whose
//! layout differs from this build's is replaced, with a warning.
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use aya::maps::{Array, HashMap, MapData, MapInfo, PerCpuArray, PerCpuValues};
use aya::programs::tc::{NlOptions, SchedClassifierLinkId, TcAttachOptions};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType, tc};
use aya::util::KernelVersion;
use routing_agent_common::{
    FlowKey, FlowState, GW_UNUSED, GatewayInfo, GatewaySlot, GatewayStats, MAX_FLOWS, MAX_GATEWAYS,
    MAX_NEIGHBOURS, NeighKey, ProbeTarget, names,
};
use tracing::{info, warn};

/// How the TC programs are attached (`--tc-attach`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// TCX on kernels ≥ 6.6, netlink (clsact + cls_bpf) before.
    Auto,
    Tcx,
    Netlink,
}

struct Slot {
    index: u32,
    info: GatewayInfo,
}

struct Attached {
    name: String,
    egress: SchedClassifierLinkId,
    ingress: SchedClassifierLinkId,
}

pub struct Programs {
    egress: SchedClassifier,
    ingress: SchedClassifier,
    /// `ra_uplink`.
    uplink_prog: SchedClassifier,
    tcx: bool,
    attached: BTreeMap<u32, Attached>,
    /// The uplink guard (`ra_uplink`, egress only) and the interface it is on.
    uplink: Option<(u32, String, SchedClassifierLinkId)>,
    uplink_refused: PerCpuArray<MapData, u64>,
    neigh: HashMap<MapData, NeighKey, GatewaySlot>,
    stats: PerCpuArray<MapData, GatewayStats>,
    gateways: Array<MapData, GatewayInfo>,
    targets: PerCpuArray<MapData, ProbeTarget>,
    /// Each tracked gateway's slot and the record last written there. The agent is the
    /// only writer of `RA_GATEWAYS` and `RA_NEIGH`, so what it wrote is what they hold:
    /// the health tick diffs against these copies instead of reading the maps back.
    slots: BTreeMap<IpAddr, Slot>,
    /// `RA_NEIGH` as last written.
    neigh_written: BTreeMap<NeighKey, u32>,
    /// Record gateway MACs in `RA_GATEWAYS` (the TC program pins only to a known MAC).
    pinning: bool,
}

/// The object built by `build.rs` (aya-build).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/routing-agent"));

pub fn ifname(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    let s = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(s.to_string_lossy().into_owned())
}

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns()`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// (key size, value size, max entries) of each map in this build.
fn layout(name: &str) -> (usize, usize, u32) {
    use std::mem::size_of;
    match name {
        names::MAP_NEIGH => (
            size_of::<NeighKey>(),
            size_of::<GatewaySlot>(),
            MAX_NEIGHBOURS,
        ),
        names::MAP_GW_STATS => (4, size_of::<GatewayStats>(), MAX_GATEWAYS),
        names::MAP_FLOWS => (size_of::<FlowKey>(), size_of::<FlowState>(), MAX_FLOWS),
        names::MAP_GATEWAYS => (4, size_of::<GatewayInfo>(), MAX_GATEWAYS),
        names::MAP_UPLINK => (4, size_of::<u64>(), 1),
        names::MAP_TARGETS => (4, size_of::<ProbeTarget>(), MAX_GATEWAYS),
        _ => unreachable!("unknown map {name}"),
    }
}

/// The health part of a `RA_GATEWAYS` record (times in ms since the Unix epoch).
#[derive(Clone, Copy, Debug, Default)]
pub struct HealthRecord {
    pub state: u32,
    pub penalty: u32,
    pub down_since_ms: u64,
    pub changed_ms: u64,
    pub next_probe_ms: u64,
}

/// A `RA_GATEWAYS` record (IPv4 addresses in the first 4 bytes).
fn gateway_info(a: IpAddr, state: u32, penalty: u32, down_since_ms: u64) -> GatewayInfo {
    let mut addr = [0u8; 16];
    let family = match a {
        IpAddr::V4(v4) => {
            addr[..4].copy_from_slice(&v4.octets());
            4
        }
        IpAddr::V6(v6) => {
            addr = v6.octets();
            6
        }
    };
    GatewayInfo {
        addr,
        family,
        state,
        penalty,
        ifindex: 0,
        down_since_ms,
        mac: [0; 6],
        _pad: [0; 2],
        changed_ms: 0,
        next_probe_ms: 0,
    }
}

fn addr_of(info: &GatewayInfo) -> Option<IpAddr> {
    match info.family {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(&info.addr[..4]).ok()?)),
        6 => Some(IpAddr::from(info.addr)),
        _ => None,
    }
}

/// Removes the agent's cls_bpf filters from every interface of this namespace (they
/// outlive the process, unlike TCX links). Returns how many interfaces had some.
pub fn detach_netlink_filters() -> usize {
    let mut n = 0;
    for (_, name) in interfaces() {
        let mut any = false;
        for (t, prog) in [
            (TcAttachType::Egress, names::PROG_EGRESS),
            (TcAttachType::Ingress, names::PROG_INGRESS),
            (TcAttachType::Egress, names::PROG_UPLINK),
        ] {
            any |= tc::qdisc_detach_program(&name, t, prog).is_ok();
        }
        n += usize::from(any);
    }
    n
}

/// The agent's TCX attachments in this network namespace (interface, direction), found by
/// querying every interface; works from any process (`routing-agent status`).
pub fn tcx_attachments() -> Vec<(String, &'static str)> {
    let mut out = Vec::new();
    for (_, name) in interfaces() {
        for (t, dir, prog) in [
            (TcAttachType::Egress, "egress", names::PROG_EGRESS),
            (TcAttachType::Ingress, "ingress", names::PROG_INGRESS),
            (
                TcAttachType::Egress,
                "egress uplink-guard",
                names::PROG_UPLINK,
            ),
        ] {
            let Ok((_, progs)) = aya::programs::SchedClassifier::query_tcx(&name, t) else {
                continue;
            };
            if progs.iter().any(|p| p.name_as_str() == Some(prog)) {
                out.push((name.clone(), dir));
            }
        }
    }
    out
}

/// The agent's cls_bpf filters (the netlink attach mode: kernels before 6.6, or
/// `--tc-attach netlink`) in this network namespace: (interface, direction, how many of
/// ours are there). Found by dumping each interface's clsact filters.
pub async fn netlink_attachments(handle: &rtnetlink::Handle) -> Vec<(String, &'static str, usize)> {
    use futures::TryStreamExt as _;
    use netlink_packet_route::tc::{TcAttribute, TcFilterBpfOption, TcOption};
    let mut out = Vec::new();
    for (index, name) in interfaces() {
        for (dir, prog) in [
            ("egress", names::PROG_EGRESS),
            ("ingress", names::PROG_INGRESS),
            ("egress uplink-guard", names::PROG_UPLINK),
        ] {
            let mut h = handle.traffic_filter(index as i32);
            let req = match dir {
                "ingress" => h.get().ingress(),
                _ => h.get().egress(),
            };
            let mut stream = req.execute();
            let mut n = 0;
            while let Ok(Some(m)) = stream.try_next().await {
                let ours = m.attributes.iter().any(|a| match a {
                    TcAttribute::Options(opts) => opts.iter().any(|o| {
                        matches!(o, TcOption::Bpf(TcFilterBpfOption::ProgName(p))
                            if p.split(':').next() == Some(prog))
                    }),
                    _ => false,
                });
                n += usize::from(ours);
            }
            if n > 0 {
                out.push((name.clone(), dir, n));
            }
        }
    }
    out
}

fn interfaces() -> Vec<(u32, String)> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns an array terminated by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return out;
        }
        let mut p = list;
        while (*p).if_index != 0 {
            let name = std::ffi::CStr::from_ptr((*p).if_name).to_string_lossy();
            out.push(((*p).if_index, name.into_owned()));
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}

/// Removes the pinned maps, and programs a loader left for an agent that never took them
/// (and the directory when it is left empty).
pub fn remove_pins(pin_dir: &Path) -> std::io::Result<usize> {
    let mut n = 0;
    let paths = names::MAPS
        .iter()
        .map(|m| pin_dir.join(m))
        .chain(PROGRAMS.iter().map(|p| handoff_path(pin_dir, p)));
    for path in paths {
        match std::fs::remove_file(path) {
            Ok(()) => n += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    let _ = std::fs::remove_dir(pin_dir);
    Ok(n)
}

/// The programs, in the order the loader hands them over.
const PROGRAMS: [&str; 3] = [names::PROG_EGRESS, names::PROG_INGRESS, names::PROG_UPLINK];

/// Where the loader process leaves a loaded program for the agent, which takes it and
/// removes the pin at once (see [`load_for_handoff`]).
fn handoff_path(pin_dir: &Path, prog: &str) -> PathBuf {
    pin_dir.join(format!("handoff-{prog}"))
}

/// The loader's work (`routing-agent ebpf-load`, a short-lived process the agent starts):
/// loads the object, reusing the maps pinned under `pin_dir` (created if missing, replaced
/// when their layout differs), and pins the three loaded programs there for the agent.
///
/// Why a process of its own: aya 0.14's `EbpfLoader::new()` reads and parses the kernel's
/// BTF (`/sys/kernel/btf/vmlinux`) whatever `.btf(None)` says afterwards, about 35 MiB at
/// peak for an object that needs none (it has no CO-RE relocations). In a process that
/// exits, that memory is never the agent's: the agent only opens the pins.
pub fn load_for_handoff(pin_dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(pin_dir).with_context(|| {
        format!(
            "creating {} (is bpffs mounted on /sys/fs/bpf?)",
            pin_dir.display()
        )
    })?;
    let mut loader = aya::EbpfLoader::new();
    for name in names::MAPS {
        let path = pin_dir.join(name);
        if let Ok(info) = MapInfo::from_pin(&path) {
            let (k, v, max) = layout(name);
            let have = (
                info.key_size() as usize,
                info.value_size() as usize,
                info.max_entries(),
            );
            if have != (k, v, max) {
                warn!(map = name, ?have, want = ?(k, v, max),
                    "pinned map has another layout (older agent?); starting it afresh");
                std::fs::remove_file(&path)?;
            } else {
                info!(map = name, "reusing pinned map");
            }
        }
        loader.map_pin_path(name, path);
    }
    let mut bpf = loader.load(OBJECT).context("loading the eBPF object")?;
    for name in PROGRAMS {
        let prog: &mut SchedClassifier = bpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the object"))?
            .try_into()?;
        prog.load()
            .with_context(|| format!("the verifier rejected {name}"))?;
        let path = handoff_path(pin_dir, name);
        // One a loader before left (its agent died before taking it): replaced.
        let _ = std::fs::remove_file(&path);
        prog.pin(&path)
            .with_context(|| format!("pinning {name} at {}", path.display()))?;
    }
    Ok(())
}

impl Programs {
    /// Loads the programs in a loader process (`routing-agent ebpf-load LOADER_ARGS`, see
    /// [`load_for_handoff`]) and takes them over with the maps, all from their pins under
    /// `pin_dir`.
    pub fn load(
        pin_dir: &Path,
        mode: AttachMode,
        pinning: bool,
        loader_args: &[String],
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding the agent's own executable")?;
        let status = std::process::Command::new(&exe)
            .arg("ebpf-load")
            .arg("--bpf-pin-dir")
            .arg(pin_dir)
            .args(loader_args)
            .stdin(std::process::Stdio::null())
            .status()
            .with_context(|| format!("starting the eBPF loader {}", exe.display()))?;
        if !status.success() {
            anyhow::bail!(
                "the eBPF loader (`routing-agent ebpf-load`) failed ({status}); its error is logged above"
            );
        }
        let mut progs = Vec::new();
        for name in PROGRAMS {
            let path = handoff_path(pin_dir, name);
            let prog = SchedClassifier::from_pin(&path)
                .with_context(|| format!("taking {name} from {}", path.display()))?;
            // The agent holds it now; the pin was only the way over.
            let _ = std::fs::remove_file(&path);
            progs.push(prog);
        }
        let [egress, ingress, uplink_prog] = <[SchedClassifier; 3]>::try_from(progs)
            .map_err(|_| anyhow::anyhow!("three programs"))?;
        let take = |name: &str| -> anyhow::Result<aya::maps::Map> {
            let path = pin_dir.join(name);
            let data = MapData::from_pin(&path)
                .with_context(|| format!("opening map {name} at {}", path.display()))?;
            Ok(aya::maps::Map::from_map_data(data)?)
        };
        let neigh = HashMap::try_from(take(names::MAP_NEIGH)?)?;
        let stats = PerCpuArray::try_from(take(names::MAP_GW_STATS)?)?;
        let gateways: Array<MapData, GatewayInfo> = Array::try_from(take(names::MAP_GATEWAYS)?)?;
        let uplink_refused = PerCpuArray::try_from(take(names::MAP_UPLINK)?)?;
        let targets = PerCpuArray::try_from(take(names::MAP_TARGETS)?)?;
        // What an earlier agent left in the pinned maps, read once.
        let mut slots = BTreeMap::new();
        for index in 0..MAX_GATEWAYS {
            if let Ok(info) = gateways.get(&index, 0)
                && let Some(a) = addr_of(&info)
            {
                slots.insert(a, Slot { index, info });
            }
        }
        let neigh_written = neigh
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v): (NeighKey, GatewaySlot)| (k, v.slot))
            .collect();
        let tcx = match mode {
            AttachMode::Tcx => true,
            AttachMode::Netlink => false,
            AttachMode::Auto => {
                KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
            }
        };
        if !tcx {
            // Filters of an earlier agent are still attached (cls_bpf outlives its
            // process): remove them so that each interface carries exactly ours.
            let n = detach_netlink_filters();
            if n > 0 {
                info!(
                    interfaces = n,
                    "removed the cls_bpf filters of an earlier agent"
                );
            }
        }
        info!(pin_dir = %pin_dir.display(), attach = if tcx { "tcx" } else { "netlink" },
            restored_slots = slots.len(), flow_pinning = pinning, "eBPF programs loaded");
        Ok(Programs {
            egress,
            ingress,
            uplink_prog,
            tcx,
            attached: BTreeMap::new(),
            uplink: None,
            uplink_refused,
            neigh,
            stats,
            gateways,
            targets,
            slots,
            neigh_written,
            pinning,
        })
    }

    fn prog(&mut self, name: &str) -> &mut SchedClassifier {
        match name {
            names::PROG_EGRESS => &mut self.egress,
            names::PROG_INGRESS => &mut self.ingress,
            names::PROG_UPLINK => &mut self.uplink_prog,
            _ => unreachable!("no program {name}"),
        }
    }

    /// Attaches to exactly `ifindexes` (attaching new ones, detaching the rest).
    pub fn sync(&mut self, ifindexes: &BTreeSet<u32>) {
        let stale: Vec<u32> = self
            .attached
            .keys()
            .filter(|i| !ifindexes.contains(i))
            .copied()
            .collect();
        for i in stale {
            let a = self.attached.remove(&i).expect("present");
            // The interface may be gone already (then its attachments went with it).
            let _ = self.prog(names::PROG_EGRESS).detach(a.egress);
            let _ = self.prog(names::PROG_INGRESS).detach(a.ingress);
            info!(interface = %a.name, "TC programs detached");
        }
        for &i in ifindexes {
            if self.attached.contains_key(&i) {
                continue;
            }
            let Some(name) = ifname(i) else { continue };
            match self.attach(&name) {
                Ok(a) => {
                    info!(interface = %name, tcx = self.tcx, "TC programs attached (egress, ingress)");
                    self.attached.insert(i, a);
                }
                Err(e) => {
                    warn!(interface = %name, error = format!("{e:#}"), "attaching TC programs failed")
                }
            }
        }
    }

    fn attach(&mut self, name: &str) -> anyhow::Result<Attached> {
        let options = || {
            if self.tcx {
                TcAttachOptions::TcxOrder(LinkOrder::default())
            } else {
                TcAttachOptions::Netlink(NlOptions::default())
            }
        };
        if !self.tcx
            && let Err(e) = tc::qdisc_add_clsact(name)
        {
            // EEXIST: a clsact qdisc is already there (ours from before, or another
            // owner's); share it, never replace it.
            let exists = matches!(&e, tc::TcError::NetlinkError(n) if n.raw_os_error() == Some(libc::EEXIST))
                || e.to_string().contains("exists");
            if !exists {
                return Err(e).context("adding the clsact qdisc");
            }
        }
        let (eo, io) = (options(), options());
        let egress =
            self.prog(names::PROG_EGRESS)
                .attach_with_options(name, TcAttachType::Egress, eo)?;
        let ingress = match self.prog(names::PROG_INGRESS).attach_with_options(
            name,
            TcAttachType::Ingress,
            io,
        ) {
            Ok(l) => l,
            Err(e) => {
                let _ = self.prog(names::PROG_EGRESS).detach(egress);
                return Err(e.into());
            }
        };
        Ok(Attached {
            name: name.to_owned(),
            egress,
            ingress,
        })
    }

    /// Interface names with attachments, for logs and status.
    /// Whether every interface of `ifindexes` has both programs attached.
    pub fn covers(&self, ifindexes: &BTreeSet<u32>) -> bool {
        ifindexes.iter().all(|i| self.attached.contains_key(i))
    }

    /// Puts the uplink guard on exactly `ifindex` (egress), or nowhere.
    pub fn guard_uplink(&mut self, ifindex: Option<u32>) {
        if self.uplink.as_ref().map(|u| u.0) == ifindex {
            return;
        }
        if let Some((_, name, link)) = self.uplink.take() {
            let _ = self.prog(names::PROG_UPLINK).detach(link);
            info!(interface = %name, "uplink guard detached");
        }
        let Some(i) = ifindex else { return };
        let Some(name) = ifname(i) else { return };
        let forwarding =
            std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{name}/forwarding"));
        if forwarding.is_ok_and(|f| f.trim() == "0") {
            warn!(interface = %name,
                "IPv6 forwarding is off on the public interface: the uplink guard cannot look routes up there and lets everything pass");
        }
        let options = if self.tcx {
            TcAttachOptions::TcxOrder(LinkOrder::default())
        } else {
            if let Err(e) = tc::qdisc_add_clsact(&name) {
                let exists = matches!(&e, tc::TcError::NetlinkError(n) if n.raw_os_error() == Some(libc::EEXIST))
                    || e.to_string().contains("exists");
                if !exists {
                    warn!(interface = %name, error = %e, "adding the clsact qdisc for the uplink guard failed");
                    return;
                }
            }
            TcAttachOptions::Netlink(NlOptions::default())
        };
        match self.prog(names::PROG_UPLINK).attach_with_options(
            &name,
            TcAttachType::Egress,
            options,
        ) {
            Ok(link) => {
                info!(interface = %name, tcx = self.tcx,
                    "uplink guard attached (egress): IPv6 packets the main table refuses never leave here");
                self.uplink = Some((i, name, link));
            }
            Err(e) => warn!(interface = %name, error = %e, "attaching the uplink guard failed"),
        }
    }

    /// Packets the uplink guard refused so far (summed over the CPUs).
    pub fn uplink_refused(&self) -> u64 {
        self.uplink_refused
            .get(&0, 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    }

    pub fn attached(&self) -> Vec<String> {
        self.attached.values().map(|a| a.name.clone()).collect()
    }

    /// Writes `info` into `index` of `RA_GATEWAYS` unless that is what it holds already.
    /// Returns whether it wrote.
    fn write_slot(&mut self, gw: IpAddr, info: GatewayInfo) -> bool {
        let Some(s) = self.slots.get_mut(&gw) else {
            return false;
        };
        if s.info == info {
            return false;
        }
        if let Err(e) = self.gateways.set(s.index, info, 0) {
            warn!(gateway = %gw, error = %e, "cannot update RA_GATEWAYS");
            return false;
        }
        s.info = info;
        true
    }

    /// Gives every gateway in `gateways` a slot (keeping existing ones) and frees the slots
    /// of the others. A freed slot's counters are zeroed before it is reused.
    pub fn set_gateways(&mut self, gateways: &BTreeSet<IpAddr>) {
        let gone: Vec<IpAddr> = self
            .slots
            .keys()
            .filter(|g| !gateways.contains(g))
            .copied()
            .collect();
        for g in gone {
            let slot = self.slots.remove(&g).expect("present");
            let _ = self.gateways.set(slot.index, GatewayInfo::default(), 0);
        }
        for &g in gateways {
            if self.slots.contains_key(&g) {
                continue;
            }
            let used: BTreeSet<u32> = self.slots.values().map(|s| s.index).collect();
            let Some(index) = (0..MAX_GATEWAYS).find(|s| !used.contains(s)) else {
                warn!(gateway = %g, "more than {MAX_GATEWAYS} gateways: this one is not tracked");
                continue;
            };
            if let Ok(n) = aya::util::nr_cpus()
                && let Ok(zero) = PerCpuValues::try_from(vec![GatewayStats::default(); n])
            {
                let _ = self.stats.set(index, zero, 0);
            }
            let info = gateway_info(g, routing_agent_common::GW_UP, 0, 0);
            if let Err(e) = self.gateways.set(index, info, 0) {
                warn!(gateway = %g, error = %e, "cannot record the gateway's slot");
                continue;
            }
            self.slots.insert(g, Slot { index, info });
        }
    }

    /// The health verdicts recorded by an earlier agent (slot table), for a restart.
    pub fn recorded(&self) -> Vec<(IpAddr, GatewayInfo)> {
        self.slots
            .iter()
            .map(|(a, s)| (*a, s.info))
            .filter(|(_, i)| i.state != GW_UNUSED)
            .collect()
    }

    /// Records a gateway's health in its slot (for bpftool users and the next agent).
    pub fn record_health(&mut self, gw: IpAddr, h: HealthRecord) {
        let Some(s) = self.slots.get(&gw) else {
            return;
        };
        let info = GatewayInfo {
            state: h.state,
            penalty: h.penalty,
            down_since_ms: h.down_since_ms,
            changed_ms: h.changed_ms,
            next_probe_ms: h.next_probe_ms,
            ..s.info
        };
        self.write_slot(gw, info);
    }

    pub fn slot(&self, gw: IpAddr) -> Option<u32> {
        self.slots.get(&gw).map(|s| s.index)
    }

    /// Makes `RA_NEIGH` hold exactly `want` ((interface, MAC) → gateway), translating
    /// gateways to slots, and records each gateway's (interface, MAC) in its `RA_GATEWAYS`
    /// slot for flow pinning. Returns the number of map updates.
    pub fn set_neighbours(&mut self, want: &BTreeMap<(u32, [u8; 6], u8), IpAddr>) -> usize {
        let mut target: BTreeMap<NeighKey, u32> = BTreeMap::new();
        let mut link: BTreeMap<IpAddr, (u32, [u8; 6])> = BTreeMap::new();
        for ((ifindex, mac, family), gw) in want {
            if let Some(s) = self.slots.get(gw) {
                if self.pinning {
                    link.entry(*gw).or_insert((*ifindex, *mac));
                }
                target.insert(
                    NeighKey {
                        ifindex: *ifindex,
                        mac: *mac,
                        family: *family,
                        _pad: 0,
                    },
                    s.index,
                );
            }
        }
        let mut n = 0;
        for k in self
            .neigh_written
            .keys()
            .filter(|k| !target.contains_key(k))
        {
            let _ = self.neigh.remove(k);
            n += 1;
        }
        let mut failed = Vec::new();
        for (k, slot) in &target {
            if self.neigh_written.get(k) != Some(slot) {
                if let Err(e) = self.neigh.insert(k, GatewaySlot { slot: *slot }, 0) {
                    warn!(error = %e, "cannot update RA_NEIGH");
                    // Not recorded as written: tried again at the next tick.
                    failed.push(*k);
                }
                n += 1;
            }
        }
        for k in failed {
            target.remove(&k);
        }
        self.neigh_written = target;
        let gws: Vec<IpAddr> = self.slots.keys().copied().collect();
        for gw in gws {
            let (ifindex, mac) = link.get(&gw).copied().unwrap_or_default();
            let info = GatewayInfo {
                ifindex,
                mac,
                ..self.slots[&gw].info
            };
            n += usize::from(self.write_slot(gw, info));
        }
        n
    }

    /// Per gateway, the latest destination a SYN-ACK answered through it (the freshest of
    /// the CPUs' entries) and how long ago.
    pub fn read_targets(&self) -> BTreeMap<IpAddr, (std::net::SocketAddr, std::time::Duration)> {
        let now = monotonic_ns();
        let mut out = BTreeMap::new();
        for (gw, slot) in &self.slots {
            let Ok(values) = self.targets.get(&slot.index, 0) else {
                continue;
            };
            let Some(t) = values
                .iter()
                .filter(|t| t.family != 0)
                .max_by_key(|t| t.seen_ns)
            else {
                continue;
            };
            let ip = if t.family == 4 {
                IpAddr::from([t.addr[0], t.addr[1], t.addr[2], t.addr[3]])
            } else {
                IpAddr::from(t.addr)
            };
            let age = std::time::Duration::from_nanos(now.saturating_sub(t.seen_ns));
            out.insert(*gw, ((ip, t.port).into(), age));
        }
        out
    }

    /// Counters of every gateway with a slot, summed over the CPUs.
    pub fn read_stats(&self) -> BTreeMap<IpAddr, GatewayStats> {
        let mut out = BTreeMap::new();
        for (gw, slot) in &self.slots {
            let Ok(values) = self.stats.get(&slot.index, 0) else {
                continue;
            };
            let mut s = GatewayStats::default();
            values.iter().for_each(|v| s.add(v));
            out.insert(*gw, s);
        }
        out
    }
}
