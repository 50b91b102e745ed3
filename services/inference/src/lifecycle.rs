//! Lifecycle changes to what is served, each recorded in the ledger before it takes effect:
//! plan (a new version is loaded and hash-checked here), write the manifests, record, apply.
//! If the ledger cannot record the change, the manifests are put back and nothing changes.

use std::sync::Arc;

use medai_ledger_client::LedgerClient;
use serde_json::json;

use crate::caller::Caller;
use crate::error::InferenceError;
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
}

/// The four changes to what is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    Stage,
    Activate,
    Retire,
    /// Back to the version active before the current one (the version named is ignored).
    Rollback,
}

impl Lifecycle {
    /// Plans, records and applies one change; refused before anything is loaded if it has no
    /// reason.
    pub async fn change(
        &self,
        kind: ChangeKind,
        name: &str,
        version: &str,
        request: &ChangeRequest,
    ) -> Result<(VersionView, u64), InferenceError> {
        require_reason(request)?;
        let repository = &self.repository;
        let change = match kind {
            ChangeKind::Stage => repository.plan_stage(name, version).await?,
            ChangeKind::Activate => repository.plan_activate(name, version).await?,
            ChangeKind::Retire => repository.plan_retire(name, version).await?,
            ChangeKind::Rollback => repository.plan_rollback(name).await?,
        };
        self.commit(change, request).await
    }

    async fn commit(
        &self,
        change: PlannedChange,
        request: &ChangeRequest,
    ) -> Result<(VersionView, u64), InferenceError> {
        self.repository.write(&change)?;
        let context = json!({
            "model": change.name,
            "version": change.version,
            "previously_served": change.previously_served,
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
                tracing::error!(code = ?status.code(), model = %change.name, action = change.action, "lifecycle change not recorded; undoing it");
                self.repository.undo_write(&change);
                return Err(InferenceError::LedgerUnavailable);
            }
        };
        let view = self
            .repository
            .apply(change)
            .ok_or_else(|| InferenceError::Failed("the changed version vanished".to_owned()))?;
        Ok((view, seq))
    }
}

fn require_reason(request: &ChangeRequest) -> Result<(), InferenceError> {
    if request.reason.trim().is_empty() {
        return Err(InferenceError::ReasonMissing);
    }
    Ok(())
}
