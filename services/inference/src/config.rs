use std::path::PathBuf;

use medai_runtime::TlsFiles;
use medai_runtime::config::from_str_or_native;
use medai_runtime::process::{ProcessConfig, ServiceConfig};
use serde::{Deserialize, Serialize};

pub const ENV_PREFIX: &str = "MEDAI_INFERENCE_";

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InferenceConfig {
    pub process: ProcessConfig,
    pub tls: TlsFiles,
    /// A folder per model, a sub-folder per version, each holding `manifest.toml`.
    pub model_repository: PathBuf,
    /// The ONNX Runtime shared library (`libonnxruntime.so.1.31.1`), loaded at start.
    pub onnxruntime_library: PathBuf,
    #[serde(default)]
    pub runtime: RuntimeSettings,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RuntimeSettings {
    /// Threads one inference may use; 0 lets ONNX Runtime decide.
    #[serde(default, deserialize_with = "from_str_or_native")]
    pub intra_op_threads: usize,
}

impl ServiceConfig for InferenceConfig {
    fn process(&self) -> &ProcessConfig {
        &self.process
    }

    fn tls(&self) -> &TlsFiles {
        &self.tls
    }
}
