//! `cargo xtask vm-test`: the kernel-facing integration tests inside VMs booted with other
//! kernels (Debian 12's 6.1 and 6.12 cloud kernels by default, in turn), the way aya tests
//! itself across kernels; `--kernel host` runs the same suites on the host without a VM.
//!
//! - Each kernel comes from a Debian metapackage (`linux-image-cloud-amd64` for 6.1,
//!   `linux-image-6.12-cloud-amd64`: the version it names), downloaded once into
//!   `VM_CACHE`; `depmod` gives its module dependencies.
//! - The agent and the test binaries are built statically (`+crt-static`, glibc) for
//!   `x86_64-unknown-linux-gnu`, without debuginfo.
//! - The initramfs (newc, written by `busybox cpio`) holds them, the host's `ip`, `tc`,
//!   `nft`, `bpftool`, `nsenter`, `sysctl` and `dash` with their shared libraries, the
//!   modules the lab needs (veth, bridge, clsact, cls_bpf, nf_tables and NAT), busybox for
//!   the rest, and an init that mounts what the lab expects, runs the tests and prints the
//!   verdict on the console.
//! - qemu runs it under TCG (no usable KVM here); its console is streamed.
use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

pub const VM_CACHE: &str = "/var/cache/routing-agent/vm";
use crate::image::TARGET;
const MARKER: &str = "RA-VM-RESULT";

/// Tests the guest skips, with why. They check the agent's own logic, and the kernel
/// objects they make are the ones the other suites check on each kernel; TCG slows them
/// most (tenfold and more), so they would take half the VM budget:
/// - the 10,000-prefix tests measure a linear diff and one group replace per withdrawal
///   (the same strict-checked dumps and group replaces as every suite);
/// - the control-plane test follows the `kubernetes` Endpoints through a real API server
///   (4 min under TCG: kubectl per poll); its protected routes are the ones
///   `a_default_override_moves_egress_and_keeps_the_node_reachable` checks;
/// - the lossy-gateway and allow-list tests judge statistics over a minute or more of
///   traffic (the adaptive threshold); their kernel parts (nft random loss and drops, the
///   TC counters) are what the failover faces check on each kernel.
///
/// They run on the host (`cargo xtask test`); `--filter NAME` does not bring them back
/// into a guest, `--kernel host` runs them.
const HOST_ONLY: &[(&str, &str)] = &[
    ("restart_and_cleanup_at_10000_prefixes", "scale (host tier)"),
    (
        "failover_with_10000_other_prefixes_on_the_same_gateways",
        "scale (host tier)",
    ),
    (
        "the_control_plane_stays_reachable_and_its_endpoints_are_followed",
        "Endpoints following (host tier)",
    ),
    (
        "a_gateway_with_2_percent_loss_is_never_withdrawn",
        "statistics over minutes of traffic (host tier)",
    ),
    (
        "a_destination_refusing_one_gateway_leaves_that_gateway_in",
        "statistics over minutes of traffic (host tier)",
    ),
];

/// Modules the lab needs in the guest (insmod'ed in dependency order).
const MODULES: &[&str] = &[
    "veth",
    "bridge",
    "sch_ingress",
    "cls_bpf",
    "cls_u32",
    "nf_tables",
    "nft_chain_nat",
    "nft_masq",
    "nft_ct",
    "nft_numgen",
    "nft_limit",
    "sch_netem",
    "dummy",
];

/// Host tools copied into the guest, with their libraries (openssl: the lab's control
/// plane makes its keys with it; kube-apiserver, etcd and kubectl are static).
const TOOLS: &[&str] = &[
    "/usr/bin/ip",
    "/usr/sbin/tc",
    "/usr/sbin/nft",
    "/usr/sbin/bpftool",
    "/usr/bin/nsenter",
    "/usr/sbin/sysctl",
    "/usr/bin/dash",
    "/usr/bin/openssl",
];
/// Host files copied into the guest as they are (their targets, for symlinks).
const FILES: &[&str] = &["/usr/lib/ssl/openssl.cnf", "/etc/protocols"];

/// busybox applets linked into the guest (only names no real tool above takes).
const APPLETS: &[&str] = &[
    "cat", "echo", "mount", "mkdir", "insmod", "poweroff", "sleep", "ls", "ln", "rm", "true",
    "false", "sync", "uname", "grep", "head", "tail", "env", "ps", "kill", "timeout",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kernel {
    /// Debian 12's cloud kernel (6.1, the kernel of DOKS nodes), downloaded once.
    #[value(name = "debian-6.1")]
    Debian61,
    /// Debian 12's newer cloud kernel (6.12, from bookworm), downloaded once.
    #[value(name = "debian-6.12")]
    Debian612,
    /// No VM: the same suites on the host's own kernel.
    #[value(name = "host")]
    Host,
}

impl Kernel {
    /// The Debian metapackage naming the kernel package.
    fn metapackage(self) -> &'static str {
        match self {
            Kernel::Debian61 => "linux-image-cloud-amd64",
            Kernel::Debian612 => "linux-image-6.12-cloud-amd64",
            Kernel::Host => unreachable!("the host kernel is not downloaded"),
        }
    }

    /// How qemu runs the guest's two vCPUs. The 6.12 guest panicked in three of four CI
    /// runs under multi-threaded TCG: an `int3` oops in `__netif_receive_skb_core` or
    /// `__dev_queue_xmit` right after tc's static keys were patched, i.e. a vCPU thread
    /// still running qemu's translation of the code from before the patch (cross-modified
    /// text that MTTCG does not always invalidate in time). Single-threaded TCG runs both
    /// vCPUs round-robin in one host thread, where every write to guest text invalidates
    /// its translations before either vCPU runs again; the guest keeps two CPUs (per-CPU
    /// maps, SMP paths). 6.1 patches the same keys without the fault and keeps the faster
    /// multi-threaded mode.
    fn accel(self) -> &'static str {
        match self {
            Kernel::Debian612 => "tcg,thread=single",
            _ => "tcg,thread=multi",
        }
    }
}

fn say(what: &str) {
    eprintln!("[vm-test] {what}");
}

/// The kernel image and its module tree (extracted), downloading the package once.
fn kernel(k: Kernel) -> Result<(PathBuf, PathBuf, String)> {
    kernel_from_lists(k, false)
}

/// [`kernel`]; when the package lists are stale (the metapackage is unknown, or names a
/// version the mirror no longer has), updates them once and tries again.
fn kernel_from_lists(k: Kernel, updated: bool) -> Result<(PathBuf, PathBuf, String)> {
    let meta = k.metapackage();
    let retry = || -> Result<(PathBuf, PathBuf, String)> {
        crate::cmd("apt-get", &["update", "-qq"])?;
        kernel_from_lists(k, true)
    };
    let deps = match crate::output("apt-cache", &["depends", meta]) {
        Ok(d) => d,
        Err(_) if !updated => return retry(),
        Err(e) => return Err(e),
    };
    let pkg = match deps
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .filter(|p| p.starts_with("linux-image-"))
    {
        Some(p) => p.to_string(),
        None if !updated => return retry(),
        None => bail!("{meta} names no kernel package"),
    };
    let release = pkg.trim_start_matches("linux-image-").to_string();
    let cache = Path::new(VM_CACHE);
    let root = cache.join(&release);
    let vmlinuz = root.join(format!("boot/vmlinuz-{release}"));
    if !vmlinuz.exists() {
        std::fs::create_dir_all(cache)?;
        say(&format!("downloading {pkg}"));
        let st = Command::new("apt-get")
            .args(["download", &pkg])
            .current_dir(cache)
            .status()?;
        if !st.success() {
            if !updated {
                return retry();
            }
            bail!("apt-get download {pkg} failed");
        }
        let deb = std::fs::read_dir(cache)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{pkg}_")))
            })
            .context("the downloaded .deb")?;
        let tmp = cache.join(format!("{release}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        crate::output(
            "dpkg",
            &["-x", &deb.display().to_string(), &tmp.display().to_string()],
        )?;
        crate::output("depmod", &["-b", &tmp.display().to_string(), &release])?;
        std::fs::rename(&tmp, &root)?;
    }
    Ok((vmlinuz, root, release))
}

/// Builds the agent and the test binaries statically; returns (agent, tests by name).
fn build(tests: &[&str]) -> Result<(PathBuf, Vec<(String, PathBuf)>)> {
    let env = crate::image::static_env();
    say("building the agent and the tests statically (first time: a full build)");
    let agent = crate::image::static_agent(false)?;
    let mut args = vec![
        "test",
        "-p",
        "routing-agent-tests",
        "--no-run",
        "--target",
        TARGET,
        "--message-format=json",
    ];
    for t in tests {
        args.extend(["--test", t]);
    }
    let o = Command::new("cargo")
        .args(&args)
        .envs(env)
        .current_dir(crate::workspace())
        .stderr(Stdio::inherit())
        .output()?;
    if !o.status.success() {
        bail!("building the static tests failed");
    }
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] == "compiler-artifact"
            && v["target"]["kind"][0] == "test"
            && let Some(exe) = v["executable"].as_str()
        {
            let name = v["target"]["name"].as_str().unwrap_or_default().to_string();
            bins.push((name, PathBuf::from(exe)));
        }
    }
    if bins.len() != tests.len() {
        bail!("expected {} test binaries, found {bins:?}", tests.len());
    }
    Ok((agent, bins))
}

/// The shared libraries of `bin` (ldd).
fn libs(bin: &str) -> Result<Vec<String>> {
    Ok(crate::output("ldd", &[bin])?
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = if let Some((_, r)) = l.split_once("=>") {
                r.split_whitespace().next()?
            } else {
                l.split_whitespace().next()?
            };
            path.starts_with('/').then(|| path.to_string())
        })
        .collect())
}

fn copy_into(root: &Path, src: &Path, dst: &str) -> Result<()> {
    let to = root.join(dst.trim_start_matches('/'));
    std::fs::create_dir_all(to.parent().expect("a parent"))?;
    std::fs::copy(src, &to).with_context(|| format!("copying {}", src.display()))?;
    Ok(())
}

const INIT: &str = r#"#!/bin/sh
# routing-agent VM test init (generated by xtask/src/vm.rs).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
# /tmp stays the initramfs's own (writable): a workspace under /tmp (CI's clone) has its
# deploy/ and fixtures packed there, at the paths the test binaries were built with.
mount -t tmpfs run /run
mount -t bpf bpf /sys/fs/bpf
mkdir -p /run/netns
while read m; do insmod $m || echo "insmod $m failed"; done < /modules.order
ip link set lo up
# Netfilter's hooks stay registered for the whole run (empty chains, policy accept, in the
# guest's own root namespace): otherwise the labs' nft tables (NAT on the gateways, the
# faults) switch the global nf_hooks_needed static keys on and off with every lab, and
# the text poking that does crashed a 6.12 guest under TCG (an int3 Oops in NF_HOOK).
nft -f - <<'NFT' || echo "nft keep-alive table failed"
table inet ra_vm_keep {
  chain f_pre { type filter hook prerouting priority 0; }
  chain f_in { type filter hook input priority 0; }
  chain f_fwd { type filter hook forward priority 0; }
  chain f_out { type filter hook output priority 0; }
  chain f_post { type filter hook postrouting priority 0; }
  chain n_pre { type nat hook prerouting priority -100; }
  chain n_in { type nat hook input priority 100; }
  chain n_out { type nat hook output priority -100; }
  chain n_post { type nat hook postrouting priority 100; }
}
NFT
echo "kernel: $(uname -r)"
export ROUTING_AGENT_BIN=/usr/bin/routing-agent RUST_BACKTRACE=0 NO_COLOR=1
code=0
for t in /tests/*; do
  echo "== $t"
  # --report-time (libtest, unstable: RUSTC_BOOTSTRAP for the test binary alone): each
  # test's time under TCG, what the CI budget is planned from.
  RUSTC_BOOTSTRAP=1 "$t" --test-threads=1 -Zunstable-options --report-time $RA_VM_FILTER || code=1
done
echo "RA-VM-RESULT $code"
sync
poweroff -f
"#;

/// Writes the initramfs; returns its path.
fn initramfs(
    agent: &Path,
    tests: &[(String, PathBuf)],
    modroot: &Path,
    release: &str,
    filter: &str,
) -> Result<PathBuf> {
    let stage = Path::new(VM_CACHE).join("stage");
    let _ = std::fs::remove_dir_all(&stage);
    for d in [
        "proc", "sys", "dev", "tmp", "run", "bin", "sbin", "usr/bin", "usr/sbin", "tests", "etc",
    ] {
        std::fs::create_dir_all(stage.join(d))?;
    }
    copy_into(&stage, agent, "/usr/bin/routing-agent")?;
    for (name, exe) in tests {
        copy_into(&stage, exe, &format!("/tests/{name}"))?;
    }
    let mut libset = BTreeSet::new();
    for t in TOOLS {
        copy_into(&stage, Path::new(t), t)?;
        libset.extend(libs(t)?);
    }
    for f in FILES {
        copy_into(&stage, &std::fs::canonicalize(f)?, f)?;
    }
    let kube = Path::new(crate::setup::KUBE_CACHE);
    for b in ["kube-apiserver", "etcd"] {
        copy_into(&stage, &kube.join(b), &kube.join(b).display().to_string())?;
    }
    let kubectl = std::fs::canonicalize(
        crate::output("sh", &["-c", "command -v kubectl"])
            .context("kubectl on the PATH")?
            .trim(),
    )?;
    copy_into(&stage, &kubectl, "/usr/bin/kubectl")?;
    // The manifests and fixtures the tests apply, where the test binaries (built here)
    // look for them.
    let ws = crate::workspace();
    if ["/run", "/proc", "/sys", "/dev"]
        .iter()
        .any(|m| ws.starts_with(m))
    {
        bail!(
            "the workspace {} is under a directory the guest mounts over; move it",
            ws.display()
        );
    }
    std::fs::create_dir_all(stage.join(ws.join("tests").strip_prefix("/")?))?;
    for dir in ["deploy", "routing-agent/tests/fixtures"] {
        for e in std::fs::read_dir(ws.join(dir))? {
            let f = e?.path();
            if f.extension().is_some_and(|x| x == "yaml") {
                copy_into(&stage, &f, &f.display().to_string())?;
            }
        }
    }
    for l in libset {
        let real = std::fs::canonicalize(&l)?;
        copy_into(&stage, &real, &l)?;
    }
    copy_into(&stage, Path::new("/bin/busybox"), "/bin/busybox")?;
    for a in APPLETS {
        std::os::unix::fs::symlink("/bin/busybox", stage.join("bin").join(a))?;
    }
    std::os::unix::fs::symlink("/usr/bin/dash", stage.join("bin/sh"))?;
    // Modules, in dependency order.
    let mut order: Vec<String> = Vec::new();
    for m in MODULES {
        let deps = crate::output(
            "modprobe",
            &[
                "-d",
                &modroot.display().to_string(),
                "-S",
                release,
                "--show-depends",
                m,
            ],
        )?;
        for line in deps.lines() {
            // `insmod PATH [OPTIONS]`; builtins say `builtin NAME`.
            let Some(rest) = line.strip_prefix("insmod ") else {
                continue;
            };
            let mut words = rest.split_whitespace();
            let Some(path) = words.next() else { continue };
            let options: Vec<&str> = words.collect();
            let rel = path
                .strip_prefix(&modroot.display().to_string())
                .unwrap_or(path);
            if !order
                .iter()
                .any(|o| o.split_whitespace().next() == Some(rel))
            {
                copy_into(&stage, Path::new(path), rel)?;
                order.push(
                    std::iter::once(rel)
                        .chain(options)
                        .collect::<Vec<_>>()
                        .join(" "),
                );
            }
        }
    }
    std::fs::write(stage.join("modules.order"), order.join("\n") + "\n")?;
    let mut args = filter.to_string();
    for (name, why) in HOST_ONLY {
        say(&format!("the guest skips {name}: {why}"));
        args.push_str(&format!(" --skip {name}"));
    }
    let init = INIT.replace("$RA_VM_FILTER", &args);
    std::fs::write(stage.join("init"), init)?;
    std::fs::set_permissions(
        stage.join("init"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    std::fs::write(stage.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n")?;
    std::fs::write(
        stage.join("etc/hosts"),
        "127.0.0.1 localhost\n::1 localhost\n",
    )?;
    // The archive: every path, relative, through busybox cpio.
    let mut names = Vec::new();
    fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) -> std::io::Result<()> {
        for e in std::fs::read_dir(dir)? {
            let p = e?.path();
            out.push(
                p.strip_prefix(base)
                    .expect("under base")
                    .display()
                    .to_string(),
            );
            if p.is_dir() && !p.is_symlink() {
                walk(&p, base, out)?;
            }
        }
        Ok(())
    }
    walk(&stage, &stage, &mut names)?;
    let image = Path::new(VM_CACHE).join("initramfs.cpio");
    let mut child = Command::new("busybox")
        .args(["cpio", "-o", "-H", "newc"])
        .current_dir(&stage)
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&image)?)
        .spawn()?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all((names.join("\n") + "\n").as_bytes())?;
    if !child.wait()?.success() {
        bail!("busybox cpio failed");
    }
    Ok(image)
}

/// Boots and streams the console: the suites' verdict, or that the guest kernel panicked
/// before they gave one.
fn boot(vmlinuz: &Path, image: &Path, accel: &str, limit: Duration) -> Result<Boot> {
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "q35",
            "-accel",
            accel,
            "-cpu",
            "max",
            "-smp",
            "2",
            "-m",
            "4096",
            "-nographic",
            "-no-reboot",
            "-kernel",
        ])
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(image)
        .args(["-append", "console=ttyS0 quiet panic=-1 rdinit=/init"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting qemu")?;
    let started = Instant::now();
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut verdict = None;
    let mut crashed = false;
    loop {
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(line) => {
                println!("{line}");
                if let Some(code) = line.trim().strip_prefix(MARKER) {
                    verdict = Some(code.trim() == "0");
                }
                crashed |= line.contains("Kernel panic - not syncing");
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            bail!("the VM did not finish within {} s", limit.as_secs());
        }
    }
    let _ = child.wait();
    say(&format!(
        "VM finished in {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    match verdict {
        Some(ok) => Ok(Boot::Verdict(ok)),
        None if crashed => Ok(Boot::GuestPanic),
        None => bail!("the VM ended without a verdict (see its console above)"),
    }
}

/// How a guest run ended.
enum Boot {
    /// The suites ran: whether they passed.
    Verdict(bool),
    /// The guest kernel panicked before the suites gave a verdict.
    GuestPanic,
}

/// Runs `tests` (test binaries) on each of `kernels` in turn, the VMs sharing one static
/// build; fails naming every kernel whose suite failed.
pub fn run(kernels: &[Kernel], tests: &[&str], filter: &str) -> Result<()> {
    crate::setup::setup()?;
    // The lab's control plane: the host suites and the guests both start one.
    crate::setup::kube()?;
    if kernels.iter().any(|&k| k != Kernel::Host) {
        crate::setup::apt(&["qemu-system-x86", "busybox-static", "kmod"])?;
    }
    let mut failed = Vec::new();
    let mut built = None;
    for &k in kernels {
        let started = Instant::now();
        let (name, ok) = if k == Kernel::Host {
            let result = run_host(tests, filter);
            if let Err(e) = &result {
                say(&format!("host: {e:#}"));
            }
            ("host".to_string(), result.is_ok())
        } else {
            let (vmlinuz, modroot, release) = kernel(k)?;
            say(&format!("kernel {release}"));
            let (agent, bins) = match &built {
                Some(b) => b,
                None => built.insert(build(tests)?),
            };
            let image = initramfs(agent, bins, &modroot, &release, filter)?;
            say(&format!(
                "initramfs {} MiB; booting {release} under TCG",
                std::fs::metadata(&image)?.len() >> 20
            ));
            let limit = Duration::from_secs(45 * 60);
            let accel = k.accel();
            let ok = match boot(&vmlinuz, &image, accel, limit)? {
                Boot::Verdict(ok) => ok,
                // Seen under multi-threaded TCG on 6.12 (see `Kernel::accel`): an `int3`
                // oops in the receive or transmit path while a static key was being
                // patched. The guest kernel, not a test, failed: boot it once more; a
                // second panic fails the run.
                Boot::GuestPanic => {
                    say(&format!(
                        "the {release} guest kernel panicked (console above), with no verdict from the suites; booting it once more"
                    ));
                    match boot(&vmlinuz, &image, accel, limit)? {
                        Boot::Verdict(ok) => ok,
                        Boot::GuestPanic => {
                            say(&format!("the {release} guest kernel panicked again"));
                            false
                        }
                    }
                }
            };
            (release, ok)
        };
        say(&format!(
            "{name}: {} in {:.0} s",
            if ok { "passed" } else { "FAILED" },
            started.elapsed().as_secs_f64()
        ));
        if !ok {
            failed.push(name);
        }
    }
    if !failed.is_empty() {
        bail!("tests failed on {}", failed.join(", "));
    }
    say("all tests passed");
    Ok(())
}

/// The same suites on the host's own kernel, no VM.
fn run_host(tests: &[&str], filter: &str) -> Result<()> {
    crate::cmd("cargo", &["build", "-p", "routing-agent"])?;
    let mut args = vec!["test", "-p", "routing-agent-tests"];
    for t in tests {
        args.extend(["--test", t]);
    }
    args.push("--");
    args.extend(filter.split_whitespace());
    crate::cmd("cargo", &args)
}
