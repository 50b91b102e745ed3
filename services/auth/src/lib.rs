//! The auth service: users and their credentials, signing keys, access and refresh tokens,
//! revocations and re-authentication for electronic signatures.

pub mod authority;
pub mod config;
mod error;
mod grpc;
pub mod keys;
pub mod metric_catalog;
pub mod passwords;
pub mod revocation_record;
pub mod store;

use std::future::Future;
use std::sync::Arc;

use medai_proto::auth::v1::auth_service_server::AuthServiceServer;
use medai_revocation::RevocationStore;
use medai_runtime::server::{incoming, mesh_server};
use medai_runtime::tls::{ClientCertificates, TlsMaterial};
use medai_runtime::{PeerPolicy, ServiceIdentity};
use tokio::net::TcpListener;

pub use config::AuthConfig;
pub use error::AuthError;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Tls(#[from] medai_runtime::tls::TlsError),
    #[error("database: {0}")]
    Database(#[from] sea_orm::DbErr),
    #[error(transparent)]
    Keys(#[from] keys::KeyError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("revocation store: {0}")]
    Revocation(#[from] medai_revocation::RevocationError),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Only the gateway talks to auth: users reach it through the gateway.
pub fn peer_policy() -> PeerPolicy {
    [
        "Login",
        "Refresh",
        "Logout",
        "CheckRevocation",
        "GetSigningKeys",
        "RotateSigningKey",
        "CreateUser",
        "SetUserRole",
        "DisableUser",
        "ResetUserPassword",
        "DeleteUser",
        "ChangePassword",
        "Reauthenticate",
        "ConsumeSigningTicket",
    ]
    .iter()
    .fold(PeerPolicy::new(), |policy, method| {
        policy.allow(
            &format!("/medai.auth.v1.AuthService/{method}"),
            &["gateway"],
        )
    })
}

/// Ends a background task when the service it belongs to stops.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

pub async fn serve(
    config: AuthConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    metric_catalog::describe();
    let connections = config.process.connections.clone();
    config.validate().map_err(ServeError::Config)?;
    let tls = TlsMaterial::load(&config.tls)?;
    let hash_gate = Arc::new(passwords::HashGate::new(
        config.passwords.max_concurrent_hashes,
        config.passwords.max_waiting_hashes,
    ));
    let connection = store::connect(
        &config.database_url,
        config.process.run_migrations,
        config.database_max_connections,
    )
    .await?;
    if let Some(admin) = &config.bootstrap_admin {
        authority::ensure_bootstrap_admin(&connection, admin, &hash_gate).await?;
    }
    let keys = Arc::new(keys::KeyRing::new(
        connection.clone(),
        config.tokens.access_token_ttl_seconds,
    ));
    keys.ensure_a_key().await?;
    let audit = tls.mesh_channel(&config.audit_endpoint, &ServiceIdentity::new("audit"))?;
    let decoy_hash = hash_gate
        .run(passwords::decoy_hash)
        .await
        .map_err(AuthError::from)?;
    let revocations = Arc::new(RevocationStore::connect(&config.revocation)?);
    // Revocations are reloaded from the database before the first token is checked: a restart
    // (even after kill -9) or a Redis that lost its data resurrects none of them.
    revocations.start_seed();
    let (revoked_tokens, subject_floors) = revocation_record::load_in_force(&connection).await?;
    if let Err(error) = revocations.seed(&revoked_tokens, &subject_floors).await {
        tracing::warn!(error = %error, "revocations not yet seeded into Redis; retrying in the background");
    }
    let _seeder = AbortOnDrop(tokio::spawn(revocation_record::keep_seeded(
        connection.clone(),
        revocations.clone(),
    )));
    let authority = Arc::new(authority::Authority {
        connection,
        keys,
        ledger: medai_ledger_client::LedgerClient::new(audit),
        revocations,
        tokens: config.tokens.clone(),
        lockout: config.lockout.clone(),
        decoy_hash,
        hash_gate,
    });
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<AuthServiceServer<grpc::AuthApi>>()
        .await;
    mesh_server(&tls, peer_policy(), &connections)?
        .add_service(health_service)
        .add_service(AuthServiceServer::new(grpc::AuthApi { authority }))
        .serve_with_incoming_shutdown(
            incoming(listener, &tls, ClientCertificates::Required, &connections),
            shutdown,
        )
        .await?;
    Ok(())
}
