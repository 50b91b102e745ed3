//! The audit service: the only owner of the hash-chained, append-only ledger.

pub mod appender;
pub mod chain;
pub mod config;
mod error;
mod grpc;
pub mod store;
pub mod verify;

use std::future::Future;

use medai_proto::audit::v1::audit_service_server::AuditServiceServer;
use medai_runtime::PeerPolicy;
use medai_runtime::server::{incoming, mesh_server};
use medai_runtime::tls::{ClientCertificates, TlsMaterial};
use tokio::net::TcpListener;

pub use config::AuditConfig;
pub use error::AuditError;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Tls(#[from] medai_runtime::tls::TlsError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Who may call what. Appends come from the services that record events; verification is an
/// auditor view that reaches the ledger through the gateway.
pub fn peer_policy() -> PeerPolicy {
    PeerPolicy::new()
        .allow(
            "/medai.audit.v1.AuditService/Append",
            &["gateway", "auth", "inference"],
        )
        .allow("/medai.audit.v1.AuditService/Verify", &["gateway"])
}

/// Serves the audit API on `listener` until `shutdown` resolves.
pub async fn serve(
    config: AuditConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let tls = TlsMaterial::load(&config.tls)?;
    let connection = store::connect_and_migrate(&config.database_url).await?;
    let appender = appender::LedgerAppender::start(connection.clone());
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<AuditServiceServer<grpc::AuditApi>>()
        .await;
    let api = grpc::AuditApi {
        appender,
        connection,
    };
    mesh_server(&tls, ClientCertificates::Required, "audit", peer_policy())?
        .add_service(health_service)
        .add_service(AuditServiceServer::new(api))
        .serve_with_incoming_shutdown(incoming(listener), shutdown)
        .await?;
    Ok(())
}
