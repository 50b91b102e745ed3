use medai_runtime::TlsFiles;
use medai_runtime::config::{Secret, from_str_or_native};
use medai_runtime::process::{ProcessConfig, ServiceConfig};
use serde::{Deserialize, Serialize};

pub const ENV_PREFIX: &str = "MEDAI_AUTH_";

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub process: ProcessConfig,
    pub tls: TlsFiles,
    /// `postgres://…` in production, `sqlite://…?mode=rwc` for the embedded default.
    pub database_url: String,
    /// The audit service, for example `https://127.0.0.1:50055`.
    pub audit_endpoint: String,
    #[serde(default)]
    pub tokens: TokenSettings,
    /// Created on first start if no user of that name exists; its password is hashed with
    /// argon2id and never logged.
    #[serde(default)]
    pub bootstrap_admin: Option<BootstrapAdmin>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSettings {
    #[serde(default = "default_issuer")]
    pub issuer: String,
    #[serde(default = "default_audience")]
    pub audience: String,
    /// Access-token lifetime; 300–900 seconds.
    #[serde(default = "default_ttl", deserialize_with = "from_str_or_native")]
    pub access_token_ttl_seconds: u64,
}

impl Default for TokenSettings {
    fn default() -> Self {
        Self {
            issuer: default_issuer(),
            audience: default_audience(),
            access_token_ttl_seconds: default_ttl(),
        }
    }
}

pub fn default_issuer() -> String {
    "medai-auth".to_owned()
}

pub fn default_audience() -> String {
    "medai".to_owned()
}

fn default_ttl() -> u64 {
    600
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BootstrapAdmin {
    pub username: String,
    pub password: Secret,
}

impl ServiceConfig for AuthConfig {
    fn process(&self) -> &ProcessConfig {
        &self.process
    }

    fn tls(&self) -> &TlsFiles {
        &self.tls
    }
}

impl AuthConfig {
    /// Checks what types cannot: called at start so a bad value stops the service with a
    /// clear message instead of misbehaving later.
    pub fn validate(&self) -> Result<(), String> {
        let ttl = self.tokens.access_token_ttl_seconds;
        if !(300..=900).contains(&ttl) {
            return Err(format!(
                "tokens.access_token_ttl_seconds must be 300–900, got {ttl}"
            ));
        }
        if let Some(admin) = &self.bootstrap_admin {
            if admin.username.trim().is_empty() {
                return Err("bootstrap_admin.username must not be empty".to_owned());
            }
            if admin.password.expose().chars().count() < 12 {
                return Err("bootstrap_admin.password must have at least 12 characters".to_owned());
            }
        }
        Ok(())
    }
}
