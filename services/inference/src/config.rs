use std::path::PathBuf;

use medai_runtime::TlsFiles;
use medai_runtime::config::from_str_or_native;
use medai_runtime::process::{ProcessConfig, ServiceConfig};
use serde::{Deserialize, Serialize};

pub const ENV_PREFIX: &str = "MEDAI_INFERENCE_";

#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InferenceConfig {
    pub process: ProcessConfig,
    pub tls: TlsFiles,
    /// A folder per model, a sub-folder per version, each holding `manifest.toml` and the model
    /// file. Never written: a read-only mount shared by every replica is enough. Lifecycle state
    /// lives in the database (the manifests' `status` lines only seed it, the first time a model
    /// is seen).
    pub model_repository: PathBuf,
    /// The ONNX Runtime shared library (`libonnxruntime.so.1.31.1`), loaded at start.
    pub onnxruntime_library: PathBuf,
    /// The results and lifecycle store: `postgres://…` (shared by every replica), or
    /// `sqlite://…?mode=rwc` for the embedded default.
    pub database_url: String,
    /// The audit service, which records every change to what is served.
    pub audit_endpoint: String,
    #[serde(default)]
    pub runtime: RuntimeSettings,
    #[serde(default)]
    pub lifecycle: LifecycleSettings,
}

/// How a replica follows lifecycle changes made through other replicas.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LifecycleSettings {
    /// How often the lifecycle store's revisions are read (one small query); a change made
    /// through another replica is served here within about this long (plus loading the model).
    #[serde(
        default = "default_poll_interval",
        deserialize_with = "from_str_or_native"
    )]
    pub poll_interval_milliseconds: u64,
}

fn default_poll_interval() -> u64 {
    1000
}

impl Default for LifecycleSettings {
    fn default() -> Self {
        Self {
            poll_interval_milliseconds: default_poll_interval(),
        }
    }
}

/// Shown with every credential (URL passwords, secrets) redacted.
impl std::fmt::Debug for InferenceConfig {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        medai_runtime::config::fmt_redacted("InferenceConfig", self, formatter)
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RuntimeSettings {
    /// Threads one run may use, for every model; 0 lets each model's manifest decide
    /// (`execution.intra_op_threads`; absent: 1 for a small model, else the node's cores shared
    /// among the sessions). ONNX Runtime's threads never spin-wait.
    #[serde(default, deserialize_with = "from_str_or_native")]
    pub intra_op_threads: usize,
    /// Threads across independent graph branches; 0 lets ONNX Runtime decide.
    #[serde(default, deserialize_with = "from_str_or_native")]
    pub inter_op_threads: usize,
    /// `disable`, `basic`, `extended` or `all`.
    #[serde(default = "default_optimization")]
    pub graph_optimization_level: String,
    /// Sessions (and batch workers) per served version.
    #[serde(default = "default_sessions", deserialize_with = "from_str_or_native")]
    pub sessions_per_model: usize,
    /// Off runs every request alone, whatever the manifests allow.
    #[serde(default = "default_true", deserialize_with = "from_str_or_native")]
    pub dynamic_batching: bool,
    /// Requests waiting per served version; one more is refused at once (RESOURCE_EXHAUSTED).
    #[serde(
        default = "default_queue_capacity",
        deserialize_with = "from_str_or_native"
    )]
    pub queue_capacity: usize,
    /// Explanations (occlusion maps): the most grid cells one may ask for, how many run at
    /// once, how many more may wait (beyond: EXPLANATIONS_BUSY), and the longest one may take.
    #[serde(
        default = "default_explanation_max_cells",
        deserialize_with = "from_str_or_native"
    )]
    pub explanation_max_cells: u32,
    #[serde(default = "default_one", deserialize_with = "from_str_or_native")]
    pub explanation_slots: usize,
    #[serde(default = "default_one", deserialize_with = "from_str_or_native")]
    pub explanation_waiting: usize,
    #[serde(
        default = "default_explanation_seconds",
        deserialize_with = "from_str_or_native"
    )]
    pub explanation_time_limit_seconds: u64,
    /// Request copies waiting for the shadow version (issue 18); beyond this a copy is
    /// dropped and counted (`medai_model_shadow_dropped_total`), never the request.
    #[serde(
        default = "default_shadow_queue_capacity",
        deserialize_with = "from_str_or_native"
    )]
    pub shadow_queue_capacity: usize,
}

fn default_shadow_queue_capacity() -> usize {
    16
}

fn default_explanation_max_cells() -> u32 {
    256
}

fn default_one() -> usize {
    1
}

fn default_explanation_seconds() -> u64 {
    120
}

fn default_optimization() -> String {
    "all".to_owned()
}

fn default_sessions() -> usize {
    1
}

fn default_true() -> bool {
    true
}

fn default_queue_capacity() -> usize {
    256
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        Self {
            intra_op_threads: 0,
            inter_op_threads: 0,
            graph_optimization_level: default_optimization(),
            sessions_per_model: default_sessions(),
            dynamic_batching: true,
            queue_capacity: default_queue_capacity(),
            explanation_max_cells: default_explanation_max_cells(),
            explanation_slots: default_one(),
            explanation_waiting: default_one(),
            explanation_time_limit_seconds: default_explanation_seconds(),
            shadow_queue_capacity: default_shadow_queue_capacity(),
        }
    }
}

impl ServiceConfig for InferenceConfig {
    fn process(&self) -> &ProcessConfig {
        &self.process
    }

    fn tls(&self) -> &TlsFiles {
        &self.tls
    }
}
