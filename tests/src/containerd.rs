//! A private containerd (Debian's 1.6, with runc) for the image tests: its own root, state,
//! sockets and config under one scratch directory, the CRI plugin off. `Drop` stops it,
//! removes its containers' runc state and the directory. It touches no network namespace:
//! `ctr run` gives each container a new one.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use crate::wait_for;

pub struct Containerd {
    dir: PathBuf,
    child: Child,
    namespace: String,
}

impl Containerd {
    /// Starts containerd in `dir` (created; removed on drop). `namespace` is the containerd
    /// namespace `ctr` uses.
    pub fn start(dir: &Path, namespace: &str) -> Result<Containerd> {
        if !Path::new("/usr/bin/containerd").exists() {
            bail!("containerd is not installed (`cargo xtask setup` installs Debian's)");
        }
        std::fs::create_dir_all(dir)?;
        let d = dir.display();
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[debug]
  address = "{d}/debug.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#
            ),
        )?;
        let log = std::fs::File::create(dir.join("containerd.log"))?;
        let child = Command::new("/usr/bin/containerd")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting containerd")?;
        let c = Containerd {
            dir: dir.to_owned(),
            child,
            namespace: namespace.to_string(),
        };
        let sock = dir.join("containerd.sock");
        wait_for("containerd's socket", Duration::from_secs(30), || {
            (sock.exists() && c.ctr(&["version"]).is_ok()).then_some(())
        })
        .with_context(|| c.log())?;
        Ok(c)
    }

    /// Runs `ctr` against this containerd; its stdout, or an error with its stderr.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        let sock = self.dir.join("containerd.sock");
        let o = Command::new("ctr")
            .arg("--address")
            .arg(&sock)
            .args(["--namespace", &self.namespace])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running ctr")?;
        if !o.status.success() {
            bail!(
                "ctr {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&o.stderr),
                String::from_utf8_lossy(&o.stdout)
            );
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Containers first (`ctr run --rm` removes its own; this catches a failed test's).
        if let Ok(list) = self.ctr(&["tasks", "ls", "-q"]) {
            for id in list.lines() {
                let _ = self.ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
                let _ = self.ctr(&["tasks", "delete", "-f", id]);
            }
        }
        if let Ok(list) = self.ctr(&["containers", "ls", "-q"]) {
            for id in list.lines() {
                let _ = self.ctr(&["containers", "delete", id]);
            }
        }
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        // The shims keep runc state, fifos and sockets under /run/containerd whatever the
        // config says: this namespace's runc state goes, and the directories go if empty
        // (a system containerd's are not).
        let run = Path::new("/run/containerd");
        let _ = std::fs::remove_dir_all(run.join("runc").join(&self.namespace));
        for d in ["runc", "fifo", "s", ""] {
            let _ = std::fs::remove_dir(run.join(d));
        }
        // runc leaves the namespace's parent cgroup (`/<namespace>`) in every hierarchy.
        for cg in leftovers(&self.namespace)
            .into_iter()
            .filter(|p| p.starts_with("/sys"))
        {
            remove_cgroup(&cg);
        }
        let _ = Command::new("umount")
            .args(["-R", "-l"])
            .arg(&self.dir)
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What containerd and runc leave of `namespace` outside the scratch directory: its runc
/// state and its cgroups. Empty after `Drop`.
pub fn leftovers(namespace: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let runc = Path::new("/run/containerd/runc").join(namespace);
    if runc.exists() {
        found.push(runc);
    }
    if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
        for h in hierarchies.flatten() {
            let cg = h.path().join(namespace);
            if cg.is_dir() {
                found.push(cg);
            }
        }
    }
    found
}

/// Removes an empty cgroup and its empty children, deepest first (rmdir is how a cgroup is
/// deleted; one that still has tasks stays).
fn remove_cgroup(dir: &Path) {
    if let Ok(children) = std::fs::read_dir(dir) {
        for c in children.flatten() {
            if c.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&c.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}
