//! The event loop: turns snapshots, netlink notifications, timers, probe answers and
//! signals into [`Agent`] method calls, and carries out the [`Next`] they return.
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::{Agent, AgentConfig, Next, Probe};
use crate::node::dataplane::{Dataplane, monitor};
use crate::node::ebpf::Programs;
use crate::node::probe::Prober;
use crate::source::Snapshot;

pub async fn run(
    cfg: AgentConfig,
    dataplane: Dataplane,
    programs: Option<Programs>,
    mut snapshots: mpsc::Receiver<Snapshot>,
) -> anyhow::Result<()> {
    let (wake_tx, mut wake_rx) = mpsc::channel(1);
    monitor::spawn(wake_tx, dataplane.marks(), dataplane.echo())?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut resync = tokio::time::interval(cfg.resync);
    let mut tick = tokio::time::interval(cfg.health_tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let prober = match &programs {
        // One answer per interval at most; a TCP probe may take one SYN retransmission.
        Some(_) => Some(
            Prober::new(
                cfg.health.probe_interval.min(Duration::from_secs(2)),
                cfg.forward_probes.as_ref().map(|f| f.steering),
            )
            .await?,
        ),
        None => None,
    };
    let (probe_tx, mut probe_rx) = mpsc::channel::<(Probe, bool)>(64);
    let probes = cfg.probes.clone();
    let mut agent = Agent::new(cfg, dataplane, programs);

    loop {
        probes.beat();
        let retry_at = agent.retry_at();
        let retry = async {
            match retry_at {
                Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
                None => std::future::pending().await,
            }
        };
        let next = tokio::select! {
            s = snapshots.recv() => match s {
                Some(s) => agent.on_snapshot(s).await,
                None => anyhow::bail!("the Route source stopped"),
            },
            _ = wake_rx.recv() => {
                // Let a burst of notifications settle, then reconcile once.
                tokio::time::sleep(Duration::from_millis(50)).await;
                while wake_rx.try_recv().is_ok() {}
                agent.on_netlink().await
            }
            _ = retry => agent.on_retry().await,
            _ = resync.tick() => agent.on_resync().await,
            _ = tick.tick(), if agent.has_programs() => agent.on_health_tick(Instant::now()).await,
            Some((p, ok)) = probe_rx.recv() => agent.on_probe_result(p, ok, Instant::now()).await,
            _ = sigterm.recv() => agent.on_shutdown(),
            _ = tokio::signal::ctrl_c() => agent.on_shutdown(),
        };
        if next.stop {
            return Ok(());
        }
        carry_out(next, prober.as_ref(), &probe_tx);
    }
}

/// Sends the probes and warm-up pings an event asked for, each on a task of its own.
fn carry_out(next: Next, prober: Option<&Prober>, probe_tx: &mpsc::Sender<(Probe, bool)>) {
    let Some(prober) = prober else { return };
    for gw in next.warm_up {
        let prober = prober.clone();
        tokio::spawn(async move { prober.probe(gw).await });
    }
    for p in next.probe {
        let (prober, tx) = (prober.clone(), probe_tx.clone());
        tokio::spawn(async move {
            let ok = match p {
                Probe::Echo(gw) => prober.probe(gw).await,
                Probe::Forward(f) => prober.forward(f).await,
            };
            let _ = tx.send((p, ok)).await;
        });
    }
}
