//! Every family the gateway exports, with its HELP text, and the counters alerts watch
//! registered at zero, so a rule sees 0 rather than nothing before the first event.

/// Predictions computed but answered with an error because their audit record failed.
pub const UNRECORDED_PREDICTIONS: &str = "medai_gateway_unrecorded_predictions_total";
/// Rate-limit checks decided by this process because Redis did not answer.
pub const RATE_LIMIT_FALLBACK: &str = "medai_gateway_rate_limit_fallback_total";
pub const TOKEN_CHECKS: &str = "medai_gateway_token_checks_total";
/// Verified tokens, by whether the signature was checked or the token was verified before.
pub const TOKEN_VERIFICATIONS: &str = "medai_gateway_token_verifications_total";

/// Token-check outcomes that refuse a call, registered at zero (the reason-coded ones appear
/// on first use).
const REFUSING_TOKEN_OUTCOMES: [&str; 5] = [
    "missing",
    "keys_unavailable",
    "TOKEN_REVOKED",
    "revocation_unavailable",
    "role_denied",
];

/// Describes the gateway's families and registers its watched counters at zero. Idempotent;
/// without an installed recorder it does nothing.
pub fn describe() {
    use metrics::describe_counter;
    describe_counter!(
        TOKEN_CHECKS,
        "Access-token checks by outcome: ok, or why the call was refused (missing, a token error code, keys_unavailable, TOKEN_REVOKED, revocation_unavailable, role_denied)."
    );
    describe_counter!(
        TOKEN_VERIFICATIONS,
        "Tokens that verified, by verification: signature_checked (first use of a token) or cached (verified before; expiry and key checked again)."
    );
    describe_counter!(
        RATE_LIMIT_FALLBACK,
        "Rate-limit checks decided by this process's own budget because Redis did not answer."
    );
    describe_counter!(
        "medai_gateway_rate_limited_total",
        "Calls or stream messages refused RESOURCE_EXHAUSTED by a rate limit, by scope."
    );
    describe_counter!(
        "medai_gateway_shed_total",
        "Calls refused because the gateway already held its maximum of calls in flight."
    );
    describe_counter!(
        "medai_gateway_idempotent_replays_total",
        "Requests answered from the stored result of an earlier request with the same idempotency key."
    );
    describe_counter!(
        "medai_gateway_idempotency_key_reused_total",
        "Requests refused because their idempotency key was used before for a different image."
    );
    describe_counter!(
        UNRECORDED_PREDICTIONS,
        "Predictions computed but not returned because their audit record could not be written (fail closed)."
    );
    describe_counter!(
        "medai_gateway_unstored_predictions_total",
        "Predictions not returned because their result's commit failed after it was handed to the results store (the ledger records the refusal)."
    );
    describe_counter!(
        "medai_gateway_unnoted_deliveries_total",
        "Predictions returned whose delivery could not be noted in the results store."
    );
    describe_counter!(
        "medai_gateway_uploads_refused_total",
        "Image uploads refused before they were complete, by reason."
    );
    describe_counter!(
        "medai_gateway_uploads_resumed_total",
        "Resumable uploads continued from a held offset on a new stream."
    );
    describe_counter!("medai_gateway_study_streams_total", "Study streams opened.");
    describe_counter!(
        "medai_gateway_study_images_total",
        "Images received over study streams."
    );
    describe_counter!(
        "medai_gateway_study_answers_undelivered_total",
        "Study-stream answers that could not be delivered because the client had gone."
    );
    medai_revocation::describe_metrics();
    metrics::counter!(UNRECORDED_PREDICTIONS).increment(0);
    metrics::counter!(RATE_LIMIT_FALLBACK).increment(0);
    metrics::counter!("medai_gateway_shed_total").increment(0);
    metrics::counter!(TOKEN_CHECKS, "outcome" => "ok").increment(0);
    for outcome in REFUSING_TOKEN_OUTCOMES {
        metrics::counter!(TOKEN_CHECKS, "outcome" => outcome).increment(0);
    }
}
