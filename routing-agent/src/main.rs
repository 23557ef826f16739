use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use routing_agent::agent::{self, AgentConfig};
use routing_agent::cluster::{controller, publish};
use routing_agent::logic::selector::NodeInfo;
use routing_agent::node::dataplane::{
    Config, Dataplane, ModeChoice, diff::IdRange, nexthop::Resilient,
};
use routing_agent::node::ebpf::{AttachMode, Programs};
use routing_agent::node::sysctl;
use routing_agent::ops::http as serve;
use routing_agent::source;
use tokio::sync::mpsc;

/// Programs static and ECMP routes on this node from Route objects.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "ROUTING_AGENT_LOG_FORMAT")]
    log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (standalone: Routes from a directory of manifests).
    Run(Box<RunArgs>),
    /// Run the cluster-wide controller (one replica): Route status summaries from the
    /// nodes' reports, and the deletion finalizer.
    Controller(ControllerArgs),
    /// Set the ECMP sysctls and exit (the DaemonSet's privileged init container; the
    /// agent itself then runs with capabilities only, /proc/sys read-only).
    Sysctls(SysctlArgs),
    /// Print the CustomResourceDefinitions generated from the Rust types.
    Crd,
    /// Show what the agent maintains in this network namespace (routes, rules, gateways
    /// with their health and counters), read from the kernel and the pinned maps: works
    /// while the agent runs and after it stopped.
    Status(StatusArgs),
    /// Remove every route and nexthop the agent owns in this network namespace, and its
    /// bpffs pins.
    Cleanup(KernelArgs),
    /// Move from the static route operator: print a Route for each StaticRoute (same
    /// name, destinations and gateway, every node); with --apply create them, wait until
    /// each is Ready on every node, then delete the StaticRoutes. The kernel routes do not
    /// change while ownership moves.
    Migrate(MigrateArgs),
    /// (Started by `run`.) Load the eBPF object and pin its programs for the agent to take.
    #[command(hide = true)]
    EbpfLoad(EbpfLoadArgs),
}

#[derive(Args)]
struct EbpfLoadArgs {
    #[arg(long)]
    bpf_pin_dir: PathBuf,
}

#[derive(Args)]
struct MigrateArgs {
    /// This kubeconfig instead of the in-cluster configuration / KUBECONFIG.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Read the StaticRoutes from these manifests (files, directories, `-` for standard
    /// input; `kubectl get sr -o yaml` output too) instead of the cluster: print only.
    #[arg(short = 'f', long = "filename", conflicts_with = "apply")]
    files: Vec<PathBuf>,
    /// Create the Routes in the cluster, wait until each is Ready on every node (the
    /// controller's status), then delete its StaticRoute.
    #[arg(long)]
    apply: bool,
    /// With --apply: keep the StaticRoutes (the Routes win their destinations).
    #[arg(long, requires = "apply")]
    keep: bool,
    /// With --apply: how long to wait for the Routes to be Ready; a StaticRoute whose
    /// Route is not Ready by then is kept.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    timeout: Duration,
    /// Only these StaticRoutes (default: all).
    names: Vec<String>,
}

#[derive(Args)]
struct StatusArgs {
    #[command(flatten)]
    kernel: KernelArgs,
    /// JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// The running agent's HTTP port, asked why a destination refuses traffic (`none`:
    /// the kernel and the pins only).
    #[arg(long, default_value = "127.0.0.1:9977")]
    agent_addr: String,
}

#[derive(Args, Clone)]
struct KernelArgs {
    /// Route protocol id marking the agent's routes and nexthops (see /etc/iproute2/rt_protos).
    #[arg(long, default_value_t = 196)]
    route_protocol: u8,
    /// Routing table of the agent's routes.
    #[arg(long, default_value_t = 254)]
    table: u32,
    /// Metric (priority) of the agent's routes.
    #[arg(long, default_value_t = 0)]
    metric: u32,
    /// First nexthop id of the agent's range.
    #[arg(long, default_value_t = 1_960_000)]
    nexthop_id_base: u32,
    /// Size of the agent's nexthop id range.
    #[arg(long, default_value_t = 65_536)]
    nexthop_id_span: u32,
    /// How routes are expressed in the kernel.
    #[arg(long, value_enum, default_value_t = ModeChoice::Auto)]
    dataplane: ModeChoice,
    /// Buckets of each resilient nexthop group.
    #[arg(long, default_value_t = 128)]
    resilient_buckets: u16,
    /// Seconds a resilient-group bucket must be idle before it may move.
    #[arg(long, default_value_t = 120)]
    resilient_idle_timer: u32,
    /// Seconds a resilient group may stay unbalanced (a restored gateway holding fewer
    /// buckets than its share, because the flows on its old buckets never go idle) before
    /// its buckets move even when busy (0: never). Default: 30 with flow pinning (the moved
    /// TCP connections stay on their gateway), 0 without it, where moving a busy bucket
    /// breaks its connections on the other gateway's NAT. UDP flows are not pinned: a
    /// forced move changes the gateway of a busy UDP flow.
    #[arg(long)]
    resilient_unbalanced_timer: Option<u32>,
    /// bpffs directory for the agent's pinned maps (one per agent on a shared kernel).
    #[arg(long, default_value = "/sys/fs/bpf/routing-agent")]
    bpf_pin_dir: PathBuf,
    /// While the default route is overridden, answer traffic that came in on the public
    /// interface through it (a table and a `from <address>` rule per public address).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    symmetric_routing: bool,
    /// Table of symmetric routing (the reference agent's `eth0table`).
    #[arg(long, default_value_t = 135)]
    symmetric_table: u32,
    /// Priority of the symmetric routing rules.
    #[arg(long, default_value_t = 15135)]
    symmetric_rule_priority: u32,
    /// Route protocol (a number, or `static`, `boot`, `kernel`) of routes the agent adopts
    /// when one is exactly what a Route or StaticRoute asks for (its destination and one
    /// gateway, in the agent's table at its metric): replaced in place by the agent's own,
    /// with no gap. `static` is what the static route operator (pyroute2) wrote.
    /// Repeatable.
    #[arg(long = "adopt-protocol", default_value = "static", value_parser = parse_protocol)]
    adopt_protocols: Vec<u8>,
    /// Adopt no route: every route another owner left is left alone and reported.
    #[arg(long)]
    no_adopt: bool,
    /// Forwarding probes: gateway slot i uses routing table probe-table + i (256 tables).
    #[arg(long, default_value_t = 19_600)]
    probe_table: u32,
    /// Forwarding probes: gateway slot i marks its probe socket probe-mark + i (an exact
    /// `fwmark` match: pick a range nothing else on the node uses).
    #[arg(long, default_value = "0x1960000", value_parser = parse_u32)]
    probe_mark: u32,
    /// Priority of the forwarding probes' `fwmark` rules (they exist only while a probe
    /// runs; before the main table's 32766 and the symmetric rules).
    #[arg(long, default_value_t = 15_100)]
    probe_rule_priority: u32,
}

/// What stays reachable through the node's own default gateway while the default route is
/// overridden.
#[derive(Args, Clone)]
struct ProtectArgs {
    /// The metadata service (`none`: not protected).
    #[arg(long, default_value = "169.254.169.254")]
    metadata_address: String,
    /// The node's resolv.conf: its nameservers are protected (the DaemonSet mounts the
    /// host's at /host/etc/resolv.conf).
    #[arg(long, default_value = "/etc/resolv.conf")]
    resolv_conf: PathBuf,
    /// More destinations to protect (CIDR or address; repeatable).
    #[arg(long = "protected-cidr", value_parser = parse_net)]
    protected_cidrs: Vec<ipnet::IpNet>,
    /// Cluster-internal networks (service and pod CIDRs): nameservers inside them are not
    /// protected (repeatable).
    #[arg(long = "in-cluster-cidr", value_parser = parse_net)]
    in_cluster_cidrs: Vec<ipnet::IpNet>,
    /// The public interface of symmetric routing (default: the interface of the node's
    /// own default route).
    #[arg(long)]
    public_interface: Option<String>,
}

fn parse_net(s: &str) -> Result<ipnet::IpNet, String> {
    routing_agent::logic::route::parse_destination(s).map(|(n, _)| n)
}

#[derive(Args, Clone)]
struct SysctlArgs {
    /// Set net.ipv{4,6}.fib_multipath_hash_policy=1 (hash on ports).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    multipath_hash_policy: bool,
    /// Set net.ipv4.fib_multipath_use_neigh=1.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    multipath_use_neigh: bool,
}

#[derive(Args)]
struct ControllerArgs {
    /// This kubeconfig instead of the in-cluster configuration / KUBECONFIG.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// How long a Route being deleted waits for the nodes that still list it (an agent
    /// stopped or unreachable), before it is released anyway.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    deletion_timeout: Duration,
    /// Address of the health endpoints (/healthz, /readyz).
    #[arg(long, default_value = "0.0.0.0:9978")]
    health_addr: std::net::SocketAddr,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["routes_dir", "kube"])))]
struct RunArgs {
    /// Directory of Route manifests (standalone mode).
    #[arg(long)]
    routes_dir: Option<PathBuf>,
    /// Follow the Route objects and this node's Node in Kubernetes (in-cluster config, or
    /// KUBECONFIG).
    #[arg(long)]
    kube: bool,
    /// With --kube: this kubeconfig instead of the in-cluster configuration / KUBECONFIG.
    #[arg(long, requires = "kube")]
    kubeconfig: Option<PathBuf>,
    /// This node's name (matchFields metadata.name).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// A label of this node, key=value (repeatable).
    #[arg(long = "node-label", value_parser = parse_label)]
    node_labels: Vec<(String, String)>,
    #[command(flatten)]
    kernel: KernelArgs,
    /// Do not load or attach the eBPF programs.
    #[arg(long)]
    no_ebpf: bool,
    #[command(flatten)]
    sysctls: SysctlArgs,
    #[command(flatten)]
    protect: ProtectArgs,
    /// Address of the health endpoints (/healthz: the main loop turns; /readyz: the first
    /// reconcile from a complete view of the Routes is done).
    #[arg(long, default_value = "0.0.0.0:9977")]
    health_addr: std::net::SocketAddr,
    /// Seconds between full resyncs even when nothing was notified.
    #[arg(long, default_value_t = 30)]
    resync_seconds: u64,
    /// Write a JSON status (installed routes, problems, gateway health) here after every
    /// reconcile.
    #[arg(long)]
    status_file: Option<PathBuf>,
    /// How the TC programs are attached.
    #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
    tc_attach: AttachMode,
    /// Interval of the probes of a withdrawn gateway, of both kinds (e.g. 30s, 500ms).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    probe_interval: Duration,
    /// Probe a withdrawn gateway through itself: a TCP connection attempt, sent via that
    /// gateway whatever the routes say, to a destination that answered recently through
    /// a peer gateway (or a --probe-target). The gateway returns only when that is
    /// answered. Off, or with no target known: an ICMP echo to the gateway restores it.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    forwarding_probes: bool,
    /// A destination for the forwarding probes (ADDR:PORT, [V6]:PORT, or ADDR with
    /// --probe-port), used before any learned one; repeatable, one per family is used.
    #[arg(long = "probe-target")]
    probe_targets: Vec<String>,
    /// The port of a --probe-target given without one.
    #[arg(long, default_value_t = 443)]
    probe_port: u16,
    /// Unanswered TCP connection attempts in a row through a gateway that take it down
    /// (when a peer gateway succeeds meanwhile), at least: the floor of the adaptive
    /// threshold (see --false-alarm-rate).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    failure_threshold: u32,
    /// Cap of the adaptive threshold.
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u32).range(1..))]
    failure_threshold_max: u32,
    /// The accepted chance, per connection attempt, that a healthy gateway losing attempts
    /// at its measured rate p is taken down: the threshold is the least k with
    /// p^k <= this (2 below 0.1 % loss, 4 at 2 %, 5 at 4 %).
    #[arg(long, default_value_t = 1e-6, value_parser = parse_probability)]
    false_alarm_rate: f64,
    /// Half-life of a gateway's measured loss rate.
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    loss_half_life: Duration,
    /// Failed attempts older than this are forgotten.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    failure_window: Duration,
    /// A single failed attempt already counts as failing when another attempt through the
    /// same gateway has been unanswered this long, with no success since (0s: off).
    #[arg(long, default_value = "500ms", value_parser = parse_duration_or_zero)]
    pending_grace: Duration,
    /// A gateway whose neighbour entry stays unresolved (ARP/ND unanswered) this long is
    /// down, like one whose entry turns FAILED (0s: only FAILED counts).
    #[arg(long, default_value = "4s", value_parser = parse_duration_or_zero)]
    neighbour_grace: Duration,
    /// A gateway that fails again this soon after it was restored is damped: its next
    /// restore waits probe-interval × 2^n.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    flap_window: Duration,
    /// Cap of the damped restore delay.
    #[arg(long, default_value = "16m", value_parser = parse_duration)]
    max_restore_delay: Duration,
    /// How often the eBPF counters and the neighbour table are read.
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    health_interval: Duration,
    /// What a destination's traffic does while none of its gateways can be used (interface
    /// down, address or connected network gone, every neighbour FAILED, every gateway down):
    /// `closed` refuses it (an `unreachable` route of the agent's at a worse metric than
    /// the real route stays in place), `open` lets it fall through to the node's own
    /// routes (another egress IP; private ranges out of the default route). A Route's
    /// `networking.doks.digitalocean.com/fail-mode` annotation overrides it.
    #[arg(long, default_value = "closed", value_parser = parse_fail_mode)]
    fail_mode: routing_agent::logic::desired::FailMode,
    /// Keep established TCP connections on the gateway they started on when the kernel
    /// re-routes them after a route change (as long as that gateway is up). Off: the
    /// kernel alone decides, and connections that move break on the other gateway's NAT.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    flow_pinning: bool,
}

/// Where the forwarding probes' rules and tables are.
fn steering(k: &KernelArgs) -> routing_agent::node::probe::Steering {
    routing_agent::node::probe::Steering {
        protocol: k.route_protocol,
        table_base: k.probe_table,
        mark_base: k.probe_mark,
        rule_priority: k.probe_rule_priority,
    }
}

/// Decimal or 0x-hex.
fn parse_u32(s: &str) -> Result<u32, String> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u32::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|_| format!("{s:?} is not a 32-bit number (decimal or 0x-hex)"))
}

/// `ADDR:PORT`, `[V6]:PORT`, or a bare address with `port`.
fn parse_probe_target(s: &str, port: u16) -> Result<std::net::SocketAddr, String> {
    if let Ok(a) = s.parse::<std::net::SocketAddr>() {
        return Ok(a);
    }
    s.parse::<IpAddr>()
        .map(|ip| (ip, port).into())
        .map_err(|_| format!("--probe-target {s:?}: not ADDR, ADDR:PORT or [V6]:PORT"))
}

/// `500ms`, `30s`, `10m`, `1h`, or bare seconds.
fn parse_probability(s: &str) -> Result<f64, String> {
    let p: f64 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if p > 0.0 && p < 1.0 {
        Ok(p)
    } else {
        Err(format!(
            "{s:?}: a probability strictly between 0 and 1 (e.g. 1e-6)"
        ))
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 30s, 10m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    if !(secs > 0.0 && secs.is_finite()) {
        return Err(format!("{s:?} must be positive"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Like [`parse_duration`], and `0` / `0s` for "off".
fn parse_duration_or_zero(s: &str) -> Result<Duration, String> {
    match s.trim_end_matches(['m', 's', 'h']) {
        "0" => Ok(Duration::ZERO),
        _ => parse_duration(s),
    }
}

fn parse_fail_mode(s: &str) -> Result<routing_agent::logic::desired::FailMode, String> {
    routing_agent::logic::desired::FailMode::parse(s)
        .ok_or_else(|| format!("{s:?}: expected `closed` or `open`"))
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

/// `pinned`: the TC program keeps established connections on their gateway (eBPF and flow
/// pinning on), which makes a forced rebalance of the resilient groups safe for them.
fn dataplane_config(k: &KernelArgs, pinned: bool) -> Config {
    Config {
        protocol: k.route_protocol,
        table: k.table,
        metric: k.metric,
        ids: IdRange {
            base: k.nexthop_id_base,
            span: k.nexthop_id_span,
        },
        mode: k.dataplane,
        resilient: Resilient {
            buckets: k.resilient_buckets,
            idle_timer_s: k.resilient_idle_timer,
            unbalanced_timer_s: k
                .resilient_unbalanced_timer
                .unwrap_or(if pinned { 30 } else { 0 }),
        },
        symmetric: k
            .symmetric_routing
            .then_some((k.symmetric_table, k.symmetric_rule_priority)),
        adopt: if k.no_adopt {
            vec![]
        } else {
            k.adopt_protocols.clone()
        },
    }
}

/// A route protocol: a number or one of the names iproute2 knows for the low ids.
fn parse_protocol(s: &str) -> Result<u8, String> {
    match s {
        "kernel" => Ok(2),
        "boot" => Ok(3),
        "static" => Ok(4),
        _ => s
            .parse()
            .map_err(|_| format!("{s:?} is neither a protocol number nor kernel, boot, static")),
    }
}

fn init_logging(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// The client, and the addresses of the API server host it was configured with.
async fn kube_client_and_hosts(
    kubeconfig: Option<&std::path::Path>,
) -> anyhow::Result<(kube::Client, Vec<std::net::IpAddr>)> {
    let config = kube_config(kubeconfig).await?;
    let mut hosts = Vec::new();
    if let Some(host) = config.cluster_url.host() {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        match host.parse::<std::net::IpAddr>() {
            Ok(a) => hosts.push(a),
            Err(_) => {
                let port = config.cluster_url.port_u16().unwrap_or(443);
                match tokio::net::lookup_host((host, port)).await {
                    Ok(addrs) => hosts.extend(addrs.map(|s| s.ip())),
                    Err(e) => {
                        tracing::warn!(host, error = %e, "cannot resolve the API server host; not protecting it")
                    }
                }
            }
        }
    }
    let client =
        kube::Client::try_from(config).context("connecting to the Kubernetes API server")?;
    Ok((client, hosts))
}

async fn kube_config(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Config> {
    Ok(match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => kube::Config::infer().await?,
    })
}

async fn kube_client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    kube::Client::try_from(kube_config(kubeconfig).await?)
        .context("connecting to the Kubernetes API server")
}

/// This process's peak resident set (`VmHWM`), in KiB.
fn peak_rss_kib() -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// `routing-agent migrate`: the manifest on standard output (print) or one line per step
/// (apply); what could not be moved on standard error, and a failure exit.
async fn migrate(m: MigrateArgs) -> anyhow::Result<()> {
    use routing_agent::cluster::migrate as mig;
    let client = if m.files.is_empty() {
        Some(kube_client(m.kubeconfig.as_deref()).await?)
    } else {
        None
    };
    let statics = match &client {
        Some(c) => mig::list(c).await?,
        None => mig::read_files(&m.files)?,
    };
    let statics = mig::select(statics, &m.names)?;
    if statics.is_empty() {
        eprintln!("no StaticRoute to move");
        return Ok(());
    }
    let steps = mig::steps(client.as_ref(), &statics).await?;
    let refused = match (&client, m.apply) {
        (Some(c), true) => {
            let opts = mig::ApplyOptions {
                keep: m.keep,
                timeout: m.timeout,
            };
            mig::apply(c, steps, &opts, &mut |line| println!("{line}")).await?
        }
        _ => {
            let (manifest, refused) = mig::manifest(&steps);
            print!("{manifest}");
            refused
        }
    };
    for why in &refused {
        eprintln!("{why}");
    }
    if !refused.is_empty() {
        anyhow::bail!(
            "{} of {} StaticRoutes not moved (above)",
            refused.len(),
            statics.len()
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format, &cli.log_level);
    match cli.command {
        Command::Crd => {
            print!("{}", routing_agent::logic::crd::yaml());
            Ok(())
        }
        Command::Sysctls(s) => {
            for (k, v) in sysctl::wanted(s.multipath_hash_policy, s.multipath_use_neigh) {
                sysctl::ensure(k, v).with_context(|| format!("setting {k}={v}"))?;
            }
            Ok(())
        }
        Command::Controller(c) => {
            let client = kube_client(c.kubeconfig.as_deref()).await?;
            let probes = serve::Probes::new(Duration::MAX);
            serve::spawn(c.health_addr, probes.clone(), None).await?;
            controller::run(
                client,
                controller::Config {
                    deletion_timeout: c.deletion_timeout,
                },
                probes,
            )
            .await
        }
        Command::Status(st) => {
            let k = &st.kernel;
            let mut tables = vec![k.table];
            if k.symmetric_routing {
                tables.push(k.symmetric_table);
            }
            let view = routing_agent::node::inspect::read(&routing_agent::node::inspect::Scope {
                protocol: k.route_protocol,
                tables,
                rule_priority: k.symmetric_routing.then_some(k.symmetric_rule_priority),
                pin_dir: &k.bpf_pin_dir,
                agent_addr: match st.agent_addr.as_str() {
                    "none" => None,
                    a => Some(a.parse().with_context(|| format!("--agent-addr {a}"))?),
                },
            })
            .await?;
            if st.json {
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                print!("{}", routing_agent::node::inspect::render(&view));
            }
            Ok(())
        }
        Command::Migrate(m) => migrate(m).await,
        Command::EbpfLoad(l) => {
            routing_agent::node::ebpf::load_for_handoff(&l.bpf_pin_dir)?;
            tracing::info!(
                peak_rss_kib = peak_rss_kib().unwrap_or(0),
                "eBPF loader: object loaded, programs handed over; exiting"
            );
            Ok(())
        }
        Command::Cleanup(k) => {
            let mut dp = Dataplane::new(dataplane_config(&k, false)).await?;
            let removed = dp.remove_all().await?;
            let probe_rules = routing_agent::node::probe::remove_leftovers(steering(&k)).await?;
            let filters = routing_agent::node::ebpf::detach_netlink_filters();
            let pins = routing_agent::node::ebpf::remove_pins(&k.bpf_pin_dir)
                .with_context(|| format!("removing the pins in {}", k.bpf_pin_dir.display()))?;
            tracing::info!(removed, probe_rules, tc_filter_interfaces = filters, pins, pin_dir = %k.bpf_pin_dir.display(), "cleanup done");
            Ok(())
        }
        Command::Run(a) => {
            sysctl::apply(
                a.sysctls.multipath_hash_policy,
                a.sysctls.multipath_use_neigh,
            );
            let resync = Duration::from_secs(a.resync_seconds.max(1));
            let probes = serve::Probes::new(resync * 3 + Duration::from_secs(30));
            let metrics = std::sync::Arc::new(routing_agent::ops::metrics::Metrics::new());
            serve::spawn(a.health_addr, probes.clone(), Some(metrics.clone()))
                .await
                .with_context(|| format!("serving the health endpoints on {}", a.health_addr))?;
            let dataplane =
                Dataplane::new(dataplane_config(&a.kernel, !a.no_ebpf && a.flow_pinning)).await?;
            let programs = if a.no_ebpf {
                None
            } else {
                let log_format = match cli.log_format {
                    LogFormat::Text => "text",
                    LogFormat::Json => "json",
                };
                let loader_args = [
                    "--log-format".to_string(),
                    log_format.into(),
                    "--log-level".into(),
                    cli.log_level.clone(),
                ];
                Some(Programs::load(
                    &a.kernel.bpf_pin_dir,
                    a.tc_attach,
                    a.flow_pinning,
                    &loader_args,
                )?)
            };
            let (tx, rx) = mpsc::channel(4);
            let mut publisher = None;
            let probe_targets = a
                .probe_targets
                .iter()
                .map(|t| parse_probe_target(t, a.probe_port))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| anyhow::anyhow!(e))?;
            let mut protected: Vec<ipnet::IpNet> = a.protect.protected_cidrs.clone();
            if a.protect.metadata_address != "none" {
                protected.push(
                    parse_net(&a.protect.metadata_address)
                        .map_err(|e| anyhow::anyhow!("--metadata-address: {e}"))?,
                );
            }
            match &a.routes_dir {
                Some(dir) => source::dir::spawn(dir.clone(), tx)?,
                None => {
                    let (client, api_hosts) =
                        kube_client_and_hosts(a.kubeconfig.as_deref()).await?;
                    // The API server this agent was configured with is protected too,
                    // unless it is a cluster-internal address (the in-cluster
                    // configuration's service IP: its endpoints are followed instead).
                    protected.extend(
                        api_hosts
                            .into_iter()
                            .filter(|h| !a.protect.in_cluster_cidrs.iter().any(|n| n.contains(h)))
                            .map(ipnet::IpNet::from),
                    );
                    source::kube::spawn(client.clone(), a.node_name.clone(), tx, metrics.clone());
                    publisher = Some(publish::spawn(client, a.node_name.clone(), metrics.clone()));
                }
            }
            let node = NodeInfo {
                name: a.node_name,
                labels: a.node_labels.into_iter().collect::<BTreeMap<_, _>>(),
            };
            tracing::info!(node = %node.name, labels = ?node.labels, "routing-agent starting");
            agent::run(
                AgentConfig {
                    node,
                    resync,
                    retry_min: Duration::from_secs(1),
                    retry_max: Duration::from_secs(30),
                    status_file: a.status_file,
                    health: routing_agent::logic::health::Config {
                        window: a.failure_window,
                        min_failures: a.failure_threshold,
                        probe_interval: a.probe_interval,
                        flap_window: a.flap_window,
                        max_restore_delay: a.max_restore_delay,
                        pending_grace: a.pending_grace,
                        unresolved_grace: a.neighbour_grace,
                        false_alarm: a.false_alarm_rate,
                        max_failures: a.failure_threshold_max,
                        loss_half_life: a.loss_half_life,
                        loss_prior: routing_agent::logic::health::LOSS_PRIOR,
                    },
                    health_tick: a.health_interval,
                    publisher,
                    probes,
                    metrics,
                    policy: routing_agent::logic::plan::Policy {
                        fail_mode: a.fail_mode,
                    },
                    forward_probes: a.forwarding_probes.then(|| agent::ForwardProbes {
                        targets: probe_targets,
                        steering: steering(&a.kernel),
                    }),
                    protect: agent::ProtectConfig {
                        fixed: protected,
                        resolv_conf: Some(a.protect.resolv_conf.clone()),
                        in_cluster: a.protect.in_cluster_cidrs.clone(),
                        symmetric: a.kernel.symmetric_routing.then(|| agent::SymmetricConfig {
                            table: a.kernel.symmetric_table,
                            priority: a.kernel.symmetric_rule_priority,
                            interface: a.protect.public_interface.clone(),
                        }),
                    },
                },
                dataplane,
                programs,
                rx,
            )
            .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_zero_means_off_only_where_allowed() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert!(
            parse_duration("0s").is_err(),
            "an interval must be positive"
        );
        for off in ["0", "0s", "0ms", "0m"] {
            assert_eq!(parse_duration_or_zero(off), Ok(Duration::ZERO), "{off}");
        }
        assert_eq!(
            parse_duration_or_zero("500ms"),
            Ok(Duration::from_millis(500))
        );
        assert!(parse_duration_or_zero("-1s").is_err());
        assert!(parse_duration_or_zero("5x").is_err());
        assert!(parse_fail_mode("open").is_ok() && parse_fail_mode("shut").is_err());
    }

    #[test]
    fn probe_targets_and_marks_parse() {
        let t = |s: &str| parse_probe_target(s, 443).map(|a| a.to_string());
        assert_eq!(t("192.0.2.7"), Ok("192.0.2.7:443".into()));
        assert_eq!(t("192.0.2.7:80"), Ok("192.0.2.7:80".into()));
        assert_eq!(t("2001:db8::5"), Ok("[2001:db8::5]:443".into()));
        assert_eq!(t("[2001:db8::5]:80"), Ok("[2001:db8::5]:80".into()));
        assert!(t("example.com:80").unwrap_err().contains("--probe-target"));
        assert_eq!(parse_u32("0x1960000"), Ok(0x1960000));
        assert_eq!(parse_u32("15100"), Ok(15100));
        assert!(parse_u32("0xfffffffff").is_err() && parse_u32("mark").is_err());
    }

    /// `routing-agent run` with a routes dir, a node name and `extra`.
    fn run_args(extra: &[&str]) -> Result<Box<RunArgs>, clap::Error> {
        let base = [
            "routing-agent",
            "run",
            "--routes-dir",
            "/tmp",
            "--node-name",
            "n",
        ];
        let cli = Cli::try_parse_from(base.iter().chain(extra))?;
        let Command::Run(a) = cli.command else {
            panic!("not run")
        };
        Ok(a)
    }

    #[test]
    fn the_run_command_accepts_pending_grace_zero() {
        let a = run_args(&["--pending-grace", "0s", "--fail-mode", "open"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.pending_grace, Duration::ZERO);
    }

    #[test]
    fn the_false_alarm_rate_is_a_probability() {
        let a = run_args(&["--false-alarm-rate", "1e-4"]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.false_alarm_rate, 1e-4);
        assert_eq!((a.failure_threshold, a.failure_threshold_max), (2, 12));
        for bad in ["0", "1", "1.5", "often"] {
            let e = run_args(&["--false-alarm-rate", bad])
                .err()
                .expect(bad)
                .to_string();
            assert!(e.contains("--false-alarm-rate"), "{e}");
        }
    }
}
