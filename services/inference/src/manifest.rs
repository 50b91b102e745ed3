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
    pub status: ModelStatus,
    /// Shown wherever a result of this model is shown.
    pub intended_use: String,
    pub labels: Vec<String>,
    pub input: TensorSpec,
    pub output: TensorSpec,
    pub preprocessing: Preprocessing,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ModelStatus {
    Staged,
    Active,
    Retired,
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
        if self.sha256.len() != 64 || !self.sha256.bytes().all(|byte| byte.is_ascii_hexdigit()) {
            return Err("sha256 must be 64 hex digits".to_owned());
        }
        Ok(())
    }
}
