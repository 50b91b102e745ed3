use medai_runtime::TlsFiles;
use medai_runtime::config::from_str_or_native;
use medai_runtime::process::{ProcessConfig, ServiceConfig};
use serde::{Deserialize, Serialize};

pub const ENV_PREFIX: &str = "MEDAI_VALIDATION_";

#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationConfig {
    pub process: ProcessConfig,
    pub tls: TlsFiles,
    #[serde(default)]
    pub limits: medai_imaging::ImageLimits,
    #[serde(default)]
    pub quality: crate::quality::QualityPolicy,
    /// What each model does with a multi-frame DICOM object (default: refuse).
    #[serde(default)]
    pub frames: crate::frame_policy::FramePolicies,
    /// The key of the keyed hash that turns a DICOM patient identifier into the pseudonymous
    /// `patient_key` results are grouped by. Without it no patient key is produced.
    #[serde(default)]
    pub patient_key_secret: Option<medai_runtime::config::Secret>,
    /// Decodes running at once; more wait for a slot. Bounds memory to about this many times
    /// `limits.max_decoded_bytes`.
    #[serde(
        default = "default_concurrent_decodes",
        deserialize_with = "from_str_or_native"
    )]
    pub max_concurrent_decodes: usize,
    /// Memory all decodes running at once may hold together, in bytes: each takes what its
    /// header declares (pixel data plus one frame's working copies) before it starts, and waits
    /// while the rest is taken; one that needs more than the whole budget is refused with
    /// IMAGE_DECODED_SIZE_TOO_LARGE.
    #[serde(
        default = "default_decode_memory_budget_bytes",
        deserialize_with = "from_str_or_native"
    )]
    pub decode_memory_budget_bytes: u64,
}

/// Half of the Helm chart's 2 GiB memory limit; the rest is for requests in flight.
pub fn default_decode_memory_budget_bytes() -> u64 {
    1 << 30
}

/// Shown with every credential (URL passwords, secrets) redacted.
impl std::fmt::Debug for ValidationConfig {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        medai_runtime::config::fmt_redacted("ValidationConfig", self, formatter)
    }
}

/// One decode per core: decoding is CPU-bound, so more would not finish sooner.
pub fn default_concurrent_decodes() -> usize {
    std::thread::available_parallelism().map_or(2, std::num::NonZero::get)
}

impl ServiceConfig for ValidationConfig {
    fn process(&self) -> &ProcessConfig {
        &self.process
    }

    fn tls(&self) -> &TlsFiles {
        &self.tls
    }
}
