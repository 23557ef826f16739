use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use routing_agent::agent::{self, AgentConfig};
use routing_agent::dataplane::{Config, Dataplane, ModeChoice, diff::IdRange, nexthop::Resilient};
use routing_agent::ebpf::{AttachMode, Programs};
use routing_agent::selector::NodeInfo;
use routing_agent::{controller, publish, serve, source, sysctl};
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
    /// Remove every route and nexthop the agent owns in this network namespace, and its
    /// bpffs pins.
    Cleanup(KernelArgs),
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
    /// bpffs directory for the agent's pinned maps (one per agent on a shared kernel).
    #[arg(long, default_value = "/sys/fs/bpf/routing-agent")]
    bpf_pin_dir: PathBuf,
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
    /// Interval of the ICMP probes of a withdrawn gateway (e.g. 30s, 500ms).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    probe_interval: Duration,
    /// Failed TCP connection attempts through a gateway, with no success since, that take
    /// it down (when a peer gateway succeeds meanwhile).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    failure_threshold: u32,
    /// Failed attempts older than this are forgotten.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    failure_window: Duration,
    /// A single failed attempt already counts as failing when another attempt through the
    /// same gateway has been unanswered this long, with no success since (0s: off).
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    pending_grace: Duration,
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
    /// Keep established TCP connections on the gateway they started on when the kernel
    /// re-routes them after a route change (as long as that gateway is up). Off: the
    /// kernel alone decides, and connections that move break on the other gateway's NAT.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    flow_pinning: bool,
}

/// `500ms`, `30s`, `10m`, `1h`, or bare seconds.
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

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

fn dataplane_config(k: &KernelArgs) -> Config {
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
        },
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

async fn kube_client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    kube::Client::try_from(config).context("connecting to the Kubernetes API server")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format, &cli.log_level);
    match cli.command {
        Command::Crd => {
            print!("{}", routing_agent::crd::yaml());
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
            serve::spawn(c.health_addr, probes.clone()).await?;
            controller::run(
                client,
                controller::Config {
                    deletion_timeout: c.deletion_timeout,
                },
                probes,
            )
            .await
        }
        Command::Cleanup(k) => {
            let mut dp = Dataplane::new(dataplane_config(&k)).await?;
            let removed = dp.remove_all().await?;
            let filters = routing_agent::ebpf::detach_netlink_filters();
            let pins = routing_agent::ebpf::remove_pins(&k.bpf_pin_dir)
                .with_context(|| format!("removing the pins in {}", k.bpf_pin_dir.display()))?;
            tracing::info!(removed, tc_filter_interfaces = filters, pins, pin_dir = %k.bpf_pin_dir.display(), "cleanup done");
            Ok(())
        }
        Command::Run(a) => {
            sysctl::apply(
                a.sysctls.multipath_hash_policy,
                a.sysctls.multipath_use_neigh,
            );
            let resync = Duration::from_secs(a.resync_seconds.max(1));
            let probes = serve::Probes::new(resync * 3 + Duration::from_secs(30));
            serve::spawn(a.health_addr, probes.clone())
                .await
                .with_context(|| format!("serving the health endpoints on {}", a.health_addr))?;
            let dataplane = Dataplane::new(dataplane_config(&a.kernel)).await?;
            let programs = if a.no_ebpf {
                None
            } else {
                Some(Programs::load(
                    &a.kernel.bpf_pin_dir,
                    a.tc_attach,
                    a.flow_pinning,
                )?)
            };
            let (tx, rx) = mpsc::channel(4);
            let mut publisher = None;
            match &a.routes_dir {
                Some(dir) => source::dir::spawn(dir.clone(), tx)?,
                None => {
                    let client = kube_client(a.kubeconfig.as_deref()).await?;
                    source::kube::spawn(client.clone(), a.node_name.clone(), tx);
                    publisher = Some(publish::spawn(client, a.node_name.clone()));
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
                    health: routing_agent::health::Config {
                        window: a.failure_window,
                        min_failures: a.failure_threshold,
                        probe_interval: a.probe_interval,
                        flap_window: a.flap_window,
                        max_restore_delay: a.max_restore_delay,
                        pending_grace: a.pending_grace,
                    },
                    health_tick: a.health_interval,
                    publisher,
                    probes,
                },
                dataplane,
                programs,
                rx,
            )
            .await
        }
    }
}
