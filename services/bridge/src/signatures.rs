//! How the bridge learns that a reported result was signed: it asks the gateway's results API
//! (ListResults, status SIGNED, created since the oldest unsigned reported instance) and keeps
//! each new signature in the outbox, where report delivery finds it and sends the amended SR.

use crate::forwarder::StudyForwarder;
use crate::outbox::Outbox;
use crate::outcome::InferenceOutcome;

/// One look; failures are logged and the next look tries again.
pub async fn record_new_signatures(forwarder: &mut StudyForwarder, outbox: &Outbox) {
    let unsigned = match outbox.reported_unsigned().await {
        Ok(unsigned) => unsigned,
        Err(error) => {
            tracing::error!(error = %error, "the outbox cannot be read");
            return;
        }
    };
    let Some(oldest) = unsigned.iter().map(|(_, _, received)| *received).min() else {
        return;
    };
    // Results are created after their image arrived; an hour's margin covers clock skew.
    let since = time::OffsetDateTime::from_unix_timestamp(oldest / 1000 - 3600)
        .ok()
        .and_then(|at| {
            at.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default();
    let signed = match forwarder.signed_results(&since).await {
        Ok(signed) => signed,
        Err(error) => {
            tracing::warn!(error = %error, "signatures not looked up; tried again later");
            return;
        }
    };
    for (tag, result_json, _) in &unsigned {
        let Ok(outcome) = serde_json::from_str::<InferenceOutcome>(result_json) else {
            continue;
        };
        let Some((_, signature)) = signed
            .iter()
            .find(|(result_id, _)| *result_id == outcome.result_id)
        else {
            continue;
        };
        let json = serde_json::to_string(signature).unwrap_or_default();
        match outbox.record_signature(tag, json).await {
            Ok(()) => {
                tracing::info!(meaning = %signature.meaning, "a reported result was signed; amended report due")
            }
            Err(error) => {
                tracing::error!(error = %error, "signature not kept; looked up again later")
            }
        }
    }
}
