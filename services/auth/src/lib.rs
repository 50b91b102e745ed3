//! The auth service: users and their credentials, the signing keys, and access tokens.

pub mod config;
mod error;
mod grpc;
pub mod keys;
mod ledger;
pub mod login;
pub mod passwords;
pub mod store;

use std::future::Future;
use std::sync::Arc;

use medai_proto::auth::v1::auth_service_server::AuthServiceServer;
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
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Only the gateway talks to auth: users reach it through the gateway's Login.
pub fn peer_policy() -> PeerPolicy {
    PeerPolicy::new()
        .allow("/medai.auth.v1.AuthService/Login", &["gateway"])
        .allow("/medai.auth.v1.AuthService/GetSigningKeys", &["gateway"])
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
    config.validate().map_err(ServeError::Config)?;
    let tls = TlsMaterial::load(&config.tls)?;
    let connection = store::connect_and_migrate(&config.database_url).await?;
    if let Some(admin) = &config.bootstrap_admin {
        login::ensure_bootstrap_admin(&connection, admin).await?;
    }
    let signing_key = Arc::new(keys::ensure_signing_key(&connection).await?);
    let audit = tls.channel(&config.audit_endpoint, &ServiceIdentity::new("audit"))?;
    let decoy_hash = tokio::task::spawn_blocking(passwords::decoy_hash)
        .await
        .map_err(|error| ServeError::Config(error.to_string()))?;
    let login = Arc::new(login::LoginService {
        connection: connection.clone(),
        signing_key,
        ledger: ledger::LedgerClient::new(audit),
        tokens: config.tokens.clone(),
        decoy_hash,
    });
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<AuthServiceServer<grpc::AuthApi>>()
        .await;
    mesh_server(&tls, ClientCertificates::Required, "auth", peer_policy())?
        .add_service(health_service)
        .add_service(AuthServiceServer::new(grpc::AuthApi { login, connection }))
        .serve_with_incoming_shutdown(incoming(listener), shutdown)
        .await?;
    Ok(())
}
