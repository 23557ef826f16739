//! `cargo xtask image`: the routing-agent image without Docker or Podman. Builds the agent
//! statically (glibc, `+crt-static`, for `x86_64-unknown-linux-gnu`, as vm-test does) and
//! writes `target/image/routing-agent.tar`: one tar that is both an OCI image layout and a
//! docker-archive (`routing_agent_tests::image` says how, and why it is reproducible).
//! Load it with `ctr -n k8s.io images import`, `podman load -i` or `docker load -i`.
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Result, bail};
use routing_agent_tests::image;

pub const TARGET: &str = "x86_64-unknown-linux-gnu";

/// The flags of every static build (vm-test's, the image's, the tests' image), so that they
/// share one build: target-specific, so build scripts and proc macros stay dynamic.
pub fn static_env() -> [(&'static str, String); 1] {
    [(
        "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
        format!("{} -C debuginfo=0", image::STATIC_RUSTFLAGS),
    )]
}

/// Builds the static agent (`release` or the debug profile) and returns its path.
pub fn static_agent(release: bool) -> Result<PathBuf> {
    let mut args = vec!["build", "-p", "routing-agent", "--target", TARGET];
    if release {
        args.push("--release");
    }
    let st = Command::new("cargo")
        .args(&args)
        .envs(static_env())
        .current_dir(crate::workspace())
        .status()?;
    if !st.success() {
        bail!("building the static agent failed ({st})");
    }
    let profile = if release { "release" } else { "debug" };
    Ok(crate::workspace().join(format!("target/{TARGET}/{profile}/routing-agent")))
}

pub fn run(debug: bool, reference: Option<String>, out: Option<PathBuf>) -> Result<()> {
    crate::setup::setup()?;
    let binary = static_agent(!debug)?;
    let out = out.unwrap_or_else(|| crate::workspace().join("target/image/routing-agent.tar"));
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let reference = reference.unwrap_or_else(image::reference);
    let w = image::write(&binary, &reference, &out)?;
    println!(
        "{}\n  image    {reference}\n  digest   {}\n  id       {}\n  layer    {:.1} MiB (uncompressed: the binary and three directories)\n  archive  {:.1} MiB",
        out.display(),
        w.digest,
        w.config,
        w.layer_bytes as f64 / (1 << 20) as f64,
        w.archive_bytes as f64 / (1 << 20) as f64,
    );
    Ok(())
}
