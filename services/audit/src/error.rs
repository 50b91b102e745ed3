use medai_runtime::errors::{ErrorKind, ServiceError, to_status};

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{field} is required")]
    MissingField { field: &'static str },
    #[error("{field} is longer than {limit} bytes")]
    FieldTooLong { field: &'static str, limit: usize },
    #[error("context_json must be a JSON object")]
    ContextNotAnObject,
    #[error("a batch must hold at least one event")]
    BatchEmpty,
    #[error("a batch may hold at most {events} events and {bytes} bytes of fields")]
    BatchTooLarge { events: usize, bytes: usize },
    #[error("the requested seq or tree size is outside the ledger")]
    OutOfRange,
    #[error("the page token is not valid")]
    PageTokenInvalid,
    #[error("the ledger does not verify at seq {seq}; no checkpoint is signed over it")]
    ChainBroken { seq: u64 },
    #[error(
        "the ledger refuses appends: it does not extend its last committed head or signed checkpoint"
    )]
    ChainAnchorViolation,
    #[error(
        "the ledger refuses appends: entries {first}..={last}, covered by a signed checkpoint, are missing from the database (restored from an older backup?)"
    )]
    BehindCheckpoint { first: u64, last: u64 },
    #[error("the ledger is unavailable")]
    LedgerUnavailable(String),
    #[error("storage failure: {0}")]
    Storage(String),
}

impl ServiceError for AuditError {
    const DOMAIN: &'static str = "medai.audit";

    fn kind(&self) -> ErrorKind {
        match self {
            Self::MissingField { .. }
            | Self::FieldTooLong { .. }
            | Self::ContextNotAnObject
            | Self::BatchEmpty
            | Self::BatchTooLarge { .. }
            | Self::OutOfRange
            | Self::PageTokenInvalid => ErrorKind::InvalidArgument,
            Self::ChainBroken { .. }
            | Self::ChainAnchorViolation
            | Self::BehindCheckpoint { .. } => ErrorKind::FailedPrecondition,
            Self::LedgerUnavailable(_) => ErrorKind::Unavailable,
            Self::Storage(_) => ErrorKind::Internal,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::MissingField { .. } => "FIELD_MISSING",
            Self::FieldTooLong { .. } => "FIELD_TOO_LONG",
            Self::ContextNotAnObject => "CONTEXT_NOT_OBJECT",
            Self::BatchEmpty => "BATCH_EMPTY",
            Self::BatchTooLarge { .. } => "BATCH_TOO_LARGE",
            Self::OutOfRange => "OUT_OF_RANGE",
            Self::PageTokenInvalid => "PAGE_TOKEN_INVALID",
            Self::ChainBroken { .. } => "LEDGER_CHAIN_BROKEN",
            Self::ChainAnchorViolation => "LEDGER_ANCHOR_VIOLATION",
            Self::BehindCheckpoint { .. } => "LEDGER_BEHIND_CHECKPOINT",
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
