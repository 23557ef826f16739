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
//!
//! Split by what each part owns: [`topology`] (the namespaces, links, addresses and the
//! `Lab` itself), [`traffic`] (servers, connections, streams), [`faults`] (the faces of a
//! black-holing gateway), [`kernel`] (reading back what the kernel holds), [`process`]
//! (the agent as a process) and [`kube`] (the control plane). Everything is re-exported
//! here, so tests `use routing_agent_tests::*`.
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

pub mod containerd;
pub mod faults;
pub mod image;
pub mod kernel;
pub mod kube;
pub mod process;
pub mod topology;
pub mod traffic;

pub use faults::*;
pub use kernel::*;
pub use process::*;
pub use topology::*;
pub use traffic::*;

/// Runs a command, returning stdout; the error carries the command and its stderr.
pub fn run(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawning {args:?}"))?;
    stdout_of(args, &out, "")
}

/// The standard output of a finished command; an error naming it, its stderr and `input`
/// (when there was one) if it failed.
fn stdout_of(args: &[&str], out: &std::process::Output, input: &str) -> Result<String> {
    if !out.status.success() {
        let input = if input.is_empty() {
            String::new()
        } else {
            format!(" (input: {input:?})")
        };
        bail!(
            "{} failed ({}): {}{input}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// [`run`] with `input` on the command's standard input (`ip -batch -`, `nft -f -`).
pub fn run_input(args: &[&str], input: &str) -> Result<String> {
    use std::io::Write as _;
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {args:?}"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    stdout_of(args, &out, input)
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
