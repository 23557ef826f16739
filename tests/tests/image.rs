//! The image `cargo xtask image` writes, loaded by a real container runtime: a private
//! containerd (Debian's 1.6) imports the archive under the reference `deploy/` names, and
//! runc starts the agent from it the way the DaemonSet's `command: ["routing-agent", …]`
//! does (found through the image's PATH, with nothing but the static binary in the image).
//! The binary is the static debug build that `cargo xtask test` and vm-test make.
use std::path::{Path, PathBuf};

use routing_agent_tests::containerd::Containerd;
use routing_agent_tests::image;

fn static_agent() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/x86_64-unknown-linux-gnu/debug/routing-agent");
    assert!(
        p.exists(),
        "{} is missing: build it first (`cargo xtask image --debug`; `cargo xtask test` does)",
        p.display()
    );
    p
}

/// Removes the test's scratch directory, also when the test fails.
struct Scratch(PathBuf);
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn containerd_imports_the_image_and_runs_the_agent_from_it() {
    let dir = PathBuf::from(format!("/tmp/routing-agent-image-{}", std::process::id()));
    let reference = image::reference();
    std::fs::create_dir_all(&dir).unwrap();
    let _scratch = Scratch(dir.clone());
    let archive = dir.join("routing-agent.tar");
    let written = image::write(&static_agent(), &reference, &archive).unwrap();
    let c = Containerd::start(&dir.join("containerd"), "ra-image-test").unwrap();

    c.ctr(&[
        "images",
        "import",
        "--snapshotter",
        "native",
        archive.to_str().unwrap(),
    ])
    .unwrap();
    let list = c.ctr(&["images", "ls"]).unwrap();
    let line = list
        .lines()
        .find(|l| l.split_whitespace().next() == Some(reference.as_str()))
        .unwrap_or_else(|| panic!("{reference} not in the imported images:\n{list}"));
    assert!(
        line.contains(&written.digest),
        "imported under another digest than the one written ({}):\n{line}",
        written.digest
    );
    assert!(line.contains("linux/amd64"), "{line}");

    let out = c
        .ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            "native",
            &reference,
            "ra-image-test",
            "routing-agent",
            "--version",
        ])
        .unwrap();
    assert_eq!(
        out.trim(),
        format!("routing-agent {}", env!("CARGO_PKG_VERSION")),
        "the agent in the image"
    );
    drop(c);
    let left = routing_agent_tests::containerd::leftovers("ra-image-test");
    assert!(left.is_empty(), "containerd left behind: {left:?}");
}

/// `podman load` reads archives through containers/image, as skopeo does: both halves of
/// the archive are read by it, and copying verifies every blob against its digest. The
/// docker-archive half (manifest.json) is what `docker load` reads.
#[test]
fn skopeo_reads_the_archive_as_an_oci_archive_and_as_a_docker_archive() {
    let dir = PathBuf::from(format!("/tmp/routing-agent-skopeo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let _scratch = Scratch(dir.clone());
    let archive = dir.join("routing-agent.tar");
    let reference = image::reference();
    let written = image::write(&static_agent(), &reference, &archive).unwrap();
    let tag = reference.rsplit_once(':').unwrap().1;
    let a = archive.display();
    for (n, source) in [
        format!("oci-archive:{a}:{tag}"),
        format!("docker-archive:{a}:{reference}"),
    ]
    .iter()
    .enumerate()
    {
        let copy = dir.join(format!("copy{n}"));
        routing_agent_tests::run(&[
            "skopeo",
            "--insecure-policy",
            "copy",
            "--quiet",
            source,
            &format!("dir:{}", copy.display()),
        ])
        .unwrap();
        let config: serde_json::Value = serde_json::from_str(
            &routing_agent_tests::run(&[
                "skopeo",
                "--insecure-policy",
                "inspect",
                "--config",
                source,
            ])
            .unwrap(),
        )
        .unwrap();
        assert_eq!(
            config["config"]["Entrypoint"],
            serde_json::json!([image::BINARY]),
            "{source}"
        );
        assert_eq!(
            config["config"]["Env"],
            serde_json::json!([image::PATH]),
            "{source}"
        );
        // The copy holds the layer under its digest: the binary, byte for byte.
        let layer = config["rootfs"]["diff_ids"][0].as_str().unwrap();
        let blob = copy.join(layer.strip_prefix("sha256:").unwrap());
        assert_eq!(
            std::fs::metadata(&blob).unwrap().len(),
            written.layer_bytes,
            "{source}: {}",
            blob.display()
        );
    }
    let oci: serde_json::Value = serde_json::from_str(
        &routing_agent_tests::run(&[
            "skopeo",
            "--insecure-policy",
            "inspect",
            &format!("oci-archive:{a}:{tag}"),
        ])
        .unwrap(),
    )
    .unwrap();
    assert_eq!(oci["Digest"], written.digest.as_str());
}
