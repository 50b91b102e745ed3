use medai_runtime::TlsFiles;
use medai_runtime::process::{ProcessConfig, ServiceConfig};
use serde::{Deserialize, Serialize};

/// Environment prefix: `MEDAI_AUDIT_DATABASE_URL`, `MEDAI_AUDIT_TLS__CA_CERT`, …
pub const ENV_PREFIX: &str = "MEDAI_AUDIT_";

#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    pub process: ProcessConfig,
    pub tls: TlsFiles,
    /// `postgres://…` in production, `sqlite://…?mode=rwc` for the embedded default.
    pub database_url: String,
    /// The schema owner's URL for migrations, when `database_url` names a role that may only
    /// insert and select (a member of `medai_ledger_writer`); absent, `database_url` migrates.
    #[serde(default)]
    pub migration_database_url: Option<String>,
    /// The Ed25519 key that signs checkpoints (base64 PKCS#8). Keep it outside the database.
    pub checkpoint_key_file: std::path::PathBuf,
    /// What happens when `checkpoint_key_file` does not exist (see [`CheckpointKeyMode`]).
    #[serde(default)]
    pub checkpoint_key_mode: CheckpointKeyMode,
    /// The checkpoint log (every signed checkpoint, kept outside the database; see
    /// `checkpoint_log`). Absent: beside the key in `generate` mode, none in `required` mode,
    /// where the key's folder is a read-only Secret. The chart names one file per pod on a
    /// shared volume; the newest checkpoint in any `*.checkpoints.jsonl` of that folder holds
    /// the ledger back at start.
    #[serde(default)]
    pub checkpoint_log_file: Option<std::path::PathBuf>,
    /// A checkpoint is signed this often when entries were added; 0 signs only on demand.
    #[serde(
        default = "default_checkpoint_interval",
        deserialize_with = "medai_runtime::config::from_str_or_native"
    )]
    pub checkpoint_interval_seconds: u64,
}

/// Shown with every credential (URL passwords, secrets) redacted.
impl std::fmt::Debug for AuditConfig {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        medai_runtime::config::fmt_redacted("AuditConfig", self, formatter)
    }
}

/// Where the checkpoint key comes from.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointKeyMode {
    /// The embedded default (`medai up`, one replica): a missing key file is created (mode
    /// 0600) and its public key written beside it as `<file>.pub` for auditors.
    #[default]
    Generate,
    /// Production (the Helm chart): the key must already exist — one key from a Secret,
    /// mounted read-only and shared by every replica. Nothing is generated or written; the
    /// public key is derived in memory (and served by `GetCheckpointKey`). Without the file
    /// the service refuses to start, rather than sign with a key of its own that the other
    /// replicas' auditors would not know.
    Required,
}

fn default_checkpoint_interval() -> u64 {
    60
}

impl ServiceConfig for AuditConfig {
    fn process(&self) -> &ProcessConfig {
        &self.process
    }

    fn tls(&self) -> &TlsFiles {
        &self.tls
    }
}
