//! Model files and ONNX Runtime sessions: a file is read once into memory, its bytes are checked
//! against the SHA-256 in its manifest, and ONNX Runtime is given those same bytes (never the
//! path again, so a file swapped after the check cannot be served). A session runs a whole batch
//! of rows at once, with spin-waiting off and its intra-op threads sized for the model.

use std::io::Read;
use std::path::Path;
use std::sync::OnceLock;

use ndarray::Array4;
use ort::environment::Environment;
use ort::ep;
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

/// A model file's bytes, read once and checked against the manifest's SHA-256. Sessions are
/// built from these bytes, so what runs is exactly what was checked.
pub struct VerifiedModel {
    bytes: Vec<u8>,
}

impl VerifiedModel {
    /// Reads the model file of `manifest` in `folder` and checks its hash.
    pub fn read(manifest: &ModelManifest, folder: &Path) -> Result<Self, ModelError> {
        let file = folder.join(&manifest.file);
        let bytes = std::fs::read(&file).map_err(|error| ModelError::Read {
            path: file.display().to_string(),
            reason: error.to_string(),
        })?;
        let actual = hex::encode(Sha256::digest(&bytes));
        if !actual.eq_ignore_ascii_case(&manifest.sha256) {
            return Err(ModelError::IntegrityMismatch {
                name: manifest.name.clone(),
                version: manifest.version.clone(),
                expected: manifest.sha256.clone(),
                actual,
            });
        }
        Ok(Self { bytes })
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Opens `settings.sessions_per_model` sessions on the verified bytes.
    pub fn open_sessions(
        &self,
        environment: &Environment,
        manifest: &ModelManifest,
        settings: &RuntimeSettings,
    ) -> Result<Vec<Session>, ModelError> {
        let session_error = |error: ort::Error| ModelError::Session {
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            reason: error.to_string(),
        };
        let level = optimization_level(&settings.graph_optimization_level)?;
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let intra_threads = intra_op_threads(manifest, settings, self.bytes.len(), cores);
        let arena = manifest.execution.cpu_memory_arena.unwrap_or(false);
        (0..settings.sessions_per_model.max(1))
            .map(|_| {
                let mut builder = Session::builder(environment)
                    .map_err(session_error)?
                    .with_optimization_level(level)
                    .map_err(|error| session_error(error.into()))?
                    // An idle worker thread sleeps instead of spinning: spinning burns the
                    // cores that preprocessing, TLS and the other sessions need.
                    .with_intra_op_spinning(false)
                    .map_err(|error| session_error(error.into()))?
                    .with_inter_op_spinning(false)
                    .map_err(|error| session_error(error.into()))?
                    .with_intra_threads(intra_threads)
                    .map_err(|error| session_error(error.into()))?
                    // The CPU arena keeps every block the load or any run (the largest batch)
                    // ever took; off, a session holds little more than its weights, and each
                    // run's planned block is freed when the run ends (issue 14).
                    .with_execution_providers([ep::CPU::default()
                        .with_arena_allocator(arena)
                        .build()])
                    .map_err(|error| session_error(error.into()))?;
                if settings.inter_op_threads > 0 {
                    builder = builder
                        .with_inter_threads(settings.inter_op_threads)
                        .map_err(|error| session_error(error.into()))?;
                }
                builder
                    .commit_from_memory(&self.bytes)
                    .map_err(session_error)
            })
            .collect()
    }
}

/// Models smaller than this run each request faster on one thread than on several: the work of
/// one run is less than the cost of waking and joining a thread pool.
pub const SMALL_MODEL_BYTES: usize = 1 << 20;

/// Intra-op threads for one session of `manifest`: the service setting if it names a number
/// (an operator's override), else the manifest's `execution.intra_op_threads`, else one thread
/// for a small model and the node's cores shared among the sessions for a large one.
pub fn intra_op_threads(
    manifest: &ModelManifest,
    settings: &RuntimeSettings,
    model_bytes: usize,
    cores: usize,
) -> usize {
    if settings.intra_op_threads > 0 {
        return settings.intra_op_threads;
    }
    if let Some(threads) = manifest.execution.intra_op_threads {
        return threads.max(1);
    }
    if model_bytes < SMALL_MODEL_BYTES {
        return 1;
    }
    (cores / settings.sessions_per_model.max(1)).max(1)
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

/// Reads and verifies the model file, then opens `settings.sessions_per_model` sessions on
/// the verified bytes.
pub fn open_sessions(
    environment: &Environment,
    manifest: &ModelManifest,
    folder: &Path,
    settings: &RuntimeSettings,
) -> Result<Vec<Session>, ModelError> {
    VerifiedModel::read(manifest, folder)?.open_sessions(environment, manifest, settings)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(threads: Option<usize>) -> ModelManifest {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../models/synthetic-light/1/manifest.toml"),
        )
        .expect("the light model's manifest");
        let mut manifest: ModelManifest = toml::from_str(&text).expect("manifest");
        manifest.execution.intra_op_threads = threads;
        manifest
    }

    #[test]
    fn intra_op_threads_follow_the_setting_the_manifest_and_the_model_size() {
        let defaults = RuntimeSettings::default();
        let large = 65 << 20;
        // Absent everywhere: one thread for a small model on any node; a large model takes the
        // node's cores, shared among its sessions.
        assert_eq!(intra_op_threads(&manifest(None), &defaults, 33 << 10, 2), 1);
        assert_eq!(
            intra_op_threads(&manifest(None), &defaults, 33 << 10, 32),
            1
        );
        assert_eq!(intra_op_threads(&manifest(None), &defaults, large, 2), 2);
        assert_eq!(intra_op_threads(&manifest(None), &defaults, large, 32), 32);
        let two_sessions = RuntimeSettings {
            sessions_per_model: 2,
            ..RuntimeSettings::default()
        };
        assert_eq!(
            intra_op_threads(&manifest(None), &two_sessions, large, 32),
            16
        );
        assert_eq!(
            intra_op_threads(&manifest(None), &two_sessions, large, 1),
            1
        );
        // The manifest decides for its model; the service setting overrides every manifest.
        assert_eq!(
            intra_op_threads(&manifest(Some(4)), &defaults, 33 << 10, 2),
            4
        );
        let pinned = RuntimeSettings {
            intra_op_threads: 3,
            ..RuntimeSettings::default()
        };
        assert_eq!(intra_op_threads(&manifest(Some(4)), &pinned, large, 32), 3);
    }
}
