//! The manifest that describes one model version: what file, which hash, which tensors, how to
//! prepare an image for it, what its outputs mean and what it may be used for.

use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelManifest {
    pub name: String,
    pub version: String,
    /// The model file, relative to the manifest's folder.
    pub file: String,
    /// Hex SHA-256 of the model file; checked on every load.
    pub sha256: String,
    pub platform: String,
    /// The version's lifecycle status when its model is first seen; it seeds the lifecycle
    /// store once and is never read again (nor written: the repository is immutable).
    pub status: ModelStatus,
    /// Shown wherever a result of this model is shown.
    pub intended_use: String,
    pub labels: Vec<String>,
    /// The top probability must reach this for a result to count as a decision.
    #[serde(default = "default_threshold")]
    pub decision_threshold: f32,
    pub input: TensorSpec,
    pub output: TensorSpec,
    pub preprocessing: Preprocessing,
    #[serde(default)]
    pub batching: Batching,
    #[serde(default)]
    pub execution: Execution,
    /// Intended use in machine terms and figures from the validation report (issue 18).
    #[serde(default)]
    pub decision_support: crate::decision_support::DecisionSupport,
    /// True when the version may only be used for research: it may then be activated without
    /// a validation report (issue 18).
    #[serde(default)]
    pub research_use_only: bool,
    /// The version's validation report (dataset, metrics, intended use, reference
    /// distributions), checked against its SHA-256 before activation or a canary.
    #[serde(default)]
    pub validation_report: Option<ValidationReportFile>,
    /// The report itself, read and checked when the version is loaded to be served.
    #[serde(skip)]
    pub validation: Option<crate::rollout::CheckedReport>,
}

/// Where a version's validation report is, and its hash.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ValidationReportFile {
    /// Relative to the manifest's folder.
    pub file: String,
    /// Hex SHA-256 of the file.
    pub sha256: String,
}

/// How ONNX Runtime runs this model.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Execution {
    /// Threads one run of this model may use. Absent: one for a small model (under 1 MiB),
    /// else the node's cores shared among the version's sessions. The service's
    /// `runtime.intra_op_threads`, when set, overrides it.
    #[serde(default)]
    pub intra_op_threads: Option<usize>,
    /// ONNX Runtime's CPU memory arena for this model. Absent or false: off (issue 14), so a
    /// small model's process holds little more than its weights, and each run's blocks go back
    /// to the system when it ends. True keeps them for the next run: the process then holds
    /// what its largest batch used, and no run faults its blocks in afresh. The brain-MRI model
    /// needs it (its server time 90.2 → 82.2–84.2 ms per prediction; idle RSS unchanged, 61 MiB
    /// more after single predictions, 181 MiB more after a batch of four).
    #[serde(default)]
    pub cpu_memory_arena: Option<bool>,
}

fn default_threshold() -> f32 {
    0.5
}

/// How requests for this model are gathered into batches (Triton's dynamic batching).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Batching {
    /// The most rows one run may hold; 1 turns batching off for this model.
    #[serde(default = "default_max_batch_size")]
    pub max_batch_size: usize,
    /// How long the first request of a batch may wait for others.
    #[serde(default = "default_queue_delay")]
    pub max_queue_delay_microseconds: u64,
}

fn default_max_batch_size() -> usize {
    8
}

fn default_queue_delay() -> u64 {
    1000
}

impl Default for Batching {
    fn default() -> Self {
        Self {
            max_batch_size: default_max_batch_size(),
            max_queue_delay_microseconds: default_queue_delay(),
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ModelStatus {
    Staged,
    Active,
    Retired,
}

impl ModelStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Staged => "STAGED",
            Self::Active => "ACTIVE",
            Self::Retired => "RETIRED",
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    pub name: String,
    /// KServe v2 datatype name; only FP32 is supported.
    pub datatype: String,
    /// -1 marks the batch dimension.
    pub shape: Vec<i64>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Preprocessing {
    pub width: u32,
    pub height: u32,
    /// Only NHWC for now.
    pub layout: String,
    /// RGB or GREY.
    pub color: String,
    /// Multiplies each 8-bit sample (for example 1/255).
    pub scale: f32,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("manifest {path} is invalid: {reason}")]
    Invalid { path: String, reason: String },
}

impl ModelManifest {
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let display = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|error| ManifestError::Read {
            path: display.clone(),
            reason: error.to_string(),
        })?;
        let manifest: Self = toml::from_str(&text).map_err(|error| ManifestError::Invalid {
            path: display.clone(),
            reason: error.message().to_owned(),
        })?;
        manifest.check().map_err(|reason| ManifestError::Invalid {
            path: display,
            reason,
        })?;
        Ok(manifest)
    }

    fn check(&self) -> Result<(), String> {
        if self.input.datatype != "FP32" || self.output.datatype != "FP32" {
            return Err("only FP32 inputs and outputs are supported".to_owned());
        }
        if self.preprocessing.layout != "NHWC" {
            return Err("only NHWC layout is supported".to_owned());
        }
        let channels = match self.preprocessing.color.as_str() {
            "RGB" => 3,
            "GREY" => 1,
            other => return Err(format!("unknown colour mode {other}")),
        };
        let expected = [
            -1,
            i64::from(self.preprocessing.height),
            i64::from(self.preprocessing.width),
            channels,
        ];
        if self.input.shape != expected {
            return Err(format!(
                "input shape {:?} does not match preprocessing {expected:?}",
                self.input.shape
            ));
        }
        if self.output.shape != [-1, self.labels.len() as i64] {
            return Err(format!(
                "output shape {:?} does not match {} labels",
                self.output.shape,
                self.labels.len()
            ));
        }
        if !(0.0..=1.0).contains(&self.decision_threshold) {
            return Err("decision_threshold must lie in 0..=1".to_owned());
        }
        if self.batching.max_batch_size == 0 || self.batching.max_batch_size > 1024 {
            return Err("batching.max_batch_size must lie in 1..=1024".to_owned());
        }
        if self
            .execution
            .intra_op_threads
            .is_some_and(|threads| threads == 0 || threads > 256)
        {
            return Err("execution.intra_op_threads must lie in 1..=256".to_owned());
        }
        self.decision_support.check()?;
        if let Some(report) = &self.validation_report {
            let plain = !report.file.is_empty()
                && !report.file.contains('/')
                && !report.file.starts_with('.');
            if !plain {
                return Err(
                    "validation_report.file must be a file name in the version folder".to_owned(),
                );
            }
            if report.sha256.len() != 64
                || !report.sha256.bytes().all(|byte| byte.is_ascii_hexdigit())
            {
                return Err("validation_report.sha256 must be 64 hex digits".to_owned());
            }
        }
        if self.sha256.len() != 64 || !self.sha256.bytes().all(|byte| byte.is_ascii_hexdigit()) {
            return Err("sha256 must be 64 hex digits".to_owned());
        }
        Ok(())
    }
}
