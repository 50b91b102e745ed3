use medai_runtime::errors::{ErrorKind, ServiceError, to_status};

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{field} is required")]
    MissingField { field: &'static str },
    #[error("{field} is longer than {limit} bytes")]
    FieldTooLong { field: &'static str, limit: usize },
    #[error("context_json must be a JSON object")]
    ContextNotAnObject,
    #[error("the ledger is unavailable")]
    LedgerUnavailable(String),
    #[error("storage failure: {0}")]
    Storage(String),
}

impl ServiceError for AuditError {
    const DOMAIN: &'static str = "medai.audit";

    fn kind(&self) -> ErrorKind {
        match self {
            Self::MissingField { .. } | Self::FieldTooLong { .. } | Self::ContextNotAnObject => {
                ErrorKind::InvalidArgument
            }
            Self::LedgerUnavailable(_) => ErrorKind::Unavailable,
            Self::Storage(_) => ErrorKind::Internal,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::MissingField { .. } => "FIELD_MISSING",
            Self::FieldTooLong { .. } => "FIELD_TOO_LONG",
            Self::ContextNotAnObject => "CONTEXT_NOT_OBJECT",
            Self::LedgerUnavailable(_) => "LEDGER_UNAVAILABLE",
            Self::Storage(_) => "INTERNAL",
        }
    }
}

impl From<AuditError> for tonic::Status {
    fn from(error: AuditError) -> Self {
        to_status(&error)
    }
}
