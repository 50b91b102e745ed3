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
    pub limits: ImageLimits,
    #[serde(default)]
    pub quality: crate::quality::QualityPolicy,
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

/// What an image must satisfy before any model sees it.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ImageLimits {
    #[serde(default = "default_max_bytes", deserialize_with = "from_str_or_native")]
    pub max_bytes: usize,
    #[serde(default = "default_min_side", deserialize_with = "from_str_or_native")]
    pub min_side: u32,
    #[serde(default = "default_max_side", deserialize_with = "from_str_or_native")]
    pub max_side: u32,
    /// The most frames a DICOM object may declare.
    #[serde(
        default = "default_max_frames",
        deserialize_with = "from_str_or_native"
    )]
    pub max_frames: u32,
    /// The most bytes its pixel data may decode to, as rows × columns × samples × bits ×
    /// frames declare it; checked before anything is decompressed, so a small file cannot
    /// expand into gigabytes.
    #[serde(
        default = "default_max_decoded_bytes",
        deserialize_with = "from_str_or_native"
    )]
    pub max_decoded_bytes: u64,
}

fn default_max_frames() -> u32 {
    1000
}

fn default_max_decoded_bytes() -> u64 {
    1 << 30
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self {
            max_bytes: default_max_bytes(),
            min_side: default_min_side(),
            max_side: default_max_side(),
            max_frames: default_max_frames(),
            max_decoded_bytes: default_max_decoded_bytes(),
        }
    }
}

impl ImageLimits {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_bytes == 0 {
            return Err("limits.max_bytes must be positive".to_owned());
        }
        if self.min_side == 0 || self.min_side > self.max_side {
            return Err(format!(
                "limits.min_side ({}) must be positive and at most limits.max_side ({})",
                self.min_side, self.max_side
            ));
        }
        Ok(())
    }

    /// The largest canonical pixel buffer these limits allow (RGB, 16-bit).
    pub fn max_canonical_bytes(&self) -> usize {
        let side = self.max_side as usize;
        side * side * 3 * 2
    }
}

fn default_max_bytes() -> usize {
    50 * 1024 * 1024
}

fn default_min_side() -> u32 {
    64
}

fn default_max_side() -> u32 {
    4096
}
