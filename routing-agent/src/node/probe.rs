//! ICMP echo probes of withdrawn gateways (surge-ping, raw ICMP sockets: root or
//! CAP_NET_RAW, works inside a network namespace).
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use surge_ping::{Client, Config, ICMP, PingIdentifier, PingSequence};

#[derive(Clone)]
pub struct Prober {
    v4: Arc<Client>,
    v6: Option<Arc<Client>>,
    timeout: Duration,
    seq: Arc<AtomicU16>,
}

impl Prober {
    pub fn new(timeout: Duration) -> std::io::Result<Self> {
        let raw = |kind| {
            Config::builder()
                .kind(kind)
                .sock_type_hint(socket2::Type::RAW)
                .build()
        };
        let v4 = Arc::new(Client::new(&raw(ICMP::V4))?);
        // A node without IPv6 still probes its IPv4 gateways.
        let v6 = Client::new(&raw(ICMP::V6)).ok().map(Arc::new);
        Ok(Prober {
            v4,
            v6,
            timeout,
            seq: Arc::new(AtomicU16::new(0)),
        })
    }

    /// Sends one echo request to `gw`; true when it is answered within the timeout.
    pub async fn probe(&self, gw: IpAddr) -> bool {
        let client = match gw {
            IpAddr::V4(_) => &self.v4,
            IpAddr::V6(_) => match &self.v6 {
                Some(c) => c,
                None => return false,
            },
        };
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let ident = PingIdentifier((std::process::id() as u16) ^ n.rotate_left(8));
        let mut pinger = client.pinger(gw, ident).await;
        pinger.timeout(self.timeout);
        pinger
            .ping(PingSequence(n), b"routing-agent probe")
            .await
            .is_ok()
    }
}
