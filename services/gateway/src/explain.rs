//! Explanations of delivered results (issue 18): the client sends the result's image again
//! (images are never stored), the gateway checks it is that result's image, has validation
//! canonicalise it, has inference compute the occlusion map with the version that produced
//! the result, records the view in the ledger (bound to the result's content hash and the heat
//! map's hash), and only then answers; the explanation is then noted on the result.

use std::time::{Duration, Instant};

use medai_proto::audit::v1::AppendRequest;
use medai_proto::gateway::v1 as gw;
use medai_proto::inference::v1::{ExplainResultRequest, RecordExplanationRequest};
use medai_proto::validation::v1::ValidateImageRequest;
use sha2::{Digest, Sha256};
use tonic::Status;

use crate::downstream::Downstream;
use crate::error::{GatewayError, relay_downstream};
use crate::token_auth::Caller;

/// The longest an explanation may take when the caller names no deadline; the inference
/// service bounds it too (`explanation_time_limit_seconds`).
const EXPLANATION_BOUND: Duration = Duration::from_secs(180);

pub async fn explain_result(
    downstream: &Downstream,
    caller: &Caller,
    request: gw::ExplainResultRequest,
    max_image_bytes: usize,
    correlation: &str,
    deadline: Option<Instant>,
) -> Result<gw::ExplainResultResponse, Status> {
    if request.image.len() > max_image_bytes {
        return Err(GatewayError::ImageTooLarge {
            actual: request.image.len(),
            limit: max_image_bytes,
        }
        .into());
    }
    let time_left = || deadline.map(|at| at.saturating_duration_since(Instant::now()));
    // Unknown, hidden and undelivered results are all "not found", as for GetResult.
    let result = crate::results::fetch_visible(
        downstream,
        caller,
        &request.result_id,
        correlation,
        deadline,
    )
    .await?;
    let image_sha256 = hex::encode(Sha256::digest(&request.image));
    if image_sha256 != result.image_sha256 {
        return Err(GatewayError::ImageNotOfResult.into());
    }
    let canonical = downstream
        .validation
        .clone()
        .validate_image(downstream.request(
            ValidateImageRequest {
                image: request.image.into(),
                format: request.format,
                model_name: result.model_name.clone(),
                // The full image: an explanation is rare, and the version that explains may
                // be a canary or shadow of another input size.
                model_input_size: None,
            },
            correlation,
            time_left(),
        ))
        .await
        .map_err(|status| relay_downstream("validation", status))?
        .into_inner()
        .image;
    let mut explain = downstream.request(
        ExplainResultRequest {
            result_id: result.result_id.clone(),
            image: canonical,
            grid_rows: request.grid_rows,
            grid_columns: request.grid_columns,
        },
        correlation,
        None,
    );
    // Explanations take many forward passes: their own bound, not the per-call one.
    explain.set_timeout(time_left().map_or(EXPLANATION_BOUND, |left| left.min(EXPLANATION_BOUND)));
    let explanation = downstream
        .inference
        .clone()
        .explain_result(explain)
        .await
        .map_err(|status| relay_downstream("inference", status))?
        .into_inner()
        .explanation
        .ok_or(GatewayError::DownstreamUnavailable {
            service: "inference",
        })?;

    let resource = format!("result/{}", result.result_id);
    let context = serde_json::json!({
        "correlation_id": correlation,
        "content_sha256": result.content_sha256,
        "model_version": explanation.model_version,
        "target_label": explanation.target_label,
        "grid_rows": explanation.grid_rows,
        "grid_columns": explanation.grid_columns,
        "most_important_cell": [explanation.most_important_row, explanation.most_important_column],
        "heatmap_sha256": explanation.heatmap_sha256,
        "forward_passes": explanation.forward_passes,
    });
    let append = AppendRequest {
        actor: format!("user:{}", caller.subject),
        action: "RESULT_EXPLAINED".to_owned(),
        resource,
        outcome: "SUCCESS".to_owned(),
        context_json: context.to_string(),
    };
    // Recorded before it is answered; an explanation the ledger did not take is withheld.
    let ledger_seq = downstream
        .record(
            append,
            time_left().map(|left| left.max(Duration::from_secs(1))),
        )
        .await
        .map_err(|_| Status::from(GatewayError::LedgerUnavailable))?
        .seq;
    let noted = downstream
        .inference
        .clone()
        .record_explanation(downstream.request(
            RecordExplanationRequest {
                result_id: result.result_id.clone(),
                ledger_seq,
                grid_rows: explanation.grid_rows,
                grid_columns: explanation.grid_columns,
                heatmap_sha256: explanation.heatmap_sha256.clone(),
            },
            correlation,
            None,
        ))
        .await;
    if let Err(status) = noted {
        // Recorded in the ledger and answered; only the result's view will miss it.
        tracing::error!(code = ?status.code(), result_id = %result.result_id, "explanation not noted on the result");
    }
    Ok(gw::ExplainResultResponse {
        explanation: Some(explanation),
        ledger_seq,
    })
}
