use medai_runtime::errors::{ErrorKind, ServiceError, to_status};

/// Every refusal of the inference service, each with one stable reason code.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    #[error("no active model is named {name}")]
    ModelNotFound { name: String },
    #[error("model {name} is not serving version {version}")]
    VersionNotServed { name: String, version: String },
    #[error("an image is required")]
    ImageMissing,
    #[error("{0}")]
    ImageInconsistent(String),
    #[error("{0}")]
    TensorInvalid(String),
    #[error("{rows} rows in one request; this model takes 1 to {max}")]
    BatchTooLarge { rows: usize, max: usize },
    #[error("the model's queue is full; retry later")]
    QueueFull,
    #[error("the request's deadline passed while it waited in the queue")]
    DeadlinePassed,
    #[error("inference failed: {0}")]
    Failed(String),

    #[error("model {name} has no version {version} in the repository")]
    VersionUnknown { name: String, version: String },
    #[error("model {name} version {version} is retired and is never served again")]
    VersionRetired { name: String, version: String },
    #[error("model {name} version {version} is already {status}")]
    AlreadyInState {
        name: String,
        version: String,
        status: &'static str,
    },
    #[error("model {name} has no earlier active version to roll back to")]
    NoPreviousVersion { name: String },
    #[error("{0}")]
    IntegrityMismatch(String),
    #[error("the model version cannot be loaded: {0}")]
    LoadFailed(String),
    #[error("a reason for the change is required")]
    ReasonMissing,
    /// Another change to the model was made (on any replica) since this one was planned, or
    /// is being made now; nothing of this one was recorded or made.
    #[error("model {name} was changed concurrently; ask again on the current state")]
    LifecycleConflict { name: String },
    #[error("the change could not be recorded in the ledger, so it was not made")]
    LedgerUnavailable,
    #[error("the inference could not be recorded in the ledger, so no outputs are returned")]
    InferenceUnrecorded,
    #[error("the caller presented no service identity")]
    CallerUnknown,
    #[error("only the gateway may relay a user's subject")]
    RelayRefused,

    #[error("no result has id {0}")]
    ResultNotFound(String),
    #[error("{0}")]
    QueryInvalid(String),
    #[error("the result is signed; a signed result never changes")]
    ResultAlreadySigned,
    #[error("the result's content is not what the signer was shown")]
    ResultContentChanged,
    /// A retry must be the same request as the one its key first named.
    #[error("this idempotency key was used for another image, model or version")]
    IdempotencyKeyReused,
    #[error("the results store failed")]
    Store,

    #[error("model {name} version {version} has no validation report and is not research use only")]
    ValidationReportMissing { name: String, version: String },
    #[error("the validation report of {name} version {version} does not match its SHA-256")]
    ValidationReportMismatch { name: String, version: String },
    #[error("{0}")]
    ValidationReportInvalid(String),
    #[error("{0}")]
    RolloutStateInvalid(String),
    #[error("share_percent must lie in 1..=99")]
    CanaryShareInvalid,

    #[error("{0}")]
    ExplanationGridInvalid(String),
    #[error("every explanation slot is taken; retry later")]
    ExplanationsBusy,
    #[error("the explanation did not finish within its time limit")]
    ExplanationTimeLimit,
}

impl ServiceError for InferenceError {
    const DOMAIN: &'static str = "medai.inference";

    fn kind(&self) -> ErrorKind {
        match self {
            Self::ModelNotFound { .. }
            | Self::VersionNotServed { .. }
            | Self::VersionUnknown { .. }
            | Self::ResultNotFound(_) => ErrorKind::NotFound,
            Self::ImageMissing
            | Self::ImageInconsistent(_)
            | Self::TensorInvalid(_)
            | Self::BatchTooLarge { .. }
            | Self::ReasonMissing
            | Self::ExplanationGridInvalid(_)
            | Self::CanaryShareInvalid
            | Self::QueryInvalid(_) => ErrorKind::InvalidArgument,
            Self::QueueFull | Self::ExplanationsBusy => ErrorKind::ResourceExhausted,
            Self::DeadlinePassed | Self::ExplanationTimeLimit => ErrorKind::DeadlineExceeded,
            Self::VersionRetired { .. }
            | Self::AlreadyInState { .. }
            | Self::NoPreviousVersion { .. }
            | Self::IntegrityMismatch(_)
            | Self::ResultAlreadySigned
            | Self::ResultContentChanged
            | Self::IdempotencyKeyReused
            | Self::ValidationReportMissing { .. }
            | Self::ValidationReportMismatch { .. }
            | Self::ValidationReportInvalid(_)
            | Self::RolloutStateInvalid(_) => ErrorKind::FailedPrecondition,
            Self::LifecycleConflict { .. } => ErrorKind::Aborted,
            Self::LedgerUnavailable | Self::InferenceUnrecorded => ErrorKind::Unavailable,
            Self::CallerUnknown | Self::RelayRefused => ErrorKind::PermissionDenied,
            Self::Failed(_) | Self::LoadFailed(_) | Self::Store => ErrorKind::Internal,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::ModelNotFound { .. } => "MODEL_NOT_FOUND",
            Self::VersionNotServed { .. } => "MODEL_VERSION_NOT_SERVED",
            Self::ImageMissing => "IMAGE_MISSING",
            Self::ImageInconsistent(_) => "IMAGE_INCONSISTENT",
            Self::TensorInvalid(_) => "TENSOR_INVALID",
            Self::BatchTooLarge { .. } => "BATCH_TOO_LARGE",
            Self::QueueFull => "INFERENCE_QUEUE_FULL",
            Self::DeadlinePassed => "DEADLINE_PASSED_IN_QUEUE",
            Self::Failed(_) => "INFERENCE_FAILED",
            Self::VersionUnknown { .. } => "MODEL_VERSION_UNKNOWN",
            Self::VersionRetired { .. } => "MODEL_VERSION_RETIRED",
            Self::AlreadyInState { .. } => "MODEL_VERSION_ALREADY_IN_STATE",
            Self::NoPreviousVersion { .. } => "NO_PREVIOUS_VERSION",
            Self::IntegrityMismatch(_) => "MODEL_INTEGRITY_MISMATCH",
            Self::LoadFailed(_) => "MODEL_LOAD_FAILED",
            Self::ReasonMissing => "REASON_MISSING",
            Self::LifecycleConflict { .. } => "LIFECYCLE_CONFLICT",
            Self::LedgerUnavailable | Self::InferenceUnrecorded => "LEDGER_UNAVAILABLE",
            Self::CallerUnknown => "CALLER_UNKNOWN",
            Self::RelayRefused => "SUBJECT_RELAY_REFUSED",
            Self::ResultNotFound(_) => "RESULT_NOT_FOUND",
            Self::QueryInvalid(_) => "QUERY_INVALID",
            Self::ResultAlreadySigned => "RESULT_ALREADY_SIGNED",
            Self::ResultContentChanged => "RESULT_CONTENT_CHANGED",
            Self::IdempotencyKeyReused => "IDEMPOTENCY_KEY_REUSED",
            Self::Store => "RESULTS_STORE_FAILED",
            Self::ValidationReportMissing { .. } => "VALIDATION_REPORT_MISSING",
            Self::ValidationReportMismatch { .. } => "VALIDATION_REPORT_MISMATCH",
            Self::ValidationReportInvalid(_) => "VALIDATION_REPORT_INVALID",
            Self::RolloutStateInvalid(_) => "ROLLOUT_STATE_INVALID",
            Self::CanaryShareInvalid => "CANARY_SHARE_INVALID",
            Self::ExplanationGridInvalid(_) => "EXPLANATION_GRID_INVALID",
            Self::ExplanationsBusy => "EXPLANATIONS_BUSY",
            Self::ExplanationTimeLimit => "EXPLANATION_TIME_LIMIT",
        }
    }
}

impl From<InferenceError> for tonic::Status {
    fn from(error: InferenceError) -> Self {
        to_status(&error)
    }
}
