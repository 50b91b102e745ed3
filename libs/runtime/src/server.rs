//! The gRPC server every service starts from: TLS with the mesh CA, and the layers every call
//! passes through, outermost first:
//! - metrics: every call counted and timed, refusals included (paths the server does not hold
//!   under one label value);
//! - peer policy: a peer not named for the method is refused before any handler runs;
//! - deadline: a call past its caller's `grpc-timeout` is answered DEADLINE_EXCEEDED and its
//!   work dropped;
//! - health: the standard health service answered from the process's readiness (NOT_SERVING
//!   while draining or while a required dependency is gone), whatever the service registered.

use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tower::layer::util::{Identity, Stack};

use crate::deadline::DeadlineLayer;
use crate::grpc_metrics::GrpcMetricsLayer;
use crate::health::{HealthLayer, Readiness};
use crate::peer_policy::{PeerPolicy, PeerPolicyLayer};
use crate::tls::{ClientCertificates, TlsMaterial};

pub type MeshServer = Server<
    Stack<
        HealthLayer,
        Stack<DeadlineLayer, Stack<PeerPolicyLayer, Stack<GrpcMetricsLayer, Identity>>>,
    >,
>;

/// Call inside a tokio runtime (the health status follows the readiness in a task).
pub fn mesh_server(
    tls: &TlsMaterial,
    client_certificates: ClientCertificates,
    policy: PeerPolicy,
) -> Result<MeshServer, tonic::transport::Error> {
    let health = HealthLayer::new(Readiness::of_this_process(), policy.services());
    Ok(Server::builder()
        .tls_config(tls.server_config(client_certificates))?
        .tcp_nodelay(true)
        .layer(GrpcMetricsLayer::new(policy.methods()))
        .layer(PeerPolicyLayer::new(policy))
        .layer(DeadlineLayer)
        .layer(health))
}

/// The connections of a handed-in listener, with Nagle's algorithm off. Without it a response's
/// HEADERS, DATA and trailer frames wait on the peer's delayed ACK (tens of milliseconds per
/// call); `Server::tcp_nodelay` only reaches sockets tonic accepts itself.
pub fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}
