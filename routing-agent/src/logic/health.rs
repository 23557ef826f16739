//! Gateway health: a state machine per gateway, fed with the eBPF counters, the
//! neighbour table and ICMP probe results. Pure (the caller passes the clock), so every
//! rule below is unit-tested.
//!
//! - **up → down** when, since its last successful connection attempt, a gateway is
//!   *failing* — it collected ≥ `min_failures` failed attempts within `window`, or one
//!   failed attempt corroborated by another attempt unanswered for `pending_grace` or more
//!   — *and* a peer (a gateway sharing a route with it, itself up and not failing)
//!   succeeded meanwhile. The corroborated single failure is what makes detection fast:
//!   a SYN is only known lost when the kernel retransmits it (1 s), and waiting for a
//!   second retransmission costs another inter-arrival time; an attempt that got no answer
//!   within `pending_grace` while none got through is the same evidence, earlier. A lone
//!   lost SYN on a healthy gateway is not enough: the attempts after it are answered. Failures that
//!   hit every gateway alike point at the destination, not at a gateway: nothing is
//!   withdrawn then. A neighbour entry turning FAILED (ARP/ND unanswered) is the gateway's
//!   own fault and takes it down without comparing.
//! - **down**: probed every `probe_interval`, by preference *through* the gateway: a TCP
//!   connection attempt to a destination that answered recently through an up peer (or a
//!   configured target) — see [`forwarding_target`]. Only with no such target, or with
//!   forwarding probes off, with an ICMP echo to the gateway itself (as DOKS does), which
//!   proves it alive but not forwarding.
//! - **down → up** on an answered probe, but not before `restore_after`: a gateway that
//!   fails again within `flap_window` of its last restore gets a penalty, and its restore
//!   waits `probe_interval × 2^penalty` (capped at `max_restore_delay`). A gateway that
//!   answers ping but drops forwarded traffic is not restored by a forwarding probe at all;
//!   restored by echoes (no target known), it comes back ever more rarely.
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use routing_agent_common::GatewayStats;

#[derive(Clone, Debug)]
pub struct Config {
    /// Failed attempts older than this are forgotten.
    pub window: Duration,
    /// Failed attempts (with no success since) that make a gateway suspect.
    pub min_failures: u32,
    pub probe_interval: Duration,
    /// A new failure this soon after a restore raises the damping penalty.
    pub flap_window: Duration,
    /// Cap of the damped restore delay.
    pub max_restore_delay: Duration,
    /// An attempt unanswered for this long corroborates a single failure (zero: off, only
    /// `min_failures` counts).
    pub pending_grace: Duration,
    /// A neighbour entry unresolved (INCOMPLETE or FAILED) this long is as good as FAILED.
    /// Under steady traffic the kernel cycles FAILED → INCOMPLETE at once (every new packet
    /// starts resolving again), so a reader sampling the table rarely sees FAILED itself;
    /// a healthy gateway resolves within the kernel's own 3 probes of 1 s.
    pub unresolved_grace: Duration,
    /// The accepted chance, per connection attempt, that a healthy gateway losing
    /// attempts at its measured rate `p` is taken down: the unanswered attempts in a row
    /// that take a gateway down are the least `k` with `p^k ≤ false_alarm`, within
    /// `min_failures..=max_failures`.
    pub false_alarm: f64,
    /// Cap of the adaptive threshold.
    pub max_failures: u32,
    /// Half-life of the measured loss rate (older attempts weigh less).
    pub loss_half_life: Duration,
    /// The prior of the measured loss rate, as (failed, attempts): see [`LOSS_PRIOR`].
    pub loss_prior: (f64, f64),
}

/// A gateway's neighbour entry, as the health tick read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Neighbour {
    /// No entry (nothing was sent to it lately), or the table could not be read.
    Unknown,
    Resolved,
    /// INCOMPLETE: being resolved.
    Unresolved,
    /// FAILED: the kernel gave up.
    Failed,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            window: Duration::from_secs(10),
            min_failures: 2,
            probe_interval: Duration::from_secs(30),
            flap_window: Duration::from_secs(600),
            max_restore_delay: Duration::from_secs(960),
            pending_grace: Duration::from_millis(500),
            unresolved_grace: Duration::from_secs(4),
            false_alarm: 1e-6,
            max_failures: 12,
            loss_half_life: Duration::from_secs(120),
            loss_prior: LOSS_PRIOR,
        }
    }
}

/// The prior of the loss estimate, as (failed, attempts): 0.5 % over 20 attempts. Light,
/// so that the first losses a gateway shows move its estimate at once. A gateway with no
/// history starts one above the floor (3 at the defaults) and reaches it (2) after some
/// 100 clean attempts: the first losses of a lossy gateway come before its estimate
/// knows them, and two in a row (a 0.16 % chance at 4 % loss) would withdraw it. Chosen
/// with the simulation in the tests (`prior_choice`): at (0.02, 20), 3 of 200 five-minute
/// runs of a gateway losing 4 % of its attempts from the start saw a false withdrawal (3
/// of 200 with all three gateways lossy); at (0.1, 20), 0 of 1,000 (0 of 1,000), with a
/// black hole after a minute of clean traffic withdrawn as fast (p50 1.2 s, p90 1.8 s).
pub const LOSS_PRIOR: (f64, f64) = (0.1, 20.0);

/// A gateway's attempt loss rate, measured on attempts that were *resolved*: failures are
/// counted as loss only once the gateway proved, by a later success, that it still
/// forwards (a streak that ends in a withdrawal is a black hole, not loss). Exponentially
/// decayed, so the estimate follows the path as it changes.
#[derive(Clone, Copy, Debug, Default)]
pub struct LossRate {
    failed: f64,
    attempts: f64,
    at: Option<Instant>,
}

impl LossRate {
    fn decay(&self, half_life: Duration, now: Instant) -> f64 {
        match self.at {
            Some(t) if !half_life.is_zero() => {
                let dt = now.saturating_duration_since(t).as_secs_f64();
                0.5f64.powf(dt / half_life.as_secs_f64())
            }
            _ => 1.0,
        }
    }

    /// Adds `attempts` resolved attempts, `failed` of them lost.
    fn add(&mut self, failed: u64, attempts: u64, half_life: Duration, now: Instant) {
        let d = self.decay(half_life, now);
        self.failed = self.failed * d + failed as f64;
        self.attempts = self.attempts * d + attempts as f64;
        self.at = Some(now);
    }

    /// The estimate at `now` (the prior included).
    pub fn rate(&self, cfg: &Config, now: Instant) -> f64 {
        let d = self.decay(cfg.loss_half_life, now);
        let (f0, n0) = cfg.loss_prior;
        (self.failed * d + f0) / (self.attempts * d + n0).max(f64::MIN_POSITIVE)
    }
}

/// The unanswered attempts in a row that take down a gateway losing attempts at rate `p`:
/// the least `k` with `p^k ≤ cfg.false_alarm`, within `min_failures..=max_failures`.
pub fn threshold(cfg: &Config, p: f64) -> u32 {
    let lo = cfg.min_failures.max(1);
    let hi = cfg.max_failures.max(lo);
    if !(cfg.false_alarm > 0.0 && cfg.false_alarm < 1.0) || p <= 0.0 {
        return lo;
    }
    if p >= 1.0 {
        return hi;
    }
    // The epsilon keeps an exact power (0.001² = 1e-6) from rounding up.
    let k = (cfg.false_alarm.ln() / p.ln() - 1e-9).ceil();
    (k.max(0.0) as u32).clamp(lo, hi)
}

/// How a withdrawn gateway is probed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeKind {
    /// An ICMP echo to the gateway: alive, not proof that it forwards.
    Echo,
    /// A TCP connection attempt through the gateway to this destination.
    Forward(SocketAddr),
}

impl ProbeKind {
    /// The metrics label and the status field: `icmp` or `tcp`.
    pub fn label(&self) -> &'static str {
        match self {
            ProbeKind::Echo => "icmp",
            ProbeKind::Forward(_) => "tcp",
        }
    }

    pub fn target(&self) -> Option<SocketAddr> {
        match self {
            ProbeKind::Echo => None,
            ProbeKind::Forward(t) => Some(*t),
        }
    }
}

/// Learned targets older than this are not used (a destination that answered an hour ago
/// most likely still does; an older one may be gone).
pub const TARGET_MAX_AGE: Duration = Duration::from_secs(3600);

/// The target of a forwarding probe through `gw`, or `None` (probe with an echo).
///
/// - The first of `configured` of `gw`'s family: the operator's choice wins.
/// - Else the freshest destination (at most `max_age` old) in `learned` (gateway → the
///   latest destination whose SYN-ACK came back through it, and its age) of one of
///   `peers` that is up — a destination that answers, through a gateway that forwards —
///   provided `serves` says that traffic to it takes a route through `gw` (so the probe
///   asks `gw` for what it is meant to carry, not for a destination a remote allow-list
///   may refuse it). The gateway's own last destination is not used: the route to it may
///   now be the fail-closed `unreachable` one, and a node with a reverse-path filter drops
///   the answer then.
pub fn forwarding_target(
    gw: IpAddr,
    configured: &[SocketAddr],
    learned: &BTreeMap<IpAddr, (SocketAddr, Duration)>,
    peers: Option<&BTreeSet<IpAddr>>,
    is_down: impl Fn(&IpAddr) -> bool,
    serves: impl Fn(IpAddr) -> bool,
    max_age: Duration,
) -> Option<SocketAddr> {
    if let Some(t) = configured.iter().find(|t| t.is_ipv4() == gw.is_ipv4()) {
        return Some(*t);
    }
    peers?
        .iter()
        .filter(|p| !is_down(p))
        .filter_map(|p| learned.get(p))
        .filter(|(t, age)| t.is_ipv4() == gw.is_ipv4() && *age <= max_age)
        .filter(|(t, _)| serves(t.ip()))
        .min_by_key(|(_, age)| *age)
        .map(|(t, _)| *t)
}

/// Whether traffic to `addr` takes a route through `gw` that has a usable gateway: the
/// longest prefix of `routes` that holds `addr` lists `gw` (in use or withdrawn) and
/// still has a gateway in use. At most 33 (129) lookups, whatever the number of routes.
pub fn serves(
    routes: &BTreeMap<ipnet::IpNet, crate::logic::desired::DesiredRoute>,
    gw: IpAddr,
    addr: IpAddr,
) -> bool {
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (0..=max)
        .rev()
        .find_map(|len| {
            let net = ipnet::IpNet::new(addr, len).ok()?.trunc();
            routes.get(&net)
        })
        .is_some_and(|r| {
            !r.gateways.is_empty() && (r.gateways.contains(&gw) || r.withdrawn.contains(&gw))
        })
}

/// One gateway as the state machine sees it.
#[derive(Clone, Debug)]
pub struct GatewayHealth {
    pub down: bool,
    /// Why it is in its state (for logs, status and events).
    pub reason: String,
    /// When it entered its state.
    pub since: Instant,
    pub penalty: u32,
    /// Down: not restored before this, whatever the probes say.
    pub restore_after: Option<Instant>,
    /// Down: when the next probe is due.
    pub next_probe: Option<Instant>,
    /// Down: outcome of the last probe.
    pub last_probe_ok: Option<bool>,
    /// The kind of the last probe (kept after a restore: the one that restored it).
    pub last_probe: Option<ProbeKind>,
    /// Latest counters (summed over CPUs).
    pub counters: GatewayStats,
    /// Measured loss of connection attempts (see [`LossRate`]).
    pub loss: LossRate,
    /// The counters at the previous observation (deltas are taken against them).
    prev: Option<GatewayStats>,
    failures: VecDeque<Instant>,
    last_success: Option<Instant>,
    /// `syn_sent` when the last success was observed.
    sent_at_success: u64,
    /// (observation time, cumulative `syn_sent`) since the last success, oldest first.
    sent_log: VecDeque<(Instant, u64)>,
    restored_at: Option<Instant>,
    /// Down by the TCP verdict: the failed attempts that took it down. A forwarding probe
    /// that restores it proves they were not a black hole of everything (loss, or
    /// destinations that refuse this gateway): they then count as loss.
    withdrawn_by: u64,
    /// Down by the TCP verdict with no peer to compare with (its routes have no other
    /// gateway): reported and probed, but not withdrawn. Taking it out would change nothing
    /// for its traffic but refuse it sooner, and the failures may as well be the
    /// destination's.
    pub unshared: bool,
    neigh_failed: bool,
    /// The neighbour entry turned FAILED (or stayed unresolved too long) since the last
    /// `evaluate`, and how it is said.
    neigh_edge: Option<&'static str>,
    /// Since when the neighbour entry has been unresolved, and whether that was acted on.
    unresolved_since: Option<Instant>,
    unresolved_reported: bool,
}

impl GatewayHealth {
    fn new(now: Instant) -> Self {
        GatewayHealth {
            down: false,
            reason: "no failure seen".into(),
            since: now,
            penalty: 0,
            restore_after: None,
            next_probe: None,
            last_probe_ok: None,
            last_probe: None,
            counters: GatewayStats::default(),
            loss: LossRate::default(),
            prev: None,
            failures: VecDeque::new(),
            last_success: None,
            sent_at_success: 0,
            sent_log: VecDeque::new(),
            restored_at: None,
            withdrawn_by: 0,
            unshared: false,
            neigh_failed: false,
            neigh_edge: None,
            unresolved_since: None,
            unresolved_reported: false,
        }
    }

    /// Failed attempts since the last success, within the window.
    pub fn streak(&self) -> usize {
        self.failures.len()
    }

    /// Attempts sent since the last success and at least `grace` ago that are neither
    /// answered (no success since) nor counted as failed.
    fn unanswered_older_than(&self, grace: Duration, now: Instant) -> u64 {
        let Some(cut) = now.checked_sub(grace) else {
            return 0;
        };
        let sent_then = self
            .sent_log
            .iter()
            .rev()
            .find(|(t, _)| *t <= cut)
            .map_or(self.sent_at_success, |(_, n)| *n);
        sent_then
            .saturating_sub(self.sent_at_success)
            .saturating_sub(self.streak() as u64)
    }

    /// The unanswered attempts in a row: failed ones since the last success, and (once
    /// one has failed) the ones waiting longer than the grace.
    fn evidence(&self, cfg: &Config, now: Instant) -> u64 {
        let streak = self.streak() as u64;
        if streak == 0 || cfg.pending_grace.is_zero() {
            return streak;
        }
        streak + self.unanswered_older_than(cfg.pending_grace, now)
    }

    /// The failing half of the up → down rule (the peer half is in `Health::evaluate`):
    /// at least `k` attempts unanswered in a row, one of them failed.
    fn failing(&self, cfg: &Config, k: u32, now: Instant) -> bool {
        self.evidence(cfg, now) >= u64::from(k.max(1))
    }
}

/// Why `Health::evaluate` takes a gateway down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    /// Its neighbour entry failed (ARP/ND unanswered).
    Neighbour,
    /// Its TCP attempts failed while a peer succeeded: withdrawn.
    Compared,
    /// Its TCP attempts failed and it has no peer: reported and probed, not withdrawn.
    Alone,
}

/// A change of state, to be logged, recorded and acted on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub gateway: IpAddr,
    pub down: bool,
    pub reason: String,
}

pub struct Health {
    cfg: Config,
    gateways: BTreeMap<IpAddr, GatewayHealth>,
}

fn successes(s: &GatewayStats) -> u64 {
    s.established + s.rst
}

impl Health {
    pub fn new(cfg: Config) -> Self {
        Health {
            cfg,
            gateways: BTreeMap::new(),
        }
    }

    /// Follows exactly `gateways` (new ones start up; the others are forgotten).
    pub fn set_gateways(&mut self, gateways: &BTreeSet<IpAddr>, now: Instant) {
        self.gateways.retain(|g, _| gateways.contains(g));
        for g in gateways {
            self.gateways
                .entry(*g)
                .or_insert_with(|| GatewayHealth::new(now));
        }
    }

    /// Restores a verdict recorded by an earlier agent: down for `down_for` already, with
    /// `penalty`.
    pub fn restore_down(&mut self, gw: IpAddr, penalty: u32, down_for: Duration, now: Instant) {
        let since = now.checked_sub(down_for).unwrap_or(now);
        let delay = self.delay(penalty);
        let h = self
            .gateways
            .entry(gw)
            .or_insert_with(|| GatewayHealth::new(now));
        h.down = true;
        h.reason = "down according to the previous agent".into();
        h.since = since;
        h.penalty = penalty;
        h.restore_after = Some(since + delay);
        h.next_probe = Some((since + self.cfg.probe_interval).max(now));
    }

    fn delay(&self, penalty: u32) -> Duration {
        // 2^20 intervals is far beyond any sane cap; the clamp keeps the shift defined.
        self.cfg
            .probe_interval
            .saturating_mul(1 << penalty.min(20))
            .min(self.cfg.max_restore_delay)
    }

    /// Feeds the latest counters and neighbour state of `gw`.
    pub fn observe(&mut self, gw: IpAddr, stats: &GatewayStats, neigh: Neighbour, now: Instant) {
        let grace = self.cfg.unresolved_grace;
        let Some(h) = self.gateways.get_mut(&gw) else {
            return;
        };
        let neigh_failed = neigh == Neighbour::Failed;
        if matches!(neigh, Neighbour::Unresolved | Neighbour::Failed) {
            let since = *h.unresolved_since.get_or_insert(now);
            if !grace.is_zero()
                && !h.unresolved_reported
                && now.saturating_duration_since(since) >= grace
            {
                h.unresolved_reported = true;
                h.neigh_edge.get_or_insert(
                    "its neighbour entry stayed unresolved (ARP/ND unanswered) past the grace",
                );
            }
        } else {
            h.unresolved_since = None;
            h.unresolved_reported = false;
        }
        h.counters = *stats;
        let (base, first) = match h.prev {
            Some(b) if b.failed <= stats.failed && successes(&b) <= successes(stats) => (b, false),
            // First sight, or the counters were reset (a fresh slot): start from here.
            _ => (*stats, true),
        };
        h.prev = Some(*stats);
        let ok = successes(stats) - successes(&base);
        let failed = stats.failed - base.failed;
        if ok > 0 {
            // The streak ends in a success: its failures were loss on a gateway that
            // forwards.
            let lost = h.failures.len() as u64;
            h.loss.add(lost, lost + ok, self.cfg.loss_half_life, now);
            h.failures.clear();
            h.last_success = Some(now);
            h.sent_at_success = stats.syn_sent;
            h.sent_log.clear();
        } else if first || h.sent_at_success > stats.syn_sent {
            // First sight (attempts counted before it are not ours to judge), or a fresh
            // slot whose counters restarted.
            h.sent_at_success = stats.syn_sent;
            h.sent_log.clear();
        }
        if h.sent_log.back().is_none_or(|(_, n)| *n != stats.syn_sent) {
            h.sent_log.push_back((now, stats.syn_sent));
        }
        // Keep the newest sample older than the grace period and everything after it.
        let keep_after = now.checked_sub(self.cfg.pending_grace);
        while h.sent_log.len() > 1 && keep_after.is_some_and(|cut| h.sent_log[1].0 <= cut) {
            h.sent_log.pop_front();
        }
        while h.sent_log.len() > 4096 {
            h.sent_log.pop_front();
        }
        for _ in 0..failed.min(1024) {
            h.failures.push_back(now);
        }
        while h.failures.len() > 1024 {
            h.failures.pop_front();
        }
        // Edge: a neighbour entry that *turns* FAILED.
        if neigh_failed && !h.neigh_failed {
            h.neigh_edge = Some("its neighbour entry turned FAILED (ARP/ND unanswered)");
        }
        h.neigh_failed = neigh_failed;
    }

    /// Applies the up → down rule to every gateway. `peers` maps each gateway to the
    /// gateways it shares a route with.
    pub fn evaluate(
        &mut self,
        peers: &BTreeMap<IpAddr, BTreeSet<IpAddr>>,
        now: Instant,
    ) -> Vec<Transition> {
        let window = self.cfg.window;
        for h in self.gateways.values_mut() {
            while h
                .failures
                .front()
                .is_some_and(|t| now.duration_since(*t) > window)
            {
                h.failures.pop_front();
            }
        }
        let mut going_down: Vec<(IpAddr, String, Verdict)> = Vec::new();
        for (gw, h) in self.gateways.iter_mut() {
            let edge = h.neigh_edge.take();
            if !h.down
                && let Some(why) = edge
            {
                going_down.push((*gw, why.into(), Verdict::Neighbour));
            }
        }
        let k: BTreeMap<IpAddr, u32> = self
            .gateways
            .keys()
            .map(|gw| (*gw, self.threshold(gw, peers, now)))
            .collect();
        for (gw, h) in &self.gateways {
            if h.down || going_down.iter().any(|(g, ..)| g == gw) {
                continue;
            }
            if !h.failing(&self.cfg, k[gw], now) {
                continue;
            }
            let streak_start = *h.failures.front().expect("streak ≥ 1");
            let healthy_peer = peers.get(gw).into_iter().flatten().find(|p| {
                *p != gw
                    && self.gateways.get(p).is_some_and(|ph| {
                        !ph.down
                            && !ph.failing(&self.cfg, k[*p], now)
                            && ph.last_success.is_some_and(|t| t >= streak_start)
                    })
            });
            // Only formatted for a verdict (a failing gateway without one, e.g. with the
            // destination down everywhere, is seen every tick).
            let evidence = || {
                format!(
                    "{} connection attempts failed within {}s and {} more unanswered for {}ms \
                 (threshold {} at a measured loss of {:.2} %), with no success (syn_sent={} \
                 established={} failed={} rst={} icmp_unreachable={})",
                    h.streak(),
                    window.as_secs(),
                    h.unanswered_older_than(self.cfg.pending_grace, now),
                    self.cfg.pending_grace.as_millis(),
                    k[gw],
                    100.0 * self.loss_rate(gw, peers, now),
                    h.counters.syn_sent,
                    h.counters.established,
                    h.counters.failed,
                    h.counters.rst,
                    h.counters.icmp_unreachable,
                )
            };
            if let Some(p) = healthy_peer {
                let why = format!("{}, while peer {p} succeeded", evidence());
                going_down.push((*gw, why, Verdict::Compared));
            } else if peers.get(gw).is_none_or(|p| p.iter().all(|p| p == gw)) {
                let why = format!(
                    "{}; no other gateway shares its routes, so the gateway or the \
                     destinations may be at fault: reported and probed, not withdrawn",
                    evidence()
                );
                going_down.push((*gw, why, Verdict::Alone));
            }
        }
        let mut out = Vec::new();
        for (gw, reason, verdict) in going_down {
            let penalty = {
                let h = &self.gateways[&gw];
                match h.restored_at {
                    Some(t) if now.duration_since(t) < self.cfg.flap_window => h.penalty + 1,
                    _ => 0,
                }
            };
            let delay = self.delay(penalty);
            let interval = self.cfg.probe_interval;
            let h = self.gateways.get_mut(&gw).expect("present");
            h.down = true;
            h.since = now;
            h.penalty = penalty;
            h.restore_after = Some(now + delay);
            h.next_probe = Some(now + interval);
            h.last_probe_ok = None;
            h.withdrawn_by = match verdict {
                Verdict::Neighbour => 0,
                Verdict::Compared | Verdict::Alone => h.failures.len() as u64,
            };
            h.unshared = verdict == Verdict::Alone;
            h.failures.clear();
            h.reason = reason.clone();
            out.push(Transition {
                gateway: gw,
                down: true,
                reason,
            });
        }
        out
    }

    /// The loss rate `gw` is judged against: its own measured rate, or that of an up peer
    /// when higher (loss on a path that all of them share, on the destinations' side).
    pub fn loss_rate(
        &self,
        gw: &IpAddr,
        peers: &BTreeMap<IpAddr, BTreeSet<IpAddr>>,
        now: Instant,
    ) -> f64 {
        let cfg = &self.cfg;
        let own = self.gateways.get(gw).map_or_else(
            || LossRate::default().rate(cfg, now),
            |h| h.loss.rate(cfg, now),
        );
        peers
            .get(gw)
            .into_iter()
            .flatten()
            .filter_map(|p| self.gateways.get(p))
            .filter(|ph| !ph.down)
            .map(|ph| ph.loss.rate(cfg, now))
            .fold(own, f64::max)
    }

    /// The unanswered attempts in a row that take `gw` down now (see [`threshold`]).
    pub fn threshold(
        &self,
        gw: &IpAddr,
        peers: &BTreeMap<IpAddr, BTreeSet<IpAddr>>,
        now: Instant,
    ) -> u32 {
        threshold(&self.cfg, self.loss_rate(gw, peers, now))
    }

    /// Down gateways whose probe is due; their next probe is scheduled one interval on.
    pub fn due_probes(&mut self, now: Instant) -> Vec<IpAddr> {
        let interval = self.cfg.probe_interval;
        let mut out = Vec::new();
        for (gw, h) in self.gateways.iter_mut() {
            if h.down && h.next_probe.is_some_and(|t| t <= now) {
                h.next_probe = Some(now + interval);
                out.push(*gw);
            }
        }
        out
    }

    /// The outcome of a probe of `kind` sent to `gw`.
    pub fn probe_result(
        &mut self,
        gw: IpAddr,
        kind: ProbeKind,
        answered: bool,
        now: Instant,
    ) -> Option<Transition> {
        let h = self.gateways.get_mut(&gw)?;
        if !h.down {
            return None;
        }
        h.last_probe_ok = Some(answered);
        h.last_probe = Some(kind);
        if !answered || h.restore_after.is_some_and(|t| now < t) {
            return None;
        }
        h.down = false;
        h.since = now;
        h.restored_at = Some(now);
        h.restore_after = None;
        h.next_probe = None;
        h.last_probe_ok = None;
        let n = std::mem::take(&mut h.withdrawn_by);
        if matches!(kind, ProbeKind::Forward(_)) {
            h.loss.add(n, n, self.cfg.loss_half_life, now);
        }
        h.unshared = false;
        h.failures.clear();
        // The entry may still read FAILED until the next dump: only a new FAILED counts,
        // and an unresolved stretch starts again.
        h.neigh_failed = true;
        h.unresolved_since = None;
        h.unresolved_reported = false;
        h.reason = match kind {
            ProbeKind::Echo => format!(
                "answered an ICMP echo probe, no forwarding target known (penalty {})",
                h.penalty
            ),
            ProbeKind::Forward(t) => format!(
                "forwarded a TCP probe to {t}, answered (penalty {})",
                h.penalty
            ),
        };
        Some(Transition {
            gateway: gw,
            down: false,
            reason: h.reason.clone(),
        })
    }

    /// The gateways to withdraw from their routes: those down, except the ones judged
    /// without a peer (see [`GatewayHealth::unshared`]).
    pub fn down(&self) -> BTreeSet<IpAddr> {
        self.gateways
            .iter()
            .filter(|(_, h)| h.down && !h.unshared)
            .map(|(g, _)| *g)
            .collect()
    }

    pub fn get(&self, gw: &IpAddr) -> Option<&GatewayHealth> {
        self.gateways.get(gw)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&IpAddr, &GatewayHealth)> {
        self.gateways.iter()
    }
}

/// Gateway → the other gateways it shares a route with.
pub fn peers<'a>(
    routes: impl IntoIterator<Item = &'a [IpAddr]>,
) -> BTreeMap<IpAddr, BTreeSet<IpAddr>> {
    let mut out: BTreeMap<IpAddr, BTreeSet<IpAddr>> = BTreeMap::new();
    for gws in routes {
        for g in gws {
            let e = out.entry(*g).or_default();
            e.extend(gws.iter().filter(|p| *p != g));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn stats(failed: u64, ok: u64) -> GatewayStats {
        GatewayStats {
            syn_sent: failed + ok,
            failed,
            established: ok,
            ..Default::default()
        }
    }

    const A: &str = "10.0.0.1";
    const B: &str = "10.0.0.2";
    const C: &str = "10.0.0.3";

    struct World {
        h: Health,
        t0: Instant,
        peers: BTreeMap<IpAddr, BTreeSet<IpAddr>>,
    }

    impl World {
        fn new(cfg: Config, routes: &[&[&str]]) -> Self {
            let t0 = Instant::now();
            let mut h = Health::new(cfg);
            let gws: Vec<Vec<IpAddr>> = routes
                .iter()
                .map(|r| r.iter().map(|g| ip(g)).collect())
                .collect();
            let all = gws.iter().flatten().copied().collect();
            h.set_gateways(&all, t0);
            for g in &all {
                h.observe(*g, &GatewayStats::default(), Neighbour::Resolved, t0);
            }
            let peers = peers(gws.iter().map(|v| v.as_slice()));
            World { h, t0, peers }
        }
        fn at(&self, ms: u64) -> Instant {
            self.t0 + Duration::from_millis(ms)
        }
        fn step(&mut self, ms: u64, obs: &[(&str, GatewayStats, bool)]) -> Vec<Transition> {
            let now = self.at(ms);
            for (g, s, n) in obs {
                let n = if *n {
                    Neighbour::Failed
                } else {
                    Neighbour::Resolved
                };
                self.h.observe(ip(g), s, n, now);
            }
            self.h.evaluate(&self.peers, now)
        }
    }

    fn cfg() -> Config {
        Config {
            window: Duration::from_secs(10),
            min_failures: 2,
            probe_interval: Duration::from_secs(1),
            flap_window: Duration::from_secs(60),
            max_restore_delay: Duration::from_secs(8),
            pending_grace: Duration::from_millis(500),
            unresolved_grace: Duration::from_secs(3),
            // No prior: the rule tests below judge at the floor (`min_failures`); the
            // loss tests use `lossy_cfg`.
            loss_prior: (0.0, 20.0),
            ..Config::default()
        }
    }

    /// The rules as shipped: the default prior of the loss estimate.
    fn lossy_cfg() -> Config {
        Config {
            loss_prior: LOSS_PRIOR,
            ..cfg()
        }
    }

    /// `sent` attempts in all, `failed` of them failed, `ok` answered.
    fn sent(sent: u64, failed: u64, ok: u64) -> GatewayStats {
        GatewayStats {
            syn_sent: sent,
            failed,
            established: ok,
            ..Default::default()
        }
    }

    #[test]
    fn one_failure_and_an_old_unanswered_attempt_are_failing() {
        let mut w = World::new(cfg(), &[&[A, B]]);
        // Two attempts through A, none answered; B keeps succeeding.
        assert!(
            w.step(100, &[(A, sent(2, 0, 0), false), (B, sent(3, 0, 3), false)])
                .is_empty()
        );
        // 1.1 s later the first SYN is retransmitted: one failure, and the second attempt
        // has been waiting ≥ 500 ms.
        let t = w.step(
            1200,
            &[(A, sent(2, 1, 0), false), (B, sent(6, 0, 6), false)],
        );
        assert_eq!(t.len(), 1, "{t:?}");
        assert_eq!(t[0].gateway, ip(A));
        assert!(t[0].reason.contains("1 more unanswered"), "{}", t[0].reason);
    }

    #[test]
    fn a_young_unanswered_attempt_does_not_corroborate() {
        let mut w = World::new(cfg(), &[&[A, B]]);
        w.step(100, &[(A, sent(1, 0, 0), false), (B, sent(3, 0, 3), false)]);
        // The second attempt is only 200 ms old when the first is found lost.
        w.step(
            1000,
            &[(A, sent(2, 0, 0), false), (B, sent(5, 0, 5), false)],
        );
        let t = w.step(
            1200,
            &[(A, sent(2, 1, 0), false), (B, sent(6, 0, 6), false)],
        );
        assert!(t.is_empty(), "{t:?}");
        // Once it has waited long enough (and still nothing got through), A is failing.
        let t = w.step(
            1600,
            &[(A, sent(2, 1, 0), false), (B, sent(7, 0, 7), false)],
        );
        assert_eq!(t.len(), 1, "{t:?}");
    }

    #[test]
    fn a_lost_syn_followed_by_answered_attempts_is_no_failure() {
        let mut w = World::new(cfg(), &[&[A, B]]);
        w.step(100, &[(A, sent(2, 0, 0), false), (B, sent(3, 0, 3), false)]);
        // The second attempt was answered; the first SYN was lost once.
        w.step(300, &[(A, sent(2, 0, 1), false), (B, sent(4, 0, 4), false)]);
        let t = w.step(
            1200,
            &[(A, sent(2, 1, 1), false), (B, sent(6, 0, 6), false)],
        );
        assert!(t.is_empty(), "{t:?}");
    }

    #[test]
    fn zero_grace_needs_min_failures() {
        let cfg = Config {
            pending_grace: Duration::ZERO,
            ..cfg()
        };
        let mut w = World::new(cfg, &[&[A, B]]);
        w.step(100, &[(A, sent(3, 0, 0), false), (B, sent(3, 0, 3), false)]);
        let t = w.step(
            1200,
            &[(A, sent(3, 1, 0), false), (B, sent(6, 0, 6), false)],
        );
        assert!(t.is_empty(), "{t:?}");
        let t = w.step(
            1300,
            &[(A, sent(3, 2, 0), false), (B, sent(7, 0, 7), false)],
        );
        assert_eq!(t.len(), 1, "{t:?}");
    }

    #[test]
    fn attempts_counted_before_the_first_observation_are_not_judged() {
        // A restarted agent first sees counters of its predecessor (pinned maps): 100
        // attempts, 90 answered. One new failure is not corroborated by those.
        let t0 = Instant::now();
        let mut h = Health::new(cfg());
        h.set_gateways(&[ip(A), ip(B)].into(), t0);
        let peers = peers([[ip(A), ip(B)].as_slice()]);
        h.observe(ip(A), &sent(100, 0, 90), Neighbour::Resolved, t0);
        h.observe(ip(B), &sent(100, 0, 100), Neighbour::Resolved, t0);
        let later = t0 + Duration::from_millis(1500);
        h.observe(ip(A), &sent(100, 1, 90), Neighbour::Resolved, later);
        h.observe(ip(B), &sent(103, 0, 103), Neighbour::Resolved, later);
        assert!(h.evaluate(&peers, later).is_empty());
    }

    #[test]
    fn failing_gateway_goes_down_when_a_peer_succeeds() {
        let mut w = World::new(cfg(), &[&[A, B, C]]);
        // One failure: not yet.
        assert!(
            w.step(
                200,
                &[
                    (A, stats(1, 0), false),
                    (B, stats(0, 3), false),
                    (C, stats(0, 2), false)
                ]
            )
            .is_empty()
        );
        // Second failure while B and C keep succeeding.
        let t = w.step(
            400,
            &[
                (A, stats(2, 0), false),
                (B, stats(0, 4), false),
                (C, stats(0, 3), false),
            ],
        );
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].gateway, ip(A));
        assert!(t[0].down);
        assert!(
            t[0].reason.contains("2 connection attempts failed"),
            "{}",
            t[0].reason
        );
        assert_eq!(w.h.down(), [ip(A)].into());
    }

    #[test]
    fn a_success_resets_the_streak() {
        let mut w = World::new(cfg(), &[&[A, B]]);
        w.step(100, &[(A, stats(1, 0), false), (B, stats(0, 1), false)]);
        w.step(200, &[(A, stats(1, 1), false), (B, stats(0, 2), false)]);
        let t = w.step(300, &[(A, stats(2, 1), false), (B, stats(0, 3), false)]);
        assert!(t.is_empty(), "one failure since the last success: {t:?}");
        assert_eq!(w.h.get(&ip(A)).unwrap().streak(), 1);
    }

    #[test]
    fn failures_on_every_gateway_alike_withdraw_nothing() {
        let mut w = World::new(cfg(), &[&[A, B, C]]);
        let mut all = Vec::new();
        for i in 1..=10u64 {
            all.extend(w.step(
                i * 200,
                &[
                    (A, stats(i, 0), false),
                    (B, stats(i, 0), false),
                    (C, stats(i, 0), false),
                ],
            ));
        }
        assert!(all.is_empty(), "{all:?}");
        assert!(w.h.down().is_empty());
    }

    #[test]
    fn a_peer_with_no_success_is_no_evidence() {
        // B is idle: no success since A's failures began.
        let mut w = World::new(cfg(), &[&[A, B]]);
        w.step(100, &[(B, stats(0, 5), false)]);
        let t = w.step(2000, &[(A, stats(5, 0), false), (B, stats(0, 5), false)]);
        assert!(t.is_empty(), "{t:?}");
    }

    #[test]
    fn a_gateway_without_peers_is_judged_reported_and_probed_but_not_withdrawn() {
        // A and B share no route: B's successes say nothing about A.
        let mut w = World::new(cfg(), &[&[A], &[B]]);
        let t = w.step(500, &[(A, stats(5, 0), false), (B, stats(0, 5), false)]);
        assert_eq!(t.len(), 1, "{t:?}");
        assert_eq!(t[0].gateway, ip(A));
        assert!(t[0].reason.contains("not withdrawn"), "{}", t[0].reason);
        let h = w.h.get(&ip(A)).unwrap();
        assert!(h.down && h.unshared);
        assert!(w.h.down().is_empty(), "never withdrawn: {:?}", w.h.down());
        // Probed like any down gateway, and back on an answer.
        assert_eq!(w.h.due_probes(w.at(1600)), vec![ip(A)]);
        let back = w.h.probe_result(ip(A), ProbeKind::Echo, true, w.at(1600));
        assert!(back.is_some_and(|t| !t.down));
        assert!(!w.h.get(&ip(A)).unwrap().unshared);
        // Gateways that do share a route are compared, never judged alone.
        let mut w = World::new(cfg(), &[&[A, B]]);
        let t = w.step(500, &[(A, stats(5, 0), false), (B, stats(5, 0), false)]);
        assert!(t.is_empty(), "{t:?}");
    }

    #[test]
    fn old_failures_leave_the_window() {
        let mut w = World::new(cfg(), &[&[A, B]]);
        w.step(100, &[(A, stats(1, 0), false), (B, stats(0, 1), false)]);
        // 11 s later the first failure is forgotten; the second alone is not enough.
        let t = w.step(11_200, &[(A, stats(2, 0), false), (B, stats(0, 2), false)]);
        assert!(t.is_empty(), "{t:?}");
        assert_eq!(w.h.get(&ip(A)).unwrap().streak(), 1);
    }

    #[test]
    fn neighbour_failed_takes_it_down_without_peers() {
        let mut w = World::new(cfg(), &[&[A]]);
        let t = w.step(100, &[(A, stats(0, 0), true)]);
        assert_eq!(t.len(), 1);
        assert!(t[0].reason.contains("FAILED"));
        // Level stays FAILED after a restore: no new transition without a new edge.
        let now = w.at(1200);
        assert_eq!(w.h.due_probes(now), vec![ip(A)]);
        assert!(
            w.h.probe_result(ip(A), ProbeKind::Echo, true, now)
                .is_some()
        );
        assert!(w.step(1300, &[(A, stats(0, 0), true)]).is_empty());
        // It recovers, then fails again: down.
        w.step(1400, &[(A, stats(0, 0), false)]);
        assert_eq!(w.step(1500, &[(A, stats(0, 0), true)]).len(), 1);
    }

    #[test]
    fn probes_restore_and_damping_grows_on_repeated_failure() {
        let mut w = World::new(cfg(), &[&[A, B]]);
        let mut fa = 0;
        let mut ob = 0;
        let mut fail = |w: &mut World, at: u64| {
            fa += 2;
            ob += 1;
            w.step(at, &[(A, stats(fa, 0), false), (B, stats(0, ob), false)])
        };
        assert_eq!(fail(&mut w, 1000).len(), 1);
        let h = w.h.get(&ip(A)).unwrap();
        assert_eq!(h.penalty, 0);
        assert_eq!(h.restore_after, Some(w.at(2000)));
        // Not due before one interval.
        assert!(w.h.due_probes(w.at(1500)).is_empty());
        // Unanswered probe: still down; next one an interval later.
        assert_eq!(w.h.due_probes(w.at(2000)), vec![ip(A)]);
        assert!(
            w.h.probe_result(ip(A), ProbeKind::Echo, false, w.at(2100))
                .is_none()
        );
        assert!(w.h.due_probes(w.at(2500)).is_empty());
        assert_eq!(w.h.due_probes(w.at(3000)), vec![ip(A)]);
        let up =
            w.h.probe_result(ip(A), ProbeKind::Echo, true, w.at(3100))
                .unwrap();
        assert!(!up.down);
        assert!(w.h.down().is_empty());

        // Fails again soon after: penalty 1, restore no sooner than 2 intervals.
        assert_eq!(fail(&mut w, 4000).len(), 1);
        let h = w.h.get(&ip(A)).unwrap();
        assert_eq!(h.penalty, 1);
        assert_eq!(h.restore_after, Some(w.at(6000)));
        assert_eq!(w.h.due_probes(w.at(5000)), vec![ip(A)]);
        assert!(
            w.h.probe_result(ip(A), ProbeKind::Echo, true, w.at(5000))
                .is_none(),
            "answered but damped"
        );
        assert_eq!(w.h.due_probes(w.at(6000)), vec![ip(A)]);
        assert!(
            w.h.probe_result(ip(A), ProbeKind::Echo, true, w.at(6000))
                .is_some()
        );

        // Again: penalty 2 (4 s), then 3 (8 s, the cap), then still 8 s.
        assert_eq!(fail(&mut w, 7000).len(), 1);
        assert_eq!(w.h.get(&ip(A)).unwrap().restore_after, Some(w.at(11_000)));
        assert!(
            w.h.probe_result(ip(A), ProbeKind::Echo, true, w.at(11_000))
                .is_some()
        );
        assert_eq!(fail(&mut w, 12_000).len(), 1);
        assert_eq!(w.h.get(&ip(A)).unwrap().restore_after, Some(w.at(20_000)));
        assert!(
            w.h.probe_result(ip(A), ProbeKind::Echo, true, w.at(20_000))
                .is_some()
        );
        assert_eq!(fail(&mut w, 21_000).len(), 1);
        let h = w.h.get(&ip(A)).unwrap();
        assert_eq!(h.penalty, 4);
        assert_eq!(h.restore_after, Some(w.at(29_000)), "capped");
        assert!(
            w.h.probe_result(ip(A), ProbeKind::Echo, true, w.at(29_000))
                .is_some()
        );

        // A failure long after the last restore starts from penalty 0 again.
        assert_eq!(fail(&mut w, 29_000 + 61_000).len(), 1);
        assert_eq!(w.h.get(&ip(A)).unwrap().penalty, 0);
    }

    #[test]
    fn counter_reset_is_a_new_baseline() {
        let mut w = World::new(cfg(), &[&[A, B]]);
        w.step(100, &[(A, stats(50, 50), false), (B, stats(0, 1), false)]);
        // The slot was reset: counters went down; nothing is counted from it.
        w.step(200, &[(A, stats(0, 0), false), (B, stats(0, 2), false)]);
        assert_eq!(w.h.get(&ip(A)).unwrap().streak(), 0);
    }

    #[test]
    fn restore_down_from_a_record() {
        let mut w = World::new(cfg(), &[&[A, B]]);
        let now = w.at(0);
        w.h.restore_down(ip(A), 1, Duration::from_millis(500), now);
        assert_eq!(w.h.down(), [ip(A)].into());
        // Penalty 1: 2 s from when it went down (0.5 s ago).
        assert!(
            w.h.probe_result(ip(A), ProbeKind::Echo, true, w.at(1000))
                .is_none()
        );
        assert!(
            w.h.probe_result(ip(A), ProbeKind::Echo, true, w.at(1500))
                .is_some()
        );
    }

    #[test]
    fn peers_of_routes() {
        let a = [ip(A), ip(B)];
        let b = [ip(B), ip(C)];
        let c = [ip(C)];
        let p = peers([&a[..], &b[..], &c[..]]);
        assert_eq!(p[&ip(A)], [ip(B)].into());
        assert_eq!(p[&ip(B)], [ip(A), ip(C)].into());
        assert_eq!(p[&ip(C)], [ip(B)].into());
    }

    #[test]
    fn a_neighbour_unresolved_past_the_grace_takes_it_down_once() {
        // FAILED and INCOMPLETE alternate under traffic (every packet restarts resolving):
        // a reader rarely sees FAILED, but the entry stays unresolved.
        let mut w = World::new(cfg(), &[&[A, B]]);
        let mut seen = Vec::new();
        for ms in [100, 1600, 2900, 3200, 3400, 6000] {
            let t = w.at(ms);
            w.h.observe(ip(A), &GatewayStats::default(), Neighbour::Unresolved, t);
            seen.push((ms, w.h.evaluate(&w.peers, t)));
        }
        let downs: Vec<u64> = seen
            .iter()
            .filter(|(_, t)| !t.is_empty())
            .map(|(ms, _)| *ms)
            .collect();
        assert_eq!(downs, vec![3200], "once, 3 s after it became unresolved");
        assert!(
            seen[3].1[0].reason.contains("unresolved"),
            "{:?}",
            seen[3].1
        );
        // Resolving within the grace is no failure, and a new stretch starts afresh.
        let mut w = World::new(cfg(), &[&[A, B]]);
        for (ms, n) in [
            (100, Neighbour::Unresolved),
            (2500, Neighbour::Unresolved),
            (2700, Neighbour::Resolved),
            (3500, Neighbour::Unresolved),
            (5000, Neighbour::Unresolved),
            (6000, Neighbour::Unknown),
        ] {
            let t = w.at(ms);
            w.h.observe(ip(A), &GatewayStats::default(), n, t);
            assert!(w.h.evaluate(&w.peers, t).is_empty(), "at {ms} ms");
        }
    }

    #[test]
    fn the_threshold_is_the_least_run_a_healthy_gateway_makes_that_rarely() {
        let c = cfg();
        // p^k ≤ 1e-6.
        for (p, k) in [
            (0.0, 2),
            (1e-4, 2),
            (1e-3, 2),
            (2e-3, 3),
            (0.01, 3),
            (0.02, 4),
            (0.04, 5),
            (0.1, 6),
            (0.3, 12),
            (1.0, 12),
        ] {
            assert_eq!(threshold(&c, p), k, "p = {p}");
        }
        let c = Config {
            min_failures: 3,
            max_failures: 4,
            ..cfg()
        };
        assert_eq!(threshold(&c, 1e-4), 3);
        assert_eq!(threshold(&c, 0.5), 4);
    }

    /// What is due for one attempt in the simulation below.
    #[derive(Clone, Copy, PartialEq)]
    enum Due {
        /// The SYN-ACK arrives.
        Answer,
        /// The kernel retransmits the SYN (`n`: how many times before; the first time the
        /// attempt counts failed). `refused`: the destination never answers through it.
        Retransmit { n: u32, refused: bool },
    }

    /// Counters of one gateway in the simulation below, as the eBPF programs keep them.
    #[derive(Default)]
    struct SimGw {
        stats: GatewayStats,
        due: Vec<(u64, Due)>,
    }

    /// Tiny deterministic generator (xorshift): the simulation must replay exactly.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// A simulated node: 10 new connections/s over gateways A, B, C (ECMP over those in
    /// the route), read every 200 ms.
    #[derive(Clone, Copy)]
    struct Scenario {
        /// Per gateway: the chance that an attempt (its SYN or its SYN-ACK) is lost; the
        /// kernel retransmits a lost SYN after 1 s, then 2 s, 4 s, each lost alike.
        loss: [f64; 3],
        /// The share of the attempts that go to a destination whose allow-list lacks A's
        /// address: through A they are never answered (the connection gives up after 3
        /// retransmissions); A's forwarding probes find such a target as often.
        refused_by_a: f64,
        /// From then on (ms), C loses everything, probes included.
        black_hole_at: Option<u64>,
        secs: u64,
    }

    const CLEAN: Scenario = Scenario {
        loss: [0.0; 3],
        refused_by_a: 0.0,
        black_hole_at: None,
        secs: 0,
    };

    /// Runs `sc`; returns the withdrawals (ms, gateway) and the failures each gateway had.
    fn simulate(c: Config, sc: Scenario, seed: u64) -> (Vec<(u64, IpAddr)>, [u64; 3]) {
        let gws = [ip(A), ip(B), ip(C)];
        let mut w = World::new(c, &[&[A, B, C]]);
        let mut rng = Rng(seed);
        let mut sim: Vec<SimGw> = (0..3).map(|_| SimGw::default()).collect();
        let mut downs = Vec::new();
        for ms in (0..sc.secs * 1000).step_by(100) {
            let holed = |i: usize| i == 2 && sc.black_hole_at.is_some_and(|t| ms >= t);
            for (i, g) in sim.iter_mut().enumerate() {
                let due: Vec<Due> = g
                    .due
                    .iter()
                    .filter(|(t, _)| *t <= ms)
                    .map(|d| d.1)
                    .collect();
                g.due.retain(|(t, _)| *t > ms);
                for d in due {
                    match d {
                        Due::Answer => g.stats.established += 1,
                        Due::Retransmit { n, refused } => {
                            g.stats.failed += u64::from(n == 0);
                            if refused || holed(i) || rng.next() < sc.loss[i] {
                                if n < 3 {
                                    let next = Due::Retransmit { n: n + 1, refused };
                                    g.due.push((ms + (2000 << n), next));
                                }
                            } else {
                                g.due.push((ms + 1, Due::Answer));
                            }
                        }
                    }
                }
            }
            let down = w.h.down();
            let up: Vec<usize> = (0..3).filter(|i| !down.contains(&gws[*i])).collect();
            let to_refuser = rng.next() < sc.refused_by_a;
            let i = up[(rng.next() * up.len() as f64) as usize % up.len()];
            let refused = to_refuser && i == 0;
            sim[i].stats.syn_sent += 1;
            if refused || holed(i) || rng.next() < sc.loss[i] {
                let first = Due::Retransmit { n: 0, refused };
                sim[i].due.push((ms + 1000, first));
            } else {
                sim[i].due.push((ms + 1, Due::Answer));
            }
            if ms % 200 == 0 {
                let now = w.at(ms);
                for (i, g) in sim.iter().enumerate() {
                    w.h.observe(gws[i], &g.stats, Neighbour::Resolved, now);
                }
                for t in w.h.evaluate(&w.peers, now) {
                    downs.push((ms, t.gateway));
                }
                let target = ProbeKind::Forward("198.51.100.10:7".parse().unwrap());
                for gw in w.h.due_probes(now) {
                    let holed_c = gw == gws[2] && holed(2);
                    let refused_a = gw == gws[0] && rng.next() < sc.refused_by_a;
                    let forwards = !holed_c && !refused_a;
                    w.h.probe_result(gw, target, forwards, now);
                }
            }
        }
        (downs, [0, 1, 2].map(|i| sim[i].stats.failed))
    }

    const SEED: u64 = 0x9e37_79b9_7f4a_7c15;

    #[test]
    fn a_gateway_losing_4_percent_of_its_attempts_is_never_withdrawn() {
        // 2 % of the packets lost both ways: about 4 % of the attempts. Two hours of
        // traffic per seed, about 24,000 attempts through the lossy gateway each.
        for seed in 1..=3 {
            let (downs, failed) = simulate(
                lossy_cfg(),
                Scenario {
                    loss: [0.04, 0.0, 0.0],
                    secs: 7200,
                    ..CLEAN
                },
                SEED ^ seed,
            );
            assert!(failed[0] > 500, "the loss was real: {failed:?}");
            assert_eq!(downs, vec![], "seed {seed}");
        }
    }

    #[test]
    fn judged_by_a_fixed_two_in_a_row_the_lossy_gateway_would_be_withdrawn() {
        // The control of the test above: the same traffic and seed.
        let c = Config {
            max_failures: 2,
            ..lossy_cfg()
        };
        let (downs, _) = simulate(
            c,
            Scenario {
                loss: [0.04, 0.0, 0.0],
                secs: 7200,
                ..CLEAN
            },
            SEED ^ 1,
        );
        assert!(downs.len() > 5, "{downs:?}");
        assert!(downs.iter().all(|d| d.1 == ip(A)), "{downs:?}");
    }

    #[test]
    fn with_loss_on_every_path_a_black_hole_is_still_taken_down() {
        let (downs, failed) = simulate(
            lossy_cfg(),
            Scenario {
                loss: [0.04; 3],
                black_hole_at: Some(600_000),
                secs: 1200,
                ..CLEAN
            },
            SEED,
        );
        assert!(failed.iter().all(|f| *f > 50), "{failed:?}");
        assert_eq!(downs.first().map(|d| d.1), Some(ip(C)), "{downs:?}");
        assert!(
            downs.iter().all(|d| d.1 == ip(C)),
            "only the black hole: {downs:?}"
        );
        assert!((600_000..610_000).contains(&downs[0].0), "{downs:?}");
    }

    #[test]
    fn loss_counts_only_when_a_success_ends_the_streak_and_fades() {
        let mut w = World::new(lossy_cfg(), &[&[A, B]]);
        let c = lossy_cfg();
        let hl = c.loss_half_life;
        let prior = LOSS_PRIOR.0 / LOSS_PRIOR.1;
        // One attempt of A lost, then 9 answered: 1 lost of 10.
        w.step(100, &[(A, sent(1, 0, 0), false), (B, sent(1, 0, 1), false)]);
        w.step(
            1200,
            &[(A, sent(1, 1, 0), false), (B, sent(2, 0, 2), false)],
        );
        w.step(
            1400,
            &[(A, sent(10, 1, 9), false), (B, sent(3, 0, 3), false)],
        );
        let r = w.h.get(&ip(A)).unwrap().loss.rate(&c, w.at(1400));
        assert!((r - 1.1 / 30.0).abs() < 1e-3, "{r}");
        assert_eq!(w.h.threshold(&ip(A), &w.peers, w.at(1400)), 5);
        // B shares the route: it is judged against the higher of the two.
        assert_eq!(w.h.threshold(&ip(B), &w.peers, w.at(1400)), 5);
        // It fades with the half-life.
        let later = w.at(1400) + hl * 20;
        assert!(w.h.get(&ip(A)).unwrap().loss.rate(&c, later) < 2.0 * prior);
        // A streak that ends in a withdrawal is not loss.
        let mut w = World::new(cfg(), &[&[A, B]]);
        w.step(100, &[(A, sent(2, 0, 0), false), (B, sent(1, 0, 1), false)]);
        let t = w.step(
            1200,
            &[(A, sent(2, 2, 0), false), (B, sent(3, 0, 3), false)],
        );
        assert_eq!(t.len(), 1);
        let r = w.h.get(&ip(A)).unwrap().loss.rate(&c, w.at(1200));
        assert!((r - prior).abs() < 1e-9, "{r}");
    }

    #[test]
    fn a_gateway_refused_by_one_destination_stays_once_its_loss_is_measured() {
        // A third of the attempts go to a destination whose allow-list lacks A's address.
        // At the onset a run of them may withdraw A (before its estimate knows the share);
        // its forwarding probe restores it, and once the refused share is measured it is
        // not withdrawn again.
        let mut early = 0;
        for seed in 0..20 {
            let sc = Scenario {
                refused_by_a: 1.0 / 3.0,
                secs: 900,
                ..CLEAN
            };
            let (downs, failed) = simulate(lossy_cfg(), sc, SEED ^ seed);
            assert!(failed[0] > 500 && failed[1] == 0, "{failed:?}");
            assert!(
                downs.iter().all(|d| d.1 == ip(A) && d.0 < 120_000),
                "seed {seed}: {downs:?}"
            );
            early += downs.len();
        }
        assert!(early <= 10, "{early} early withdrawals in 20 runs");
    }

    #[test]
    fn a_gateway_that_every_destination_refuses_stays_withdrawn() {
        let sc = Scenario {
            refused_by_a: 1.0,
            secs: 600,
            ..CLEAN
        };
        let (downs, _) = simulate(lossy_cfg(), sc, SEED);
        assert_eq!(downs.len(), 1, "withdrawn once, never restored: {downs:?}");
        assert_eq!(downs[0].1, ip(A));
    }

    /// How the prior of the loss estimate was chosen (prints; run with `--ignored
    /// --nocapture`): five-minute runs of a gateway losing 4 % of its attempts from the
    /// start (and of all three), and the detection of a black hole after a minute of clean
    /// traffic, per prior.
    #[test]
    #[ignore]
    fn prior_choice() {
        for (prior, runs) in [((0.02, 20.0), 200u64), ((0.1, 20.0), 1000)] {
            let c = Config {
                loss_prior: prior,
                ..lossy_cfg()
            };
            let (mut one, mut all, mut detect) = (0, 0, Vec::new());
            for seed in 0..runs {
                let lossy = |loss| Scenario {
                    loss,
                    secs: 300,
                    ..CLEAN
                };
                one += usize::from(
                    !simulate(c.clone(), lossy([0.04, 0.0, 0.0]), seed)
                        .0
                        .is_empty(),
                );
                all += usize::from(!simulate(c.clone(), lossy([0.04; 3]), seed).0.is_empty());
                let hole = Scenario {
                    black_hole_at: Some(60_000),
                    secs: 80,
                    ..CLEAN
                };
                if let Some(d) = simulate(c.clone(), hole, seed).0.first() {
                    detect.push((d.0 - 60_000) as f64 / 1000.0);
                }
            }
            detect.sort_by(f64::total_cmp);
            let p = |q: f64| detect[((detect.len() - 1) as f64 * q).round() as usize];
            println!(
                "prior {prior:?}: runs with a false withdrawal: {one}/{runs} (one lossy gateway), \
                 {all}/{runs} (all three); black hole withdrawn after p50 {:.1} / p90 {:.1} / p99 {:.1} s",
                p(0.5),
                p(0.9),
                p(0.99)
            );
        }
    }

    /// False withdrawals per gateway-hour of a gateway losing 4 % of its attempts, the
    /// adaptive threshold against a fixed "2 in a row" (prints; run with `--ignored
    /// --nocapture`): 20 simulated hours each.
    #[test]
    #[ignore]
    fn false_withdrawal_rates() {
        for (name, c) in [
            ("adaptive", lossy_cfg()),
            (
                "fixed 2 in a row",
                Config {
                    max_failures: 2,
                    ..lossy_cfg()
                },
            ),
        ] {
            let mut downs = 0;
            for seed in 0..10 {
                let sc = Scenario {
                    loss: [0.04, 0.0, 0.0],
                    secs: 7200,
                    ..CLEAN
                };
                downs += simulate(c.clone(), sc, SEED ^ (seed + 100)).0.len();
            }
            println!(
                "{name}: {downs} false withdrawals in 20 h, {:.2} per hour",
                downs as f64 / 20.0
            );
        }
    }
}
