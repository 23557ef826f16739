//! Project tasks: `cargo xtask <setup|test|vm-test|lab|bench|image|gen-crd>`.
mod bench;
mod demo;
mod failover;
mod image;
mod scale;
mod setup;
mod tccost;
mod vm;

use std::process::Command;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "routing-agent project tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what a fresh machine lacks (idempotent).
    Setup,
    /// The whole test suite: set-up, fmt, clippy (stable + nightly eBPF), unit and lab tests.
    Test,
    /// The lab demo: build, create the namespace lab, run the agent, show ECMP at work.
    Lab {
        /// Routes from a real kube-apiserver (two nodes, the controller, status, events,
        /// a gateway failure, deletion) instead of a directory.
        #[arg(long)]
        kube: bool,
    },
    /// Benchmarks (measure, never assert).
    Bench {
        #[arg(value_enum)]
        which: bench::Which,
        /// Trials per failure face (failover).
        #[arg(long, default_value_t = 20)]
        trials: usize,
        /// Trials per face of the kernel-alone baseline (failover), 30 s each.
        #[arg(long, default_value_t = 2)]
        baseline_trials: usize,
        /// Other prefixes on the same gateways (failover at scale: Routes of 5
        /// destinations each next to the measured one). Dataplane: measure this size only
        /// (0: 1,000, 5,000, 10,000 and 20,000).
        #[arg(long, default_value_t = 0)]
        prefixes: usize,
        /// Dataplane: which of the modes to measure.
        #[arg(long, value_enum, default_value_t = scale::Modes::All)]
        mode: scale::Modes,
    },
    /// The image without a container engine: the static agent as one layer, written as
    /// target/image/routing-agent.tar (an OCI layout that is also a docker-archive).
    Image {
        /// The debug profile (the one the tests and vm-test build) instead of release.
        #[arg(long)]
        debug: bool,
        /// repository:tag (default: the one deploy/ names).
        #[arg(long)]
        reference: Option<String>,
        /// Where to write the archive.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Regenerate deploy/crd.yaml from the Rust types.
    GenCrd,
    /// The kernel-facing integration tests inside a VM with another kernel (qemu, TCG).
    VmTest {
        /// Kernels to run on, in turn (repeat the flag): Debian 12's 6.1 and 6.12 cloud
        /// kernels in a VM, or the host's own kernel without one.
        #[arg(long = "kernel", value_enum, default_values_t = [vm::Kernel::Debian61, vm::Kernel::Debian612])]
        kernels: Vec<vm::Kernel>,
        /// Test binaries (tests/tests/*.rs) to run.
        #[arg(long = "test", default_values_t = ["dataplane".to_string(), "health".to_string(), "default_route".to_string(), "fail_closed".to_string()])]
        tests: Vec<String>,
        /// A test-name filter passed to every test binary.
        #[arg(long, default_value = "")]
        filter: String,
    },
}

/// Runs a command and returns its standard output; fails naming it, with its stderr.
pub fn output(program: &str, args: &[&str]) -> Result<String> {
    let o = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !o.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Runs a command with inherited output; fails naming it.
pub fn cmd(program: &str, args: &[&str]) -> Result<()> {
    eprintln!("$ {program} {}", args.join(" "));
    let st = Command::new(program)
        .args(args)
        .current_dir(workspace())
        .status()
        .with_context(|| format!("spawning {program}"))?;
    if !st.success() {
        bail!("`{program} {}` failed ({st})", args.join(" "));
    }
    Ok(())
}

pub fn workspace() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn test() -> Result<()> {
    setup::setup()?;
    setup::kube()?;
    cmd("cargo", &["fmt", "--all", "--", "--check"])?;
    cmd(
        "cargo",
        &[
            "clippy",
            "--workspace",
            "--exclude",
            "routing-agent-ebpf",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    cmd(
        "cargo",
        &[
            "+nightly",
            "clippy",
            "-p",
            "routing-agent-ebpf",
            "--",
            "-D",
            "warnings",
            "-C",
            "panic=abort",
            "-Zpanic_abort_tests",
        ],
    )?;
    cmd("cargo", &["build", "-p", "routing-agent"])?;
    // The image test's binary (the one vm-test uses too, so the VM tier builds nothing more).
    image::static_agent(false)?;
    cargo_test(&[
        "test",
        "--workspace",
        "--exclude",
        "routing-agent-ebpf",
        "--lib",
        "--bins",
        "--tests",
    ])
}

/// Runs `cargo test`, passing its output through, and closes with one total line
/// (`summary: N passed, M failed`) so that a reader of the last line sees every binary.
fn cargo_test(args: &[&str]) -> Result<()> {
    use std::io::{BufRead as _, BufReader};
    eprintln!("$ cargo {}", args.join(" "));
    let mut child = Command::new("cargo")
        .args(args)
        .current_dir(workspace())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                let part = part
                    .trim()
                    .trim_start_matches("ok. ")
                    .trim_start_matches("FAILED. ");
                if let Some(n) = part.strip_suffix(" passed") {
                    passed += n.trim().parse::<u64>().unwrap_or(0);
                } else if let Some(n) = part.strip_suffix(" failed") {
                    failed += n.trim().parse::<u64>().unwrap_or(0);
                }
            }
        }
    }
    let st = child.wait()?;
    println!("summary: {passed} passed, {failed} failed");
    if !st.success() || failed > 0 {
        bail!("cargo test failed ({st})");
    }
    if passed == 0 {
        bail!("cargo test ran no test");
    }
    Ok(())
}

fn gen_crd() -> Result<()> {
    let out = Command::new("cargo")
        .args(["run", "--quiet", "-p", "routing-agent", "--", "crd"])
        .current_dir(workspace())
        .output()?;
    if !out.status.success() {
        bail!(
            "routing-agent crd failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let path = workspace().join("deploy/crd.yaml");
    let mut text = String::from(
        "# Generated by `cargo xtask gen-crd` from routing-agent/src/crd.rs. Do not edit.\n",
    );
    text.push_str(&String::from_utf8(out.stdout)?);
    std::fs::write(&path, text)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup::setup(),
        Cmd::Test => test(),
        Cmd::Lab { kube: false } => demo::run(),
        Cmd::Lab { kube: true } => demo::run_kube(),
        Cmd::Bench {
            which,
            trials,
            baseline_trials,
            prefixes,
            mode,
        } => bench::run(which, trials, baseline_trials, prefixes, mode),
        Cmd::Image {
            debug,
            reference,
            out,
        } => image::run(debug, reference, out),
        Cmd::GenCrd => gen_crd(),
        Cmd::VmTest {
            kernels,
            tests,
            filter,
        } => vm::run(
            &kernels,
            &tests.iter().map(String::as_str).collect::<Vec<_>>(),
            &filter,
        ),
    }
}
