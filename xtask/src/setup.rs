//! `cargo xtask setup`: installs what a fresh machine lacks, and says what it does. Every
//! step checks first, so a second run installs nothing.
use std::process::Command;

use anyhow::{Context as _, Result, bail};

fn output(program: &str, args: &[&str]) -> Option<String> {
    crate::output(program, args).ok()
}

const APT: &[&str] = &[
    "llvm-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "bpftool",
    "iproute2",
    "iputils-ping",
    "util-linux",
    "build-essential",
    "pkg-config",
    "nftables",
    "iperf3",
    "openssl",
    // The image tests: a private containerd imports the image and runc runs it; skopeo
    // reads it as podman does (containers/image).
    "containerd",
    "skopeo",
];
/// Where `kube()` keeps kube-apiserver and etcd (built once per machine).
pub const KUBE_CACHE: &str = "/var/cache/routing-agent/kube-v1.20.2";

const BPF_LINKER: &str = "0.13.0";

fn step(what: &str, state: &str) {
    eprintln!("[setup] {what}: {state}");
}

/// Installs the Debian `packages` that are missing (the set-up's own, or another task's).
pub fn apt(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !output("dpkg-query", &["-W", "-f=${Status}", p])
                .is_some_and(|s| s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        step("apt packages", "present");
        return Ok(());
    }
    step("apt packages", &format!("installing {}", missing.join(" ")));
    // SAFETY: set-up runs before any thread is spawned.
    unsafe { std::env::set_var("DEBIAN_FRONTEND", "noninteractive") };
    crate::cmd("apt-get", &["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(&missing);
    crate::cmd("apt-get", &args)
        .context("apt-get install failed (is the Debian mirror reachable? are you root?)")
}

fn nightly() -> Result<()> {
    let vv = output("rustc", &["+nightly", "-vV"]).context(
        "the `nightly` toolchain is not installed; this project uses the nightly that ships with the machine \
         (LLVM 22) and never installs another",
    )?;
    if !vv.lines().any(|l| l.starts_with("LLVM version: 22.")) {
        bail!(
            "the installed nightly is not on LLVM 22 (bpf-linker 0.13 is built against LLVM 22):\n{vv}"
        );
    }
    let comps = output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )
    .unwrap_or_default();
    if comps.lines().any(|l| l.starts_with("rust-src")) {
        step("nightly rust-src", "present");
        return Ok(());
    }
    step("nightly rust-src", "adding");
    crate::cmd(
        "rustup",
        &["component", "add", "rust-src", "--toolchain", "nightly"],
    )
}

fn bpf_linker() -> Result<()> {
    if output("bpf-linker", &["--version"]).is_some_and(|v| v.contains(BPF_LINKER)) {
        step("bpf-linker", &format!("{BPF_LINKER} present"));
        return Ok(());
    }
    step(
        "bpf-linker",
        &format!("building {BPF_LINKER} against LLVM 22 (2-3 min)"),
    );
    let st = Command::new("cargo")
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER}"),
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", "/usr/lib/llvm-22")
        .status()?;
    if !st.success() {
        bail!(
            "cargo install bpf-linker failed ({st}); it needs llvm-22-dev, libzstd-dev, zlib1g-dev"
        );
    }
    Ok(())
}

fn bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        step("bpffs", "mounted on /sys/fs/bpf");
        return Ok(());
    }
    step("bpffs", "mounting on /sys/fs/bpf");
    crate::cmd("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .context("cannot mount bpffs (root needed)")
}

pub fn setup() -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("setup, tests and the lab need root (network namespaces, bpffs)");
    }
    apt(APT)?;
    nightly()?;
    bpf_linker()?;
    bpffs()?;
    Ok(())
}

/// A real kube-apiserver (v1.20.2, built from Debian's source package) and etcd for the
/// Kubernetes tests, in `KUBE_CACHE`; skipped when both are there.
pub fn kube() -> Result<()> {
    let script = crate::workspace().join("xtask/scripts/kube-apiserver.sh");
    let st = Command::new("bash").arg(&script).arg(KUBE_CACHE).status()?;
    if !st.success() {
        bail!("{} failed ({st})", script.display());
    }
    Ok(())
}
