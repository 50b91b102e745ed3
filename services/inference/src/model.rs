//! A model version loaded into ONNX Runtime after its file's SHA-256 matched its manifest.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ndarray::Array4;
use ort::environment::Environment;
use ort::session::Session;
use ort::value::Tensor;
use sha2::{Digest, Sha256};

use crate::config::RuntimeSettings;
use crate::manifest::ModelManifest;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot load ONNX Runtime from {path}: {reason}")]
    Runtime { path: String, reason: String },
    #[error("cannot read model file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error(
        "model {name} version {version}: file hash {actual} does not match the manifest's {expected}"
    )]
    IntegrityMismatch {
        name: String,
        version: String,
        expected: String,
        actual: String,
    },
    #[error("ONNX Runtime refused model {name} version {version}: {reason}")]
    Session {
        name: String,
        version: String,
        reason: String,
    },
    #[error("inference failed: {0}")]
    Run(String),
    #[error("the model returned {actual} scores for {expected} labels")]
    OutputShape { expected: usize, actual: usize },
}

/// ONNX Runtime allows one environment per process; every model shares it.
pub fn onnx_environment(library: &Path) -> Result<Environment, ModelError> {
    static ENVIRONMENT: OnceLock<Result<Environment, String>> = OnceLock::new();
    ENVIRONMENT
        .get_or_init(|| {
            ort::init_from(library)
                .map_err(|error| error.to_string())?
                .with_name("medai-inference")
                .build()
                .map_err(|error| error.to_string())
        })
        .clone()
        .map_err(|reason| ModelError::Runtime {
            path: library.display().to_string(),
            reason,
        })
}

/// Streams a file through SHA-256.
pub fn file_sha256(path: &Path) -> Result<String, ModelError> {
    let read_error = |error: std::io::Error| ModelError::Read {
        path: path.display().to_string(),
        reason: error.to_string(),
    };
    let mut file = std::fs::File::open(path).map_err(read_error)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = file.read(&mut buffer).map_err(read_error)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hex::encode(hasher.finalize()))
}

pub struct LoadedModel {
    pub manifest: ModelManifest,
    pub file: PathBuf,
    // ort sessions run with `&mut self`; one run at a time per session.
    session: Mutex<Session>,
}

impl LoadedModel {
    /// Verifies the file's hash against the manifest, then builds the session.
    pub fn load(
        environment: &Environment,
        manifest: ModelManifest,
        folder: &Path,
        settings: &RuntimeSettings,
    ) -> Result<Self, ModelError> {
        let file = folder.join(&manifest.file);
        let actual = file_sha256(&file)?;
        if !actual.eq_ignore_ascii_case(&manifest.sha256) {
            return Err(ModelError::IntegrityMismatch {
                name: manifest.name.clone(),
                version: manifest.version.clone(),
                expected: manifest.sha256.clone(),
                actual,
            });
        }
        let session_error = |reason: String| ModelError::Session {
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            reason,
        };
        let mut builder =
            Session::builder(environment).map_err(|error| session_error(error.to_string()))?;
        if settings.intra_op_threads > 0 {
            builder = builder
                .with_intra_threads(settings.intra_op_threads)
                .map_err(|error| session_error(error.to_string()))?;
        }
        let session = builder
            .commit_from_file(&file)
            .map_err(|error| session_error(error.to_string()))?;
        Ok(Self {
            manifest,
            file,
            session: Mutex::new(session),
        })
    }

    /// Runs one prepared input; returns one probability per label.
    pub fn run(&self, input: Array4<f32>) -> Result<Vec<f32>, ModelError> {
        let tensor =
            Tensor::from_array(input).map_err(|error| ModelError::Run(error.to_string()))?;
        let mut session = self
            .session
            .lock()
            .map_err(|_| ModelError::Run("session lock poisoned".to_owned()))?;
        let outputs = session
            .run(ort::inputs![self.manifest.input.name.as_str() => tensor])
            .map_err(|error| ModelError::Run(error.to_string()))?;
        let scores = outputs[self.manifest.output.name.as_str()]
            .try_extract_array::<f32>()
            .map_err(|error| ModelError::Run(error.to_string()))?;
        let scores: Vec<f32> = scores.iter().copied().collect();
        if scores.len() != self.manifest.labels.len() {
            return Err(ModelError::OutputShape {
                expected: self.manifest.labels.len(),
                actual: scores.len(),
            });
        }
        Ok(scores)
    }
}
