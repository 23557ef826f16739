//! Builds the eBPF object with aya-build (the aya-template layout): the installed nightly
//! compiles `routing-agent-ebpf` for `bpfel-unknown-none` and the object lands in OUT_DIR,
//! from where `src/ebpf.rs` embeds it. `AYA_BUILD_SKIP=1` skips it (the agent then runs
//! without eBPF; used nowhere by default). `RA_EBPF_TOOLCHAIN` names another toolchain than
//! `nightly` (the Containerfile pins the dated nightly verified with bpf-linker 0.13).
use anyhow::anyhow;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("no workspace root"))?
        .join("routing-agent-ebpf");
    let root_dir = root.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
    println!("cargo:rerun-if-env-changed=RA_EBPF_TOOLCHAIN");
    let custom = std::env::var("RA_EBPF_TOOLCHAIN").ok();
    let toolchain = match custom.as_deref() {
        Some(name) if !name.is_empty() => Toolchain::Custom(name),
        _ => Toolchain::default(),
    };
    aya_build::build_ebpf(
        [Package {
            name: "routing-agent-ebpf",
            root_dir,
            ..Default::default()
        }],
        toolchain,
    )
}
