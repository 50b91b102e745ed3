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
}

impl ServiceError for GatewayError {
    const DOMAIN: &'static str = "medai.gateway";

    fn kind(&self) -> ErrorKind {
        match self {
            Self::ImageTooLarge { .. } => ErrorKind::InvalidArgument,
            Self::DownstreamUnavailable { .. } | Self::LedgerUnavailable => ErrorKind::Unavailable,
            Self::CallerMissing => ErrorKind::Unauthenticated,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::ImageTooLarge { .. } => "IMAGE_TOO_LARGE",
            Self::DownstreamUnavailable { .. } => "DOWNSTREAM_UNAVAILABLE",
            Self::LedgerUnavailable => "LEDGER_UNAVAILABLE",
            Self::CallerMissing => "TOKEN_MISSING",
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
