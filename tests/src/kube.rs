//! A real control plane for the Kubernetes tests: etcd 3.4 and kube-apiserver v1.20.2
//! (built once per machine by `cargo xtask setup`, see `xtask/scripts/kube-apiserver.sh`)
//! in the lab's `cp` namespace, on br-vpc at `CP_ADDR:6443` (in a lab with a public side:
//! behind the isp at `CP_PUBLIC_ADDR`, reached through the nodes' own default route, with
//! the `kubernetes` Endpoints left to the test). TLS with the apiserver's
//! self-signed CA, bearer tokens: an administrator (`system:masters`, for kubectl) and the
//! agent's and the controller's ServiceAccount identities, so that RBAC from `deploy/` is
//! what they get. The controller (`routing-agent controller`) runs in the `cp` namespace.
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::{Batch, Lab, in_netns, run};

pub const CP_ADDR: &str = "10.114.0.250";
/// The API server's address in a lab with a public side (behind the isp only).
pub const CP_PUBLIC_ADDR: &str = "198.18.1.250";
pub const AGENT_NAMESPACE: &str = "routing-agent";
pub const AGENT_SERVICE_ACCOUNT: &str = "routing-agent";
pub const CONTROLLER_SERVICE_ACCOUNT: &str = "routing-agent-controller";

/// Where kube-apiserver and etcd are (`RA_KUBE_DIR`, or the set-up cache).
pub fn kube_bin_dir() -> PathBuf {
    std::env::var_os("RA_KUBE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/routing-agent/kube-v1.20.2"))
}

pub struct ControlPlane {
    ns: String,
    /// etcd, then kube-apiserver.
    procs: Vec<Child>,
    apiserver_args: Vec<String>,
    dir: PathBuf,
    /// kubeconfig of the administrator.
    pub admin: PathBuf,
    /// kubeconfig of the agent's ServiceAccount identity.
    pub agent: PathBuf,
    /// kubeconfig of the controller's ServiceAccount identity.
    pub controller: PathBuf,
    controller_proc: Option<Child>,
    /// `kubectl proxy`, when started ([`ControlPlane::start_proxy`]).
    proxy_proc: Option<Child>,
}

/// Starts `program` inside `ns`, its output appended to `log`.
fn spawn_in(ns: &str, log: &Path, program: &Path, args: &[String]) -> Result<Child> {
    let out = fs::OpenOptions::new().create(true).append(true).open(log)?;
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .arg(program)
        .args(args)
        .env("NO_COLOR", "1")
        .stdout(Stdio::from(out.try_clone()?))
        .stderr(Stdio::from(out))
        .spawn()
        .with_context(|| format!("starting {}", program.display()))
}

fn kubeconfig(path: &Path, addr: &str, ca: &Path, user: &str, token: &str) -> Result<()> {
    fs::write(
        path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: https://{addr}:6443\n    certificate-authority: {}\nusers:\n- name: {user}\n  user:\n    token: {token}\ncontexts:\n- name: lab\n  context: {{cluster: lab, user: {user}}}\ncurrent-context: lab\n",
            ca.display()
        ),
    )?;
    Ok(())
}

impl Lab {
    /// Starts etcd and kube-apiserver in a new `cp` namespace and waits until the API
    /// server is ready.
    pub fn control_plane(&mut self) -> Result<ControlPlane> {
        let bin = kube_bin_dir();
        let (etcd, apiserver) = (bin.join("etcd"), bin.join("kube-apiserver"));
        if !etcd.exists() || !apiserver.exists() {
            bail!(
                "no kube-apiserver/etcd in {} (run `cargo xtask setup`)",
                bin.display()
            );
        }
        let mut b = Batch::default();
        let ns = self.add_ns(&mut b, "cp")?;
        let addr = if self.spec.public {
            let isp = self.ns("isp");
            b.veth(&ns, "eth0", &isp, "cp0");
            b.ip(&ns, format!("addr add {CP_PUBLIC_ADDR}/24 dev eth0"));
            b.ip(&isp, "addr add 198.18.1.1/24 dev cp0");
            b.ip(&ns, "route add default via 198.18.1.1");
            CP_PUBLIC_ADDR
        } else {
            // Created from cp's side: its lines run first in the batch.
            let fab = self.ns("fabric");
            b.veth(&ns, "eth0", &fab, "cp-vpc");
            b.ip(&fab, "link set dev cp-vpc master br-vpc");
            b.ip(&ns, format!("addr add {CP_ADDR}/20 dev eth0"));
            CP_ADDR
        };
        b.run()?;
        let dir = self.scratch.join("cp");
        fs::create_dir_all(dir.join("certs"))?;
        let p = |f: &str| dir.join(f).display().to_string();
        run(&["openssl", "genrsa", "-out", &p("sa.key"), "2048"])?;
        run(&[
            "openssl",
            "rsa",
            "-in",
            &p("sa.key"),
            "-pubout",
            "-out",
            &p("sa.pub"),
        ])?;
        let sa = |name: &str| format!("system:serviceaccount:{AGENT_NAMESPACE}:{name}");
        let groups = format!(
            "\"system:serviceaccounts,system:serviceaccounts:{AGENT_NAMESPACE},system:authenticated\""
        );
        fs::write(
            dir.join("tokens.csv"),
            format!(
                "admin-token,admin,admin,system:masters\n\
                 agent-token,{},agent,{groups}\n\
                 controller-token,{},controller,{groups}\n",
                sa(AGENT_SERVICE_ACCOUNT),
                sa(CONTROLLER_SERVICE_ACCOUNT),
            ),
        )?;
        let mut procs = Vec::new();
        procs.push(spawn_in(
            &ns,
            &dir.join("etcd.log"),
            &etcd,
            &[
                format!("--data-dir={}", p("etcd")),
                "--listen-client-urls=http://127.0.0.1:2379".into(),
                "--advertise-client-urls=http://127.0.0.1:2379".into(),
                "--listen-peer-urls=http://127.0.0.1:2380".into(),
                "--unsafe-no-fsync".into(),
            ],
        )?);
        let mut cp = ControlPlane {
            ns: ns.clone(),
            procs,
            apiserver_args: Vec::new(),
            admin: dir.join("admin.kubeconfig"),
            agent: dir.join("agent.kubeconfig"),
            controller: dir.join("controller.kubeconfig"),
            controller_proc: None,
            proxy_proc: None,
            dir: dir.clone(),
        };
        cp.apiserver_args = vec![
            "--etcd-servers=http://127.0.0.1:2379".into(),
            "--bind-address=0.0.0.0".into(),
            format!("--advertise-address={addr}"),
            "--secure-port=6443".into(),
            format!("--cert-dir={}", p("certs")),
            format!("--token-auth-file={}", p("tokens.csv")),
            "--authorization-mode=RBAC".into(),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            "--enable-priority-and-fairness=false".into(),
            // As every distribution does (the DaemonSet's sysctl init container is privileged).
            "--allow-privileged=true".into(),
        ];
        if self.spec.public {
            // The test writes the `kubernetes` Endpoints itself.
            cp.apiserver_args
                .push("--endpoint-reconciler-type=none".into());
        }
        cp.start_apiserver()?;
        let ca = dir.join("certs/apiserver.crt");
        kubeconfig(&cp.admin, addr, &ca, "admin", "admin-token")?;
        kubeconfig(&cp.agent, addr, &ca, "agent", "agent-token")?;
        kubeconfig(&cp.controller, addr, &ca, "controller", "controller-token")?;
        cp.wait_ready()?;
        Ok(cp)
    }
}

impl ControlPlane {
    /// Starts `routing-agent controller` (its ServiceAccount identity) in the `cp`
    /// namespace.
    pub fn start_controller(&mut self, extra: &[&str]) -> Result<()> {
        self.stop_controller();
        let mut args = vec![
            "controller".to_string(),
            "--kubeconfig".into(),
            self.controller.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        self.controller_proc = Some(spawn_in(
            &self.ns,
            &self.dir.join("controller.log"),
            &crate::agent_bin(),
            &args,
        )?);
        Ok(())
    }

    pub fn stop_controller(&mut self) {
        if let Some(mut c) = self.controller_proc.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The controller's log.
    pub fn controller_log(&self) -> String {
        fs::read_to_string(self.dir.join("controller.log")).unwrap_or_default()
    }

    /// Starts kube-apiserver (again, after `stop_apiserver`).
    pub fn start_apiserver(&mut self) -> Result<()> {
        let child = spawn_in(
            &self.ns,
            &self.dir.join("kube-apiserver.log"),
            &kube_bin_dir().join("kube-apiserver"),
            &self.apiserver_args,
        )?;
        self.procs.truncate(1);
        self.procs.push(child);
        Ok(())
    }

    /// Kills kube-apiserver (etcd keeps the data).
    pub fn stop_apiserver(&mut self) {
        if let Some(mut c) = self.procs.pop() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits until the API server answers `/readyz`.
    pub fn wait_ready(&mut self) -> Result<()> {
        let ca = self.dir.join("certs/apiserver.crt");
        let start = Instant::now();
        loop {
            if ca.exists()
                && self
                    .kubectl(&["get", "--raw", "/readyz"])
                    .is_ok_and(|o| o.trim() == "ok")
            {
                break;
            }
            for c in self.procs.iter_mut() {
                if let Some(st) = c.try_wait()? {
                    bail!("the control plane exited ({st}):\n{}", self.logs());
                }
            }
            // A guard against a hang, not a measure: under TCG (the VM suites) on a busy
            // machine the API server has taken more than a minute to start.
            if start.elapsed() > Duration::from_secs(180) {
                bail!("kube-apiserver not ready after 180 s:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Ok(())
    }

    /// kubectl as the administrator (run inside the `cp` namespace).
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.kubectl_as(&self.admin, args)
    }

    /// kubectl with the given kubeconfig.
    pub fn kubectl_as(&self, kubeconfig: &Path, args: &[&str]) -> Result<String> {
        let kc = format!("--kubeconfig={}", kubeconfig.display());
        let ns = format!("--net=/run/netns/{}", self.ns);
        let mut v = vec!["nsenter", &ns, "kubectl", &kc];
        v.extend(args);
        run(&v)
    }

    /// Starts `kubectl proxy` (as the administrator) on 127.0.0.1:8001 of the `cp`
    /// namespace, and waits until it answers: requests through it ([`ControlPlane::post`])
    /// cost no kubectl start, so a benchmark can time the API server → agent path alone.
    pub fn start_proxy(&mut self) -> Result<()> {
        let kc = format!("--kubeconfig={}", self.admin.display());
        self.proxy_proc = Some(spawn_in(
            &self.ns,
            &self.dir.join("proxy.log"),
            Path::new("kubectl"),
            &[kc, "proxy".into(), "--port=8001".into()],
        )?);
        let start = Instant::now();
        while self.get("/readyz").is_err() {
            if start.elapsed() > Duration::from_secs(30) {
                bail!("kubectl proxy did not answer within 30 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    fn get(&self, path: &str) -> Result<String> {
        let url = format!("http://127.0.0.1:8001{path}");
        in_netns(&self.ns, move || -> Result<String> {
            Ok(ureq::get(&url).call()?.body_mut().read_to_string()?)
        })?
    }

    /// POSTs `yaml` to `path` of the API server through the proxy (it must be started).
    pub fn post(&self, path: &str, yaml: &str) -> Result<()> {
        let (url, body) = (format!("http://127.0.0.1:8001{path}"), yaml.to_string());
        in_netns(&self.ns, move || -> Result<()> {
            ureq::post(&url)
                .header("Content-Type", "application/yaml")
                .send(body)
                .with_context(|| format!("POST {url}"))?;
            Ok(())
        })?
    }

    /// `routing-agent migrate --kubeconfig <administrator's> ARGS` in the `cp` namespace:
    /// whether it succeeded, its standard output and its standard error.
    pub fn migrate(&self, args: &[&str]) -> Result<(bool, String, String)> {
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns))
            .arg(crate::agent_bin())
            .arg("migrate")
            .arg(format!("--kubeconfig={}", self.admin.display()))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running routing-agent migrate")?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// `kubectl apply -f -` with `yaml`.
    pub fn apply(&self, yaml: &str) -> Result<String> {
        let path = self.dir.join(format!("apply-{}.yaml", std::process::id()));
        fs::write(&path, yaml)?;
        let r = self.kubectl(&["apply", "-f", &path.display().to_string()]);
        let _ = fs::remove_file(&path);
        r
    }

    /// The tails of the etcd and kube-apiserver logs, for failure messages.
    pub fn logs(&self) -> String {
        ["etcd.log", "kube-apiserver.log"]
            .iter()
            .map(|f| {
                let t = fs::read_to_string(self.dir.join(f)).unwrap_or_default();
                let tail: Vec<&str> = t.lines().rev().take(15).collect();
                format!(
                    "--- {f}\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop_controller();
        if let Some(mut c) = self.proxy_proc.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for c in self.procs.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
