//! How the Kubernetes watchers retry while the API server is away: quickly, with jitter,
//! and a "410 Gone" (the resource version expired during the outage) relists at once.
//!
//! kube-runtime's `default_backoff()` is client-go's schedule, kind to a struggling API
//! server: 0.8 s doubling to 30 s (with jitter, gaps of ~36 s were seen), and every error
//! counts, the 410 after the reconnect included. Measured with it: a Route created after a
//! 60 s outage reached the kernel 55–57 s after the API server was back. The agent's
//! installed routes stay throughout, so what matters is coming back soon: 250 ms doubling
//! to 1.5 s, plus a random jitter of up to the delay (backon), so that 1,000 agents do not
//! reconnect in step. kube-runtime's `StreamBackoff` does not see the error, so it cannot
//! skip the wait for a 410; this adapter can (written here for that reason only; the
//! schedule itself is backon's, the crate kube-runtime uses).
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::BackoffBuilder as _;
use futures::{Stream, StreamExt};
use kube::runtime::watcher;

/// The retry schedule.
fn schedule() -> backon::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(Duration::from_millis(1500))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Whether the error means "relist" rather than "the API server is unwell".
pub fn gone(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::WatchError(s) => s.code == 410,
        watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s))
        | watcher::Error::InitialListFailed(kube::Error::Api(s)) => s.code == 410,
        _ => false,
    }
}

/// `stream` with a pause after each error (but a 410), reset by any event.
pub fn backoff<S, T>(stream: S) -> impl Stream<Item = Result<T, watcher::Error>>
where
    S: Stream<Item = Result<T, watcher::Error>>,
{
    let state = Arc::new(Mutex::new(schedule()));
    stream.then(move |item| {
        let state = state.clone();
        async move {
            let pause = match &item {
                Ok(_) => {
                    *state.lock().unwrap_or_else(|p| p.into_inner()) = schedule();
                    None
                }
                Err(e) if gone(e) => None,
                Err(_) => state.lock().unwrap_or_else(|p| p.into_inner()).next(),
            };
            if let Some(d) = pause {
                tokio::time::sleep(d).await;
            }
            item
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_is_capped_with_jitter() {
        let d: Vec<Duration> = schedule().take(12).collect();
        assert!(d[0] >= Duration::from_millis(250) && d[0] < Duration::from_millis(500));
        for x in &d {
            assert!(*x <= Duration::from_millis(3000), "{d:?}");
        }
        assert!(
            d[6..].iter().all(|x| *x >= Duration::from_millis(1500)),
            "capped at 1.5 s plus jitter: {d:?}"
        );
    }

    #[test]
    fn a_410_is_a_relist_not_a_failure() {
        let status = |code| {
            let mut s = kube::core::Status::failure("expired", "Expired");
            s.code = code;
            s
        };
        assert!(gone(&watcher::Error::WatchError(Box::new(status(410)))));
        assert!(!gone(&watcher::Error::WatchError(Box::new(status(500)))));
        assert!(!gone(&watcher::Error::NoResourceVersion));
    }

    #[tokio::test(start_paused = true)]
    async fn errors_pause_the_stream_a_410_and_events_do_not() {
        let status = |code| {
            let mut s = kube::core::Status::failure("x", "X");
            s.code = code;
            watcher::Error::WatchError(Box::new(s))
        };
        let items: Vec<Result<u8, watcher::Error>> = vec![
            Err(status(503)),
            Err(status(503)),
            Ok(1),
            Err(status(410)),
            Ok(2),
        ];
        let start = tokio::time::Instant::now();
        let mut s = std::pin::pin!(backoff(futures::stream::iter(items)));
        let mut at = Vec::new();
        while let Some(i) = s.next().await {
            at.push((i.is_ok(), start.elapsed()));
        }
        // Two paused errors (each at least 250 ms), then nothing waits.
        assert!(at[1].1 >= Duration::from_millis(250), "{at:?}");
        assert!(at[2].1 >= Duration::from_millis(750), "{at:?}");
        assert_eq!(at[4].1, at[3].1, "no pause after a 410: {at:?}");
        assert_eq!(at[3].1, at[2].1, "none after an event: {at:?}");
    }
}
