//! Model files and ONNX Runtime sessions: a file is opened only after its SHA-256 matched its
//! manifest, and a session runs a whole batch of rows at once.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ndarray::Array4;
use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
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
    #[error("unknown graph optimisation level {0}; use disable, basic, extended or all")]
    OptimizationLevel(String),
    #[error("inference failed: {0}")]
    Run(String),
    #[error("the model returned {actual} scores for {expected}")]
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

/// The model file of `manifest` in `folder`, once its hash matches the manifest's.
pub fn verified_model_file(manifest: &ModelManifest, folder: &Path) -> Result<PathBuf, ModelError> {
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
    Ok(file)
}

fn optimization_level(name: &str) -> Result<GraphOptimizationLevel, ModelError> {
    match name {
        "disable" => Ok(GraphOptimizationLevel::Disable),
        "basic" => Ok(GraphOptimizationLevel::Level1),
        "extended" => Ok(GraphOptimizationLevel::Level2),
        "all" => Ok(GraphOptimizationLevel::All),
        other => Err(ModelError::OptimizationLevel(other.to_owned())),
    }
}

/// Verifies the model file, then opens `settings.sessions_per_model` sessions on it.
pub fn open_sessions(
    environment: &Environment,
    manifest: &ModelManifest,
    folder: &Path,
    settings: &RuntimeSettings,
) -> Result<Vec<Session>, ModelError> {
    let file = verified_model_file(manifest, folder)?;
    let session_error = |error: ort::Error| ModelError::Session {
        name: manifest.name.clone(),
        version: manifest.version.clone(),
        reason: error.to_string(),
    };
    let level = optimization_level(&settings.graph_optimization_level)?;
    (0..settings.sessions_per_model.max(1))
        .map(|_| {
            let mut builder = Session::builder(environment)
                .map_err(session_error)?
                .with_optimization_level(level)
                .map_err(|error| session_error(error.into()))?;
            if settings.intra_op_threads > 0 {
                builder = builder
                    .with_intra_threads(settings.intra_op_threads)
                    .map_err(|error| session_error(error.into()))?;
            }
            if settings.inter_op_threads > 0 {
                builder = builder
                    .with_inter_threads(settings.inter_op_threads)
                    .map_err(|error| session_error(error.into()))?;
            }
            builder.commit_from_file(&file).map_err(session_error)
        })
        .collect()
}

/// Runs `rows` (`[N, H, W, C]`) in one call; returns N rows of one score per label.
pub fn run_rows(
    session: &mut Session,
    manifest: &ModelManifest,
    rows: Array4<f32>,
) -> Result<Vec<Vec<f32>>, ModelError> {
    let count = rows.shape()[0];
    let labels = manifest.labels.len();
    let tensor = Tensor::from_array(rows).map_err(|error| ModelError::Run(error.to_string()))?;
    let outputs = session
        .run(ort::inputs![manifest.input.name.as_str() => tensor])
        .map_err(|error| ModelError::Run(error.to_string()))?;
    let scores = outputs[manifest.output.name.as_str()]
        .try_extract_array::<f32>()
        .map_err(|error| ModelError::Run(error.to_string()))?;
    if scores.len() != count * labels {
        return Err(ModelError::OutputShape {
            expected: count * labels,
            actual: scores.len(),
        });
    }
    let flat: Vec<f32> = scores.iter().copied().collect();
    Ok(flat.chunks_exact(labels).map(<[f32]>::to_vec).collect())
}
