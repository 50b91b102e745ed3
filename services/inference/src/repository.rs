//! The model repository: `<root>/<model>/<version>/manifest.toml`. Every version's manifest
//! holds its status (staged, active, retired); at start each active version is loaded after its
//! file hash is checked. Lifecycle changes are planned first (loading a new version happens
//! then), written to the manifests, recorded by the caller, and only then applied, so a change
//! the ledger did not record is undone instead of served.
//!
//! `<root>/<model>/activation-history` lists the versions activated, oldest first; a rollback
//! returns to the one before the current.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use ort::environment::Environment;

use crate::batcher::ServedVersion;
use crate::config::RuntimeSettings;
use crate::error::InferenceError;
use crate::manifest::{ManifestError, ModelManifest, ModelStatus};
use crate::model::{ModelError, VerifiedModel, open_sessions};

const HISTORY_FILE: &str = "activation-history";

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

#[derive(Clone, Debug)]
struct VersionEntry {
    manifest: ModelManifest,
    folder: PathBuf,
}

#[derive(Default)]
struct ModelEntry {
    versions: BTreeMap<String, VersionEntry>,
    serving: Option<Arc<ServedVersion>>,
    history: Vec<String>,
}

/// One version as listed by ListModels and KServe's readiness calls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionView {
    pub name: String,
    pub version: String,
    pub status: ModelStatus,
    pub ready: bool,
    pub sha256: String,
    pub intended_use: String,
}

pub struct ModelRepository {
    root: PathBuf,
    environment: Environment,
    settings: RuntimeSettings,
    models: RwLock<BTreeMap<String, ModelEntry>>,
    /// One lifecycle change at a time.
    changes: Arc<tokio::sync::Mutex<()>>,
}

/// A lifecycle change, ready to be written and applied.
pub struct PlannedChange {
    pub name: String,
    pub version: String,
    pub action: &'static str,
    /// The version served before the change, if any.
    pub previously_served: Option<String>,
    /// Manifest files to rewrite: (path, new text, old text).
    rewrites: Vec<(PathBuf, String, String)>,
    statuses: Vec<(String, ModelStatus)>,
    history: Vec<String>,
    /// `Some(new)` replaces what is served (`Some(None)` stops serving the model).
    serving: Option<Option<Arc<ServedVersion>>>,
    /// A version staging adds to the listing.
    new_version: Option<VersionEntry>,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

impl ModelRepository {
    pub fn load(
        root: &Path,
        environment: &Environment,
        settings: &RuntimeSettings,
    ) -> Result<Arc<Self>, RepositoryError> {
        let mut models: BTreeMap<String, ModelEntry> = BTreeMap::new();
        for folder in version_folders(root)? {
            let manifest = ModelManifest::load(&folder.join("manifest.toml"))?;
            let entry = models.entry(manifest.name.clone()).or_default();
            if manifest.status == ModelStatus::Active {
                if entry.serving.is_some() {
                    return Err(RepositoryError::SeveralActive {
                        name: manifest.name,
                    });
                }
                let sessions = open_sessions(environment, &manifest, &folder, settings)?;
                tracing::info!(model = %manifest.name, version = %manifest.version, sha256 = %manifest.sha256, "model loaded");
                entry.serving = Some(ServedVersion::start(
                    manifest.clone(),
                    sessions,
                    settings.dynamic_batching,
                    settings.queue_capacity,
                ));
            } else {
                tracing::info!(model = %manifest.name, version = %manifest.version, status = manifest.status.as_str(), "listed, not served");
            }
            entry
                .versions
                .insert(manifest.version.clone(), VersionEntry { manifest, folder });
        }
        for (name, entry) in &mut models {
            entry.history = read_history(&root.join(name));
            let active = entry
                .serving
                .as_ref()
                .map(|served| served.manifest.version.clone());
            if let Some(active) = active
                && entry.history.last() != Some(&active)
            {
                entry.history.push(active);
            }
        }
        Ok(Arc::new(Self {
            root: root.to_owned(),
            environment: environment.clone(),
            settings: settings.clone(),
            models: RwLock::new(models),
            changes: Arc::new(tokio::sync::Mutex::new(())),
        }))
    }

    /// The version of `name` being served, if any.
    pub fn served(&self, name: &str) -> Option<Arc<ServedVersion>> {
        let models = self
            .models
            .read()
            .unwrap_or_else(|poison| poison.into_inner());
        models.get(name)?.serving.clone()
    }

    /// The served version of `name`, refusing a named version that is not the served one.
    pub fn select(&self, name: &str, version: &str) -> Result<Arc<ServedVersion>, InferenceError> {
        let served = self
            .served(name)
            .ok_or_else(|| InferenceError::ModelNotFound {
                name: name.to_owned(),
            })?;
        if !version.is_empty() && version != served.manifest.version {
            return Err(InferenceError::VersionNotServed {
                name: name.to_owned(),
                version: version.to_owned(),
            });
        }
        Ok(served)
    }

    /// Every version of every model, in name and version order.
    pub fn list(&self) -> Vec<VersionView> {
        let models = self
            .models
            .read()
            .unwrap_or_else(|poison| poison.into_inner());
        models
            .values()
            .flat_map(|entry| {
                let serving = entry
                    .serving
                    .as_ref()
                    .map(|served| served.manifest.version.clone());
                entry.versions.values().map(move |version| VersionView {
                    name: version.manifest.name.clone(),
                    version: version.manifest.version.clone(),
                    status: version.manifest.status,
                    ready: serving.as_deref() == Some(version.manifest.version.as_str()),
                    sha256: version.manifest.sha256.clone(),
                    intended_use: version.manifest.intended_use.clone(),
                })
            })
            .collect()
    }

    pub fn view(&self, name: &str, version: &str) -> Option<VersionView> {
        self.list()
            .into_iter()
            .find(|view| view.name == name && view.version == version)
    }

    pub fn model_names(&self) -> Vec<String> {
        let models = self
            .models
            .read()
            .unwrap_or_else(|poison| poison.into_inner());
        models.keys().cloned().collect()
    }

    /// Plans staging: the version folder must exist on disk and its file hash must match.
    pub async fn plan_stage(
        &self,
        name: &str,
        version: &str,
    ) -> Result<PlannedChange, InferenceError> {
        let guard = self.lock_changes().await;
        let folder = self.root.join(name).join(version);
        let unknown = || InferenceError::VersionUnknown {
            name: name.to_owned(),
            version: version.to_owned(),
        };
        if !is_plain_segment(name) || !is_plain_segment(version) {
            return Err(unknown());
        }
        let manifest_path = folder.join("manifest.toml");
        if !manifest_path.is_file() {
            return Err(unknown());
        }
        let manifest = ModelManifest::load(&manifest_path)
            .map_err(|error| InferenceError::LoadFailed(error.to_string()))?;
        if manifest.name != name || manifest.version != version {
            return Err(InferenceError::LoadFailed(format!(
                "the manifest in {name}/{version} names {} version {}",
                manifest.name, manifest.version
            )));
        }
        if let Some(known) = self.known_status(name, version) {
            match known {
                ModelStatus::Retired => return Err(retired(name, version)),
                status => return Err(already(name, version, status)),
            }
        }
        let file_check_manifest = manifest.clone();
        let file_check_folder = folder.clone();
        tokio::task::spawn_blocking(move || {
            VerifiedModel::read(&file_check_manifest, &file_check_folder).map(drop)
        })
        .await
        .map_err(|error| InferenceError::LoadFailed(error.to_string()))?
        .map_err(model_error)?;
        let mut change = self.empty_change(name, version, "MODEL_STAGE", guard);
        change.add_status(&manifest_path, name, version, ModelStatus::Staged)?;
        let mut manifest = manifest;
        manifest.status = ModelStatus::Staged;
        change.new_version = Some(VersionEntry { manifest, folder });
        Ok(change)
    }

    /// Plans activation of a staged version: loads it now (hash checked), so a version that
    /// cannot run is refused before anything changes.
    pub async fn plan_activate(
        &self,
        name: &str,
        version: &str,
    ) -> Result<PlannedChange, InferenceError> {
        let guard = self.lock_changes().await;
        let entry = self.version_entry(name, version)?;
        match entry.manifest.status {
            ModelStatus::Staged => {}
            ModelStatus::Retired => return Err(retired(name, version)),
            ModelStatus::Active => return Err(already(name, version, ModelStatus::Active)),
        }
        let mut change = self.empty_change(name, version, "MODEL_ACTIVATE", guard);
        change.history.push(version.to_owned());
        self.plan_swap(&mut change, entry).await?;
        Ok(change)
    }

    /// Plans retirement; retiring the served version stops serving the model.
    pub async fn plan_retire(
        &self,
        name: &str,
        version: &str,
    ) -> Result<PlannedChange, InferenceError> {
        let guard = self.lock_changes().await;
        let entry = self.version_entry(name, version)?;
        if entry.manifest.status == ModelStatus::Retired {
            return Err(retired(name, version));
        }
        let mut change = self.empty_change(name, version, "MODEL_RETIRE", guard);
        change.add_status(
            &entry.folder.join("manifest.toml"),
            name,
            version,
            ModelStatus::Retired,
        )?;
        change.history.retain(|listed| listed != version);
        if entry.manifest.status == ModelStatus::Active {
            change.serving = Some(None);
        }
        Ok(change)
    }

    /// Plans a rollback to the version active before the current one.
    pub async fn plan_rollback(&self, name: &str) -> Result<PlannedChange, InferenceError> {
        let guard = self.lock_changes().await;
        let (history, versions) = {
            let models = self
                .models
                .read()
                .unwrap_or_else(|poison| poison.into_inner());
            let entry = models
                .get(name)
                .ok_or_else(|| InferenceError::ModelNotFound {
                    name: name.to_owned(),
                })?;
            (entry.history.clone(), entry.versions.clone())
        };
        let mut remaining = history;
        remaining.pop();
        while let Some(candidate) = remaining.last() {
            if versions
                .get(candidate)
                .is_some_and(|entry| entry.manifest.status == ModelStatus::Staged)
            {
                break;
            }
            remaining.pop();
        }
        let Some(target) = remaining.last().cloned() else {
            return Err(InferenceError::NoPreviousVersion {
                name: name.to_owned(),
            });
        };
        let entry = versions[&target].clone();
        let mut change = self.empty_change(name, &target, "MODEL_ROLLBACK", guard);
        change.history = remaining;
        self.plan_swap(&mut change, entry).await?;
        Ok(change)
    }

    /// Writes the planned manifests; on failure restores the ones already written.
    pub fn write(&self, change: &PlannedChange) -> Result<(), InferenceError> {
        for (index, (path, new_text, _)) in change.rewrites.iter().enumerate() {
            if let Err(error) = write_atomically(path, new_text) {
                for (written, _, old_text) in &change.rewrites[..index] {
                    let _ = write_atomically(written, old_text);
                }
                return Err(InferenceError::RepositoryWrite(error.to_string()));
            }
        }
        Ok(())
    }

    /// Puts the manifests back as they were before [`Self::write`].
    pub fn undo_write(&self, change: &PlannedChange) {
        for (path, _, old_text) in &change.rewrites {
            if let Err(error) = write_atomically(path, old_text) {
                tracing::error!(path = %path.display(), error = %error, "cannot restore a manifest");
            }
        }
    }

    /// Makes the written change the one in force.
    pub fn apply(&self, change: PlannedChange) -> Option<VersionView> {
        let history_path = self.root.join(&change.name).join(HISTORY_FILE);
        if let Err(error) = write_atomically(&history_path, &(change.history.join("\n") + "\n")) {
            tracing::warn!(model = %change.name, error = %error, "activation history not saved");
        }
        {
            let mut models = self
                .models
                .write()
                .unwrap_or_else(|poison| poison.into_inner());
            let entry = models.entry(change.name.clone()).or_default();
            if let Some(new_version) = change.new_version.clone() {
                entry
                    .versions
                    .insert(new_version.manifest.version.clone(), new_version);
            }
            for (version, status) in &change.statuses {
                if let Some(listed) = entry.versions.get_mut(version) {
                    listed.manifest.status = *status;
                }
            }
            entry.history = change.history.clone();
            if let Some(serving) = change.serving.clone() {
                // In-flight requests hold the old version's handle and finish on it.
                entry.serving = serving;
            }
        }
        tracing::info!(model = %change.name, version = %change.version, action = change.action, "model lifecycle change applied");
        self.view(&change.name, &change.version)
    }

    async fn lock_changes(&self) -> tokio::sync::OwnedMutexGuard<()> {
        self.changes.clone().lock_owned().await
    }

    fn empty_change(
        &self,
        name: &str,
        version: &str,
        action: &'static str,
        guard: tokio::sync::OwnedMutexGuard<()>,
    ) -> PlannedChange {
        let models = self
            .models
            .read()
            .unwrap_or_else(|poison| poison.into_inner());
        let entry = models.get(name);
        PlannedChange {
            name: name.to_owned(),
            version: version.to_owned(),
            action,
            previously_served: entry
                .and_then(|entry| entry.serving.as_ref())
                .map(|served| served.manifest.version.clone()),
            rewrites: Vec::new(),
            statuses: Vec::new(),
            history: entry.map(|entry| entry.history.clone()).unwrap_or_default(),
            serving: None,
            new_version: None,
            _guard: guard,
        }
    }

    /// Loads `entry` and plans it in place of the served version (which returns to staged).
    async fn plan_swap(
        &self,
        change: &mut PlannedChange,
        entry: VersionEntry,
    ) -> Result<(), InferenceError> {
        let (name, version) = (change.name.clone(), change.version.clone());
        change.add_status(
            &entry.folder.join("manifest.toml"),
            &name,
            &version,
            ModelStatus::Active,
        )?;
        if let Some(previous) = change.previously_served.clone() {
            let previous_entry = self.version_entry(&name, &previous)?;
            change.add_status(
                &previous_entry.folder.join("manifest.toml"),
                &name,
                &previous,
                ModelStatus::Staged,
            )?;
        }
        let environment = self.environment.clone();
        let settings = self.settings.clone();
        let mut manifest = entry.manifest.clone();
        manifest.status = ModelStatus::Active;
        let load_manifest = manifest.clone();
        let sessions = tokio::task::spawn_blocking(move || {
            open_sessions(&environment, &load_manifest, &entry.folder, &settings)
        })
        .await
        .map_err(|error| InferenceError::LoadFailed(error.to_string()))?
        .map_err(model_error)?;
        change.serving = Some(Some(ServedVersion::start(
            manifest,
            sessions,
            self.settings.dynamic_batching,
            self.settings.queue_capacity,
        )));
        Ok(())
    }

    fn known_status(&self, name: &str, version: &str) -> Option<ModelStatus> {
        let models = self
            .models
            .read()
            .unwrap_or_else(|poison| poison.into_inner());
        models
            .get(name)?
            .versions
            .get(version)
            .map(|entry| entry.manifest.status)
    }

    fn version_entry(&self, name: &str, version: &str) -> Result<VersionEntry, InferenceError> {
        let models = self
            .models
            .read()
            .unwrap_or_else(|poison| poison.into_inner());
        models
            .get(name)
            .and_then(|entry| entry.versions.get(version))
            .cloned()
            .ok_or_else(|| InferenceError::VersionUnknown {
                name: name.to_owned(),
                version: version.to_owned(),
            })
    }
}

impl PlannedChange {
    fn add_status(
        &mut self,
        path: &Path,
        name: &str,
        version: &str,
        status: ModelStatus,
    ) -> Result<(), InferenceError> {
        let old_text = std::fs::read_to_string(path)
            .map_err(|error| InferenceError::RepositoryWrite(error.to_string()))?;
        let new_text = ModelManifest::with_status(&old_text, status).map_err(|reason| {
            InferenceError::LoadFailed(format!("{name} version {version}: {reason}"))
        })?;
        self.rewrites.push((path.to_owned(), new_text, old_text));
        self.statuses.push((version.to_owned(), status));
        Ok(())
    }
}

fn retired(name: &str, version: &str) -> InferenceError {
    InferenceError::VersionRetired {
        name: name.to_owned(),
        version: version.to_owned(),
    }
}

fn already(name: &str, version: &str, status: ModelStatus) -> InferenceError {
    InferenceError::AlreadyInState {
        name: name.to_owned(),
        version: version.to_owned(),
        status: status.as_str(),
    }
}

fn model_error(error: ModelError) -> InferenceError {
    match error {
        ModelError::IntegrityMismatch { .. } => {
            InferenceError::IntegrityMismatch(error.to_string())
        }
        other => InferenceError::LoadFailed(other.to_string()),
    }
}

/// A folder name that cannot climb out of the repository.
fn is_plain_segment(segment: &str) -> bool {
    !segment.is_empty()
        && segment != "."
        && segment != ".."
        && segment
            .chars()
            .all(|character| character.is_ascii_alphanumeric() || "-_.".contains(character))
}

fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let temporary = path.with_extension("writing");
    std::fs::write(&temporary, text)?;
    std::fs::File::open(&temporary)?.sync_all()?;
    std::fs::rename(&temporary, path)
}

fn read_history(model_folder: &Path) -> Vec<String> {
    std::fs::read_to_string(model_folder.join(HISTORY_FILE))
        .map(|text| {
            text.lines()
                .map(str::trim)
                .filter(|line| !line.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn version_folders(root: &Path) -> Result<Vec<PathBuf>, RepositoryError> {
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
