//! The accept loop and the life of each connection, on hyper directly: `axum::serve` has no
//! connection cap and no timeouts, so idle and slow clients could hold sockets forever.
//!
//! - One client address holds at most `max_connections_per_peer` of them: a connection over
//!   that is closed at once, before it takes a slot, so one peer cannot lock everyone out.
//! - At most `max_connections` are served; a connection accepted at the cap waits for a slot
//!   (the others wait in the listen backlog) and asks idle connections (no request in flight,
//!   no request head started) to close at once, so idle sockets can never lock everyone out.
//! - A connection with no request in flight closes after `keep_alive_timeout`; once the first
//!   byte of a request head arrives, the whole head must follow within `header_read_timeout`.
//!   Bodies have their own timeout in the JSON extractor; the request timeout covers the rest.
//! - A response is in flight until its last byte is written, not only until hyper has taken
//!   its body: a slow reader of a large response is not cut by the keep-alive timeout. A
//!   reader that takes nothing for `write_stall_timeout` while output waits is cut.
//! - On drain, idle connections close and busy ones finish their response, then close.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use axum::Router;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tower::ServiceExt;

use super::shutdown::Shutdown;
use crate::engine::Metrics;

#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub keep_alive_timeout: Duration,
    /// How long output may wait on a client that reads nothing (`--write-stall-timeout`).
    pub write_stall_timeout: Duration,
    /// Open connections one client address may hold (`--max-connections-per-peer`).
    pub max_connections_per_peer: usize,
}

/// Open connections per client address.
#[derive(Default)]
struct Peers(std::sync::Mutex<HashMap<IpAddr, usize>>);

/// One connection's place in its peer's count, given back when dropped.
struct PeerSlot {
    peers: Arc<Peers>,
    ip: IpAddr,
}

impl Peers {
    /// A place for a connection from `ip`, unless it already holds `cap`.
    fn enter(self: &Arc<Self>, ip: IpAddr, cap: usize) -> Option<PeerSlot> {
        let mut open = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(ip).or_default();
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            peers: Arc::clone(self),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.peers.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// What the watchdog of one connection knows about it.
struct ConnState {
    opened: Instant,
    /// Requests whose response body is still being sent.
    in_flight: AtomicUsize,
    /// Milliseconds since `opened` when the last request ended (0 = at open).
    idle_since_ms: AtomicU64,
    /// Milliseconds since `opened`, plus one, when the first byte of the next request head
    /// arrived; 0 = none yet.
    head_started_ms: AtomicU64,
    /// Output is waiting for the client to read (the socket's last write would block).
    write_blocked: AtomicBool,
    /// Milliseconds since `opened` when the socket last took output.
    wrote_ms: AtomicU64,
    changed: Notify,
}

impl ConnState {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            head_started_ms: AtomicU64::new(0),
            write_blocked: AtomicBool::new(false),
            wrote_ms: AtomicU64::new(0),
            changed: Notify::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64
    }

    fn at(&self, ms: u64) -> Instant {
        self.opened + Duration::from_millis(ms)
    }

    fn bytes_read(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0
            && self.head_started_ms.load(Ordering::Acquire) == 0
        {
            self.head_started_ms
                .store(self.now_ms() + 1, Ordering::Release);
            self.changed.notify_one();
        }
    }

    fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_started_ms.store(0, Ordering::Release);
    }

    fn request_ended(&self) {
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle_since_ms.store(self.now_ms(), Ordering::Release);
            self.changed.notify_one();
        }
    }

    /// A write to the socket: `took` bytes, or none because it would block.
    fn wrote(&self, took: bool) {
        let now = self.now_ms();
        if took {
            self.wrote_ms.store(now, Ordering::Release);
        }
        let was_blocked = self.write_blocked.swap(!took, Ordering::AcqRel);
        if was_blocked == took {
            if took && self.in_flight.load(Ordering::Acquire) == 0 {
                // The last response's end went out: the connection is idle from now.
                self.idle_since_ms.store(now, Ordering::Release);
            }
            self.changed.notify_one();
        }
    }

    /// Idle: nothing in flight, no output waiting and no request head begun.
    fn is_idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
            && !self.write_blocked.load(Ordering::Acquire)
            && self.head_started_ms.load(Ordering::Acquire) == 0
    }

    /// When this connection is to be closed if nothing changes; None while a request runs.
    fn deadline(&self, limits: &ConnectionLimits) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        if self.write_blocked.load(Ordering::Acquire) {
            // The last response's end still waits on the client: it must keep reading.
            return Some(
                self.at(self.wrote_ms.load(Ordering::Acquire)) + limits.write_stall_timeout,
            );
        }
        match self.head_started_ms.load(Ordering::Acquire) {
            0 => Some(
                self.at(self.idle_since_ms.load(Ordering::Acquire)) + limits.keep_alive_timeout,
            ),
            started => Some(self.at(started - 1) + limits.header_read_timeout),
        }
    }
}

/// The socket, telling its connection's state when bytes arrive.
struct WatchedIo {
    inner: TcpStream,
    state: Arc<ConnState>,
}

impl AsyncRead for WatchedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.state.bytes_read();
        }
        r
    }
}

impl AsyncWrite for WatchedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.state.wrote(!r.is_pending());
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.state.wrote(!r.is_pending());
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Marks its request ended when hyper drops the response body (sent, or the client left).
struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

/// A response body that carries its request's in-flight mark.
struct TrackedBody {
    inner: Body,
    _in_flight: InFlight,
}

impl http_body::Body for TrackedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Serves `app` on `listener` until `shutdown` drains and every connection has closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let peers = Arc::new(Peers::default());
    let pressure = Arc::new(Notify::new());
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors or a connection reset before accept: not fatal.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.draining() => break,
        };
        let Some(peer) = peers.enter(peer.ip(), limits.max_connections_per_peer.max(1)) else {
            metrics.connections_refused.increment(1);
            continue; // dropping the stream closes it
        };
        // At the cap, the connection just accepted waits for a slot, and idle connections
        // are asked to give way (again every 100 ms, in case one became idle meanwhile).
        let slot = loop {
            if let Ok(s) = Arc::clone(&slots).try_acquire_owned() {
                break Some(s);
            }
            pressure.notify_waiters();
            tokio::select! {
                s = Arc::clone(&slots).acquire_owned() => break s.ok(),
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = shutdown.draining() => break None,
            }
        };
        let Some(slot) = slot else { break };
        let _ = stream.set_nodelay(true);
        let (app, metrics, pressure, shutdown) = (
            app.clone(),
            Arc::clone(&metrics),
            Arc::clone(&pressure),
            shutdown.clone(),
        );
        connections.spawn(async move {
            metrics.open_connections.increment(1.0);
            serve_connection(stream, app, limits, &metrics, &pressure, shutdown).await;
            metrics.open_connections.decrement(1.0);
            drop((slot, peer));
        });
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

async fn serve_connection(
    stream: TcpStream,
    app: Router,
    limits: ConnectionLimits,
    metrics: &Metrics,
    pressure: &Notify,
    shutdown: Shutdown,
) {
    let state = Arc::new(ConnState::new());
    let io = TokioIo::new(WatchedIo {
        inner: stream,
        state: Arc::clone(&state),
    });
    let svc_state = Arc::clone(&state);
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let (app, state) = (app.clone(), Arc::clone(&svc_state));
        state.request_started();
        let in_flight = InFlight(state);
        async move {
            let resp: Response = app
                .oneshot(Request::from(req.map(Body::new)))
                .await
                .unwrap_or_else(|never| match never {});
            Ok::<_, std::convert::Infallible>(resp.map(|inner| {
                Body::new(TrackedBody {
                    inner,
                    _in_flight: in_flight,
                })
            }))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(io, service);
    let mut conn = std::pin::pin!(conn);
    let mut drained = false;
    loop {
        let deadline = state.deadline(&limits);
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = sleep => {
                if state.deadline(&limits).is_some_and(|d| d <= Instant::now()) {
                    metrics.connections_timed_out.increment(1);
                    return; // dropping the connection closes the socket
                }
            }
            _ = state.changed.notified() => {}
            _ = pressure.notified() => {
                if state.is_idle() {
                    return;
                }
            }
            _ = shutdown.draining(), if !drained => {
                drained = true;
                if state.in_flight.load(Ordering::Acquire) == 0
                    && !state.write_blocked.load(Ordering::Acquire)
                {
                    return; // idle or a half-sent head: nothing to finish
                }
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Raises the soft limit on open files to the hard limit, so that `max_connections` sockets
/// fit; returns the limit now in force (None where unknown).
pub fn raise_open_files_limit() -> Option<u64> {
    rlimit::increase_nofile_limit(u64::MAX).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ConnectionLimits = ConnectionLimits {
        max_connections: 1,
        header_read_timeout: Duration::from_secs(10),
        keep_alive_timeout: Duration::from_secs(1),
        write_stall_timeout: Duration::from_secs(30),
        max_connections_per_peer: 1,
    };

    /// A response hyper has taken whole but the client has not read is still in flight: the
    /// keep-alive timeout (1 s here) does not apply until its end is written, only the stall
    /// timeout (30 s) while nothing is.
    #[test]
    fn output_waiting_on_the_client_keeps_the_connection_busy() {
        let c = ConnState::new();
        assert!(c.is_idle());
        c.request_started();
        assert_eq!(c.deadline(&LIMITS), None);
        c.wrote(true);
        c.wrote(false); // the socket is full
        c.request_ended(); // hyper took the last of the body
        assert!(!c.is_idle());
        let stall = c.deadline(&LIMITS).unwrap();
        assert!(
            stall >= Instant::now() + Duration::from_secs(29),
            "{stall:?}"
        );
        c.wrote(true); // the end went out
        assert!(c.is_idle());
        let idle = c.deadline(&LIMITS).unwrap();
        assert!(idle <= Instant::now() + Duration::from_secs(1), "{idle:?}");
    }

    #[test]
    fn a_peer_holds_at_most_its_cap_and_gets_its_places_back() {
        let peers = Arc::new(Peers::default());
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let first = peers.enter(a, 2).unwrap();
        let second = peers.enter(a, 2).unwrap();
        assert!(peers.enter(a, 2).is_none());
        assert!(
            peers.enter(b, 2).is_some(),
            "another peer is not counted with it"
        );
        drop(first);
        let third = peers.enter(a, 2).unwrap();
        drop((second, third));
        assert!(peers.0.lock().unwrap().is_empty());
    }
}
