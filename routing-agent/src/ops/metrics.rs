//! Prometheus metrics (prometheus-client), served at `/metrics` on the agent's HTTP port.
//!
//! Names follow the conventions: `routing_agent_` prefix, `_total` counters, base units
//! (seconds, bytes). Labels are bounded: a gateway, a Route name, a reason or a direction —
//! never a flow.
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use routing_agent_common::GatewayStats;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GatewayLabels {
    pub gateway: String,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    attempted,
    established,
    failed,
    reset,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub gateway: String,
    pub outcome: Outcome,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Direction {
    tx,
    rx,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficLabels {
    pub gateway: String,
    pub direction: Direction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    pub gateway: String,
    /// `icmp` (an echo to the gateway) or `tcp` (a connection through it).
    pub kind: String,
    pub answered: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ComponentLabels {
    pub component: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

pub struct Metrics {
    registry: Registry,
    pub gateway_up: Family<GatewayLabels, Gauge>,
    pub gateway_penalty: Family<GatewayLabels, Gauge>,
    pub gateway_threshold: Family<GatewayLabels, Gauge>,
    pub gateway_loss: Family<GatewayLabels, Gauge<f64, AtomicU64>>,
    pub gateway_last_change: Family<GatewayLabels, Gauge>,
    pub withdrawals: Family<GatewayLabels, Counter>,
    pub restores: Family<GatewayLabels, Counter>,
    pub connections: Family<ConnectionLabels, Counter>,
    pub icmp_unreachable: Family<GatewayLabels, Counter>,
    pub udp_unreachable: Family<GatewayLabels, Counter>,
    pub steered_back: Family<GatewayLabels, Counter>,
    pub packets: Family<TrafficLabels, Counter>,
    pub bytes: Family<TrafficLabels, Counter>,
    pub probes: Family<ProbeLabels, Counter>,
    pub route_applied: Family<RouteLabels, Gauge>,
    pub destinations_installed: Gauge,
    pub problems: Family<ReasonLabels, Gauge>,
    /// Destinations refusing traffic because no gateway can be used, by reason.
    pub failing_closed: Family<ReasonLabels, Gauge>,
    /// Packets the uplink guard refused (since its map was created).
    pub uplink_refused: Gauge,
    pub reconcile_duration: Histogram,
    pub reconciles: Counter,
    pub reconcile_errors: Counter,
    pub kernel_changes: Counter,
    pub api_errors: Family<ComponentLabels, Counter>,
    /// Last counters read per gateway (the eBPF counters are cumulative).
    last: Mutex<HashMap<IpAddr, GatewayStats>>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("routing_agent");
        let m = Metrics {
            registry: Registry::default(),
            gateway_up: Family::default(),
            gateway_penalty: Family::default(),
            gateway_threshold: Family::default(),
            gateway_loss: Family::default(),
            gateway_last_change: Family::default(),
            withdrawals: Family::default(),
            restores: Family::default(),
            connections: Family::default(),
            icmp_unreachable: Family::default(),
            udp_unreachable: Family::default(),
            steered_back: Family::default(),
            packets: Family::default(),
            bytes: Family::default(),
            probes: Family::default(),
            route_applied: Family::default(),
            destinations_installed: Gauge::default(),
            problems: Family::default(),
            failing_closed: Family::default(),
            uplink_refused: Gauge::default(),
            reconcile_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            reconciles: Counter::default(),
            reconcile_errors: Counter::default(),
            kernel_changes: Counter::default(),
            api_errors: Family::default(),
            last: Mutex::new(HashMap::new()),
        };
        let build: Family<BuildLabels, Gauge> = Family::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").into(),
            })
            .set(1);
        r.register("build_info", "Build of the running agent (always 1)", build);
        r.register(
            "gateway_up",
            "1 while the gateway is in its routes, 0 while withdrawn",
            m.gateway_up.clone(),
        );
        r.register(
            "gateway_penalty",
            "Flap damping of the gateway: its next restore waits probe-interval x 2^penalty",
            m.gateway_penalty.clone(),
        );
        r.register(
            "gateway_failure_threshold",
            "Unanswered connection attempts in a row that take the gateway down now (adapts to its measured loss)",
            m.gateway_threshold.clone(),
        );
        r.register(
            "gateway_loss_ratio",
            "Measured share of the gateway's connection attempts lost on a path that still forwards",
            m.gateway_loss.clone(),
        );
        r.register_with_unit(
            "gateway_last_change_timestamp",
            "When the gateway last went down or up (Unix time)",
            Unit::Seconds,
            m.gateway_last_change.clone(),
        );
        r.register(
            "gateway_withdrawals",
            "Times the gateway was withdrawn from its routes",
            m.withdrawals.clone(),
        );
        r.register(
            "gateway_restores",
            "Times the gateway was put back into its routes",
            m.restores.clone(),
        );
        r.register(
            "gateway_connections",
            "TCP connection attempts through the gateway by outcome (failed: SYN retransmitted or ICMP unreachable while unanswered)",
            m.connections.clone(),
        );
        r.register(
            "gateway_icmp_unreachable",
            "ICMP destination-unreachable messages from the gateway's side",
            m.icmp_unreachable.clone(),
        );
        r.register(
            "gateway_udp_unreachable",
            "ICMP destination-unreachable messages from the gateway's side quoting a UDP datagram of this node",
            m.udp_unreachable.clone(),
        );
        r.register(
            "gateway_steered_back_packets",
            "Packets of established connections put back on their gateway after a re-route (flow pinning)",
            m.steered_back.clone(),
        );
        r.register(
            "gateway_packets",
            "Packets through the gateway",
            m.packets.clone(),
        );
        r.register_with_unit(
            "gateway",
            "Bytes through the gateway",
            Unit::Bytes,
            m.bytes.clone(),
        );
        r.register(
            "gateway_probes",
            "Probes of withdrawn gateways by kind (icmp: an echo to the gateway; tcp: a connection through it) and result",
            m.probes.clone(),
        );
        r.register(
            "route_applied",
            "1 when every destination of the Route is in the kernel, 0 when it failed on this node",
            m.route_applied.clone(),
        );
        r.register(
            "destinations_installed",
            "Destinations routed by the agent on this node",
            m.destinations_installed.clone(),
        );
        r.register(
            "route_problems",
            "Problems with the Routes on this node, by reason",
            m.problems.clone(),
        );
        r.register(
            "destinations_failing_closed",
            "Destinations whose traffic is refused because none of their gateways can be used (AllGatewaysDown, InterfaceDown, GatewayUnreachable)",
            m.failing_closed.clone(),
        );
        r.register(
            "uplink_guard_refused_packets",
            "IPv6 packets dropped on the public interface because the main table refuses their destination (fail-closed under an IPv6 default-route override with symmetric routing)",
            m.uplink_refused.clone(),
        );
        r.register_with_unit(
            "reconcile_duration",
            "Time of one reconcile (plan, kernel read, diff, apply)",
            Unit::Seconds,
            m.reconcile_duration.clone(),
        );
        r.register("reconciles", "Reconciles done", m.reconciles.clone());
        r.register(
            "reconcile_errors",
            "Reconciles that could not read or change the kernel (netlink errors)",
            m.reconcile_errors.clone(),
        );
        r.register(
            "kernel_changes",
            "Kernel operations (routes, nexthops, rules) applied",
            m.kernel_changes.clone(),
        );
        r.register(
            "api_errors",
            "Failed Kubernetes API calls and watches, by component",
            m.api_errors.clone(),
        );
        Metrics { registry: r, ..m }
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Adds what the eBPF counters of `gateway` gained since the last read.
    pub fn observe_stats(&self, gateway: IpAddr, now: &GatewayStats) {
        let mut last = self.last.lock().expect("not poisoned");
        let d = now.since(&last.get(&gateway).copied().unwrap_or_default());
        let g = gateway.to_string();
        for (outcome, n) in [
            (Outcome::attempted, d.syn_sent),
            (Outcome::established, d.established),
            (Outcome::failed, d.failed),
            (Outcome::reset, d.rst),
        ] {
            let l = ConnectionLabels {
                gateway: g.clone(),
                outcome,
            };
            self.connections.get_or_create(&l).inc_by(n);
        }
        let gl = GatewayLabels { gateway: g.clone() };
        self.icmp_unreachable
            .get_or_create(&gl)
            .inc_by(d.icmp_unreachable);
        self.udp_unreachable
            .get_or_create(&gl)
            .inc_by(d.udp_unreachable);
        self.steered_back.get_or_create(&gl).inc_by(d.steered_back);
        for (direction, packets, bytes) in [
            (Direction::tx, d.tx_packets, d.tx_bytes),
            (Direction::rx, d.rx_packets, d.rx_bytes),
        ] {
            let l = TrafficLabels {
                gateway: g.clone(),
                direction,
            };
            self.packets.get_or_create(&l).inc_by(packets);
            self.bytes.get_or_create(&l).inc_by(bytes);
        }
        last.insert(gateway, *now);
    }

    pub fn gateway(gateway: IpAddr) -> GatewayLabels {
        GatewayLabels {
            gateway: gateway.to_string(),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_follow_the_cumulative_ebpf_counters() {
        let m = Metrics::new();
        let gw: IpAddr = "10.0.0.1".parse().unwrap();
        let mut s = GatewayStats {
            syn_sent: 5,
            established: 4,
            failed: 1,
            tx_bytes: 1000,
            ..Default::default()
        };
        m.observe_stats(gw, &s);
        s.syn_sent = 7;
        s.established = 6;
        m.observe_stats(gw, &s);
        let text = m.encode();
        assert!(
            text.contains(r#"routing_agent_gateway_connections_total{gateway="10.0.0.1",outcome="attempted"} 7"#),
            "{text}"
        );
        assert!(text.contains(
            r#"routing_agent_gateway_connections_total{gateway="10.0.0.1",outcome="failed"} 1"#
        ));
        assert!(
            text.contains(
                r#"routing_agent_gateway_bytes_total{gateway="10.0.0.1",direction="tx"} 1000"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"routing_agent_build_info{version=""#));
        // Maps recreated (counters back to small values): counted again from there.
        s.syn_sent = 2;
        m.observe_stats(gw, &s);
        assert!(m.encode().contains(r#"outcome="attempted"} 9"#));
    }
}
