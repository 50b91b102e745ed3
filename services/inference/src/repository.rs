//! The model repository: `<root>/<model>/<version>/manifest.toml`. At start every version
//! whose manifest says `active` is loaded (hash checked); the others are listed, never served.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use ort::environment::Environment;

use crate::config::RuntimeSettings;
use crate::manifest::{ManifestError, ModelManifest, ModelStatus};
use crate::model::{LoadedModel, ModelError};

#[derive(Debug, thiserror::Error)]
pub enum RepositoryError {
    #[error("cannot read the model repository {path}: {reason}")]
    Read { path: String, reason: String },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("model {name} has more than one active version")]
    SeveralActive { name: String },
}

/// The versions being served, by model name.
pub struct ModelRepository {
    active: BTreeMap<String, Arc<LoadedModel>>,
}

impl ModelRepository {
    pub fn load(
        root: &Path,
        environment: &Environment,
        settings: &RuntimeSettings,
    ) -> Result<Self, RepositoryError> {
        let mut active: BTreeMap<String, Arc<LoadedModel>> = BTreeMap::new();
        for version_folder in version_folders(root)? {
            let manifest = ModelManifest::load(&version_folder.join("manifest.toml"))?;
            if manifest.status != ModelStatus::Active {
                tracing::info!(model = %manifest.name, version = %manifest.version, status = ?manifest.status, "not served");
                continue;
            }
            let name = manifest.name.clone();
            if active.contains_key(&name) {
                return Err(RepositoryError::SeveralActive { name });
            }
            let model = LoadedModel::load(environment, manifest, &version_folder, settings)?;
            tracing::info!(model = %name, version = %model.manifest.version, sha256 = %model.manifest.sha256, "model loaded");
            active.insert(name, Arc::new(model));
        }
        Ok(Self { active })
    }

    pub fn active(&self, name: &str) -> Option<Arc<LoadedModel>> {
        self.active.get(name).cloned()
    }

    pub fn model_names(&self) -> impl Iterator<Item = &str> {
        self.active.keys().map(String::as_str)
    }
}

fn version_folders(root: &Path) -> Result<Vec<std::path::PathBuf>, RepositoryError> {
    let read_error = |path: &Path, error: std::io::Error| RepositoryError::Read {
        path: path.display().to_string(),
        reason: error.to_string(),
    };
    let mut folders = Vec::new();
    for model in std::fs::read_dir(root).map_err(|error| read_error(root, error))? {
        let model = model.map_err(|error| read_error(root, error))?.path();
        if !model.is_dir() {
            continue;
        }
        for version in std::fs::read_dir(&model).map_err(|error| read_error(&model, error))? {
            let version = version.map_err(|error| read_error(&model, error))?.path();
            if version.join("manifest.toml").is_file() {
                folders.push(version);
            }
        }
    }
    folders.sort();
    Ok(folders)
}
