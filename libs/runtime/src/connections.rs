//! Bounds on what peers can hold open on a service's gRPC listener (and the bridge's STOW-RS
//! one). Without them 8,000 idle TLS connections (anonymous ones, at the gateway) grew the
//! gateway from 14 to 212 MiB and were kept forever: nothing closed a connection that sent
//! nothing, and the file-descriptor limit was the only cap, reached with every other client
//! refused.
//! - At most `max_open` connections, handshakes included; one beyond it is closed as it is
//!   accepted, before any TLS work, and counted.
//! - A connection on which nothing is read or written for `idle_seconds` is closed. Live HTTP/2
//!   peers never get there: the server pings a connection quiet for `keepalive_seconds` and a
//!   live peer's answer is a read (one that does not answer is closed by HTTP/2's own keep-alive
//!   timeout).
//! - At most `max_streams_per_connection` calls at once on one connection (tonic leaves it
//!   unlimited unless told; hyper's own default is 200).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::Connected;

use crate::config::from_str_or_native;

/// Connections open on the listener now, handshakes included.
pub const OPEN_GAUGE: &str = "medai_connections_open";
/// Connections closed as they were accepted because `max_open` were open.
pub const REFUSED_COUNTER: &str = "medai_connections_refused_total";
/// Connections closed after nothing was read or written for `idle_seconds`.
pub const IDLE_CLOSED_COUNTER: &str = "medai_connections_idle_closed_total";

/// `process.connections` in every service's config (for example
/// `MEDAI_GATEWAY_PROCESS__CONNECTIONS__MAX_OPEN`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConnectionLimits {
    /// Connections open at once, handshakes included. About 25 KiB each when idle.
    #[serde(default = "default_max_open", deserialize_with = "from_str_or_native")]
    pub max_open: usize,
    /// A connection on which nothing is read or written for this long is closed.
    #[serde(
        default = "default_idle_seconds",
        deserialize_with = "from_str_or_native"
    )]
    pub idle_seconds: u64,
    /// The server pings a connection that has sent nothing for this long; a peer that does not
    /// answer within 20 s is closed. Below `idle_seconds`, so live peers stay open.
    #[serde(
        default = "default_keepalive_seconds",
        deserialize_with = "from_str_or_native"
    )]
    pub keepalive_seconds: u64,
    /// Calls in progress at once on one connection (HTTP/2's MAX_CONCURRENT_STREAMS).
    #[serde(
        default = "default_max_streams_per_connection",
        deserialize_with = "from_str_or_native"
    )]
    pub max_streams_per_connection: u32,
}

fn default_max_open() -> usize {
    1024
}

fn default_idle_seconds() -> u64 {
    120
}

fn default_keepalive_seconds() -> u64 {
    30
}

fn default_max_streams_per_connection() -> u32 {
    1024
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_open: default_max_open(),
            idle_seconds: default_idle_seconds(),
            keepalive_seconds: default_keepalive_seconds(),
            max_streams_per_connection: default_max_streams_per_connection(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConnectionLimitsError {
    #[error("process.connections.max_open must be at least 1")]
    NoConnections,
    #[error("process.connections.max_streams_per_connection must be at least 1")]
    NoStreams,
    #[error(
        "process.connections.keepalive_seconds ({keepalive}) must be at least 1 and below idle_seconds ({idle}), or live peers would be closed as idle"
    )]
    KeepaliveNotBelowIdle { keepalive: u64, idle: u64 },
}

impl ConnectionLimits {
    pub fn validate(&self) -> Result<(), ConnectionLimitsError> {
        if self.max_open == 0 {
            return Err(ConnectionLimitsError::NoConnections);
        }
        if self.max_streams_per_connection == 0 {
            return Err(ConnectionLimitsError::NoStreams);
        }
        if self.keepalive_seconds == 0 || self.keepalive_seconds >= self.idle_seconds {
            return Err(ConnectionLimitsError::KeepaliveNotBelowIdle {
                keepalive: self.keepalive_seconds,
                idle: self.idle_seconds,
            });
        }
        Ok(())
    }

    pub fn idle(&self) -> Duration {
        Duration::from_secs(self.idle_seconds)
    }

    pub fn keepalive(&self) -> Duration {
        Duration::from_secs(self.keepalive_seconds)
    }
}

/// Which listener a connection came to: the `listener` label of the connection metrics.
pub const GRPC: &str = "grpc";
/// The admin endpoint (`/metrics`, `/livez`).
pub const ADMIN: &str = "admin";
/// The bridge's DICOMweb STOW-RS endpoint.
pub const STOW: &str = "stow";

/// The admin endpoint's bounds: Prometheus and the kubelet need a few connections, not more.
pub const ADMIN_LIMITS: ConnectionLimits = ConnectionLimits {
    max_open: 64,
    idle_seconds: 120,
    keepalive_seconds: 30,
    max_streams_per_connection: 1,
};

pub(crate) fn describe() {
    metrics::describe_gauge!(
        OPEN_GAUGE,
        "Connections open on a listener (grpc, admin or stow), TLS handshakes included."
    );
    metrics::describe_counter!(
        REFUSED_COUNTER,
        "Connections closed as they were accepted because the listener's limit (process.connections.max_open for grpc) were open."
    );
    metrics::describe_counter!(
        IDLE_CLOSED_COUNTER,
        "Connections closed after nothing was read or written for the listener's idle time (process.connections.idle_seconds for grpc)."
    );
    metrics::gauge!(OPEN_GAUGE, "listener" => GRPC).increment(0.0);
    metrics::counter!(REFUSED_COUNTER, "listener" => GRPC).increment(0);
    metrics::counter!(IDLE_CLOSED_COUNTER, "listener" => GRPC).increment(0);
}

/// The listener's places: one is taken as a connection is accepted and given back when it closes.
#[derive(Clone)]
pub struct ConnectionSlots {
    places: Arc<Semaphore>,
    idle: Duration,
    listener: &'static str,
    max_open: usize,
    open: metrics::Gauge,
    refused: metrics::Counter,
    idle_closed: metrics::Counter,
}

/// A place held by one connection; given back (and the gauge lowered) when dropped.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    open: metrics::Gauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.decrement(1.0);
    }
}

impl ConnectionSlots {
    /// The places of the listener named `listener` ([`GRPC`], [`ADMIN`] or [`STOW`]).
    pub fn new(limits: &ConnectionLimits, listener: &'static str) -> Self {
        Self {
            places: Arc::new(Semaphore::new(limits.max_open.max(1))),
            idle: limits.idle(),
            listener,
            max_open: limits.max_open,
            open: metrics::gauge!(OPEN_GAUGE, "listener" => listener),
            refused: metrics::counter!(REFUSED_COUNTER, "listener" => listener),
            idle_closed: metrics::counter!(IDLE_CLOSED_COUNTER, "listener" => listener),
        }
    }

    /// A place for a connection just accepted, or `None` (counted) when all are taken.
    pub fn take(&self) -> Option<Slot> {
        match self.places.clone().try_acquire_owned() {
            Ok(permit) => {
                self.open.increment(1.0);
                Some(Slot {
                    _permit: permit,
                    open: self.open.clone(),
                })
            }
            Err(_) => {
                self.refused.increment(1);
                None
            }
        }
    }

    /// `connection`, holding `slot` until it closes and closed once nothing is read or written
    /// for the idle time.
    pub fn hold<S>(&self, connection: S, slot: Slot) -> HeldConnection<S> {
        HeldConnection {
            inner: connection,
            idle: self.idle,
            last_active: Instant::now(),
            check: Box::pin(tokio::time::sleep(self.idle)),
            idle_closed: self.idle_closed.clone(),
            _slot: slot,
        }
    }
}

/// A TCP listener whose connections hold places of [`ConnectionSlots`]: one beyond the limit is
/// closed as it is accepted, before any other work. axum serves the HTTP endpoints (admin,
/// STOW-RS) from it directly; the gRPC listener takes each connection with its place and makes
/// the TLS handshake first.
pub struct BoundedListener {
    listener: tokio::net::TcpListener,
    slots: ConnectionSlots,
    /// Said once each time the listener fills, not once per connection it refuses.
    refusing: bool,
}

impl BoundedListener {
    pub fn new(listener: tokio::net::TcpListener, slots: ConnectionSlots) -> Self {
        Self {
            listener,
            slots,
            refusing: false,
        }
    }

    pub fn slots(&self) -> &ConnectionSlots {
        &self.slots
    }

    /// The next connection that finds a place, with its place. Cancel-safe: nothing is held
    /// across an await but the listener.
    pub async fn accept_with_slot(
        &mut self,
    ) -> (tokio::net::TcpStream, Slot, std::net::SocketAddr) {
        loop {
            let (stream, address) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: a pause instead of a hot loop.
                    tracing::warn!(error = %error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(slot) = self.slots.take() else {
                if !self.refusing {
                    tracing::warn!(
                        listener = self.slots.listener,
                        max_open = self.slots.max_open,
                        "connection limit reached; new connections are closed until one ends"
                    );
                    self.refusing = true;
                }
                drop(stream);
                continue;
            };
            self.refusing = false;
            return (stream, slot, address);
        }
    }
}

impl axum::serve::Listener for BoundedListener {
    type Io = HeldConnection<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (stream, slot, address) = self.accept_with_slot().await;
        (self.slots.hold(stream, slot), address)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

pin_project_lite::pin_project! {
    /// A connection that holds a place on its listener and ends with `TimedOut` once nothing has
    /// been read or written for the idle time.
    pub struct HeldConnection<S> {
        #[pin]
        inner: S,
        idle: Duration,
        last_active: Instant,
        // Armed for `last_active + idle` lazily: moved on only when it fires, not on every byte.
        check: Pin<Box<Sleep>>,
        idle_closed: metrics::Counter,
        _slot: Slot,
    }
}

impl<S> HeldConnection<S> {
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead> AsyncRead for HeldConnection<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        match this.inner.poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    *this.last_active = Instant::now();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => loop {
                ready!(this.check.as_mut().poll(cx));
                let due = *this.last_active + *this.idle;
                if due <= Instant::now() {
                    this.idle_closed.increment(1);
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "nothing was read or written on the connection for the idle time",
                    )));
                }
                this.check.as_mut().reset(due);
            },
        }
    }
}

impl<S: AsyncWrite> AsyncWrite for HeldConnection<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let written = this.inner.poll_write(cx, buf);
        if matches!(written, Poll::Ready(Ok(count)) if count > 0) {
            *this.last_active = Instant::now();
        }
        written
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let written = this.inner.poll_write_vectored(cx, bufs);
        if matches!(written, Poll::Ready(Ok(count)) if count > 0) {
            *this.last_active = Instant::now();
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

impl<S: Connected> Connected for HeldConnection<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn the_defaults_are_valid_and_bad_settings_are_refused_with_their_reason() {
        assert_eq!(ConnectionLimits::default().validate(), Ok(()));
        let with = |change: fn(&mut ConnectionLimits)| {
            let mut limits = ConnectionLimits::default();
            change(&mut limits);
            limits.validate()
        };
        assert_eq!(
            with(|limits| limits.max_open = 0),
            Err(ConnectionLimitsError::NoConnections)
        );
        assert_eq!(
            with(|limits| limits.max_streams_per_connection = 0),
            Err(ConnectionLimitsError::NoStreams)
        );
        assert_eq!(
            with(|limits| limits.keepalive_seconds = limits.idle_seconds),
            Err(ConnectionLimitsError::KeepaliveNotBelowIdle {
                keepalive: 120,
                idle: 120
            })
        );
        assert_eq!(
            with(|limits| limits.keepalive_seconds = 0),
            Err(ConnectionLimitsError::KeepaliveNotBelowIdle {
                keepalive: 0,
                idle: 120
            })
        );
    }

    #[test]
    fn settings_come_from_environment_strings() {
        let limits: ConnectionLimits = serde_json::from_value(serde_json::json!({
            "max_open": "8", "idle_seconds": "60", "keepalive_seconds": 10,
        }))
        .expect("settings");
        assert_eq!(limits.max_open, 8);
        assert_eq!(limits.idle_seconds, 60);
        assert_eq!(limits.keepalive_seconds, 10);
        assert_eq!(limits.max_streams_per_connection, 1024);
    }

    #[tokio::test]
    async fn places_run_out_at_max_open_and_come_back_when_a_connection_closes() {
        let slots = ConnectionSlots::new(
            &ConnectionLimits {
                max_open: 2,
                ..ConnectionLimits::default()
            },
            GRPC,
        );
        let first = slots.take().expect("a place");
        let second = slots.take().expect("a place");
        assert!(slots.take().is_none(), "a third place at max_open 2");
        let (near, _far) = tokio::io::duplex(64);
        let held = slots.hold(near, first);
        drop(held);
        assert!(slots.take().is_some(), "the closed connection's place");
        drop(second);
    }

    #[tokio::test]
    async fn an_http_endpoint_on_a_bounded_listener_closes_connections_beyond_its_places_and_idle_ones()
     {
        use axum::routing::get;
        use std::future::IntoFuture;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let slots = ConnectionSlots::new(
            &ConnectionLimits {
                max_open: 2,
                idle_seconds: 1,
                ..ADMIN_LIMITS
            },
            ADMIN,
        );
        let router = axum::Router::new().route("/livez", get(|| std::future::ready("ok")));
        let server =
            tokio::spawn(axum::serve(BoundedListener::new(listener, slots), router).into_future());
        let opened = std::time::Instant::now();
        let connect = || tokio::net::TcpStream::connect(address);
        let mut silent = [
            connect().await.expect("connect"),
            connect().await.expect("connect"),
        ];
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut sink = Vec::new();
        let mut beyond = connect().await.expect("connect");
        tokio::time::timeout(Duration::from_millis(500), beyond.read_to_end(&mut sink))
            .await
            .expect("closed as it was accepted")
            .expect("an orderly close");
        for connection in &mut silent {
            tokio::time::timeout(Duration::from_secs(3), connection.read_to_end(&mut sink))
                .await
                .expect("closed at the idle time")
                .ok();
        }
        assert!(
            opened.elapsed() >= Duration::from_millis(800),
            "not before the idle time: {:?}",
            opened.elapsed()
        );
        assert!(
            sink.is_empty(),
            "nothing was answered to silent connections"
        );
        let mut asking = connect().await.expect("connect");
        asking
            .write_all(b"GET /livez HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
            .await
            .expect("request");
        asking.read_to_end(&mut sink).await.expect("answer");
        let answer = String::from_utf8_lossy(&sink);
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok"),
            "{answer}"
        );
        server.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_quiet_both_ways_ends_at_the_idle_time_and_one_that_reads_or_writes_stays()
    {
        let slots = ConnectionSlots::new(
            &ConnectionLimits {
                idle_seconds: 10,
                keepalive_seconds: 5,
                ..ConnectionLimits::default()
            },
            GRPC,
        );
        let (near, mut far) = tokio::io::duplex(64);
        let mut held = slots.hold(near, slots.take().expect("a place"));
        // Bytes every 6 s keep it open well past 10 s.
        let mut byte = [0_u8; 1];
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            far.write_all(b"x").await.expect("write");
            held.read_exact(&mut byte).await.expect("a byte, not idle");
        }
        // Bytes written count too: an answer still being written keeps it open.
        tokio::time::sleep(Duration::from_secs(6)).await;
        held.write_all(b"y").await.expect("write");
        far.read_exact(&mut byte).await.expect("read");
        assert_eq!(&byte, b"y");
        tokio::time::sleep(Duration::from_secs(6)).await;
        // Silence both ways: the read ends 10 s after the last byte written, not before.
        let resumed = Instant::now();
        let ended = held.read(&mut byte).await;
        assert_eq!(
            ended.expect_err("idle").kind(),
            std::io::ErrorKind::TimedOut
        );
        assert_eq!(resumed.elapsed(), Duration::from_secs(4));
    }
}
