//! Event sequences driven through [`Agent`] with a fake kernel and fake TC programs: what
//! each event makes the agent ask of the kernel, with no kernel involved.
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use routing_agent_common::{GW_DOWN, GatewayInfo, GatewayStats};

use super::*;
use crate::logic::crd::RouteSpec;
use crate::logic::default_route::{NodeFacts, Symmetric};
use crate::logic::desired::Problem;
use crate::node::dataplane::{Read, neigh::Neighbour, nexthop::NlError};
use crate::node::ebpf::HealthRecord;

const A: &str = "10.114.0.3";
const B: &str = "10.114.0.4";
const DST: &str = "198.51.100.0/24";
const OIF: u32 = 7;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// Every gateway is on interface `OIF` unless listed unreachable; every reconcile's plan
/// is kept for the test to read.
#[derive(Default)]
struct FakeKernel {
    plans: Vec<DesiredState>,
    /// How much of the kernel each reconcile was asked to read first.
    fresh: Vec<Read>,
    unreachable: BTreeSet<IpAddr>,
    neighbours: BTreeMap<IpAddr, Neighbour>,
}

impl FakeKernel {
    fn last_plan(&self) -> &DesiredState {
        self.plans.last().expect("reconciled at least once")
    }
}

impl Kernel for FakeKernel {
    async fn reconcile(
        &mut self,
        desired: &Arc<DesiredState>,
        read: Read,
    ) -> anyhow::Result<Outcome> {
        self.plans.push((**desired).clone());
        self.fresh.push(read);
        let mut out = Outcome {
            problems: desired.problems.clone(),
            ..Outcome::default()
        };
        for (dst, r) in &desired.routes {
            for gw in r.gateways.iter().chain(&r.withdrawn) {
                if self.unreachable.contains(gw) {
                    out.problems.push(Problem {
                        route: r.owner.clone(),
                        kind: ProblemKind::GatewayUnreachable { gateway: *gw },
                        message: format!("gateway {gw} unreachable"),
                    });
                } else {
                    out.gateway_oifs.insert(*gw, OIF);
                }
            }
            let usable: Vec<IpAddr> = r
                .gateways
                .iter()
                .filter(|g| !self.unreachable.contains(g))
                .copied()
                .collect();
            if !usable.is_empty() {
                Arc::make_mut(&mut out.installed).insert(*dst, usable);
                out.interfaces.insert(OIF);
            }
        }
        out.problems.sort();
        out.problems.dedup();
        // Something changed when the plan did (as the kernel would say).
        let n = self.plans.len();
        out.changes = usize::from(n < 2 || self.plans[n - 2] != self.plans[n - 1]);
        Ok(out)
    }

    async fn facts(&self, _symmetric: Option<&Symmetric>) -> Result<NodeFacts, NlError> {
        Ok(NodeFacts::default())
    }

    async fn neighbours(
        &self,
        gateways: &BTreeMap<IpAddr, u32>,
    ) -> Result<BTreeMap<IpAddr, Neighbour>, NlError> {
        Ok(self
            .neighbours
            .iter()
            .filter(|(g, _)| gateways.contains_key(g))
            .map(|(g, n)| (*g, *n))
            .collect())
    }
}

/// Counters the test sets; records and attachments kept as the real maps would.
#[derive(Default)]
struct FakePrograms {
    gateways: BTreeSet<IpAddr>,
    stats: BTreeMap<IpAddr, GatewayStats>,
    records: BTreeMap<IpAddr, HealthRecord>,
    attached: BTreeSet<u32>,
    /// What an earlier agent left in the slots.
    pinned: Vec<(IpAddr, GatewayInfo)>,
    uplink: Option<u32>,
    /// What `RA_TARGETS` holds: gateway → latest answered destination, its age.
    targets: BTreeMap<IpAddr, (std::net::SocketAddr, Duration)>,
}

impl TcPrograms for FakePrograms {
    fn set_gateways(&mut self, gateways: &BTreeSet<IpAddr>) {
        self.gateways = gateways.clone();
    }
    fn sync(&mut self, ifindexes: &BTreeSet<u32>) {
        self.attached = ifindexes.clone();
    }
    fn covers(&self, ifindexes: &BTreeSet<u32>) -> bool {
        ifindexes.is_subset(&self.attached)
    }
    fn attached(&self) -> Vec<String> {
        self.attached.iter().map(|i| format!("if{i}")).collect()
    }
    fn set_neighbours(&mut self, _want: &BTreeMap<(u32, [u8; 6], u8), IpAddr>) -> usize {
        0
    }
    fn read_stats(&self) -> BTreeMap<IpAddr, GatewayStats> {
        self.stats.clone()
    }
    fn read_targets(&self) -> BTreeMap<IpAddr, (std::net::SocketAddr, Duration)> {
        self.targets.clone()
    }
    fn record_health(&mut self, gw: IpAddr, h: HealthRecord) {
        self.records.insert(gw, h);
    }
    fn recorded(&self) -> Vec<(IpAddr, GatewayInfo)> {
        self.pinned.clone()
    }
    fn guard_uplink(&mut self, ifindex: Option<u32>) {
        self.uplink = ifindex;
    }
    fn uplink_refused(&self) -> u64 {
        0
    }
    fn slot(&self, gw: IpAddr) -> Option<u32> {
        self.gateways
            .iter()
            .position(|g| *g == gw)
            .map(|i| i as u32)
    }
}

fn config() -> AgentConfig {
    AgentConfig {
        node: NodeInfo::new("node-a", &[("pool", "a")]),
        resync: Duration::from_secs(30),
        retry_min: Duration::from_secs(1),
        retry_max: Duration::from_secs(30),
        status_file: None,
        health: health::Config {
            window: Duration::from_secs(10),
            min_failures: 2,
            probe_interval: Duration::from_secs(1),
            flap_window: Duration::from_secs(60),
            max_restore_delay: Duration::from_secs(8),
            pending_grace: Duration::from_millis(500),
            unresolved_grace: Duration::from_secs(3),
            // No prior of the loss estimate: judged at the floor (health.rs tests the rest).
            loss_prior: (0.0, 20.0),
            ..health::Config::default()
        },
        health_tick: Duration::from_millis(200),
        publisher: None,
        probes: crate::ops::http::Probes::new(Duration::from_secs(60)),
        protect: ProtectConfig::default(),
        metrics: Arc::new(crate::ops::metrics::Metrics::new()),
        policy: plan::Policy::default(),
        forward_probes: None,
    }
}

fn route(name: &str, dst: &[&str], gws: &[&str]) -> Route {
    Route::new(
        name,
        RouteSpec {
            destinations: dst.iter().map(|s| s.to_string()).collect(),
            gateways: gws.iter().map(|s| s.to_string()).collect(),
            node_selector: None,
        },
    )
}

fn snapshot(routes: Vec<Route>) -> Snapshot {
    Snapshot {
        routes: routes.into_iter().map(std::sync::Arc::new).collect(),
        ..Snapshot::default()
    }
}

fn agent(programs: FakePrograms) -> Agent<FakeKernel, FakePrograms> {
    Agent::new(config(), FakeKernel::default(), Some(programs))
}

/// `sent` connection attempts, `failed` of them failed, `ok` answered.
fn sent(sent: u64, failed: u64, ok: u64) -> GatewayStats {
    GatewayStats {
        syn_sent: sent,
        failed,
        established: ok,
        ..Default::default()
    }
}

fn gateways_of(plan: &DesiredState, dst: &str) -> (Vec<IpAddr>, Vec<IpAddr>) {
    let r = &plan.routes[&net(dst)];
    (r.gateways.clone(), r.withdrawn.clone())
}

/// One health tick at `t0 + ms` with these counters.
async fn tick(
    a: &mut Agent<FakeKernel, FakePrograms>,
    t0: Instant,
    ms: u64,
    stats: &[(&str, GatewayStats)],
) -> Next {
    let p = a.programs_mut().unwrap();
    for (g, s) in stats {
        p.stats.insert(ip(g), *s);
    }
    a.on_health_tick(t0 + Duration::from_millis(ms)).await
}

#[tokio::test]
async fn nothing_reaches_the_kernel_before_the_first_snapshot() {
    let mut a = agent(FakePrograms::default());
    let t0 = Instant::now();
    for next in [
        a.on_resync().await,
        a.on_netlink().await,
        a.on_retry().await,
        a.on_health_tick(t0).await,
    ] {
        assert_eq!(next, Next::default());
    }
    assert!(
        a.kernel().plans.is_empty(),
        "a restart must not touch the kernel"
    );
    assert!(a.last().is_none());
}

#[tokio::test]
async fn a_snapshot_is_planned_and_reconciled() {
    let mut a = agent(FakePrograms::default());
    a.on_snapshot(snapshot(vec![route("r", &[DST], &[B, A])]))
        .await;
    assert_eq!(a.kernel().plans.len(), 1);
    let plan = a.kernel().last_plan();
    assert_eq!(gateways_of(plan, DST), (vec![ip(A), ip(B)], vec![]));
    assert_eq!(plan.selected, vec!["r".to_string()]);
    let (_, outcome) = a.last().unwrap();
    assert_eq!(outcome.installed[&net(DST)], vec![ip(A), ip(B)]);
    // The TC programs follow the gateways and sit on their interface.
    let p = a.programs_mut().unwrap();
    assert_eq!(p.gateways, [ip(A), ip(B)].into());
    assert_eq!(p.attached, [OIF].into());
    // The pass changed the kernel: another confirms it shortly after (how the gateways
    // resolve, and the agent's objects if someone else touched them; the whole table is
    // the resync's), then nothing.
    let verify = a.retry_at().expect("a confirming pass is scheduled");
    assert!(verify <= Instant::now() + VERIFY_AFTER);
    a.on_retry().await;
    assert_eq!(a.kernel().fresh.last(), Some(&Read::Gateways));
    assert_eq!(a.retry_at(), None, "nothing changed: nothing scheduled");
    a.on_resync().await;
    assert_eq!(a.kernel().fresh.last(), Some(&Read::All));
}

#[tokio::test]
async fn a_lost_api_server_removes_nothing() {
    // The Kubernetes source sends nothing while the API server is gone: every other
    // event re-plans the last complete view, which keeps the routes.
    let mut a = agent(FakePrograms::default());
    a.on_snapshot(snapshot(vec![route("r", &[DST], &[A, B])]))
        .await;
    for _ in 0..3 {
        a.on_resync().await;
        a.on_netlink().await;
    }
    assert_eq!(a.kernel().plans.len(), 7);
    assert!(
        a.kernel()
            .plans
            .iter()
            .all(|p| p.routes.contains_key(&net(DST))),
        "no plan without the route"
    );
    // An empty snapshot is a real deletion, and is followed.
    a.on_snapshot(snapshot(vec![])).await;
    assert!(a.kernel().last_plan().routes.is_empty());
}

#[tokio::test]
async fn a_black_holing_gateway_is_withdrawn_probed_and_restored() {
    let mut a = agent(FakePrograms::default());
    a.on_snapshot(snapshot(vec![route("r", &[DST], &[A, B])]))
        .await;
    let t0 = Instant::now();
    // First sight of the counters: the baseline.
    tick(&mut a, t0, 0, &[(A, sent(0, 0, 0)), (B, sent(0, 0, 0))]).await;
    // Two attempts through A, none answered; B keeps succeeding.
    tick(&mut a, t0, 200, &[(A, sent(2, 0, 0)), (B, sent(3, 0, 3))]).await;
    assert_eq!(a.kernel().plans.len(), 1, "no state change, no reconcile");
    // A's first SYN is retransmitted while the second waited ≥ 500 ms: A is withdrawn.
    let next = tick(&mut a, t0, 1200, &[(A, sent(2, 1, 0)), (B, sent(6, 0, 6))]).await;
    assert_eq!(a.kernel().plans.len(), 2, "the withdrawal reconciles");
    assert_eq!(
        gateways_of(a.kernel().last_plan(), DST),
        (vec![ip(B)], vec![ip(A)])
    );
    assert!(a.health().get(&ip(A)).unwrap().down);
    assert!(next.probe.is_empty(), "the first probe waits one interval");
    let rec = a.programs_mut().unwrap().records[&ip(A)];
    assert_eq!(rec.state, GW_DOWN, "the verdict is recorded in its slot");

    // One interval later the probe is due.
    let next = tick(&mut a, t0, 2200, &[(A, sent(2, 1, 0)), (B, sent(8, 0, 8))]).await;
    assert_eq!(probed(&next), vec![(ip(A), ProbeKind::Echo)]);
    // Unanswered: nothing changes.
    let n = a.kernel().plans.len();
    a.on_probe_result(next.probe[0], false, t0 + Duration::from_millis(2300))
        .await;
    assert_eq!(a.kernel().plans.len(), n);
    // Answered: A is back in the route.
    let next = tick(&mut a, t0, 3200, &[(A, sent(2, 1, 0)), (B, sent(9, 0, 9))]).await;
    assert_eq!(probed(&next), vec![(ip(A), ProbeKind::Echo)]);
    a.on_probe_result(next.probe[0], true, t0 + Duration::from_millis(3300))
        .await;
    assert_eq!(a.kernel().plans.len(), n + 1);
    assert_eq!(
        gateways_of(a.kernel().last_plan(), DST),
        (vec![ip(A), ip(B)], vec![])
    );
    assert!(!a.health().get(&ip(A)).unwrap().down);
}

fn probed(next: &Next) -> Vec<(IpAddr, ProbeKind)> {
    next.probe.iter().map(|p| (p.gateway(), p.kind())).collect()
}

fn forwarding(targets: &[&str]) -> Option<super::ForwardProbes> {
    Some(super::ForwardProbes {
        targets: targets.iter().map(|t| t.parse().unwrap()).collect(),
        steering: crate::node::probe::Steering {
            protocol: 196,
            table_base: 19_600,
            mark_base: 0x1960000,
            rule_priority: 15_100,
        },
    })
}

/// Withdraws A (of A, B on `DST`) and returns the probes due one interval later.
async fn probes_of_withdrawn_a(
    cfg_targets: &[&str],
    learned: &[(&str, &str, u64)],
    extra: Vec<Route>,
) -> (Agent<FakeKernel, FakePrograms>, Next) {
    let mut cfg = config();
    cfg.forward_probes = forwarding(cfg_targets);
    let mut programs = FakePrograms::default();
    for (gw, t, age) in learned {
        programs
            .targets
            .insert(ip(gw), (t.parse().unwrap(), Duration::from_secs(*age)));
    }
    let mut a = Agent::new(cfg, FakeKernel::default(), Some(programs));
    let mut routes = vec![route("r", &[DST], &[A, B])];
    routes.extend(extra);
    a.on_snapshot(snapshot(routes)).await;
    let t0 = Instant::now();
    tick(&mut a, t0, 0, &[(A, sent(0, 0, 0)), (B, sent(0, 0, 0))]).await;
    tick(&mut a, t0, 200, &[(A, sent(2, 0, 0)), (B, sent(3, 0, 3))]).await;
    tick(&mut a, t0, 1200, &[(A, sent(2, 1, 0)), (B, sent(6, 0, 6))]).await;
    assert!(a.health().get(&ip(A)).unwrap().down);
    let next = tick(&mut a, t0, 2200, &[(A, sent(2, 1, 0)), (B, sent(8, 0, 8))]).await;
    (a, next)
}

#[tokio::test]
async fn a_withdrawn_gateway_is_probed_through_itself_to_where_a_peer_got_answers() {
    let (mut a, next) = probes_of_withdrawn_a(
        &[],
        &[(B, "198.51.100.9:7", 2), (A, "198.51.100.8:7", 1)],
        vec![],
    )
    .await;
    let target = "198.51.100.9:7".parse().unwrap();
    assert_eq!(probed(&next), vec![(ip(A), ProbeKind::Forward(target))]);
    let p = next.probe[0];
    let Probe::Forward(f) = p else {
        panic!("{p:?}")
    };
    assert_eq!((f.oif, f.index), (OIF, 0), "A's interface and slot");
    // An answer restores it, and says so.
    let t = Instant::now() + Duration::from_secs(5);
    a.on_probe_result(p, true, t).await;
    let h = a.health().get(&ip(A)).unwrap();
    assert!(!h.down);
    assert!(
        h.reason.contains("TCP probe to 198.51.100.9:7"),
        "{}",
        h.reason
    );
    assert_eq!(h.last_probe, Some(ProbeKind::Forward(target)));
}

#[tokio::test]
async fn an_unanswered_forwarding_probe_keeps_the_gateway_withdrawn() {
    let (mut a, next) = probes_of_withdrawn_a(&[], &[(B, "198.51.100.9:7", 2)], vec![]).await;
    let n = a.kernel().plans.len();
    a.on_probe_result(
        next.probe[0],
        false,
        Instant::now() + Duration::from_secs(5),
    )
    .await;
    assert!(a.health().get(&ip(A)).unwrap().down);
    assert_eq!(a.kernel().plans.len(), n, "no reconcile");
}

#[tokio::test]
async fn with_no_target_a_peer_reached_through_the_gateways_route_the_probe_is_an_echo() {
    // B's latest answer is for a destination only B serves; A's own is not used.
    let (_, next) = probes_of_withdrawn_a(
        &[],
        &[(B, "203.0.113.5:443", 1), (A, "198.51.100.8:7", 1)],
        vec![route("b-only", &["203.0.113.0/24"], &[B])],
    )
    .await;
    assert_eq!(probed(&next), vec![(ip(A), ProbeKind::Echo)]);
    // Another family does not count.
    let (_, next) = probes_of_withdrawn_a(&[], &[(B, "[2001:db8::1]:7", 1)], vec![]).await;
    assert_eq!(probed(&next), vec![(ip(A), ProbeKind::Echo)]);
    // Too old.
    let (_, next) = probes_of_withdrawn_a(&[], &[(B, "198.51.100.9:7", 7200)], vec![]).await;
    assert_eq!(probed(&next), vec![(ip(A), ProbeKind::Echo)]);
}

#[tokio::test]
async fn a_configured_probe_target_of_the_family_wins() {
    let (_, next) = probes_of_withdrawn_a(
        &["[2001:db8::5]:80", "192.0.2.7:80"],
        &[(B, "198.51.100.9:7", 1)],
        vec![],
    )
    .await;
    let t = "192.0.2.7:80".parse().unwrap();
    assert_eq!(probed(&next), vec![(ip(A), ProbeKind::Forward(t))]);
}

#[tokio::test]
async fn a_destination_whose_gateways_are_all_down_has_none_left() {
    let mut a = agent(FakePrograms::default());
    a.on_snapshot(snapshot(vec![
        route("ecmp", &[DST], &[A, B]),
        route("single", &["203.0.113.0/24"], &[A]),
    ]))
    .await;
    let t0 = Instant::now();
    tick(&mut a, t0, 0, &[(A, sent(0, 0, 0)), (B, sent(0, 0, 0))]).await;
    tick(&mut a, t0, 200, &[(A, sent(2, 0, 0)), (B, sent(3, 0, 3))]).await;
    tick(&mut a, t0, 1200, &[(A, sent(2, 1, 0)), (B, sent(6, 0, 6))]).await;
    let plan = a.kernel().last_plan();
    assert_eq!(gateways_of(plan, DST), (vec![ip(B)], vec![ip(A)]));
    // No gateway left: the plan keeps the destination (the kernel keeps refusing its
    // traffic) and says why.
    assert_eq!(gateways_of(plan, "203.0.113.0/24"), (vec![], vec![ip(A)]),);
    assert!(plan.problems.iter().any(|p| matches!(
        &p.kind,
        ProblemKind::NoGateway { destination, why: crate::logic::desired::NoGateway::AllDown, .. }
            if *destination == net("203.0.113.0/24")
    )));
}

#[tokio::test]
async fn unresolved_gateways_are_warmed_up_every_few_seconds() {
    let mut a = agent(FakePrograms::default());
    a.on_snapshot(snapshot(vec![route("r", &[DST], &[A, B])]))
        .await;
    a.kernel.neighbours.insert(
        ip(B),
        Neighbour {
            ifindex: OIF,
            mac: Some([2, 0, 0, 0, 0, 4]),
            failed: false,
            unresolved: false,
        },
    );
    let t0 = Instant::now();
    assert_eq!(tick(&mut a, t0, 0, &[]).await.warm_up, vec![ip(A)]);
    assert!(tick(&mut a, t0, 200, &[]).await.warm_up.is_empty());
    assert_eq!(tick(&mut a, t0, 5200, &[]).await.warm_up, vec![ip(A)]);
}

#[tokio::test]
async fn an_unreachable_gateway_is_retried_with_back_off() {
    let mut a = agent(FakePrograms::default());
    a.kernel.unreachable.insert(ip(A));
    let before = Instant::now();
    a.on_snapshot(snapshot(vec![route("r", &[DST], &[A])]))
        .await;
    let first = a.retry_at().expect("a retry is scheduled");
    assert!(first >= before + Duration::from_secs(1));
    let (_, outcome) = a.last().unwrap();
    assert!(matches!(
        outcome.problems[0].kind,
        ProblemKind::GatewayUnreachable { .. }
    ));
    a.on_retry().await;
    assert_eq!(
        a.kernel().fresh.last(),
        Some(&Read::All),
        "a retry reads everything"
    );
    let second = a.retry_at().expect("still unreachable");
    assert!(
        second >= first + Duration::from_secs(1),
        "the back-off grows"
    );
    // Reachable again: installed, nothing pending.
    a.kernel.unreachable.clear();
    a.on_retry().await;
    assert_eq!(a.retry_at(), None);
    assert_eq!(a.last().unwrap().1.installed[&net(DST)], vec![ip(A)]);
}

#[tokio::test]
async fn a_node_relabelled_by_the_source_is_replanned() {
    let mut sel = route("pool-b", &[DST], &[A]);
    sel.spec.node_selector = Some(
        serde_json::from_value(serde_json::json!({"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["b"]}]}]}))
        .unwrap(),
    );
    let mut a = agent(FakePrograms::default());
    a.on_snapshot(snapshot(vec![sel.clone()])).await;
    assert!(a.kernel().last_plan().routes.is_empty());
    a.on_snapshot(Snapshot {
        routes: vec![std::sync::Arc::new(sel)],
        node_labels: Some([("pool".to_string(), "b".to_string())].into()),
        control_plane: None,
    })
    .await;
    assert!(a.kernel().last_plan().routes.contains_key(&net(DST)));
}

#[tokio::test]
async fn a_verdict_pinned_by_an_earlier_agent_is_kept() {
    let mut info = GatewayInfo {
        family: 4,
        state: GW_DOWN,
        penalty: 2,
        ..GatewayInfo::default()
    };
    info.addr[..4].copy_from_slice(&[10, 114, 0, 3]);
    let mut a = agent(FakePrograms {
        pinned: vec![(ip(A), info)],
        ..FakePrograms::default()
    });
    a.on_snapshot(snapshot(vec![route("r", &[DST], &[A, B])]))
        .await;
    assert_eq!(
        gateways_of(a.kernel().last_plan(), DST),
        (vec![ip(B)], vec![ip(A)]),
        "still withdrawn after the restart"
    );
    assert_eq!(a.health().get(&ip(A)).unwrap().penalty, 2);
}

#[tokio::test]
async fn without_programs_there_is_no_health_and_shutdown_stops() {
    let mut a: Agent<FakeKernel, FakePrograms> = Agent::new(config(), FakeKernel::default(), None);
    assert!(!a.has_programs());
    a.on_snapshot(snapshot(vec![route("r", &[DST], &[A, B])]))
        .await;
    let n = a.kernel().plans.len();
    assert_eq!(a.on_health_tick(Instant::now()).await, Next::default());
    assert_eq!(a.kernel().plans.len(), n);
    assert!(a.on_shutdown().stop);
}

#[tokio::test]
async fn only_someone_elses_change_a_retry_or_the_resync_read_the_kernel() {
    let mut a = agent(FakePrograms::default());
    a.on_snapshot(snapshot(vec![route("r", &[DST], &[A, B])]))
        .await;
    a.on_snapshot(snapshot(vec![route("r", &[DST], &[A])]))
        .await;
    a.on_netlink().await;
    a.on_resync().await;
    a.on_retry().await;
    assert_eq!(
        a.kernel().fresh,
        vec![Read::View, Read::View, Read::Gateways, Read::All, Read::All],
        "edits diff against the kernel as the agent left it; someone else's change re-reads \
         the gateways; the resync and a retry read everything"
    );
}

#[tokio::test]
async fn a_withdrawal_starts_from_the_last_plan_and_reads_nothing() {
    let mut a = agent(FakePrograms::default());
    a.on_snapshot(snapshot(vec![route("r", &[DST], &[A, B])]))
        .await;
    let t0 = Instant::now();
    tick(&mut a, t0, 0, &[(A, sent(0, 0, 0)), (B, sent(0, 0, 0))]).await;
    tick(&mut a, t0, 200, &[(A, sent(2, 0, 0)), (B, sent(3, 0, 3))]).await;
    // The Routes the agent holds change without a snapshot (they cannot, but if they did,
    // a health pass must not pick them up: it is not a plan).
    a.routes = Some(vec![]);
    tick(&mut a, t0, 1200, &[(A, sent(2, 1, 0)), (B, sent(6, 0, 6))]).await;
    assert_eq!(a.kernel().fresh.last(), Some(&Read::View));
    assert_eq!(
        gateways_of(a.kernel().last_plan(), DST),
        (vec![ip(B)], vec![ip(A)]),
        "the last plan, A withdrawn"
    );
}
