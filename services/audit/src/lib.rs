//! The audit service: the only owner of the hash-chained, append-only ledger, its signed
//! checkpoints and its proofs.

pub mod anchor;
pub mod appender;
pub mod checkpoint_log;
pub mod checkpoints;
pub mod config;
mod error;
mod grpc;
pub mod metric_catalog;
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
    #[error(
        "the checkpoint key {0} does not exist; with checkpoint_key_mode = \"required\" it must come from the Secret every replica shares"
    )]
    MissingCheckpointKey(String),
    #[error(transparent)]
    CheckpointLog(#[from] checkpoint_log::CheckpointLogError),
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
        PeerPolicy::new()
            .allow(
                "/medai.audit.v1.AuditService/Append",
                &["gateway", "auth", "inference"],
            )
            .allow(
                "/medai.audit.v1.AuditService/AppendBatch",
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

/// Loads the checkpoint key. In `generate` mode a missing key is created and its public half
/// written beside it, for auditors; in `required` mode (a Secret mounted read-only, shared by
/// every replica) the key must exist and nothing is written.
pub fn load_checkpoint_signer(config: &AuditConfig) -> Result<CheckpointSigner, ServeError> {
    use base64::Engine;
    if config.checkpoint_key_mode == config::CheckpointKeyMode::Required {
        if !config.checkpoint_key_file.is_file() {
            return Err(ServeError::MissingCheckpointKey(
                config.checkpoint_key_file.display().to_string(),
            ));
        }
        // The file exists, so this only reads it.
        return Ok(CheckpointSigner::load_or_create(
            &config.checkpoint_key_file,
        )?);
    }
    let signer = CheckpointSigner::load_or_create(&config.checkpoint_key_file)?;
    let public_file = config.checkpoint_key_file.with_extension("pub");
    let public_key = base64::engine::general_purpose::STANDARD.encode(signer.public_key());
    std::fs::write(&public_file, format!("{public_key}\n")).map_err(ServeError::PublicKey)?;
    Ok(signer)
}

/// Opens the checkpoint log: `checkpoint_log_file` when set (the chart: one file per pod on a
/// shared volume, so the newest checkpoint any replica logged there holds the ledger back),
/// else beside the key (`generate` mode). In `required` mode without `checkpoint_log_file` the
/// key is a Secret mounted read-only, where nothing may be written: the service keeps
/// checkpoints in the database only (the auditor's export is the outside copy) and still
/// enforces a log that is already there.
fn open_checkpoint_log(
    config: &AuditConfig,
    public_key: &[u8],
) -> Result<
    (
        Option<checkpoint_log::CheckpointLog>,
        Option<medai_ledger::checkpoint::Checkpoint>,
    ),
    ServeError,
> {
    if let Some(path) = &config.checkpoint_log_file {
        let (log, own_newest) = checkpoint_log::CheckpointLog::open(path, public_key)?;
        let newest = checkpoint_log::newest_signed_in_folder(path, public_key)?
            .into_iter()
            .chain(own_newest)
            .max_by_key(|checkpoint| checkpoint.tree_size);
        tracing::info!(
            path = %path.display(),
            newest_tree_size = newest.as_ref().map(|checkpoint| checkpoint.tree_size),
            "checkpoint log opened"
        );
        return Ok((Some(log), newest));
    }
    let path = checkpoint_log::path_beside_key(&config.checkpoint_key_file);
    if config.checkpoint_key_mode == config::CheckpointKeyMode::Required {
        tracing::warn!(
            "checkpoint key from a read-only Secret: no checkpoint log is written beside it; keep the auditor's exports as the copy outside the database"
        );
        return Ok((None, checkpoint_log::newest_signed(&path, public_key)?));
    }
    let (log, newest) = checkpoint_log::CheckpointLog::open(&path, public_key)?;
    tracing::info!(
        path = %path.display(),
        newest_tree_size = newest.as_ref().map(|checkpoint| checkpoint.tree_size),
        "checkpoint log opened"
    );
    Ok((Some(log), newest))
}

/// Serves the audit API on `listener` until `shutdown` resolves.
pub async fn serve(
    config: AuditConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    metric_catalog::describe();
    let connections = config.process.connections.clone();
    let tls = TlsMaterial::load(&config.tls)?;
    let signer = Arc::new(load_checkpoint_signer(&config)?);
    let connection = match &config.migration_database_url {
        Some(owner_url) if config.process.run_migrations => {
            store::migrate_then_connect(owner_url, &config.database_url).await?
        }
        _ => store::connect(&config.database_url, config.process.run_migrations).await?,
    };
    let (checkpoint_log, newest_logged) = open_checkpoint_log(&config, signer.public_key())?;
    // Appends are refused from the start if the stored chain lost what was signed, including
    // a checkpoint only the log outside the database still holds (a restore from an older
    // backup).
    let chain_anchor = Arc::new(anchor::ChainAnchor::new());
    checkpoints::check_head_at_start(
        &connection,
        &chain_anchor,
        signer.public_key(),
        newest_logged.as_ref(),
    )
    .await
    .map_err(store::StoreError::from)?;
    let appender = appender::LedgerAppender::start(connection.clone(), chain_anchor.clone());
    let mut checkpointer = checkpoints::Checkpointer::new(connection.clone(), signer, chain_anchor);
    if let Some(log) = checkpoint_log {
        checkpointer = checkpointer.with_log(Arc::new(log));
    }
    let checkpointer = Arc::new(checkpointer);
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
    let served = mesh_server(&tls, peer_policy(), &connections)?
        .add_service(health_service)
        .add_service(AuditServiceServer::new(api))
        .serve_with_incoming_shutdown(
            incoming(listener, &tls, ClientCertificates::Required, &connections),
            shutdown,
        )
        .await;
    if let Some(task) = periodic {
        task.abort();
    }
    served?;
    Ok(())
}

#[cfg(test)]
mod checkpoint_key_tests {
    use std::collections::BTreeMap;

    use base64::Engine;

    use super::*;

    fn config(key_file: &std::path::Path, mode: Option<&str>) -> AuditConfig {
        let mut env: BTreeMap<String, String> = [
            ("MEDAI_AUDIT_PROCESS__LISTEN_ADDR", "127.0.0.1:0"),
            ("MEDAI_AUDIT_TLS__CA_CERT", "/ca.crt"),
            ("MEDAI_AUDIT_TLS__CERT", "/tls.crt"),
            ("MEDAI_AUDIT_TLS__KEY", "/tls.key"),
            ("MEDAI_AUDIT_DATABASE_URL", "sqlite::memory:"),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect();
        env.insert(
            "MEDAI_AUDIT_CHECKPOINT_KEY_FILE".to_owned(),
            key_file.display().to_string(),
        );
        if let Some(mode) = mode {
            env.insert(
                "MEDAI_AUDIT_CHECKPOINT_KEY_MODE".to_owned(),
                mode.to_owned(),
            );
        }
        medai_runtime::config::load_config(config::ENV_PREFIX, None, &env).expect("config")
    }

    fn entries(directory: &std::path::Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(directory)
            .expect("list")
            .map(|entry| {
                entry
                    .expect("entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        names.sort();
        names
    }

    #[test]
    fn required_mode_refuses_to_start_without_the_shared_key() {
        let directory = tempfile::tempdir().expect("tempdir");
        let key_file = directory.path().join("checkpoint.key");
        let error = load_checkpoint_signer(&config(&key_file, Some("required")))
            .err()
            .expect("a missing key must be refused, not generated");
        assert!(
            matches!(error, ServeError::MissingCheckpointKey(_)),
            "{error}"
        );
        assert!(
            entries(directory.path()).is_empty(),
            "nothing may be written"
        );
    }

    #[test]
    fn required_mode_reads_the_mounted_key_and_writes_nothing_beside_it() {
        // The Secret: a key made elsewhere, in a folder this process may not write to.
        let source = tempfile::tempdir().expect("tempdir");
        let made = CheckpointSigner::load_or_create(&source.path().join("made.key")).expect("key");
        let mounted = tempfile::tempdir().expect("tempdir");
        let key_file = mounted.path().join("checkpoint.key");
        std::fs::copy(source.path().join("made.key"), &key_file).expect("copy");
        let read_only = |mode| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(mounted.path(), std::fs::Permissions::from_mode(mode))
                .expect("chmod");
        };
        read_only(0o555);
        let replicas: Vec<CheckpointSigner> = (0..2)
            .map(|_| load_checkpoint_signer(&config(&key_file, Some("required"))).expect("load"))
            .collect();
        read_only(0o755);
        assert_eq!(entries(mounted.path()), vec!["checkpoint.key".to_owned()]);
        for replica in &replicas {
            assert_eq!(replica.public_key(), made.public_key());
        }
    }

    #[test]
    fn generate_mode_is_the_default_and_keeps_the_embedded_behaviour() {
        let directory = tempfile::tempdir().expect("tempdir");
        let key_file = directory.path().join("checkpoint.key");
        let loaded = config(&key_file, None);
        assert_eq!(
            loaded.checkpoint_key_mode,
            config::CheckpointKeyMode::Generate
        );
        let signer = load_checkpoint_signer(&loaded).expect("generated");
        let public = std::fs::read_to_string(directory.path().join("checkpoint.pub"))
            .expect("public key beside the key");
        assert_eq!(
            public.trim(),
            base64::engine::general_purpose::STANDARD.encode(signer.public_key())
        );
    }
}
