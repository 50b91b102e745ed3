//! Results as people see them: read and listed through the gateway (each read recorded in the
//! ledger), and signed electronically (21 CFR 11.50, 11.70, 11.200).

use medai_proto::audit::v1::AppendRequest;
use medai_proto::auth::v1::ConsumeSigningTicketRequest;
use medai_proto::gateway::v1 as gw;
use medai_proto::inference::v1::{
    GetResultRequest, ListResultsRequest, ResultSignature, SignResultRequest, StoredResult,
};
use std::time::{Duration, Instant};

use medai_tokens::Role;
use sha2::{Digest, Sha256};
use tonic::Status;

use crate::delivery_notes::NOTE_WAIT_FOR_READS;
use crate::downstream::Downstream;
use crate::error::{GatewayError, relay_downstream};
use crate::token_auth::Caller;

const SIGNED: &str = "SIGNED";
/// The route of a shadow version's result: stored beside the delivered one, never delivered.
const SHADOW: &str = "SHADOW";
const MEANINGS: [&str; 3] = ["REVIEWED", "APPROVED", "REJECTED"];
const MAX_REASON_CHARS: usize = 1000;

/// Only results whose delivery is in the ledger exist for people; viewers see signed ones only.
fn visible_to(caller: &Caller, result: &StoredResult) -> bool {
    result.ledger_seq > 0 && (caller.role != Role::Viewer || result.status == SIGNED)
}

/// What is left of the caller's deadline, for a downstream call.
fn time_left(deadline: Option<Instant>) -> Option<Duration> {
    deadline.map(|at| at.saturating_duration_since(Instant::now()))
}

#[allow(clippy::too_many_arguments)]
async fn record(
    downstream: &Downstream,
    caller: &Caller,
    action: &str,
    resource: String,
    outcome: &str,
    context: serde_json::Value,
    deadline: Option<Instant>,
) -> Result<u64, Status> {
    let append = AppendRequest {
        actor: format!("user:{}", caller.subject),
        action: action.to_owned(),
        resource,
        outcome: outcome.to_owned(),
        context_json: context.to_string(),
    };
    downstream
        .record(append, time_left(deadline))
        .await
        .map(|receipt| receipt.seq)
        .map_err(|_| GatewayError::LedgerUnavailable.into())
}

async fn fetch(
    downstream: &Downstream,
    result_id: &str,
    correlation: &str,
    deadline: Option<Instant>,
) -> Result<StoredResult, Status> {
    if uuid::Uuid::parse_str(result_id).is_err() {
        return Err(GatewayError::ResultNotFound.into());
    }
    // What this gateway has answered is shown as delivered: its notes begun before this read
    // are written first (a note is written while its answer leaves, see `delivery_notes`).
    downstream
        .notes
        .written_before_now(NOTE_WAIT_FOR_READS)
        .await;
    let found = downstream
        .inference
        .clone()
        .get_result(downstream.request(
            GetResultRequest {
                result_id: result_id.to_owned(),
                idempotency_key: String::new(),
            },
            correlation,
            time_left(deadline),
        ))
        .await;
    let mut result = match found {
        Ok(response) => response
            .into_inner()
            .result
            .ok_or(GatewayError::ResultNotFound)?,
        Err(status) if status.code() == tonic::Code::NotFound => {
            return Err(GatewayError::ResultNotFound.into());
        }
        Err(status) => return Err(relay_downstream("inference", status)),
    };
    if result.ledger_seq == 0
        && let Some((seq, _)) =
            crate::infer::delivery_in_ledger(downstream, correlation, result_id).await?
    {
        // Delivered, but its note is missing: another gateway is writing it, or the gateway
        // that answered was killed first. The ledger record is the delivery's: noted now.
        crate::infer::note_delivery(downstream, correlation, result_id, seq).await;
        result.ledger_seq = seq;
    }
    Ok(result)
}

/// A result the caller may see, read without recording a view (the caller records its own).
pub async fn fetch_visible(
    downstream: &Downstream,
    caller: &Caller,
    result_id: &str,
    correlation: &str,
    deadline: Option<Instant>,
) -> Result<StoredResult, Status> {
    let result = fetch(downstream, result_id, correlation, deadline).await?;
    if !visible_to(caller, &result) {
        return Err(GatewayError::ResultNotFound.into());
    }
    Ok(result)
}

/// One result, if the caller may see it; the read is recorded before it is answered.
pub async fn get_result(
    downstream: &Downstream,
    caller: &Caller,
    result_id: &str,
    correlation: &str,
    deadline: Option<Instant>,
) -> Result<StoredResult, Status> {
    let result = fetch(downstream, result_id, correlation, deadline).await?;
    if !visible_to(caller, &result) {
        // Not "forbidden": whether a hidden result exists is not the caller's business.
        return Err(GatewayError::ResultNotFound.into());
    }
    let context = serde_json::json!({
        "correlation_id": correlation,
        "status": result.status,
    });
    record(
        downstream,
        caller,
        "RESULT_READ",
        format!("result/{result_id}"),
        "SUCCESS",
        context,
        deadline,
    )
    .await?;
    Ok(result)
}

/// A page of results the caller may see; the listing is recorded before it is answered.
pub async fn list_results(
    downstream: &Downstream,
    caller: &Caller,
    filter: Option<ListResultsRequest>,
    correlation: &str,
    deadline: Option<Instant>,
) -> Result<gw::ListResultsResponse, Status> {
    let mut filter = filter.unwrap_or_default();
    if caller.role == Role::Viewer {
        if !filter.status.is_empty() && filter.status != SIGNED {
            return Err(GatewayError::ViewerSeesSignedOnly.into());
        }
        filter.status = SIGNED.to_owned();
    }
    // Delivered is what the ledger says, not only what a note on the stored result says: a
    // result answered through another gateway replica whose note is still being written there
    // (or was lost with that replica) is listed at once all the same (issue 14). So the store
    // lists every result but shadow ones (never delivered), and each one not yet noted is
    // looked up in the ledger: listed and noted when its delivery is recorded there, left out
    // when not (its prediction was never answered). A page may therefore hold fewer results
    // than page_size; its next_page_token still continues after all it covered.
    filter.delivered_only = false;
    // The notes of this gateway's answers begun before the listing are written first, so they
    // need no look-up.
    downstream
        .notes
        .written_before_now(NOTE_WAIT_FOR_READS)
        .await;
    let page = downstream
        .inference
        .clone()
        .list_results(downstream.request(filter.clone(), correlation, time_left(deadline)))
        .await
        .map_err(|status| relay_downstream("inference", status))?
        .into_inner();
    let mut delivered = Vec::with_capacity(page.results.len());
    for mut result in page.results {
        if result.route == SHADOW {
            continue;
        }
        if result.ledger_seq == 0 {
            let Some((seq, _)) =
                crate::infer::delivery_in_ledger(downstream, correlation, &result.result_id)
                    .await?
            else {
                continue;
            };
            crate::infer::note_beside_the_answer(downstream, correlation, &result.result_id, seq);
            result.ledger_seq = seq;
        }
        delivered.push(result);
    }
    let ids: Vec<&str> = delivered
        .iter()
        .map(|result| result.result_id.as_str())
        .collect();
    let context = serde_json::json!({
        "correlation_id": correlation,
        "model": filter.model_name,
        "status": filter.status,
        "created_from": filter.created_from,
        "created_until": filter.created_until,
        "result_ids": ids,
    });
    record(
        downstream,
        caller,
        "RESULTS_LISTED",
        "results".to_owned(),
        "SUCCESS",
        context,
        deadline,
    )
    .await?;
    Ok(gw::ListResultsResponse {
        results: delivered,
        next_page_token: page.next_page_token,
    })
}

fn check_signature_request(request: &gw::SignResultRequest) -> Result<(), GatewayError> {
    if !MEANINGS.contains(&request.meaning.as_str()) {
        return Err(GatewayError::SignatureInvalid(
            "meaning must be REVIEWED, APPROVED or REJECTED".to_owned(),
        ));
    }
    if request.meaning == "REJECTED" && request.reason.trim().is_empty() {
        return Err(GatewayError::SignatureInvalid(
            "a rejection needs its reason".to_owned(),
        ));
    }
    if request.reason.chars().count() > MAX_REASON_CHARS {
        return Err(GatewayError::SignatureInvalid(format!(
            "the reason is longer than {MAX_REASON_CHARS} characters"
        )));
    }
    if request.content_sha256.len() != 64 {
        return Err(GatewayError::SignatureInvalid(
            "content_sha256 must name the content the signer was shown".to_owned(),
        ));
    }
    Ok(())
}

/// Now, to the microsecond the results store keeps, so ledger and store show the same time.
fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    now.replace_nanosecond(now.nanosecond() / 1000 * 1000)
        .unwrap_or(now)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Signs a result: the ticket proves the signer re-entered their password; the ledger record
/// (written first) binds signer, time and meaning to the content hash; the store then marks
/// the result signed, once. A signature the store refuses is voided in the ledger.
pub async fn sign_result(
    downstream: &Downstream,
    caller: &Caller,
    request: gw::SignResultRequest,
    correlation: &str,
    deadline: Option<Instant>,
) -> Result<gw::SignResultResponse, Status> {
    check_signature_request(&request)?;
    let signer = downstream
        .auth
        .clone()
        .consume_signing_ticket(downstream.request(
            ConsumeSigningTicketRequest {
                actor: caller.subject.clone(),
                signing_ticket: request.signing_ticket.clone(),
                correlation_id: correlation.to_owned(),
            },
            correlation,
            time_left(deadline),
        ))
        .await
        .map_err(|status| relay_downstream("auth", status))?
        .into_inner();
    let result = fetch(downstream, &request.result_id, correlation, deadline).await?;
    if !visible_to(caller, &result) {
        return Err(GatewayError::ResultNotFound.into());
    }
    if result.status == SIGNED {
        return Err(crate::error::status_already_signed());
    }
    if result.content_sha256 != request.content_sha256 {
        return Err(crate::error::status_content_changed());
    }
    let signed_at = now_rfc3339();
    let resource = format!("result/{}", request.result_id);
    // The reason is free text a person typed; the ledger keeps its hash, the store the text.
    let reason_sha256 = hex::encode(Sha256::digest(request.reason.as_bytes()));
    let context = serde_json::json!({
        "correlation_id": correlation,
        "content_sha256": result.content_sha256,
        "meaning": request.meaning,
        "reason_sha256": reason_sha256,
        "signed_at": signed_at,
        "signer_name": signer.username,
    });
    let ledger_seq = record(
        downstream,
        caller,
        "SIGNATURE",
        resource.clone(),
        "SUCCESS",
        context,
        deadline,
    )
    .await?;
    let signed = downstream
        .inference
        .clone()
        .sign_result(downstream.request(
            SignResultRequest {
                result_id: request.result_id.clone(),
                expected_content_sha256: request.content_sha256.clone(),
                signature: Some(ResultSignature {
                    signer_subject: caller.subject.clone(),
                    signer_name: signer.username.clone(),
                    meaning: request.meaning.clone(),
                    reason: request.reason.clone(),
                    signed_at,
                    ledger_seq,
                }),
            },
            correlation,
            time_left(deadline),
        ))
        .await;
    match signed {
        Ok(response) => Ok(gw::SignResultResponse {
            result: response.into_inner().result,
            ledger_seq,
        }),
        Err(status) => {
            let context = serde_json::json!({
                "correlation_id": correlation,
                "voids_seq": ledger_seq,
                "reason": medai_runtime::errors::reason_of(&status),
            });
            if let Err(error) = record(
                downstream,
                caller,
                "SIGNATURE_VOID",
                resource,
                "FAILURE",
                context,
                // The void must be recorded even if the caller has given up.
                None,
            )
            .await
            {
                tracing::error!(code = ?error.code(), seq = ledger_seq, "a refused signature could not be voided in the ledger");
            }
            Err(relay_downstream("inference", status))
        }
    }
}
