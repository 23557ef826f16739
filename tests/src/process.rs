//! The agent as a process inside a node namespace: started, stopped, restarted, its log
//! and status file; the Route manifests it reads.
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};

use crate::{Lab, run, wait_for};

/// The agent binary: `$ROUTING_AGENT_BIN`, else the workspace's debug build.
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ROUTING_AGENT_BIN") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/routing-agent");
    assert!(
        p.exists(),
        "{} is missing: build it first (`cargo build -p routing-agent`; `cargo xtask test` does)",
        p.display()
    );
    p
}

/// A Route manifest.
pub fn route_yaml(
    name: &str,
    destinations: &[&str],
    gateways: &[&str],
    node_selector: Option<&str>,
) -> String {
    let list = |v: &[&str]| {
        v.iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut y = format!(
        "apiVersion: networking.doks.digitalocean.com/v1alpha1\nkind: Route\nmetadata:\n  name: {name}\nspec:\n  destinations: [{}]\n  gateways: [{}]\n",
        list(destinations),
        list(gateways)
    );
    if let Some(sel) = node_selector {
        y.push_str("  nodeSelector:\n");
        for line in sel.lines() {
            y.push_str("    ");
            y.push_str(line);
            y.push('\n');
        }
    }
    y
}

/// The `k`-th prefix of the scale tests and benchmarks (`100.64.0.0/24` onwards, one /24
/// each).
pub fn scale_prefix(k: usize) -> String {
    format!("100.{}.{}.0/24", 64 + k / 256, k % 256)
}

/// `routes` Route manifests of 5 destinations each (`scale_prefix(first..)`), named
/// `{name}{index}`, over `gateways`, as one multi-document file: a VPN's prefix list.
pub fn scale_routes_yaml(name: &str, routes: usize, first: usize, gateways: &[String]) -> String {
    let g: Vec<&str> = gateways.iter().map(String::as_str).collect();
    (0..routes)
        .map(|r| {
            let d: Vec<String> = (0..5).map(|j| scale_prefix(first + r * 5 + j)).collect();
            let d: Vec<&str> = d.iter().map(String::as_str).collect();
            route_yaml(&format!("{name}{r:05}"), &d, &g, None)
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// Writes a file atomically (rename), as editors and config management do.
pub fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name().unwrap().to_string_lossy()
    ));
    fs::write(&tmp, text)?;
    fs::rename(&tmp, path)?;
    Ok(())
}

/// The agent running in standalone mode inside a node namespace.
pub struct Agent {
    child: Option<Child>,
    pub node: String,
    pub log: PathBuf,
    pub status: PathBuf,
    args: Vec<String>,
    ns: String,
}

impl Agent {
    /// Starts the agent on `node` of `lab` with Routes from `dir`, plus `extra` flags,
    /// writing a status file the test can read.
    pub fn start(lab: &Lab, node: &str, dir: &Path, extra: &[&str]) -> Result<Agent> {
        Self::launch(lab, node, dir, extra, true)
    }

    /// Like [`Agent::start`]; without `status_file` the agent writes none (benchmarks).
    pub fn launch(
        lab: &Lab,
        node: &str,
        dir: &Path,
        extra: &[&str],
        status_file: bool,
    ) -> Result<Agent> {
        let source = ["--routes-dir".to_string(), dir.display().to_string()];
        Self::launch_with(lab, node, &source, extra, status_file)
    }

    /// Starts the agent on `node` following the Kubernetes API server of `kubeconfig`.
    pub fn start_kube(lab: &Lab, node: &str, kubeconfig: &Path, extra: &[&str]) -> Result<Agent> {
        Self::launch_kube(lab, node, kubeconfig, extra, true)
    }

    /// Like [`Agent::start_kube`]; without `status_file` the agent writes none, as the
    /// DaemonSet runs it (benchmarks).
    pub fn launch_kube(
        lab: &Lab,
        node: &str,
        kubeconfig: &Path,
        extra: &[&str],
        status_file: bool,
    ) -> Result<Agent> {
        let source = [
            "--kube".to_string(),
            "--kubeconfig".into(),
            kubeconfig.display().to_string(),
        ];
        Self::launch_with(lab, node, &source, extra, status_file)
    }

    fn launch_with(
        lab: &Lab,
        node: &str,
        source: &[String],
        extra: &[&str],
        status_file: bool,
    ) -> Result<Agent> {
        if !lab.spec.nodes.iter().any(|n| n.name == node) {
            bail!("no node {node} in the lab");
        }
        let mut args = vec!["run".to_string()];
        args.extend(source.iter().cloned());
        args.extend([
            "--node-name".into(),
            format!("node-{node}"),
            "--bpf-pin-dir".into(),
            lab.pin_dir(node).display().to_string(),
        ]);
        if status_file {
            args.push("--status-file".into());
            args.push(
                lab.scratch
                    .join(format!("status-{node}.json"))
                    .display()
                    .to_string(),
            );
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut a = Agent {
            child: None,
            node: node.into(),
            log: lab.scratch.join(format!("agent-{node}.log")),
            status: lab.scratch.join(format!("status-{node}.json")),
            args,
            ns: lab.node_ns(node),
        };
        a.spawn()?;
        Ok(a)
    }

    fn spawn(&mut self) -> Result<()> {
        // The agent only ever runs inside a lab namespace.
        assert!(
            self.ns.starts_with("ra"),
            "refusing to run the agent outside the lab"
        );
        let _ = fs::remove_file(&self.status);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns))
            .arg(agent_bin())
            .args(&self.args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// Stops the agent with SIGTERM (routes stay) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the agent with SIGKILL (no cleanup of any kind: what a crash or an OOM kill
    /// leaves) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        // The next status read must come from the new process.
        let _ = fs::remove_file(&self.status);
        self.spawn()
    }

    /// Fails if the process exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(c) = &mut self.child
            && let Some(st) = c.try_wait()?
        {
            bail!(
                "agent on {} exited ({st}); log:\n{}",
                self.node,
                self.log_text()
            );
        }
        Ok(())
    }

    /// Process id of the running agent.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn status(&self) -> Option<serde_json::Value> {
        serde_json::from_str(&fs::read_to_string(&self.status).ok()?).ok()
    }

    /// Waits until the status file satisfies `pred`.
    pub fn wait_status(
        &mut self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let r = wait_for(what, Duration::from_secs(20), || {
            if self.check_alive().is_err() {
                return Some(Err(anyhow!("agent exited")));
            }
            self.status().filter(|s| pred(s)).map(Ok)
        });
        match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) | Err(e) => Err(e.context(format!("agent log:\n{}", self.log_text()))),
        }
    }

    /// Waits until the agent reports a reconcile with `n` installed routes and no change
    /// pending (its last pass found the kernel as desired).
    /// Waits until the agent knows the MAC address of `n` gateways (so their traffic is
    /// attributed by the TC programs).
    pub fn wait_resolved(&mut self, n: usize) -> Result<serde_json::Value> {
        self.wait_status(&format!("{n} gateway MACs known"), |s| {
            s["gateways"]
                .as_array()
                .is_some_and(|g| g.iter().filter(|g| g["mac"].is_string()).count() >= n)
        })
    }

    /// The health entry of `gateway` in the status file.
    pub fn gateway(&self, gateway: &str) -> Option<serde_json::Value> {
        self.status()?["gateways"]
            .as_array()?
            .iter()
            .find(|g| g["address"] == gateway)
            .cloned()
    }

    pub fn wait_settled(&mut self, n: usize) -> Result<serde_json::Value> {
        self.wait_status(&format!("{n} routes installed, settled"), |s| {
            s["routes"].as_array().is_some_and(|r| r.len() == n) && s["lastChanges"] == 0
        })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Lab {
    /// Runs `routing-agent cleanup` in `node`'s namespace, with its pin directory.
    pub fn cleanup(&self, node: &str) -> Result<String> {
        run(&[
            "nsenter",
            &format!("--net=/run/netns/{}", self.node_ns(node)),
            agent_bin().to_str().unwrap(),
            "cleanup",
            "--bpf-pin-dir",
            self.pin_dir(node).to_str().unwrap(),
        ])
    }
}
