use medai_runtime::errors::{ErrorKind, ServiceError, to_status};

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("the image has {actual} bytes; the limit is {limit}")]
    ImageTooLarge { actual: usize, limit: usize },
    #[error("the {service} service is unavailable")]
    DownstreamUnavailable { service: &'static str },
    /// Fail closed: a prediction is only returned with its ledger record.
    #[error("the prediction could not be recorded in the audit ledger; no result is returned")]
    LedgerUnavailable,
    #[error("the caller's identity is missing")]
    CallerMissing,
    #[error("the idempotency key is longer than {limit} characters")]
    IdempotencyKeyTooLong { limit: usize },
    #[error("the deadline passed before the prediction could be delivered")]
    DeadlinePassed,
    #[error("an upload starts with its header, and only the first message is one")]
    UploadOutOfOrder,
    #[error("the upload ended after {received} of the {declared} bytes it declared")]
    UploadIncomplete { received: u64, declared: u64 },
    #[error("every image on a study stream needs a tag")]
    TagMissing,
    #[error("client_request_id takes 1 to 64 of A-Z a-z 0-9 - _ .")]
    ClientRequestIdInvalid,
    /// Answers are matched to images by tag; two images in flight with one tag could not be.
    #[error("another image with this tag is in flight on this stream")]
    TagInFlight,
    /// A retry must be the same request: the key names one image, model and version.
    #[error("this idempotency key was used for another image, model or version")]
    IdempotencyKeyReused,
    /// The caller went away before its answer could be handed over; nothing is recorded.
    #[error("the caller is gone")]
    CallerGone,
    #[error("the access token expired while the stream was open")]
    TokenExpired,
    #[error("the token has been revoked")]
    TokenRevoked,
    #[error("tokens cannot be checked for revocation right now")]
    RevocationUnavailable,
    #[error("viewers see signed results only")]
    ViewerSeesSignedOnly,
    #[error("no result has that id")]
    ResultNotFound,
    #[error("{0}")]
    SignatureInvalid(String),
    /// An explanation is of the result's own image, named by its SHA-256.
    #[error("the image is not the one this result was predicted from")]
    ImageNotOfResult,
    #[error("upload_id takes 1 to 64 of A-Z a-z 0-9 - _ .")]
    UploadIdInvalid,
    /// A resumable upload is complete when its declared size has arrived.
    #[error("a resumable upload needs its declared_size")]
    UploadSizeRequired,
    /// Unknown, expired, finished, or another identity's: the same answer for each.
    #[error("the gateway holds no such upload of yours; start it again from offset 0")]
    UploadUnknown,
    #[error("the upload holds {expected} bytes; resume from offset {expected}, not {given}")]
    UploadOffsetMismatch { expected: u64, given: u64 },
    #[error(
        "a resumed upload repeats its first header (model, version, format, size, idempotency key)"
    )]
    UploadHeaderMismatch,
    #[error("another stream is writing to this upload")]
    UploadInUse,
    #[error("the gateway holds as many unfinished uploads as it may; retry later")]
    UploadsFull,
    #[error("too many requests; retry after {retry_after_ms} ms")]
    RateLimited { retry_after_ms: u64 },
    #[error("the gateway is at capacity; retry after {retry_after_ms} ms")]
    Overloaded { retry_after_ms: u64 },
}

impl ServiceError for GatewayError {
    const DOMAIN: &'static str = "medai.gateway";

    fn kind(&self) -> ErrorKind {
        match self {
            Self::ImageTooLarge { .. } => ErrorKind::InvalidArgument,
            Self::DownstreamUnavailable { .. } | Self::LedgerUnavailable => ErrorKind::Unavailable,
            Self::CallerMissing | Self::TokenExpired | Self::TokenRevoked => {
                ErrorKind::Unauthenticated
            }
            Self::RevocationUnavailable | Self::CallerGone => ErrorKind::Unavailable,
            Self::IdempotencyKeyReused
            | Self::UploadOffsetMismatch { .. }
            | Self::UploadHeaderMismatch => ErrorKind::FailedPrecondition,
            Self::UploadIdInvalid | Self::UploadSizeRequired => ErrorKind::InvalidArgument,
            Self::UploadUnknown => ErrorKind::NotFound,
            Self::UploadInUse => ErrorKind::Aborted,
            Self::UploadsFull => ErrorKind::ResourceExhausted,
            Self::IdempotencyKeyTooLong { .. }
            | Self::UploadOutOfOrder
            | Self::UploadIncomplete { .. }
            | Self::TagMissing
            | Self::TagInFlight
            | Self::ClientRequestIdInvalid
            | Self::SignatureInvalid(_)
            | Self::ImageNotOfResult => ErrorKind::InvalidArgument,
            Self::DeadlinePassed => ErrorKind::DeadlineExceeded,
            Self::ViewerSeesSignedOnly => ErrorKind::PermissionDenied,
            Self::ResultNotFound => ErrorKind::NotFound,
            Self::RateLimited { .. } | Self::Overloaded { .. } => ErrorKind::ResourceExhausted,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::ImageTooLarge { .. } => "IMAGE_TOO_LARGE",
            Self::DownstreamUnavailable { .. } => "DOWNSTREAM_UNAVAILABLE",
            Self::LedgerUnavailable => "LEDGER_UNAVAILABLE",
            Self::CallerMissing => "TOKEN_MISSING",
            Self::IdempotencyKeyTooLong { .. } => "IDEMPOTENCY_KEY_TOO_LONG",
            Self::DeadlinePassed => "DEADLINE_PASSED",
            Self::UploadOutOfOrder => "UPLOAD_OUT_OF_ORDER",
            Self::UploadIncomplete { .. } => "UPLOAD_INCOMPLETE",
            Self::TagMissing => "TAG_MISSING",
            Self::TagInFlight => "TAG_IN_FLIGHT",
            Self::ClientRequestIdInvalid => "CLIENT_REQUEST_ID_INVALID",
            Self::IdempotencyKeyReused => "IDEMPOTENCY_KEY_REUSED",
            Self::CallerGone => "CALLER_GONE",
            Self::TokenExpired => "TOKEN_EXPIRED",
            Self::TokenRevoked => "TOKEN_REVOKED",
            Self::RevocationUnavailable => "REVOCATION_UNAVAILABLE",
            Self::ViewerSeesSignedOnly => "VIEWER_SEES_SIGNED_ONLY",
            Self::ResultNotFound => "RESULT_NOT_FOUND",
            Self::SignatureInvalid(_) => "SIGNATURE_INVALID",
            Self::ImageNotOfResult => "IMAGE_NOT_OF_RESULT",
            Self::UploadIdInvalid => "UPLOAD_ID_INVALID",
            Self::UploadSizeRequired => "UPLOAD_SIZE_REQUIRED",
            Self::UploadUnknown => "UPLOAD_UNKNOWN",
            Self::UploadOffsetMismatch { .. } => "UPLOAD_OFFSET_MISMATCH",
            Self::UploadHeaderMismatch => "UPLOAD_HEADER_MISMATCH",
            Self::UploadInUse => "UPLOAD_IN_USE",
            Self::UploadsFull => "UPLOADS_FULL",
            Self::RateLimited { .. } => "RATE_LIMITED",
            Self::Overloaded { .. } => "OVERLOADED",
        }
    }

    fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            Self::RateLimited { retry_after_ms } | Self::Overloaded { retry_after_ms } => {
                Some(std::time::Duration::from_millis(*retry_after_ms))
            }
            _ => None,
        }
    }
}

impl From<GatewayError> for tonic::Status {
    fn from(error: GatewayError) -> Self {
        to_status(&error)
    }
}

/// A downstream refusal that speaks to the caller (bad image, unknown model, limits, deadline)
/// passes through with its code and details; anything else means that service is unavailable.
pub fn relay_downstream(service: &'static str, status: tonic::Status) -> tonic::Status {
    use tonic::Code;
    match status.code() {
        Code::InvalidArgument
        | Code::NotFound
        | Code::ResourceExhausted
        | Code::DeadlineExceeded
        | Code::Unauthenticated
        | Code::FailedPrecondition => status,
        code => {
            tracing::warn!(service, code = ?code, "downstream call failed");
            GatewayError::DownstreamUnavailable { service }.into()
        }
    }
}

/// The inference service's own refusals for signatures, raised early by the gateway with the
/// same domain and codes the results store would use.
pub fn status_already_signed() -> tonic::Status {
    medai_runtime::errors::status_with_reason(
        ErrorKind::FailedPrecondition,
        "medai.inference",
        "RESULT_ALREADY_SIGNED",
        "the result is signed; a signed result never changes",
    )
}

pub fn status_content_changed() -> tonic::Status {
    medai_runtime::errors::status_with_reason(
        ErrorKind::FailedPrecondition,
        "medai.inference",
        "RESULT_CONTENT_CHANGED",
        "the result's content is not what the signer was shown",
    )
}
