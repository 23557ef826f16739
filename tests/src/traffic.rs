//! Traffic through the lab: the echo and hold servers, single connections, long-lived
//! ones, and steady streams of new connections.
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow};

use crate::{
    ECHO_PORT, HOLD_PORT, INBOUND_PORT, Lab, in_netns, node_public_v4, node_public_v6,
    spawn_in_netns,
};

/// A long-lived connection to the hold server.
pub struct Held {
    pub stream: TcpStream,
    /// The egress gateway's public address, as the server saw it.
    pub via: IpAddr,
}

impl Held {
    /// Sends a line and reads it back: the connection still carries traffic.
    pub fn alive(&mut self) -> bool {
        let msg = b"still there?\n";
        if self.stream.write_all(msg).is_err() {
            return false;
        }
        let mut buf = [0u8; 13];
        self.stream.read_exact(&mut buf).is_ok() && &buf[..] == msg
    }
}

/// One connection attempt of a `Stream`.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub started: Instant,
    /// The egress gateway's public address, or why it failed.
    pub result: std::result::Result<IpAddr, String>,
}

/// A steady stream of new connections (see `Lab::stream`).
pub struct Stream {
    stop: Arc<AtomicBool>,
    log: Arc<std::sync::Mutex<Vec<Attempt>>>,
    handle: Option<JoinHandle<()>>,
}

impl Stream {
    /// The attempts finished so far.
    pub fn attempts(&self) -> Vec<Attempt> {
        self.log.lock().unwrap().clone()
    }

    /// Stops starting connections and waits for those in flight.
    pub fn stop(mut self) -> Vec<Attempt> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.attempts()
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Lab {
    /// The echo server: a thread inside namespace `short` answering every TCP connection
    /// on `port` (v4 and v6) with the client's source address.
    pub(crate) fn start_echo_server(&mut self, short: &str, port: u16) -> Result<()> {
        let ns = self.ns(short);
        let stop = self.stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || {
            let listener = in_netns(&ns, move || TcpListener::bind(("::", port)));
            let listener = match listener {
                Ok(Ok(l)) => l,
                Ok(Err(e)) | Err(e) => {
                    let _ = ready_tx.send(Err(anyhow!("echo server: {e}")));
                    return;
                }
            };
            listener.set_nonblocking(true).expect("nonblocking");
            let _ = ready_tx.send(Ok(()));
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, peer)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = writeln!(s, "{}", peer.ip().to_canonical());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        ready_rx.recv()??;
        self.servers.push(handle);
        Ok(())
    }

    pub(crate) fn start_hold_server(&mut self) -> Result<()> {
        let ns = self.ns("inet");
        let stop = self.stop.clone();
        let listener = in_netns(&ns, || TcpListener::bind(("::", HOLD_PORT)))??;
        listener.set_nonblocking(true)?;
        let handle = std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, peer)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(120)));
                        std::thread::spawn(move || {
                            if writeln!(s, "{}", peer.ip().to_canonical()).is_err() {
                                return;
                            }
                            let mut buf = [0u8; 256];
                            while let Ok(n) = s.read(&mut buf) {
                                if n == 0 || s.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        self.servers.push(handle);
        Ok(())
    }

    /// Opens a long-lived connection from `node` to the hold server at `dst`; returns it
    /// with the egress gateway's public address.
    pub fn hold(&self, node: &str, dst: IpAddr) -> Result<Held> {
        self.hold_from(&self.node_ns(node), dst)
    }

    /// [`Lab::hold`] from namespace `ns` (a pod's: a connection the node forwards).
    pub fn hold_from(&self, ns: &str, dst: IpAddr) -> Result<Held> {
        let ns = ns.to_string();
        let addr = SocketAddr::new(dst, HOLD_PORT);
        in_netns(&ns, move || -> Result<Held> {
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            let mut r = &s;
            while r.read(&mut b)? == 1 && b[0] != b'\n' {
                line.push(b[0]);
            }
            let via = String::from_utf8(line)?.trim().parse()?;
            Ok(Held { stream: s, via })
        })?
    }

    /// Starts `per_second` new connections per second from `node` to the echo server at
    /// `dst`, each on its own thread, until the returned stream is stopped.
    pub fn stream(&self, node: &str, dst: IpAddr, per_second: u32) -> Stream {
        self.stream_with(node, dst, per_second, false)
    }

    /// Like [`Lab::stream`], each socket bound to an ephemeral port before it connects
    /// (`bound`): IPv6 connections then spread over ECMP gateways on every kernel (6.1 and
    /// 6.12 hash a kernel-chosen port as 0, so one destination takes one gateway).
    pub fn stream_with(&self, node: &str, dst: IpAddr, per_second: u32, bound: bool) -> Stream {
        self.stream_from(&self.node_ns(node), dst, per_second, bound)
    }

    /// [`Lab::stream_with`] from namespace `ns` (a pod's: connections the node forwards).
    pub fn stream_from(&self, ns: &str, dst: IpAddr, per_second: u32, bound: bool) -> Stream {
        let ns = ns.to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let log: Arc<std::sync::Mutex<Vec<Attempt>>> = Arc::default();
        let (stop2, log2) = (stop.clone(), log.clone());
        let every = Duration::from_secs(1) / per_second.max(1);
        let handle = std::thread::spawn(move || {
            let mut workers = Vec::new();
            let mut next = Instant::now();
            let addr = SocketAddr::new(dst, ECHO_PORT);
            while !stop2.load(Ordering::Relaxed) {
                let log = log2.clone();
                let worker = spawn_in_netns(&ns, move || {
                    let started = Instant::now();
                    let result = if bound { echo_bound(addr) } else { echo(addr) };
                    let result = result.map_err(|e| e.to_string());
                    log.lock().unwrap().push(Attempt { started, result });
                });
                match worker {
                    Ok(w) => workers.push(w),
                    Err(e) => log2.lock().unwrap().push(Attempt {
                        started: Instant::now(),
                        result: Err(format!("entering {ns}: {e}")),
                    }),
                }
                next += every;
                if let Some(d) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
            }
            for w in workers {
                let _ = w.join();
            }
        });
        Stream {
            stop,
            log,
            handle: Some(handle),
        }
    }

    /// Opens a TCP connection from `node` to the echo server at `dst` and returns the
    /// source address the server saw (the egress gateway's public address).
    pub fn connect(&self, node: &str, dst: IpAddr) -> Result<IpAddr> {
        self.connect_from(&self.node_ns(node), dst)
    }

    /// Like [`Lab::connect`], but the socket is bound to an ephemeral port before it
    /// connects (`bind(port 0)`), so the kernel knows the source port at route lookup.
    pub fn connect_bound(&self, node: &str, dst: IpAddr) -> Result<IpAddr> {
        let addr = SocketAddr::new(dst, ECHO_PORT);
        in_netns(&self.node_ns(node), move || echo_bound(addr))?
            .with_context(|| format!("connecting (bound) from node {node} to {addr}"))
    }

    /// Like [`Lab::connect_bound`], from source port `port` (the same 4-tuple every time),
    /// with SO_REUSEADDR so that the port is free again once an attempt is over.
    pub fn connect_from_port(&self, node: &str, dst: IpAddr, port: u16) -> Result<IpAddr> {
        let addr = SocketAddr::new(dst, ECHO_PORT);
        in_netns(&self.node_ns(node), move || echo_from(addr, port))?
            .with_context(|| format!("connecting from node {node} port {port} to {addr}"))
    }

    /// Opens a TCP connection from namespace `ns` (full name) to the echo server at `dst`:
    /// the source address the server saw.
    pub fn connect_from(&self, ns: &str, dst: IpAddr) -> Result<IpAddr> {
        let addr = SocketAddr::new(dst, ECHO_PORT);
        in_netns(ns, move || echo(addr))?.with_context(|| format!("connecting from {ns} to {addr}"))
    }

    /// An inbound connection from the internet to node `node`'s public address (v4 or v6)
    /// on [`INBOUND_PORT`]: the source address the node saw.
    pub fn connect_inbound(&self, node: &str, v6: bool) -> Result<IpAddr> {
        let host = self.node_host(node)?;
        let dst: IpAddr = if v6 {
            node_public_v6(host).parse()?
        } else {
            node_public_v4(host).parse()?
        };
        let addr = SocketAddr::new(dst, INBOUND_PORT);
        in_netns(&self.ns("inet"), move || echo(addr))?
            .with_context(|| format!("connecting from the internet to {addr}"))
    }

    /// `count` connections; the set of source addresses the server saw, with counts.
    pub fn spread(&self, node: &str, dst: IpAddr, count: usize) -> Result<BTreeMap<IpAddr, usize>> {
        tally(count, || self.connect(node, dst))
    }
}

/// `GET path` on the agent's health port (127.0.0.1:9977) inside node `node`'s namespace:
/// (status code, body).
pub fn health_get(lab: &Lab, node: &str, path: &str) -> Result<(u16, String)> {
    let request = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
    let text = in_netns(&lab.node_ns(node), move || -> Result<String> {
        let mut s = TcpStream::connect_timeout(&"127.0.0.1:9977".parse()?, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.write_all(request.as_bytes())?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    })??;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("not an HTTP answer: {text:?}"))?;
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    Ok((code, body))
}

/// One exchange with the echo server at `addr` (from the calling thread's namespace):
/// the source address it saw.
fn echo(addr: SocketAddr) -> Result<IpAddr> {
    echo_answer(TcpStream::connect_timeout(&addr, Duration::from_secs(3))?)
}

/// [`echo`] from a socket bound to an ephemeral port before it connects.
fn echo_bound(addr: SocketAddr) -> Result<IpAddr> {
    echo_from(addr, 0)
}

/// [`echo`] from a socket bound to source `port` (0: an ephemeral one) before it connects.
fn echo_from(addr: SocketAddr, port: u16) -> Result<IpAddr> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    let any: SocketAddr = if addr.is_ipv6() {
        format!("[::]:{port}").parse()?
    } else {
        format!("0.0.0.0:{port}").parse()?
    };
    if port != 0 {
        s.set_reuse_address(true)?;
    }
    s.bind(&any.into())?;
    s.connect_timeout(&addr.into(), Duration::from_secs(3))?;
    echo_answer(s.into())
}

/// The echo server's answer on a connected stream: the source address it saw.
fn echo_answer(mut s: TcpStream) -> Result<IpAddr> {
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text.trim().parse()?)
}

/// Runs `open` (one connection to an echo server) `count` times: how many times each
/// source address was seen.
pub fn tally(
    count: usize,
    mut open: impl FnMut() -> Result<IpAddr>,
) -> Result<BTreeMap<IpAddr, usize>> {
    let mut seen = BTreeMap::new();
    for _ in 0..count {
        *seen.entry(open()?).or_insert(0) += 1;
    }
    Ok(seen)
}
