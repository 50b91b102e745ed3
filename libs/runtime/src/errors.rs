//! One small catalogue of error kinds with one mapping to `tonic::Code`. Every service has its
//! own thiserror enum that implements [`ServiceError`]; [`to_status`] turns it into a `Status`
//! in exactly one place, with a machine-readable `google.rpc.ErrorInfo` detail whose `reason`
//! is the stable code clients match on.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidArgument,
    Unauthenticated,
    PermissionDenied,
    NotFound,
    FailedPrecondition,
    ResourceExhausted,
    /// A test-and-set lost to a concurrent change; retry from fresh state.
    Aborted,
    DeadlineExceeded,
    Unavailable,
    Internal,
}

impl ErrorKind {
    pub fn grpc_code(self) -> Code {
        match self {
            Self::InvalidArgument => Code::InvalidArgument,
            Self::Unauthenticated => Code::Unauthenticated,
            Self::PermissionDenied => Code::PermissionDenied,
            Self::NotFound => Code::NotFound,
            Self::FailedPrecondition => Code::FailedPrecondition,
            Self::ResourceExhausted => Code::ResourceExhausted,
            Self::Aborted => Code::Aborted,
            Self::DeadlineExceeded => Code::DeadlineExceeded,
            Self::Unavailable => Code::Unavailable,
            Self::Internal => Code::Internal,
        }
    }
}

/// Implemented by each service's error enum.
pub trait ServiceError: std::error::Error {
    /// The `ErrorInfo.domain`, for example `medai.validation`.
    const DOMAIN: &'static str;
    fn kind(&self) -> ErrorKind;
    /// The stable, machine-readable code, for example `IMAGE_TOO_LARGE`.
    fn reason(&self) -> &'static str;
    /// For refusals a client should retry: how long to wait, sent as google.rpc.RetryInfo.
    fn retry_after(&self) -> Option<std::time::Duration> {
        None
    }
    /// The message the caller sees. Internal errors hide their detail.
    fn public_message(&self) -> String {
        match self.kind() {
            ErrorKind::Internal => "internal error".to_owned(),
            _ => self.to_string(),
        }
    }
}

/// Errors answered, by `domain` and stable `reason` (both fixed strings of the code, never
/// request content).
pub const ERRORS_COUNTER: &str = "medai_errors_total";

/// The single conversion from a service error to a gRPC status. Internal errors are logged
/// here with their detail and answered with a generic message. Every one is counted.
pub fn to_status<E: ServiceError>(error: &E) -> Status {
    metrics::counter!(ERRORS_COUNTER, "domain" => E::DOMAIN, "reason" => error.reason())
        .increment(1);
    if error.kind() == ErrorKind::Internal {
        tracing::error!(domain = E::DOMAIN, reason = error.reason(), error = %error, "internal error");
    }
    let mut details =
        ErrorDetails::with_error_info(error.reason(), E::DOMAIN, std::collections::HashMap::new());
    if let Some(wait) = error.retry_after() {
        details.set_retry_info(Some(wait));
    }
    Status::with_error_details(error.kind().grpc_code(), error.public_message(), details)
}

/// How long a refused caller was told to wait, if the status says.
pub fn retry_after_of(status: &Status) -> Option<std::time::Duration> {
    status.get_details_retry_info()?.retry_delay
}

/// A status with an `ErrorInfo` detail, for the few places (tower layers) that refuse a call
/// before any service error exists.
pub fn status_with_reason(
    kind: ErrorKind,
    domain: &str,
    reason: &str,
    message: impl Into<String>,
) -> Status {
    let details = ErrorDetails::with_error_info(reason, domain, std::collections::HashMap::new());
    Status::with_error_details(kind.grpc_code(), message, details)
}

/// A status as the HTTP response a tower layer answers with, before any handler runs.
pub fn refusal_response<ResBody: Default>(status: Status) -> http::Response<ResBody> {
    let (parts, ()) = status.into_http::<()>().into_parts();
    http::Response::from_parts(parts, ResBody::default())
}

/// The stable reason carried by a status, if it has one.
pub fn reason_of(status: &Status) -> Option<String> {
    status.get_details_error_info().map(|info| info.reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum ExampleError {
        #[error("image is too large")]
        TooLarge,
        #[error("database said: secret detail")]
        Database,
    }

    impl ServiceError for ExampleError {
        const DOMAIN: &'static str = "medai.example";
        fn kind(&self) -> ErrorKind {
            match self {
                Self::TooLarge => ErrorKind::InvalidArgument,
                Self::Database => ErrorKind::Internal,
            }
        }
        fn reason(&self) -> &'static str {
            match self {
                Self::TooLarge => "IMAGE_TOO_LARGE",
                Self::Database => "INTERNAL",
            }
        }
    }

    #[test]
    fn reason_travels_in_error_info() {
        let status = to_status(&ExampleError::TooLarge);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(reason_of(&status).as_deref(), Some("IMAGE_TOO_LARGE"));
        assert_eq!(status.message(), "image is too large");
    }

    #[test]
    fn internal_detail_is_not_sent_to_the_caller() {
        let status = to_status(&ExampleError::Database);
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("secret"));
    }
}
