use medai_runtime::TlsFiles;
use medai_runtime::config::{Secret, from_str_or_native};
use medai_runtime::process::{ProcessConfig, ServiceConfig};
use serde::{Deserialize, Serialize};

pub const ENV_PREFIX: &str = "MEDAI_AUTH_";

#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub process: ProcessConfig,
    pub tls: TlsFiles,
    /// `postgres://…` in production, `sqlite://…?mode=rwc` for the embedded default.
    pub database_url: String,
    /// Connections auth's pool holds at most. No request of auth holds more than one at a time
    /// (a transaction does all its reads through itself), so any size from 1 serves; more only
    /// lets more requests reach the database at once.
    #[serde(
        default = "default_database_max_connections",
        deserialize_with = "from_str_or_native"
    )]
    pub database_max_connections: u32,
    /// The audit service, for example `https://127.0.0.1:50055`.
    pub audit_endpoint: String,
    #[serde(default)]
    pub tokens: TokenSettings,
    #[serde(default)]
    pub lockout: LockoutSettings,
    #[serde(default)]
    pub revocation: medai_revocation::RevocationSettings,
    #[serde(default)]
    pub passwords: PasswordSettings,
    /// Created on first start if no user of that name exists; its password is hashed with
    /// argon2id and never logged.
    #[serde(default)]
    pub bootstrap_admin: Option<BootstrapAdmin>,
}

/// Shown with every credential (URL passwords, secrets) redacted.
impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        medai_runtime::config::fmt_redacted("AuthConfig", self, formatter)
    }
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
    /// Refresh-token lifetime (one shift by default).
    #[serde(
        default = "default_refresh_ttl",
        deserialize_with = "from_str_or_native"
    )]
    pub refresh_token_ttl_seconds: u64,
    /// How long a new signing key is published before it signs, so verifiers that cache keys
    /// learn it first.
    #[serde(
        default = "default_publication_lead",
        deserialize_with = "from_str_or_native"
    )]
    pub key_publication_lead_seconds: u64,
    /// Lifetime of a re-authentication signing ticket.
    #[serde(
        default = "default_ticket_ttl",
        deserialize_with = "from_str_or_native"
    )]
    pub signing_ticket_ttl_seconds: u64,
}

impl Default for TokenSettings {
    fn default() -> Self {
        Self {
            issuer: default_issuer(),
            audience: default_audience(),
            access_token_ttl_seconds: default_ttl(),
            refresh_token_ttl_seconds: default_refresh_ttl(),
            key_publication_lead_seconds: default_publication_lead(),
            signing_ticket_ttl_seconds: default_ticket_ttl(),
        }
    }
}

fn default_refresh_ttl() -> u64 {
    8 * 3600
}

fn default_publication_lead() -> u64 {
    30
}

fn default_ticket_ttl() -> u64 {
    300
}

pub fn default_database_max_connections() -> u32 {
    medai_storage::DEFAULT_MAX_CONNECTIONS
}

/// Lockout after repeated failed logins.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LockoutSettings {
    #[serde(
        default = "default_max_failures",
        deserialize_with = "from_str_or_native"
    )]
    pub max_failed_attempts: u32,
    #[serde(
        default = "default_lock_minutes",
        deserialize_with = "from_str_or_native"
    )]
    pub lock_minutes: u64,
}

impl Default for LockoutSettings {
    fn default() -> Self {
        Self {
            max_failed_attempts: default_max_failures(),
            lock_minutes: default_lock_minutes(),
        }
    }
}

fn default_max_failures() -> u32 {
    5
}

fn default_lock_minutes() -> u64 {
    15
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

/// Bounds on argon2id work (19 MiB and most of a core per hash): logins past them wait, and
/// past the queue they are refused with `AUTH_BUSY` instead of exhausting memory.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PasswordSettings {
    /// Hashes run at once; default the CPU cores available (hashing is CPU-bound, more gives
    /// no throughput, only memory), at most 8: the chart sets no CPU limit on auth, so the
    /// cores are the node's, while 8 × 19 MiB stays well inside auth's 512 MiB memory limit.
    #[serde(
        default = "default_max_concurrent_hashes",
        deserialize_with = "from_str_or_native"
    )]
    pub max_concurrent_hashes: usize,
    /// Logins waiting for a hash; any further one is refused at once.
    #[serde(
        default = "default_max_waiting_hashes",
        deserialize_with = "from_str_or_native"
    )]
    pub max_waiting_hashes: usize,
}

impl Default for PasswordSettings {
    fn default() -> Self {
        Self {
            max_concurrent_hashes: default_max_concurrent_hashes(),
            max_waiting_hashes: default_max_waiting_hashes(),
        }
    }
}

fn default_max_concurrent_hashes() -> usize {
    std::thread::available_parallelism().map_or(1, |cores| cores.get().min(8))
}

fn default_max_waiting_hashes() -> usize {
    64
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
        if self.lockout.max_failed_attempts == 0 || self.lockout.lock_minutes == 0 {
            return Err(
                "lockout.max_failed_attempts and lockout.lock_minutes must be positive".to_owned(),
            );
        }
        if self.tokens.signing_ticket_ttl_seconds == 0
            || self.tokens.signing_ticket_ttl_seconds > 900
        {
            return Err("tokens.signing_ticket_ttl_seconds must be 1–900".to_owned());
        }
        if self.database_max_connections == 0 {
            return Err("database_max_connections must be positive".to_owned());
        }
        if self.passwords.max_concurrent_hashes == 0 {
            return Err("passwords.max_concurrent_hashes must be positive".to_owned());
        }
        self.revocation.validate()?;
        if let Some(admin) = &self.bootstrap_admin {
            if admin.username.trim().is_empty() {
                return Err("bootstrap_admin.username must not be empty".to_owned());
            }
            crate::passwords::check_strength(admin.password.expose())
                .map_err(|reason| format!("bootstrap_admin.password {reason}"))?;
        }
        Ok(())
    }
}
