//! The audit service: the only owner of the hash-chained, append-only ledger, its signed
//! checkpoints and its proofs.

pub mod anchor;
pub mod appender;
pub mod checkpoints;
pub mod config;
mod error;
mod grpc;
pub mod query;
pub mod store;
pub mod verify;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use medai_ledger::checkpoint::{CheckpointKeyError, CheckpointSigner};
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
    #[error(transparent)]
    CheckpointKey(#[from] CheckpointKeyError),
    #[error("cannot write the checkpoint public key: {0}")]
    PublicKey(std::io::Error),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Who may call what. Appends come from the services that record events; everything that
/// reads the ledger is an auditor view that reaches it through the gateway.
pub fn peer_policy() -> PeerPolicy {
    let reads = [
        "Verify",
        "CreateCheckpoint",
        "ListCheckpoints",
        "GetCheckpointKey",
        "GetInclusionProof",
        "GetConsistencyProof",
        "QueryEvents",
        "ExportLedger",
    ];
    reads.iter().fold(
        PeerPolicy::new().allow(
            "/medai.audit.v1.AuditService/Append",
            &["gateway", "auth", "inference"],
        ),
        |policy, method| {
            policy.allow(
                &format!("/medai.audit.v1.AuditService/{method}"),
                &["gateway"],
            )
        },
    )
}

/// Loads (or creates) the checkpoint key and writes its public half beside it, for auditors.
pub fn load_checkpoint_signer(config: &AuditConfig) -> Result<CheckpointSigner, ServeError> {
    use base64::Engine;
    let signer = CheckpointSigner::load_or_create(&config.checkpoint_key_file)?;
    let public_file = config.checkpoint_key_file.with_extension("pub");
    let public_key = base64::engine::general_purpose::STANDARD.encode(signer.public_key());
    std::fs::write(&public_file, format!("{public_key}\n")).map_err(ServeError::PublicKey)?;
    Ok(signer)
}

/// Serves the audit API on `listener` until `shutdown` resolves.
pub async fn serve(
    config: AuditConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let tls = TlsMaterial::load(&config.tls)?;
    let signer = Arc::new(load_checkpoint_signer(&config)?);
    let connection = match &config.migration_database_url {
        Some(owner_url) => store::migrate_then_connect(owner_url, &config.database_url).await?,
        None => store::connect_and_migrate(&config.database_url).await?,
    };
    // Appends are refused from the start if the stored chain lost what was signed.
    let chain_anchor = Arc::new(anchor::ChainAnchor::new());
    checkpoints::check_head_at_start(&connection, &chain_anchor, signer.public_key())
        .await
        .map_err(store::StoreError::from)?;
    let appender = appender::LedgerAppender::start(connection.clone(), chain_anchor.clone());
    let checkpointer = Arc::new(checkpoints::Checkpointer::new(
        connection.clone(),
        signer,
        chain_anchor,
    ));
    let periodic = (config.checkpoint_interval_seconds > 0).then(|| {
        tokio::spawn(
            checkpointer
                .clone()
                .run_periodically(Duration::from_secs(config.checkpoint_interval_seconds)),
        )
    });
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<AuditServiceServer<grpc::AuditApi>>()
        .await;
    let api = grpc::AuditApi {
        appender,
        connection,
        checkpointer,
    };
    let served = mesh_server(&tls, ClientCertificates::Required, "audit", peer_policy())?
        .add_service(health_service)
        .add_service(AuditServiceServer::new(api))
        .serve_with_incoming_shutdown(incoming(listener), shutdown)
        .await;
    if let Some(task) = periodic {
        task.abort();
    }
    served?;
    Ok(())
}
