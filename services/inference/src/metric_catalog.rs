//! Every family the inference service exports, with its HELP text. Per model and version: the
//! service's own request/queue/compute histograms (seconds), batch sizes, queue depth and
//! requests by code, and Triton's `nv_inference_*` families under Triton's names and labels
//! (`model`, `version`), so dashboards made for Triton work unchanged. Each version's series
//! are registered, at zero, when the version is loaded (see `batcher`).

pub const NV_REQUEST_SUCCESS: &str = "nv_inference_request_success";
pub const NV_REQUEST_FAILURE: &str = "nv_inference_request_failure";
pub const NV_INFERENCE_COUNT: &str = "nv_inference_count";
pub const NV_EXEC_COUNT: &str = "nv_inference_exec_count";
pub const NV_REQUEST_DURATION_US: &str = "nv_inference_request_duration_us";
pub const NV_QUEUE_DURATION_US: &str = "nv_inference_queue_duration_us";
pub const NV_COMPUTE_INFER_DURATION_US: &str = "nv_inference_compute_infer_duration_us";

/// The Triton families, whose names do not follow Prometheus' `_total` and base-unit
/// conventions because Triton's do not: `promtool check metrics` findings on these names
/// alone are expected.
pub const TRITON_FAMILIES: [&str; 7] = [
    NV_REQUEST_SUCCESS,
    NV_REQUEST_FAILURE,
    NV_INFERENCE_COUNT,
    NV_EXEC_COUNT,
    NV_REQUEST_DURATION_US,
    NV_QUEUE_DURATION_US,
    NV_COMPUTE_INFER_DURATION_US,
];

/// Describes the inference service's families. Idempotent; without an installed recorder it
/// does nothing.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "medai_inference_results_commits_total",
        "Transactions the results store committed on the prediction path, by write: result (one stored prediction) or delivery_notes (one group commit of delivery notes)."
    );
    describe_counter!(
        "medai_inference_delivery_notes_total",
        "Delivery notes (a prediction's ledger entry noted on its stored result) written; divided by the delivery_notes commits, the notes per commit."
    );
    describe_histogram!(
        "medai_inference_request_seconds",
        Unit::Seconds,
        "Time from a request entering the model's queue to its answer, per model and version."
    );
    describe_histogram!(
        "medai_inference_queue_seconds",
        Unit::Seconds,
        "Time a request waited in the model's queue before a run took it, per model and version."
    );
    describe_histogram!(
        "medai_inference_compute_seconds",
        Unit::Seconds,
        "Duration of one model run (one batch), per model and version."
    );
    describe_histogram!(
        "medai_inference_batch_size",
        "Rows one model run held, per model and version."
    );
    describe_gauge!(
        "medai_inference_queue_depth",
        "Requests queued and not yet taken by a model run, per model and version."
    );
    describe_counter!(
        "medai_inference_requests_total",
        "Inference requests per model, version and code (OK or the stable error reason)."
    );
    describe_counter!(
        NV_REQUEST_SUCCESS,
        "Number of successful inference requests, all batch sizes"
    );
    describe_counter!(
        NV_REQUEST_FAILURE,
        "Number of failed inference requests, all batch sizes"
    );
    describe_counter!(
        NV_INFERENCE_COUNT,
        "Number of inferences performed (does not include cached requests)"
    );
    describe_counter!(
        NV_EXEC_COUNT,
        "Number of model executions performed (does not include cached requests)"
    );
    describe_counter!(
        NV_REQUEST_DURATION_US,
        "Cumulative inference request duration in microseconds (includes cached requests)"
    );
    describe_counter!(
        NV_QUEUE_DURATION_US,
        "Cumulative inference queuing duration in microseconds (includes cached requests)"
    );
    describe_counter!(
        NV_COMPUTE_INFER_DURATION_US,
        "Cumulative compute inference duration in microseconds (does not include cached requests)"
    );
}
