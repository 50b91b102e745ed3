//! The gRPC server every service starts from: TLS with the mesh CA (accepted by
//! [`incoming`], reloaded when the certificate files rotate; connections bounded in number,
//! idle time and calls at once, see [`crate::connections`]), and the layers every call passes
//! through, outermost first:
//! - trace: a SERVER span per call, named and attributed by the OpenTelemetry RPC conventions,
//!   child of the caller's trace context, with the call's correlation id (refusals included);
//! - metrics: every call counted and timed, refusals included (paths the server does not hold
//!   under one label value);
//! - peer policy: a peer not named for the method is refused before any handler runs;
//! - deadline: a call past its caller's `grpc-timeout` is answered DEADLINE_EXCEEDED and its
//!   work dropped;
//! - health: the standard health service answered from the process's readiness (NOT_SERVING
//!   while draining or while a required dependency is gone), whatever the service registered.

use tokio::net::TcpListener;
use tonic::transport::Server;
use tower::layer::util::{Identity, Stack};

use crate::connections::ConnectionLimits;
use crate::deadline::DeadlineLayer;
use crate::grpc_metrics::GrpcMetricsLayer;
use crate::health::{HealthLayer, Readiness};
use crate::peer_policy::{PeerPolicy, PeerPolicyLayer};
use crate::rpc_trace::RpcServerTraceLayer;
use crate::tls::{ClientCertificates, MeshIncoming, RELOAD_INTERVAL, TlsMaterial};

pub type MeshServer = Server<
    Stack<
        HealthLayer,
        Stack<
            DeadlineLayer,
            Stack<PeerPolicyLayer, Stack<GrpcMetricsLayer, Stack<RpcServerTraceLayer, Identity>>>,
        >,
    >,
>;

/// The largest HTTP/2 frame a mesh server or client accepts (both advertise it). At HTTP/2's
/// default of 16 KiB a 60 KB image crossed a hop as four DATA frames, each flushed through TLS
/// as a write of its own and read back as several; at 256 KiB it is one frame and one write
/// (issue 14). The flow-control windows (hyper's 1 MiB and more) still bound what is buffered.
pub const MAX_FRAME_BYTES: u32 = 256 * 1024;

/// A peer that does not answer the server's keep-alive ping within this is closed.
pub const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// Call inside a tokio runtime (the health status follows the readiness in a task, and the
/// certificate files are watched from another). Serve it over [`incoming`].
pub fn mesh_server(
    tls: &TlsMaterial,
    policy: PeerPolicy,
    limits: &ConnectionLimits,
) -> Result<MeshServer, tonic::transport::Error> {
    tls.watch_files(RELOAD_INTERVAL);
    let health = HealthLayer::new(Readiness::of_this_process(), policy.services());
    Ok(Server::builder()
        .tcp_nodelay(true)
        .max_frame_size(MAX_FRAME_BYTES)
        .max_concurrent_streams(limits.max_streams_per_connection)
        .http2_keepalive_interval(Some(limits.keepalive()))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .layer(RpcServerTraceLayer::new(policy.methods()))
        .layer(GrpcMetricsLayer::new(policy.methods()))
        .layer(PeerPolicyLayer::new(policy))
        .layer(DeadlineLayer)
        .layer(health))
}

/// The TLS connections of a handed-in listener, each with the certificate current when it
/// arrives, with Nagle's algorithm off. Without it a response's HEADERS, DATA and trailer frames
/// wait on the peer's delayed ACK (tens of milliseconds per call); `Server::tcp_nodelay` only
/// reaches sockets tonic accepts itself. See [`TlsMaterial::incoming`].
pub fn incoming(
    listener: TcpListener,
    tls: &TlsMaterial,
    client_certificates: ClientCertificates,
    limits: &ConnectionLimits,
) -> MeshIncoming {
    tls.incoming(listener, client_certificates, limits)
}
