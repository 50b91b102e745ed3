use medai_runtime::TlsFiles;
use medai_runtime::process::{ProcessConfig, ServiceConfig};
use serde::{Deserialize, Serialize};

/// Environment prefix: `MEDAI_AUDIT_DATABASE_URL`, `MEDAI_AUDIT_TLS__CA_CERT`, …
pub const ENV_PREFIX: &str = "MEDAI_AUDIT_";

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    pub process: ProcessConfig,
    pub tls: TlsFiles,
    /// `postgres://…` in production, `sqlite://…?mode=rwc` for the embedded default.
    pub database_url: String,
}

impl ServiceConfig for AuditConfig {
    fn process(&self) -> &ProcessConfig {
        &self.process
    }

    fn tls(&self) -> &TlsFiles {
        &self.tls
    }
}
