//! Lifecycle changes to what is served, each recorded in the ledger before it takes effect:
//! catch up with the lifecycle store, plan (a new version is loaded and hash-checked here),
//! write the change in the store inside a transaction that locks the model's row, record it in
//! the ledger, commit, apply. If the ledger cannot record the change the transaction is rolled
//! back and nothing changes anywhere. The model files are never written.
//!
//! Other replicas see a committed change through [`follow_store`], which polls the store's
//! revisions (one small query per interval, one second by default).

use std::sync::Arc;
use std::time::Duration;

use medai_ledger_client::LedgerClient;
use serde_json::json;

use crate::caller::Caller;
use crate::error::InferenceError;
use crate::lifecycle_store::{LifecycleStore, LifecycleStoreError};
use crate::repository::{ModelRepository, PlannedChange, VersionView};

/// Who asked for a change and why. The actor recorded is the authenticated caller (its
/// certificate, or the user the gateway relays); the reason is free text, kept only as such.
#[derive(Clone, Debug)]
pub struct ChangeRequest {
    pub caller: Caller,
    pub reason: String,
    pub correlation_id: String,
}

pub struct Lifecycle {
    pub repository: Arc<ModelRepository>,
    pub ledger: LedgerClient,
    pub store: LifecycleStore,
}

/// The changes to what is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    Stage,
    Activate,
    Retire,
    /// Back to the version active before the current one (the version named is ignored).
    Rollback,
    /// A canary answering this percent of the requests that name no version.
    StartCanary {
        share_percent: u32,
    },
    PromoteCanary,
    AbortCanary,
    StartShadow,
    StopShadow,
}

impl Lifecycle {
    /// Plans, records and applies one change; refused before anything is loaded if it has no
    /// reason. A change to a model that another replica changed meanwhile, or is changing now,
    /// is refused with [`InferenceError::LifecycleConflict`]; asking again decides on the
    /// state that won.
    pub async fn change(
        &self,
        kind: ChangeKind,
        name: &str,
        version: &str,
        request: &ChangeRequest,
    ) -> Result<(VersionView, u64), InferenceError> {
        require_reason(request)?;
        let _one_at_a_time = self.repository.lock_changes().await;
        self.catch_up(name).await?;
        let repository = &self.repository;
        let change = match kind {
            ChangeKind::Stage => repository.plan_stage(name, version).await?,
            ChangeKind::Activate => repository.plan_activate(name, version).await?,
            ChangeKind::Retire => repository.plan_retire(name, version).await?,
            ChangeKind::Rollback => repository.plan_rollback(name).await?,
            ChangeKind::StartCanary { share_percent } => {
                repository
                    .plan_start_canary(name, version, share_percent)
                    .await?
            }
            ChangeKind::PromoteCanary => repository.plan_promote_canary(name, version).await?,
            ChangeKind::AbortCanary => repository.plan_abort_canary(name, version).await?,
            ChangeKind::StartShadow => repository.plan_start_shadow(name, version).await?,
            ChangeKind::StopShadow => repository.plan_stop_shadow(name, version).await?,
        };
        self.commit(change, request).await
    }

    /// Brings this process's view of `name` to the store's, so a change is planned from the
    /// state every replica agrees on.
    async fn catch_up(&self, name: &str) -> Result<(), InferenceError> {
        let Some(state) = self.store.load(name).await.map_err(store_error)? else {
            return Ok(());
        };
        if state.revision == self.repository.revision(name) {
            return Ok(());
        }
        self.repository
            .follow(name, &state)
            .await
            .map_err(|error| InferenceError::LoadFailed(error.to_string()))
    }

    async fn commit(
        &self,
        change: PlannedChange,
        request: &ChangeRequest,
    ) -> Result<(VersionView, u64), InferenceError> {
        let pending = self
            .store
            .begin_change(
                &change.name,
                change.base_revision,
                &change.versions,
                &change.history,
                &change.rollout,
            )
            .await
            .map_err(store_error)?;
        let context = json!({
            "model": change.name,
            "version": change.version,
            "previously_served": change.previously_served,
            "rollout": change.rollout,
            "via": request.caller.service,
            "reason": request.reason,
            "correlation_id": request.correlation_id,
        });
        let resource = format!("model/{}/{}", change.name, change.version);
        let seq = match self
            .ledger
            .record(
                &request.caller.actor(),
                change.action,
                &resource,
                "SUCCESS",
                context,
            )
            .await
        {
            Ok(seq) => seq,
            Err(status) => {
                tracing::error!(code = ?status.code(), model = %change.name, action = change.action, "lifecycle change not recorded; rolling it back");
                pending.roll_back().await;
                return Err(InferenceError::LedgerUnavailable);
            }
        };
        let revision = match pending.commit(seq).await {
            Ok(revision) => revision,
            Err(error) => {
                // Recorded but not made: say so in the ledger too, so the record stays true.
                tracing::error!(error = %error, model = %change.name, action = change.action, ledger_seq = seq, "lifecycle change recorded but not committed");
                let noted = self
                    .ledger
                    .record(
                        &request.caller.actor(),
                        change.action,
                        &resource,
                        "NOT_APPLIED",
                        json!({ "recorded_as": seq, "correlation_id": request.correlation_id }),
                    )
                    .await;
                if let Err(status) = noted {
                    tracing::error!(code = ?status.code(), ledger_seq = seq, "the change that was not made could not be noted in the ledger");
                }
                return Err(InferenceError::Store);
            }
        };
        let view = self
            .repository
            .apply(change, revision)
            .ok_or_else(|| InferenceError::Failed("the changed version vanished".to_owned()))?;
        Ok((view, seq))
    }
}

/// Seeds the store from the manifests for every model it has never seen, then serves what the
/// store says. A version the store names active that cannot be loaded fails the start.
pub async fn adopt_store_state(
    repository: &ModelRepository,
    store: &LifecycleStore,
) -> Result<(), crate::ServeError> {
    let _one_at_a_time = repository.lock_changes().await;
    for (name, versions, history) in repository.manifest_states() {
        if store
            .seed(&name, &versions, &history)
            .await
            .map_err(startup_error)?
        {
            tracing::info!(model = %name, "lifecycle state seeded from the manifests");
        }
        if let Some(state) = store.load(&name).await.map_err(startup_error)? {
            repository.follow(&name, &state).await?;
        }
    }
    Ok(())
}

/// Follows changes other replicas make: every `interval` the store's revisions are compared
/// with this process's, and each model that moved is brought to the store's state. Runs until
/// the task is dropped.
pub async fn follow_store(
    repository: Arc<ModelRepository>,
    store: LifecycleStore,
    interval: Duration,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let revisions = match store.revisions().await {
            Ok(revisions) => revisions,
            Err(error) => {
                tracing::warn!(error = %error, "lifecycle store not readable; serving what was last read");
                continue;
            }
        };
        for (name, revision) in revisions {
            if revision == repository.revision(&name) {
                continue;
            }
            let _one_at_a_time = repository.lock_changes().await;
            match store.load(&name).await {
                Ok(Some(state)) if state.revision != repository.revision(&name) => {
                    // `follow` logs what failed; the next tick tries again.
                    let _ = repository.follow(&name, &state).await;
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(error = %error, model = %name, "lifecycle state not readable");
                }
            }
        }
    }
}

fn startup_error(error: LifecycleStoreError) -> crate::ServeError {
    match error {
        LifecycleStoreError::Database(error) => crate::ServeError::Store(error),
        other => crate::ServeError::Store(sea_orm::DbErr::Custom(other.to_string())),
    }
}

fn store_error(error: LifecycleStoreError) -> InferenceError {
    match error {
        LifecycleStoreError::Conflict { name } => InferenceError::LifecycleConflict { name },
        other => {
            tracing::error!(error = %other, "lifecycle store failed");
            InferenceError::Store
        }
    }
}

fn require_reason(request: &ChangeRequest) -> Result<(), InferenceError> {
    if request.reason.trim().is_empty() {
        return Err(InferenceError::ReasonMissing);
    }
    Ok(())
}
