//! The gateway: the mesh's only external endpoint. It authenticates callers with tokens,
//! enforces roles, and orchestrates validate → infer → audit.

pub mod config;
pub mod delivery_notes;
mod downstream;
mod error;
mod explain;
mod grpc;
pub mod infer;
pub mod load_control;
pub mod metric_catalog;
mod model_inputs;
mod results;
pub mod revocation_check;
pub mod signing_keys;
pub mod streams;
pub mod token_auth;
pub mod uploads;

use std::future::Future;
use std::sync::Arc;

use medai_proto::gateway::v1::gateway_service_server::GatewayServiceServer;
use medai_runtime::PeerPolicy;
use medai_runtime::server::{incoming, mesh_server};
use medai_runtime::tls::{ClientCertificates, TlsMaterial};
use medai_tokens::Role;
use tokio::net::TcpListener;

pub use config::GatewayConfig;
pub use error::GatewayError;

use crate::revocation_check::RevocationSource;
use crate::token_auth::{RolePolicy, TokenAuthLayer, TokenChecks};
use medai_revocation::RevocationStore;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("revocation store: {0}")]
    Revocation(#[from] medai_revocation::RevocationError),
    #[error(transparent)]
    Tls(#[from] medai_runtime::tls::TlsError),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

const SERVICE: &str = "/medai.gateway.v1.GatewayService/";
const REFLECTION_V1: &str = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
const REFLECTION_V1ALPHA: &str = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo";

/// The services server reflection lists: exactly those this server answers.
pub const REFLECTED_SERVICES: [&str; 4] = [
    "medai.gateway.v1.GatewayService",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

const EXTERNAL_METHODS: [&str; 23] = [
    "Login",
    "Refresh",
    "Logout",
    "ChangePassword",
    "Reauthenticate",
    "Infer",
    "UploadImage",
    "GetUploadStatus",
    "StudyStream",
    "GetResult",
    "ListResults",
    "SignResult",
    "ExplainResult",
    "VerifyLedger",
    "QueryLedger",
    "ExportLedger",
    "CreateLedgerCheckpoint",
    "CreateUser",
    "SetUserRole",
    "DisableUser",
    "ResetUserPassword",
    "DeleteUser",
    "RotateSigningKey",
];

/// The external API is open at the transport (PACS clients may present certificates, people
/// need not); who may do what is decided by tokens and roles.
pub fn peer_policy() -> PeerPolicy {
    EXTERNAL_METHODS
        .iter()
        .fold(PeerPolicy::new(), |policy, method| {
            policy.open(&format!("{SERVICE}{method}"))
        })
        .open("/grpc.health.v1.Health/Check")
        .open("/grpc.health.v1.Health/Watch")
        .open(REFLECTION_V1)
        .open(REFLECTION_V1ALPHA)
}

/// Which role may call which external method. Anything not named is refused.
pub fn role_policy() -> RolePolicy {
    const EVERY_ROLE: [Role; 4] = [Role::Admin, Role::Clinician, Role::Viewer, Role::Auditor];
    let method = |name: &str| format!("{SERVICE}{name}");
    let policy = RolePolicy::default()
        .public(&method("Login"))
        .public(&method("Refresh"))
        .public_prefix("/grpc.health.v1.Health/")
        // The schema is public (it is in the repository); when reflection is off it is absent.
        .public(REFLECTION_V1)
        .public(REFLECTION_V1ALPHA)
        .allow(&method("Logout"), &EVERY_ROLE)
        .allow(&method("ChangePassword"), &EVERY_ROLE)
        .allow(&method("Reauthenticate"), &[Role::Admin, Role::Clinician])
        .allow(&method("Infer"), &[Role::Admin, Role::Clinician])
        .allow(&method("UploadImage"), &[Role::Admin, Role::Clinician])
        .allow(&method("GetUploadStatus"), &[Role::Admin, Role::Clinician])
        .allow(&method("StudyStream"), &[Role::Admin, Role::Clinician])
        .allow(
            &method("GetResult"),
            &[Role::Admin, Role::Clinician, Role::Viewer],
        )
        .allow(
            &method("ListResults"),
            &[Role::Admin, Role::Clinician, Role::Viewer],
        )
        .allow(&method("SignResult"), &[Role::Admin, Role::Clinician])
        .allow(&method("ExplainResult"), &[Role::Admin, Role::Clinician])
        .allow(&method("VerifyLedger"), &[Role::Admin, Role::Auditor])
        .allow(
            &method("CreateLedgerCheckpoint"),
            &[Role::Admin, Role::Auditor],
        )
        .allow(&method("QueryLedger"), &[Role::Auditor])
        .allow(&method("ExportLedger"), &[Role::Auditor]);
    [
        "CreateUser",
        "SetUserRole",
        "DisableUser",
        "ResetUserPassword",
        "DeleteUser",
        "RotateSigningKey",
    ]
    .iter()
    .fold(policy, |policy, name| {
        policy.allow(&method(name), &[Role::Admin])
    })
}

pub async fn serve(
    config: GatewayConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    metric_catalog::describe();
    let connections = config.process.connections.clone();
    let tls = TlsMaterial::load(&config.tls)?;
    let downstream = downstream::Downstream::connect(&config, &tls)?;
    let notes_in_flight = downstream.notes.clone();
    config.revocation.validate().map_err(ServeError::Config)?;
    let revocations = Arc::new(match config.revocation.redis_url {
        Some(_) => {
            RevocationSource::Shared(Arc::new(RevocationStore::connect(&config.revocation)?))
        }
        None => RevocationSource::through_auth(
            downstream.auth.clone(),
            std::time::Duration::from_millis(config.revocation.not_revoked_cache_ms),
        ),
    });
    let keys = Arc::new(signing_keys::SigningKeyCache::new(
        downstream.auth.clone(),
        config.tokens.issuer.clone(),
        config.tokens.audience.clone(),
    ));
    // Learn new keys while they are published but not yet signing.
    let key_refresher = tokio::spawn(signing_keys::refresh_periodically(
        keys.clone(),
        std::time::Duration::from_secs(config.tokens.key_refresh_seconds),
    ));
    let checks = TokenChecks {
        keys: keys.clone(),
        revocations: revocations.clone(),
        ledger: downstream.ledger.clone(),
    };
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<GatewayServiceServer<grpc::GatewayApi>>()
        .await;
    let api = GatewayServiceServer::new(grpc::GatewayApi {
        ingest: streams::Ingest {
            downstream,
            max_image_bytes: config.max_image_bytes,
            default_model: config.default_model.clone(),
            flights: Arc::default(),
            revocations: revocations.clone(),
            uploads: uploads::PartialUploads::new(config.uploads.clone()),
        },
        revocations,
    })
    // A little over the image limit, so an oversized image gets IMAGE_TOO_LARGE, not a
    // transport error.
    .max_decoding_message_size(config.max_image_bytes + 64 * 1024);
    let load_control =
        load_control::LoadControl::new(config.load_control.clone()).map_err(ServeError::Config)?;
    let reflection = |enabled: bool| -> Result<_, ServeError> {
        if !enabled {
            return Ok((None, None));
        }
        // Only what this server serves is listed; the other services' files stay registered
        // because the gateway's messages use their types.
        let served = || {
            REFLECTED_SERVICES.iter().fold(
                tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(medai_proto::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(
                        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
                    )
                    .register_encoded_file_descriptor_set(
                        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
                    ),
                |builder, service| builder.with_service_name(*service),
            )
        };
        let v1 = served()
            .build_v1()
            .map_err(|error| ServeError::Config(error.to_string()))?;
        let v1alpha = served()
            .build_v1alpha()
            .map_err(|error| ServeError::Config(error.to_string()))?;
        Ok((Some(v1), Some(v1alpha)))
    };
    let (reflection_v1, reflection_v1alpha) = reflection(config.reflection)?;
    let served = mesh_server(&tls, peer_policy(), &connections)?
        .layer(TokenAuthLayer::new(checks, role_policy()))
        .layer(load_control::LoadControlLayer::new(load_control))
        .add_service(health_service)
        .add_service(api)
        .add_optional_service(reflection_v1)
        .add_optional_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(
            incoming(listener, &tls, ClientCertificates::Optional, &connections),
            shutdown,
        )
        .await;
    key_refresher.abort();
    // Answers already given are noted before the process ends (a note cut short here is
    // made later from the ledger, as after a crash).
    let pending = notes_in_flight.open();
    if !notes_in_flight
        .written_before_now(delivery_notes::NOTE_WAIT_FOR_READS)
        .await
    {
        tracing::warn!(pending, "delivery notes still unwritten at shutdown");
    }
    served?;
    Ok(())
}
