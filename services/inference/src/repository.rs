//! The model repository: `<root>/<model>/<version>/manifest.toml` beside the model file. The
//! files are immutable artifacts (a read-only mount is enough): nothing here writes to the
//! repository. Which version is staged, active or retired, and the activation history, live in
//! the lifecycle store (see [`crate::lifecycle_store`]) that every replica shares; this type
//! holds what this process serves and follows the store. The manifests' `status` lines and the
//! optional `<root>/<model>/activation-history` file (versions activated, oldest first) are
//! read only to seed the store the first time a model is seen, or by an in-process repository
//! with no store ([`ModelRepository::load`]).
//!
//! Lifecycle changes are planned here first (a version to serve is loaded and hash-checked
//! then), made in the store by the caller once the ledger has recorded them, and only then
//! applied, so a change the ledger did not record is never served.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use ort::environment::Environment;

use crate::batcher::ServedVersion;
use crate::config::RuntimeSettings;
use crate::error::InferenceError;
use crate::lifecycle_store::LifecycleState;
use crate::manifest::{ManifestError, ModelManifest, ModelStatus};
use crate::model::{ModelError, VerifiedModel, open_sessions};
use crate::rollout::{
    Canary, CheckedReport, Rollout, Route, read_validation_report, require_validation_report,
    routes_to_canary,
};

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
    /// As read from disk, with `status` the lifecycle status in force.
    manifest: ModelManifest,
    folder: PathBuf,
}

#[derive(Default)]
struct ModelEntry {
    versions: BTreeMap<String, VersionEntry>,
    serving: Option<Arc<ServedVersion>>,
    history: Vec<String>,
    /// The lifecycle store's revision this entry shows; 0 until the store was read.
    revision: i64,
    /// The canary and shadow roles, and the versions serving them.
    rollout: Rollout,
    canary: Option<Arc<ServedVersion>>,
    shadow: Option<Arc<ServedVersion>>,
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
    /// CANARY or SHADOW while the version holds that role.
    pub rollout_role: Option<Route>,
    /// The canary's share, percent; 0 otherwise.
    pub share_percent: u32,
}

pub struct ModelRepository {
    root: PathBuf,
    environment: Environment,
    settings: RuntimeSettings,
    models: RwLock<BTreeMap<String, ModelEntry>>,
    /// One lifecycle change (or catching up with the store) at a time in this process.
    changes: Arc<tokio::sync::Mutex<()>>,
}

/// A lifecycle change, ready to be made in the store and then applied.
pub struct PlannedChange {
    pub name: String,
    pub version: String,
    pub action: &'static str,
    /// The version served before the change, if any.
    pub previously_served: Option<String>,
    /// The store revision the change was planned from.
    pub base_revision: i64,
    /// Every version's status after the change.
    pub versions: BTreeMap<String, ModelStatus>,
    /// The activation history after the change.
    pub history: Vec<String>,
    /// `Some(new)` replaces what is served (`Some(None)` stops serving the model).
    serving: Option<Option<Arc<ServedVersion>>>,
    /// A version staging adds to the listing.
    new_version: Option<VersionEntry>,
    /// The canary and shadow roles after the change.
    pub rollout: Rollout,
    /// `Some(new)` replaces the version serving the canary or shadow role.
    canary_serving: Option<Option<Arc<ServedVersion>>>,
    shadow_serving: Option<Option<Arc<ServedVersion>>>,
}

impl ModelRepository {
    /// Reads every manifest; serves nothing yet (see [`Self::follow`] and [`Self::load`]).
    pub fn open(
        root: &Path,
        environment: &Environment,
        settings: &RuntimeSettings,
    ) -> Result<Arc<Self>, RepositoryError> {
        let mut models: BTreeMap<String, ModelEntry> = BTreeMap::new();
        for folder in version_folders(root)? {
            let manifest = ModelManifest::load(&folder.join("manifest.toml"))?;
            let entry = models.entry(manifest.name.clone()).or_default();
            if manifest.status == ModelStatus::Active
                && entry
                    .versions
                    .values()
                    .any(|listed| listed.manifest.status == ModelStatus::Active)
            {
                return Err(RepositoryError::SeveralActive {
                    name: manifest.name,
                });
            }
            entry
                .versions
                .insert(manifest.version.clone(), VersionEntry { manifest, folder });
        }
        for (name, entry) in &mut models {
            entry.history = read_history(&root.join(name));
            let active = entry
                .versions
                .values()
                .find(|version| version.manifest.status == ModelStatus::Active)
                .map(|version| version.manifest.version.clone());
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

    /// A repository served as its manifests say, with no lifecycle store (in-process use:
    /// benchmarks, reference predictions). Call inside a tokio runtime.
    pub fn load(
        root: &Path,
        environment: &Environment,
        settings: &RuntimeSettings,
    ) -> Result<Arc<Self>, RepositoryError> {
        let repository = Self::open(root, environment, settings)?;
        {
            let mut models = repository.write_models();
            for entry in models.values_mut() {
                let Some(active) = entry
                    .versions
                    .values()
                    .find(|version| version.manifest.status == ModelStatus::Active)
                else {
                    continue;
                };
                let sessions =
                    open_sessions(environment, &active.manifest, &active.folder, settings)?;
                tracing::info!(model = %active.manifest.name, version = %active.manifest.version, sha256 = %active.manifest.sha256, "model loaded");
                let mut manifest = active.manifest.clone();
                manifest.validation = validation_of(&manifest, &active.folder);
                entry.serving = Some(repository.start_version(manifest, sessions));
            }
        }
        Ok(repository)
    }

    /// What the manifests (and activation-history files) say, per model: the state that seeds
    /// the lifecycle store for a model it has never seen.
    pub fn manifest_states(&self) -> Vec<(String, BTreeMap<String, ModelStatus>, Vec<String>)> {
        let models = self.read_models();
        models
            .iter()
            .map(|(name, entry)| {
                let versions = entry
                    .versions
                    .iter()
                    .map(|(version, listed)| (version.clone(), listed.manifest.status))
                    .collect();
                (name.clone(), versions, entry.history.clone())
            })
            .collect()
    }

    /// The store revision this process shows for `name` (0: none read yet).
    pub fn revision(&self, name: &str) -> i64 {
        self.read_models()
            .get(name)
            .map_or(0, |entry| entry.revision)
    }

    /// Holds off every other change and catch-up in this process while the guard lives.
    pub async fn lock_changes(&self) -> tokio::sync::OwnedMutexGuard<()> {
        self.changes.clone().lock_owned().await
    }

    /// Brings `name` to the state the store holds: statuses, history, and the version served
    /// (loaded and hash-checked here when it changes). Versions the store lists whose folder is
    /// missing are left out with an error logged. If the active version cannot be loaded the
    /// model is served by no version (never by one the store no longer names active), the
    /// error is returned and the revision is left as it was, so the next catch-up tries again.
    /// Call with [`Self::lock_changes`] held.
    pub async fn follow(&self, name: &str, state: &LifecycleState) -> Result<(), RepositoryError> {
        let (known, serving, canary, shadow) = {
            let models = self.read_models();
            let entry = models.get(name);
            (
                entry
                    .map(|entry| entry.versions.clone())
                    .unwrap_or_default(),
                entry.and_then(|entry| entry.serving.clone()),
                entry.and_then(|entry| entry.canary.clone()),
                entry.and_then(|entry| entry.shadow.clone()),
            )
        };
        // A version already loaded in some role (a promoted canary) is not loaded again.
        let loaded = |version: &str| {
            [&serving, &canary, &shadow]
                .into_iter()
                .flatten()
                .find(|served| served.manifest.version == version)
                .cloned()
        };
        let mut versions = BTreeMap::new();
        for (version, status) in &state.versions {
            let listed = match known.get(version) {
                Some(listed) => listed.clone(),
                None => match self.read_version(name, version) {
                    Ok(listed) => listed,
                    Err(error) => {
                        tracing::error!(model = %name, version = %version, error = %error, "a version the lifecycle store lists cannot be read from the repository");
                        continue;
                    }
                },
            };
            let mut listed = listed;
            listed.manifest.status = *status;
            versions.insert(version.clone(), listed);
        }
        let wanted = state.active().map(str::to_owned);
        let served_now = serving
            .as_ref()
            .map(|served| served.manifest.version.clone());
        let mut load_error = None;
        let new_serving = if wanted == served_now {
            serving.clone()
        } else if let Some(already) = wanted.as_deref().and_then(loaded) {
            Some(already)
        } else if let Some(wanted) = wanted {
            match versions.get(&wanted) {
                Some(listed) => match self.start_loaded(listed.clone()).await {
                    Ok(served) => {
                        tracing::info!(model = %name, version = %wanted, revision = state.revision, "now serving the version the lifecycle store names active");
                        Some(served)
                    }
                    Err(error) => {
                        load_error = Some(error);
                        None
                    }
                },
                None => {
                    load_error = Some(RepositoryError::Read {
                        path: self.root.join(name).join(&wanted).display().to_string(),
                        reason: "the active version's folder is missing".to_owned(),
                    });
                    None
                }
            }
        } else {
            tracing::info!(model = %name, revision = state.revision, "no version is active in the lifecycle store; serving none");
            None
        };
        let wanted_canary = state
            .rollout
            .canary
            .as_ref()
            .map(|canary| canary.version.clone());
        let new_canary = self
            .follow_role(name, wanted_canary.as_deref(), &versions, &loaded)
            .await;
        let new_shadow = self
            .follow_role(name, state.rollout.shadow.as_deref(), &versions, &loaded)
            .await;
        let mut models = self.write_models();
        let entry = models.entry(name.to_owned()).or_default();
        // In-flight requests hold the old version's handle and finish on it.
        entry.serving = new_serving;
        entry.canary = new_canary;
        entry.shadow = new_shadow;
        entry.rollout = state.rollout.clone();
        if let Some(error) = load_error {
            tracing::error!(model = %name, error = %error, "the active version cannot be served; the model is not served until it can be");
            return Err(error);
        }
        entry.versions = versions;
        entry.history = state.history.clone();
        entry.revision = state.revision;
        Ok(())
    }

    /// The version to serve in a canary or shadow role: the one loaded already, else loaded
    /// now. A role whose version cannot be loaded is served by none (logged); the active
    /// version keeps answering everything.
    async fn follow_role(
        &self,
        name: &str,
        wanted: Option<&str>,
        versions: &BTreeMap<String, VersionEntry>,
        loaded: &impl Fn(&str) -> Option<Arc<ServedVersion>>,
    ) -> Option<Arc<ServedVersion>> {
        let wanted = wanted?;
        if let Some(already) = loaded(wanted) {
            return Some(already);
        }
        let Some(listed) = versions.get(wanted) else {
            tracing::error!(model = %name, version = %wanted, "a rollout role names a version the repository does not have; the role is not served");
            return None;
        };
        match self.start_loaded(listed.clone()).await {
            Ok(served) => Some(served),
            Err(error) => {
                tracing::error!(model = %name, version = %wanted, error = %error, "a rollout role's version cannot be loaded; the role is not served");
                None
            }
        }
    }

    /// Whether any model has a version being served.
    pub fn serves_any(&self) -> bool {
        self.read_models()
            .values()
            .any(|entry| entry.serving.is_some())
    }

    /// The version of `name` being served, if any.
    pub fn served(&self, name: &str) -> Option<Arc<ServedVersion>> {
        self.read_models().get(name)?.serving.clone()
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

    /// Which version answers a request for `name`: the named one if it is the active version or
    /// the canary; else the canary when the routing key falls in its share, else the active
    /// version.
    pub fn route(
        &self,
        name: &str,
        version: &str,
        routing_key: &[u8],
    ) -> Result<(Arc<ServedVersion>, Route), InferenceError> {
        let models = self.read_models();
        let entry = models
            .get(name)
            .filter(|entry| entry.serving.is_some())
            .ok_or_else(|| InferenceError::ModelNotFound {
                name: name.to_owned(),
            })?;
        let active = entry
            .serving
            .clone()
            .ok_or_else(|| InferenceError::ModelNotFound {
                name: name.to_owned(),
            })?;
        let canary = entry.canary.clone().zip(entry.rollout.canary.clone());
        if !version.is_empty() {
            if active.manifest.version == version {
                return Ok((active, Route::Active));
            }
            if let Some((served, _)) =
                canary.filter(|(served, _)| served.manifest.version == version)
            {
                return Ok((served, Route::Canary));
            }
            return Err(InferenceError::VersionNotServed {
                name: name.to_owned(),
                version: version.to_owned(),
            });
        }
        match canary {
            Some((served, Canary { share_percent, .. }))
                if routes_to_canary(name, routing_key, share_percent) =>
            {
                Ok((served, Route::Canary))
            }
            _ => Ok((active, Route::Active)),
        }
    }

    /// The version shadowing `name`, if any.
    pub fn shadow(&self, name: &str) -> Option<Arc<ServedVersion>> {
        self.read_models().get(name)?.shadow.clone()
    }

    /// A version of `name` serving in any role (active, canary or shadow): what explains one
    /// of its results.
    pub fn select_any(
        &self,
        name: &str,
        version: &str,
    ) -> Result<Arc<ServedVersion>, InferenceError> {
        let models = self.read_models();
        let entry = models
            .get(name)
            .ok_or_else(|| InferenceError::ModelNotFound {
                name: name.to_owned(),
            })?;
        [&entry.serving, &entry.canary, &entry.shadow]
            .into_iter()
            .flatten()
            .find(|served| version.is_empty() || served.manifest.version == version)
            .cloned()
            .ok_or_else(|| InferenceError::VersionNotServed {
                name: name.to_owned(),
                version: version.to_owned(),
            })
    }

    /// The validation report `version` of `name` names, checked, and whether its manifest
    /// says research use only; and the model's labels.
    pub fn validation_report(
        &self,
        name: &str,
        version: &str,
    ) -> Result<(Option<CheckedReport>, bool, Vec<String>), InferenceError> {
        let entry = self.version_entry(name, version)?;
        let report = read_validation_report(&entry.manifest, &entry.folder)?;
        Ok((
            report,
            entry.manifest.research_use_only,
            entry.manifest.labels.clone(),
        ))
    }

    /// Every version of every model, in name and version order.
    pub fn list(&self) -> Vec<VersionView> {
        let models = self.read_models();
        models
            .values()
            .flat_map(|entry| {
                let serving = entry
                    .serving
                    .as_ref()
                    .map(|served| served.manifest.version.clone());
                let rollout = &entry.rollout;
                let loaded = [&entry.canary, &entry.shadow]
                    .into_iter()
                    .flatten()
                    .map(|served| served.manifest.version.clone())
                    .collect::<Vec<_>>();
                entry.versions.values().map(move |version| {
                    let role = rollout.role_of(&version.manifest.version);
                    VersionView {
                        name: version.manifest.name.clone(),
                        version: version.manifest.version.clone(),
                        status: version.manifest.status,
                        ready: serving.as_deref() == Some(version.manifest.version.as_str())
                            || (role.is_some() && loaded.contains(&version.manifest.version)),
                        sha256: version.manifest.sha256.clone(),
                        intended_use: version.manifest.intended_use.clone(),
                        rollout_role: role,
                        share_percent: match role {
                            Some(Route::Canary) => rollout
                                .canary
                                .as_ref()
                                .map_or(0, |canary| canary.share_percent),
                            _ => 0,
                        },
                    }
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
        self.read_models().keys().cloned().collect()
    }

    /// Plans staging: the version folder must exist on disk and its file hash must match.
    pub async fn plan_stage(
        &self,
        name: &str,
        version: &str,
    ) -> Result<PlannedChange, InferenceError> {
        let unknown = || InferenceError::VersionUnknown {
            name: name.to_owned(),
            version: version.to_owned(),
        };
        if !is_plain_segment(name) || !is_plain_segment(version) {
            return Err(unknown());
        }
        let folder = self.root.join(name).join(version);
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
        let mut change = self.empty_change(name, version, "MODEL_STAGE");
        change
            .versions
            .insert(version.to_owned(), ModelStatus::Staged);
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
        let entry = self.version_entry(name, version)?;
        match entry.manifest.status {
            ModelStatus::Staged => {}
            ModelStatus::Retired => return Err(retired(name, version)),
            ModelStatus::Active => return Err(already(name, version, ModelStatus::Active)),
        }
        require_validation_report(&entry.manifest, &entry.folder)?;
        let mut change = self.empty_change(name, version, "MODEL_ACTIVATE");
        change.history.push(version.to_owned());
        change.leave_role(version);
        self.plan_swap(&mut change, entry).await?;
        Ok(change)
    }

    /// Plans retirement; retiring the served version stops serving the model.
    pub async fn plan_retire(
        &self,
        name: &str,
        version: &str,
    ) -> Result<PlannedChange, InferenceError> {
        let entry = self.version_entry(name, version)?;
        if entry.manifest.status == ModelStatus::Retired {
            return Err(retired(name, version));
        }
        let mut change = self.empty_change(name, version, "MODEL_RETIRE");
        change
            .versions
            .insert(version.to_owned(), ModelStatus::Retired);
        change.history.retain(|listed| listed != version);
        change.leave_role(version);
        if entry.manifest.status == ModelStatus::Active {
            change.serving = Some(None);
        }
        Ok(change)
    }

    /// Plans a rollback to the version active before the current one.
    pub async fn plan_rollback(&self, name: &str) -> Result<PlannedChange, InferenceError> {
        let (history, versions) = {
            let models = self.read_models();
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
        let mut change = self.empty_change(name, &target, "MODEL_ROLLBACK");
        change.history = remaining;
        change.leave_role(&target);
        self.plan_swap(&mut change, entry).await?;
        Ok(change)
    }

    /// Plans a canary: a staged version, with a validation report (or research use only),
    /// answering `share_percent` of the requests beside the active version.
    pub async fn plan_start_canary(
        &self,
        name: &str,
        version: &str,
        share_percent: u32,
    ) -> Result<PlannedChange, InferenceError> {
        if !(1..=99).contains(&share_percent) {
            return Err(InferenceError::CanaryShareInvalid);
        }
        let entry = self.version_entry(name, version)?;
        require_validation_report(&entry.manifest, &entry.folder)?;
        let mut change = self.plan_role_start(name, version, &entry, "MODEL_CANARY_START")?;
        if change.rollout.canary.is_some() {
            return Err(InferenceError::RolloutStateInvalid(format!(
                "model {name} already has a canary; promote or abort it first"
            )));
        }
        change.rollout.canary = Some(Canary {
            version: version.to_owned(),
            share_percent,
        });
        change.canary_serving = Some(Some(self.load_planned(entry).await?));
        Ok(change)
    }

    /// Plans a shadow: a staged version run on a copy of every request, never delivered.
    pub async fn plan_start_shadow(
        &self,
        name: &str,
        version: &str,
    ) -> Result<PlannedChange, InferenceError> {
        let entry = self.version_entry(name, version)?;
        let mut change = self.plan_role_start(name, version, &entry, "MODEL_SHADOW_START")?;
        if change.rollout.shadow.is_some() {
            return Err(InferenceError::RolloutStateInvalid(format!(
                "model {name} already has a shadow; stop it first"
            )));
        }
        change.rollout.shadow = Some(version.to_owned());
        change.shadow_serving = Some(Some(self.load_planned(entry).await?));
        Ok(change)
    }

    /// Plans the canary `version` becoming the active version (the active one returns to
    /// staged); the canary's loaded sessions serve on, nothing is loaded again.
    pub async fn plan_promote_canary(
        &self,
        name: &str,
        version: &str,
    ) -> Result<PlannedChange, InferenceError> {
        let entry = self.version_entry(name, version)?;
        let mut change = self.empty_change(name, version, "MODEL_CANARY_PROMOTE");
        self.require_role(&change, name, version, Route::Canary)?;
        require_validation_report(&entry.manifest, &entry.folder)?;
        for status in change.versions.values_mut() {
            if *status == ModelStatus::Active {
                *status = ModelStatus::Staged;
            }
        }
        change
            .versions
            .insert(version.to_owned(), ModelStatus::Active);
        change.history.push(version.to_owned());
        change.rollout.canary = None;
        let loaded = self
            .read_models()
            .get(name)
            .and_then(|model| model.canary.clone())
            .filter(|served| served.manifest.version == version);
        let served = match loaded {
            Some(served) => served,
            None => self.load_planned(entry).await?,
        };
        change.serving = Some(Some(served));
        change.canary_serving = Some(None);
        Ok(change)
    }

    /// Plans the end of the canary `version`: the active version answers everything again.
    pub async fn plan_abort_canary(
        &self,
        name: &str,
        version: &str,
    ) -> Result<PlannedChange, InferenceError> {
        let mut change = self.empty_change(name, version, "MODEL_CANARY_ABORT");
        self.require_role(&change, name, version, Route::Canary)?;
        change.rollout.canary = None;
        change.canary_serving = Some(None);
        Ok(change)
    }

    /// Plans the end of the shadow `version`.
    pub async fn plan_stop_shadow(
        &self,
        name: &str,
        version: &str,
    ) -> Result<PlannedChange, InferenceError> {
        let mut change = self.empty_change(name, version, "MODEL_SHADOW_STOP");
        self.require_role(&change, name, version, Route::Shadow)?;
        change.rollout.shadow = None;
        change.shadow_serving = Some(None);
        Ok(change)
    }

    fn require_role(
        &self,
        change: &PlannedChange,
        name: &str,
        version: &str,
        role: Route,
    ) -> Result<(), InferenceError> {
        if change.rollout.role_of(version) == Some(role) {
            return Ok(());
        }
        Err(InferenceError::RolloutStateInvalid(format!(
            "version {version} is not the {} of model {name}",
            role.as_str().to_lowercase()
        )))
    }

    /// What starting a canary or shadow of `version` needs: a staged version holding no role,
    /// beside an active version.
    fn plan_role_start(
        &self,
        name: &str,
        version: &str,
        entry: &VersionEntry,
        action: &'static str,
    ) -> Result<PlannedChange, InferenceError> {
        match entry.manifest.status {
            ModelStatus::Staged => {}
            ModelStatus::Retired => return Err(retired(name, version)),
            ModelStatus::Active => {
                return Err(InferenceError::RolloutStateInvalid(format!(
                    "version {version} of model {name} is the active version"
                )));
            }
        }
        let change = self.empty_change(name, version, action);
        if change.previously_served.is_none() {
            return Err(InferenceError::RolloutStateInvalid(format!(
                "model {name} has no active version to run beside"
            )));
        }
        if let Some(role) = change.rollout.role_of(version) {
            return Err(InferenceError::RolloutStateInvalid(format!(
                "version {version} of model {name} is already the {}",
                role.as_str().to_lowercase()
            )));
        }
        Ok(change)
    }

    async fn load_planned(
        &self,
        entry: VersionEntry,
    ) -> Result<Arc<ServedVersion>, InferenceError> {
        self.start_loaded(entry).await.map_err(|error| match error {
            RepositoryError::Model(error) => model_error(error),
            other => InferenceError::LoadFailed(other.to_string()),
        })
    }

    /// Makes a change the store holds at `revision` the one this process serves.
    pub fn apply(&self, change: PlannedChange, revision: i64) -> Option<VersionView> {
        {
            let mut models = self.write_models();
            let entry = models.entry(change.name.clone()).or_default();
            if let Some(new_version) = change.new_version.clone() {
                entry
                    .versions
                    .insert(new_version.manifest.version.clone(), new_version);
            }
            for (version, status) in &change.versions {
                if let Some(listed) = entry.versions.get_mut(version) {
                    listed.manifest.status = *status;
                }
            }
            entry.history = change.history.clone();
            entry.revision = revision;
            entry.rollout = change.rollout.clone();
            if let Some(serving) = change.serving.clone() {
                // In-flight requests hold the old version's handle and finish on it.
                entry.serving = serving;
            }
            if let Some(canary) = change.canary_serving.clone() {
                entry.canary = canary;
            }
            if let Some(shadow) = change.shadow_serving.clone() {
                entry.shadow = shadow;
            }
        }
        tracing::info!(model = %change.name, version = %change.version, action = change.action, revision, "model lifecycle change applied");
        self.view(&change.name, &change.version)
    }

    fn empty_change(&self, name: &str, version: &str, action: &'static str) -> PlannedChange {
        let models = self.read_models();
        let entry = models.get(name);
        PlannedChange {
            name: name.to_owned(),
            version: version.to_owned(),
            action,
            previously_served: entry
                .and_then(|entry| entry.serving.as_ref())
                .map(|served| served.manifest.version.clone()),
            base_revision: entry.map_or(0, |entry| entry.revision),
            versions: entry
                .map(|entry| {
                    entry
                        .versions
                        .iter()
                        .map(|(version, listed)| (version.clone(), listed.manifest.status))
                        .collect()
                })
                .unwrap_or_default(),
            history: entry.map(|entry| entry.history.clone()).unwrap_or_default(),
            serving: None,
            new_version: None,
            rollout: entry.map(|entry| entry.rollout.clone()).unwrap_or_default(),
            canary_serving: None,
            shadow_serving: None,
        }
    }

    /// Loads `entry` and plans it in place of the active version (which returns to staged).
    async fn plan_swap(
        &self,
        change: &mut PlannedChange,
        entry: VersionEntry,
    ) -> Result<(), InferenceError> {
        for status in change.versions.values_mut() {
            if *status == ModelStatus::Active {
                *status = ModelStatus::Staged;
            }
        }
        change
            .versions
            .insert(change.version.clone(), ModelStatus::Active);
        let served = self.load_planned(entry).await?;
        change.serving = Some(Some(served));
        Ok(())
    }

    /// Loads `entry` (hash checked) off the async threads and starts serving it.
    async fn start_loaded(
        &self,
        entry: VersionEntry,
    ) -> Result<Arc<ServedVersion>, RepositoryError> {
        let environment = self.environment.clone();
        let settings = self.settings.clone();
        let mut manifest = entry.manifest.clone();
        manifest.status = ModelStatus::Active;
        manifest.validation = validation_of(&manifest, &entry.folder);
        let load_manifest = manifest.clone();
        let sessions = tokio::task::spawn_blocking(move || {
            open_sessions(&environment, &load_manifest, &entry.folder, &settings)
        })
        .await
        .map_err(|error| ModelError::Run(error.to_string()))??;
        Ok(self.start_version(manifest, sessions))
    }

    fn start_version(
        &self,
        manifest: ModelManifest,
        sessions: Vec<ort::session::Session>,
    ) -> Arc<ServedVersion> {
        ServedVersion::start(
            manifest,
            sessions,
            self.settings.dynamic_batching,
            self.settings.queue_capacity,
        )
    }

    fn read_version(&self, name: &str, version: &str) -> Result<VersionEntry, RepositoryError> {
        if !is_plain_segment(name) || !is_plain_segment(version) {
            return Err(RepositoryError::Read {
                path: format!("{name}/{version}"),
                reason: "not a plain folder name".to_owned(),
            });
        }
        let folder = self.root.join(name).join(version);
        let manifest = ModelManifest::load(&folder.join("manifest.toml"))?;
        Ok(VersionEntry { manifest, folder })
    }

    fn known_status(&self, name: &str, version: &str) -> Option<ModelStatus> {
        self.read_models()
            .get(name)?
            .versions
            .get(version)
            .map(|entry| entry.manifest.status)
    }

    fn version_entry(&self, name: &str, version: &str) -> Result<VersionEntry, InferenceError> {
        self.read_models()
            .get(name)
            .and_then(|entry| entry.versions.get(version))
            .cloned()
            .ok_or_else(|| InferenceError::VersionUnknown {
                name: name.to_owned(),
                version: version.to_owned(),
            })
    }

    fn read_models(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, ModelEntry>> {
        self.models
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn write_models(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, ModelEntry>> {
        self.models
            .write()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

impl PlannedChange {
    /// The version leaves whatever canary or shadow role it held (it is becoming active, or
    /// retired); the role's sessions stop with it.
    fn leave_role(&mut self, version: &str) {
        match self.rollout.role_of(version) {
            Some(Route::Canary) => self.canary_serving = Some(None),
            Some(Route::Shadow) => self.shadow_serving = Some(None),
            _ => return,
        }
        self.rollout = std::mem::take(&mut self.rollout).without(version);
    }
}

/// The version's validation report for drift figures; a report that cannot be read is logged
/// and leaves the version without a reference (activation refused it already if it mattered).
fn validation_of(manifest: &ModelManifest, folder: &Path) -> Option<CheckedReport> {
    match read_validation_report(manifest, folder) {
        Ok(report) => report,
        Err(error) => {
            tracing::warn!(model = %manifest.name, version = %manifest.version, error = %error, "validation report not usable; no drift reference");
            None
        }
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
