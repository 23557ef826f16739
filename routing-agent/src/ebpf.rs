//! Loads the TC programs, attaches them to the interfaces that face gateways, and pins
//! their maps under the pin directory for bpftool and `routing-agent status`.
//!
//! Attachment goes through aya: TCX links on kernels ≥ 6.6, clsact + cls_bpf through
//! netlink before that (Debian 12: 6.1). The agent only ever detaches links it created.
use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context as _;
use aya::programs::{SchedClassifier, TcAttachType, tc};
use aya::util::KernelVersion;
use routing_agent_common::names;
use tracing::{info, warn};

struct Attached {
    name: String,
    egress: aya::programs::tc::SchedClassifierLinkId,
    ingress: aya::programs::tc::SchedClassifierLinkId,
}

pub struct Programs {
    bpf: aya::Ebpf,
    attached: BTreeMap<u32, Attached>,
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

impl Programs {
    /// Loads the object and pins its maps under `pin_dir` (created if missing).
    pub fn load(pin_dir: &Path) -> anyhow::Result<Self> {
        let mut bpf = aya::Ebpf::load(OBJECT).context("loading the eBPF object")?;
        for name in [names::PROG_EGRESS, names::PROG_INGRESS] {
            let prog: &mut SchedClassifier = bpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the object"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("the verifier rejected {name}"))?;
        }
        std::fs::create_dir_all(pin_dir).with_context(|| {
            format!(
                "creating {} (is bpffs mounted on /sys/fs/bpf?)",
                pin_dir.display()
            )
        })?;
        let map_path = pin_dir.join(names::MAP_TRAFFIC);
        if map_path.exists() {
            // Counters restart from zero for now; reusing pinned state comes with the
            // gateway-health maps.
            std::fs::remove_file(&map_path)?;
        }
        bpf.map(names::MAP_TRAFFIC)
            .context("map missing from the object")?
            .pin(&map_path)
            .with_context(|| format!("pinning {}", map_path.display()))?;
        info!(pin = %map_path.display(), "eBPF programs loaded");
        Ok(Programs {
            bpf,
            attached: BTreeMap::new(),
        })
    }

    fn prog(&mut self, name: &str) -> &mut SchedClassifier {
        self.bpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .expect("loaded in Programs::load")
    }

    /// Attaches to exactly `ifindexes` (attaching new ones, detaching the rest).
    pub fn sync(&mut self, ifindexes: &std::collections::BTreeSet<u32>) {
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
                    info!(interface = %name, "TC programs attached (egress, ingress)");
                    self.attached.insert(i, a);
                }
                Err(e) => {
                    warn!(interface = %name, error = format!("{e:#}"), "attaching TC programs failed")
                }
            }
        }
    }

    fn attach(&mut self, name: &str) -> anyhow::Result<Attached> {
        let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
        if !tcx && let Err(e) = tc::qdisc_add_clsact(name) {
            // "Exclusivity flag on" / EEXIST: a clsact qdisc is already there; share it.
            let exists = matches!(e, tc::TcError::AlreadyAttached)
                || e.to_string().contains("xclusiv")
                || e.to_string().contains("exists");
            if !exists {
                return Err(e).context("adding the clsact qdisc");
            }
        }
        let egress = self
            .prog(names::PROG_EGRESS)
            .attach(name, TcAttachType::Egress)?;
        let ingress = match self
            .prog(names::PROG_INGRESS)
            .attach(name, TcAttachType::Ingress)
        {
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
    pub fn attached(&self) -> Vec<String> {
        self.attached.values().map(|a| a.name.clone()).collect()
    }
}
