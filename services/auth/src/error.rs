use medai_runtime::errors::{ErrorKind, ServiceError, to_status};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Unknown user and wrong password look the same to the caller.
    #[error("invalid username or password")]
    InvalidCredentials,
    #[error("the account is disabled")]
    AccountDisabled,
    #[error("username and password are required")]
    MissingCredentials,
    /// Fail closed: no token is issued unless the login is recorded.
    #[error("the login could not be recorded in the audit ledger")]
    LedgerUnavailable,
    #[error("internal failure: {0}")]
    Internal(String),
}

impl ServiceError for AuthError {
    const DOMAIN: &'static str = "medai.auth";

    fn kind(&self) -> ErrorKind {
        match self {
            Self::InvalidCredentials | Self::AccountDisabled => ErrorKind::Unauthenticated,
            Self::MissingCredentials => ErrorKind::InvalidArgument,
            Self::LedgerUnavailable => ErrorKind::Unavailable,
            Self::Internal(_) => ErrorKind::Internal,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::InvalidCredentials => "INVALID_CREDENTIALS",
            Self::AccountDisabled => "ACCOUNT_DISABLED",
            Self::MissingCredentials => "CREDENTIALS_MISSING",
            Self::LedgerUnavailable => "LEDGER_UNAVAILABLE",
            Self::Internal(_) => "INTERNAL",
        }
    }
}

impl From<AuthError> for tonic::Status {
    fn from(error: AuthError) -> Self {
        to_status(&error)
    }
}
