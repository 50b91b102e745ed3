use medai_runtime::errors::{ErrorKind, ServiceError, to_status};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Unknown user and wrong password look the same to the caller.
    #[error("invalid username or password")]
    InvalidCredentials,
    #[error("the account is locked after repeated failed logins; try again later")]
    AccountLocked,
    #[error("the account is disabled")]
    AccountDisabled,
    #[error("username and password are required")]
    MissingCredentials,
    #[error("the refresh token is not valid")]
    RefreshTokenInvalid,
    /// A used refresh token came back: its family is revoked.
    #[error("the refresh token was already used; every token of its session is revoked")]
    RefreshTokenReused,
    #[error("no such user")]
    UserNotFound,
    #[error("a user of that name exists")]
    UserExists,
    #[error("unknown role {0}")]
    RoleUnknown(String),
    #[error("the password {0}")]
    PasswordTooWeak(String),
    #[error("the signing ticket is not valid")]
    SigningTicketInvalid,
    /// Fail closed: nothing is granted or changed unless it is recorded.
    #[error("the action could not be recorded in the audit ledger")]
    LedgerUnavailable,
    #[error("the revocation store is unavailable")]
    RevocationUnavailable,
    /// Too many password hashes are running or waiting; retry shortly.
    #[error("the service is busy; retry shortly")]
    Busy,
    #[error("internal failure: {0}")]
    Internal(String),
}

impl ServiceError for AuthError {
    const DOMAIN: &'static str = "medai.auth";

    fn kind(&self) -> ErrorKind {
        match self {
            Self::InvalidCredentials
            | Self::AccountLocked
            | Self::AccountDisabled
            | Self::RefreshTokenInvalid
            | Self::RefreshTokenReused
            | Self::SigningTicketInvalid => ErrorKind::Unauthenticated,
            Self::MissingCredentials | Self::RoleUnknown(_) | Self::PasswordTooWeak(_) => {
                ErrorKind::InvalidArgument
            }
            Self::UserNotFound => ErrorKind::NotFound,
            Self::UserExists => ErrorKind::FailedPrecondition,
            Self::LedgerUnavailable | Self::RevocationUnavailable => ErrorKind::Unavailable,
            Self::Busy => ErrorKind::ResourceExhausted,
            Self::Internal(_) => ErrorKind::Internal,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::InvalidCredentials => "INVALID_CREDENTIALS",
            Self::AccountLocked => "ACCOUNT_LOCKED",
            Self::AccountDisabled => "ACCOUNT_DISABLED",
            Self::MissingCredentials => "CREDENTIALS_MISSING",
            Self::RefreshTokenInvalid => "REFRESH_TOKEN_INVALID",
            Self::RefreshTokenReused => "REFRESH_TOKEN_REUSED",
            Self::UserNotFound => "USER_NOT_FOUND",
            Self::UserExists => "USER_EXISTS",
            Self::RoleUnknown(_) => "ROLE_UNKNOWN",
            Self::PasswordTooWeak(_) => "PASSWORD_TOO_WEAK",
            Self::SigningTicketInvalid => "SIGNING_TICKET_INVALID",
            Self::LedgerUnavailable => "LEDGER_UNAVAILABLE",
            Self::RevocationUnavailable => "REVOCATION_UNAVAILABLE",
            Self::Busy => "AUTH_BUSY",
            Self::Internal(_) => "INTERNAL",
        }
    }
}

impl From<AuthError> for tonic::Status {
    fn from(error: AuthError) -> Self {
        to_status(&error)
    }
}

impl From<sea_orm::DbErr> for AuthError {
    fn from(error: sea_orm::DbErr) -> Self {
        Self::Internal(error.to_string())
    }
}

impl From<medai_revocation::RevocationError> for AuthError {
    fn from(error: medai_revocation::RevocationError) -> Self {
        match error {
            medai_revocation::RevocationError::Unavailable => Self::RevocationUnavailable,
            medai_revocation::RevocationError::Settings(detail) => Self::Internal(detail),
        }
    }
}

impl From<crate::passwords::GateError> for AuthError {
    fn from(error: crate::passwords::GateError) -> Self {
        match error {
            crate::passwords::GateError::Busy => Self::Busy,
            crate::passwords::GateError::Failed(detail) => Self::Internal(detail),
        }
    }
}
