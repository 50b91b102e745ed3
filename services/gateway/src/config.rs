use medai_runtime::TlsFiles;
use medai_runtime::config::from_str_or_native;
use medai_runtime::process::{ProcessConfig, ServiceConfig};
use serde::{Deserialize, Serialize};

pub const ENV_PREFIX: &str = "MEDAI_GATEWAY_";

#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    pub process: ProcessConfig,
    /// The gateway's own certificate serves external clients and identifies it to the mesh.
    pub tls: TlsFiles,
    pub auth_endpoint: String,
    pub validation_endpoint: String,
    pub inference_endpoint: String,
    pub audit_endpoint: String,
    #[serde(default)]
    pub tokens: TokenTrust,
    /// Where revoked tokens are looked up. With a Redis URL the gateway reads Redis itself;
    /// without one (the embedded mesh) it asks the auth service's own store.
    #[serde(default)]
    pub revocation: medai_revocation::RevocationSettings,
    /// Largest image accepted from a client.
    #[serde(
        default = "default_max_image_bytes",
        deserialize_with = "from_str_or_native"
    )]
    pub max_image_bytes: usize,
    /// Used when a request names no model.
    #[serde(default = "default_model")]
    pub default_model: String,
    /// Upper bound on any downstream call; a caller's shorter grpc-timeout wins.
    #[serde(default = "default_timeout", deserialize_with = "from_str_or_native")]
    pub downstream_timeout_seconds: u64,
    /// Rate limits and load shedding.
    #[serde(default)]
    pub load_control: crate::load_control::LoadControlSettings,
    /// Unfinished resumable uploads held for a resume (count, bytes, idle time).
    #[serde(default)]
    pub uploads: crate::uploads::UploadSettings,
    /// Server reflection, so grpcurl and similar tools can list and call the API.
    #[serde(
        default = "default_reflection",
        deserialize_with = "from_str_or_native"
    )]
    pub reflection: bool,
    /// Name the model's input size to validation, which then returns the checked image at that
    /// size, so only model-sized pixels cross the mesh (issue 14). `false` sends the full
    /// canonical image on to inference, which resizes it: the earlier path, kept to compare
    /// the two side by side.
    #[serde(
        default = "default_model_input_resize",
        deserialize_with = "from_str_or_native"
    )]
    pub model_input_resize: bool,
}

/// Shown with every credential (URL passwords, secrets) redacted.
impl std::fmt::Debug for GatewayConfig {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        medai_runtime::config::fmt_redacted("GatewayConfig", self, formatter)
    }
}

fn default_reflection() -> bool {
    true
}

fn default_model_input_resize() -> bool {
    true
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenTrust {
    #[serde(default = "default_issuer")]
    pub issuer: String,
    #[serde(default = "default_audience")]
    pub audience: String,
    /// How often the published keys are refetched; keep it below auth's publication lead so
    /// a new key is known before it signs.
    #[serde(
        default = "default_key_refresh",
        deserialize_with = "from_str_or_native"
    )]
    pub key_refresh_seconds: u64,
}

fn default_key_refresh() -> u64 {
    10
}

impl Default for TokenTrust {
    fn default() -> Self {
        Self {
            issuer: default_issuer(),
            audience: default_audience(),
            key_refresh_seconds: default_key_refresh(),
        }
    }
}

fn default_issuer() -> String {
    "medai-auth".to_owned()
}

fn default_audience() -> String {
    "medai".to_owned()
}

fn default_max_image_bytes() -> usize {
    50 * 1024 * 1024
}

fn default_model() -> String {
    "brain-mri-tumor".to_owned()
}

fn default_timeout() -> u64 {
    30
}

impl ServiceConfig for GatewayConfig {
    fn process(&self) -> &ProcessConfig {
        &self.process
    }

    fn tls(&self) -> &TlsFiles {
        &self.tls
    }
}
