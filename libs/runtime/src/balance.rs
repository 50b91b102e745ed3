//! Calls of one client spread across every replica of the service it calls.
//!
//! One HTTP/2 connection to a ClusterIP carries every call of a client to the one pod kube-proxy
//! picked when the connection opened, so a second replica gets nothing. A
//! [`BalancedChannel`] instead resolves the service's name (a headless Service: DNS answers
//! with the address of every ready pod), keeps one mTLS connection per address and sends each
//! call to the replica with the fewest calls in flight (ties taken in turn, so a client calling
//! one call at a time spreads its calls evenly). With tens of replicas at most, a full scan per
//! call costs nothing and needs none of power-of-two-choices' randomness.
//!
//! - The name is resolved again every [`RESOLVE_INTERVAL`]: a new pod gets calls from the next
//!   resolution on; a pod that left DNS gets no new call, its calls in flight finish on its
//!   connection, which closes with the last of them.
//! - A replica whose connection closes or fails (the pod was killed, or drains and sends
//!   GOAWAY) or that cannot be dialled is set aside at once, before DNS notices, and gets no
//!   call while another replica is usable. Each resolution dials it again (TCP and the TLS
//!   handshake); once that succeeds it takes calls again.
//! - Every connection checks that the server is the service meant (the TLS server name is the
//!   service's, `medai-audit`, never the address dialled).
//! - A name that resolves to one address, or an IP literal, behaves as one channel did: when
//!   every replica is set aside, calls still go to one of them and fail as one channel would
//!   (UNAVAILABLE) rather than wait.
//! - A failed resolution (DNS unreachable, or no address for a moment) keeps the replicas
//!   already known.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use http::Uri;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};
use tower::{Service, ServiceExt};

use crate::tls::TlsMaterial;

/// How often a balanced channel resolves its service's name again. Kubernetes updates a
/// headless Service's records within seconds of a pod becoming ready or leaving.
pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(5);
/// A replica set aside is dialled again at each resolution; a dial slower than this fails.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Turns a host name and port into the addresses of the replicas behind it.
pub trait Resolve: Send + Sync + 'static {
    fn resolve(
        &self,
        host: &str,
        port: u16,
    ) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>>;
}

/// The system's resolver (`getaddrinfo`, which reads the cluster DNS through resolv.conf):
/// what every service uses.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(
        &self,
        host: &str,
        port: u16,
    ) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> {
        let host = host.to_owned();
        Box::pin(async move {
            let mut addresses: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
                .await?
                .collect();
            addresses.sort_unstable();
            addresses.dedup();
            Ok(addresses)
        })
    }
}

/// A channel over every address its service's name resolves to; clones share the replicas.
#[derive(Clone)]
pub struct BalancedChannel {
    shared: Arc<Balancer>,
    resolved: watch::Receiver<bool>,
}

impl std::fmt::Debug for BalancedChannel {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("BalancedChannel")
            .field("target", &self.shared.target)
            .finish_non_exhaustive()
    }
}

struct Balancer {
    /// `host:port`, for logs.
    target: String,
    /// The endpoint every connection is made for (its URI gives the `:authority`, the service's
    /// name, whatever address is dialled).
    endpoint: Endpoint,
    material: TlsMaterial,
    server_name: ServerName<'static>,
    replicas: RwLock<Vec<Arc<Replica>>>,
    next: AtomicUsize,
}

/// One address of the service and its connection.
struct Replica {
    address: SocketAddr,
    channel: Channel,
    in_flight: Arc<AtomicUsize>,
    health: Arc<ReplicaHealth>,
}

#[derive(Default)]
struct ReplicaHealth {
    /// Its connection closed or failed, or it could not be dialled.
    set_aside: AtomicBool,
}

#[derive(Debug, thiserror::Error)]
#[error("no address is known for {target}")]
pub struct NoAddress {
    target: String,
}

impl BalancedChannel {
    /// A channel to `endpoint` (`http://<host>:<port>`, TLS done by the connector) whose
    /// servers must present the certificate of `server_name`. Call inside a tokio runtime: the
    /// name is resolved in a task, at once and then every `interval`, for as long as a clone
    /// of the channel lives.
    pub(crate) fn new(
        material: TlsMaterial,
        server_name: ServerName<'static>,
        endpoint: Endpoint,
        resolver: Arc<dyn Resolve>,
        interval: Duration,
    ) -> Self {
        let uri = endpoint.uri().clone();
        let host = uri
            .host()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(443);
        let shared = Arc::new(Balancer {
            target: format!("{host}:{port}"),
            endpoint,
            material,
            server_name,
            replicas: RwLock::new(Vec::new()),
            next: AtomicUsize::new(0),
        });
        if let Ok(ip) = host.parse::<IpAddr>() {
            // An address, not a name: one replica, nothing to resolve.
            shared.set_replicas(&[SocketAddr::new(ip, port)]);
            let (_, resolved) = watch::channel(true);
            return Self { shared, resolved };
        }
        let (announce, resolved) = watch::channel(false);
        tokio::spawn(resolve_periodically(
            Arc::downgrade(&shared),
            resolver,
            host,
            port,
            interval,
            announce,
        ));
        Self { shared, resolved }
    }

    /// The addresses calls may go to now (replicas set aside excluded).
    pub fn usable_addresses(&self) -> Vec<SocketAddr> {
        self.shared
            .replicas()
            .iter()
            .filter(|replica| !replica.health.set_aside.load(Ordering::SeqCst))
            .map(|replica| replica.address)
            .collect()
    }
}

async fn resolve_periodically(
    balancer: Weak<Balancer>,
    resolver: Arc<dyn Resolve>,
    host: String,
    port: u16,
    interval: Duration,
    announce: watch::Sender<bool>,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let resolution = resolver.resolve(&host, port).await;
        let Some(balancer) = balancer.upgrade() else {
            return;
        };
        match resolution {
            Ok(addresses) if !addresses.is_empty() => {
                balancer.set_replicas(&addresses);
                balancer.probe_set_aside().await;
            }
            Ok(_) => {
                tracing::warn!(target_service = %balancer.target, "the name resolved to no address; keeping the replicas known");
            }
            Err(error) => {
                tracing::warn!(target_service = %balancer.target, error = %error, "resolving the name failed; keeping the replicas known");
            }
        }
        // Calls wait for the first resolution only, whatever its outcome.
        announce.send_replace(true);
    }
}

impl Balancer {
    fn replicas(&self) -> Vec<Arc<Replica>> {
        self.replicas
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn replica(&self, address: SocketAddr) -> Replica {
        let health = Arc::new(ReplicaHealth::default());
        let connector = ReplicaConnector {
            material: self.material.clone(),
            server_name: self.server_name.clone(),
            address,
            health: health.clone(),
        };
        Replica {
            address,
            channel: self.endpoint.connect_with_connector_lazy(connector),
            in_flight: Arc::new(AtomicUsize::new(0)),
            health,
        }
    }

    /// Keeps the replicas still listed, adds the new ones and drops those gone (their calls in
    /// flight finish on their own connections).
    fn set_replicas(&self, addresses: &[SocketAddr]) {
        let mut replicas = self
            .replicas
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let before: Vec<SocketAddr> = replicas.iter().map(|replica| replica.address).collect();
        replicas.retain(|replica| addresses.contains(&replica.address));
        for address in addresses {
            if !before.contains(address) {
                replicas.push(Arc::new(self.replica(*address)));
            }
        }
        let after: Vec<SocketAddr> = replicas.iter().map(|replica| replica.address).collect();
        if before != after {
            tracing::info!(
                target_service = %self.target,
                replicas = after.len(),
                addresses = ?after,
                "replicas of the service changed"
            );
        }
    }

    /// Dials each replica set aside; one that answers the handshake gets a fresh connection
    /// and takes calls again.
    async fn probe_set_aside(&self) {
        let set_aside: Vec<SocketAddr> = self
            .replicas()
            .iter()
            .filter(|replica| replica.health.set_aside.load(Ordering::SeqCst))
            .map(|replica| replica.address)
            .collect();
        for address in set_aside {
            let dialled = tokio::time::timeout(
                PROBE_TIMEOUT,
                dial(&self.material, self.server_name.clone(), address),
            )
            .await;
            if !matches!(dialled, Ok(Ok(_))) {
                continue;
            }
            let fresh = Arc::new(self.replica(address));
            let mut replicas = self
                .replicas
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(slot) = replicas
                .iter_mut()
                .find(|replica| replica.address == address)
            {
                *slot = fresh;
                tracing::info!(target_service = %self.target, address = %address, "a replica set aside answers again");
            }
        }
    }

    /// The usable replica with the fewest calls in flight, ties taken in turn; when none is
    /// usable, one of those set aside (its call fails as one channel's would).
    fn pick(&self) -> Option<Arc<Replica>> {
        let replicas = self.replicas.read().unwrap_or_else(PoisonError::into_inner);
        let count = replicas.len();
        if count == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % count;
        let mut best: Option<&Arc<Replica>> = None;
        for offset in 0..count {
            let candidate = &replicas[(start + offset) % count];
            if candidate.health.set_aside.load(Ordering::SeqCst) {
                continue;
            }
            let load = candidate.in_flight.load(Ordering::SeqCst);
            if best.is_none_or(|chosen| load < chosen.in_flight.load(Ordering::SeqCst)) {
                best = Some(candidate);
            }
        }
        Some(best.unwrap_or(&replicas[start]).clone())
    }
}

impl Service<http::Request<tonic::body::Body>> for BalancedChannel {
    type Response = http::Response<tonic::body::Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Each call takes its replica's channel when it is made (see `call`).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let shared = self.shared.clone();
        let mut resolved = self.resolved.clone();
        Box::pin(async move {
            if !*resolved.borrow() {
                // The first resolution always announces; a closed sender means it did.
                let _ = resolved.wait_for(|done| *done).await;
            }
            let replica = shared.pick().ok_or_else(|| NoAddress {
                target: shared.target.clone(),
            })?;
            let in_flight = InFlight::start(replica.in_flight.clone());
            let response = replica.channel.clone().oneshot(request).await?;
            Ok(response.map(|body| tonic::body::Body::new(InFlightBody { body, in_flight })))
        })
    }
}

/// Counts one call in flight on a replica until dropped.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn start(counter: Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Self(counter)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its call counted in flight until it ends (a stream is a call
    /// in flight for as long as it runs).
    struct InFlightBody<B> {
        #[pin]
        body: B,
        in_flight: InFlight,
    }
}

impl<B: http_body::Body> http_body::Body for InFlightBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.project().body.poll_frame(context)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// TCP to `address`, then the TLS handshake with the material current now, insisting on the
/// service's name.
async fn dial(
    material: &TlsMaterial,
    server_name: ServerName<'static>,
    address: SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let connector = tokio_rustls::TlsConnector::from(material.client_config());
    let stream = TcpStream::connect(address).await?;
    stream.set_nodelay(true)?;
    connector.connect(server_name, stream).await
}

/// Dials one replica's address whatever the URI says, and sets the replica aside when the dial
/// fails or its connection later closes.
#[derive(Clone)]
struct ReplicaConnector {
    material: TlsMaterial,
    server_name: ServerName<'static>,
    address: SocketAddr,
    health: Arc<ReplicaHealth>,
}

type ReplicaConnection =
    hyper_util::rt::TokioIo<WatchedStream<tokio_rustls::client::TlsStream<TcpStream>>>;

impl Service<Uri> for ReplicaConnector {
    type Response = ReplicaConnection;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<ReplicaConnection, std::io::Error>> + Send>>;

    fn poll_ready(&mut self, _context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let connector = self.clone();
        Box::pin(async move {
            match dial(
                &connector.material,
                connector.server_name,
                connector.address,
            )
            .await
            {
                Ok(stream) => {
                    connector.health.set_aside.store(false, Ordering::SeqCst);
                    Ok(hyper_util::rt::TokioIo::new(WatchedStream {
                        inner: stream,
                        health: connector.health,
                    }))
                }
                Err(error) => {
                    connector.health.set_aside.store(true, Ordering::SeqCst);
                    tracing::warn!(address = %connector.address, error = %error, "a replica cannot be dialled; set aside");
                    Err(error)
                }
            }
        })
    }
}

pin_project_lite::pin_project! {
    /// A connection that sets its replica aside when the server closes it or it fails. HTTP/2
    /// always has a read pending, so this is seen as soon as the peer's FIN or RST arrives.
    struct WatchedStream<S> {
        #[pin]
        inner: S,
        health: Arc<ReplicaHealth>,
    }
}

impl<S: AsyncRead> AsyncRead for WatchedStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let filled_before = buffer.filled().len();
        let polled = this.inner.poll_read(context, buffer);
        let closed = match &polled {
            Poll::Ready(Ok(())) => buffer.filled().len() == filled_before && buffer.remaining() > 0,
            Poll::Ready(Err(_)) => true,
            Poll::Pending => false,
        };
        if closed {
            this.health.set_aside.store(true, Ordering::SeqCst);
        }
        polled
    }
}

impl<S: AsyncWrite> AsyncWrite for WatchedStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write(context, buffer);
        if matches!(polled, Poll::Ready(Err(_))) {
            this.health.set_aside.store(true, Ordering::SeqCst);
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(context)
    }

    fn poll_shutdown(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(context)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffers: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.project().inner.poll_write_vectored(context, buffers)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
