//! What went wrong, as the `medai` command reports it: one message on stderr and one stable
//! exit code per kind of failure, so scripts can tell a gateway that is down from a wrong
//! password from a refusal by the service.

use crate::client::ClientError;

/// Success.
pub const OK: u8 = 0;
/// A failure none of the codes below names (a local file that cannot be written, …).
pub const FAILURE: u8 = 1;
/// Bad usage: unknown flag, missing argument, a URL without scheme, an unreadable input file.
pub const USAGE: u8 = 2;
/// The server cannot be reached (down, wrong address, connection timed out).
pub const UNREACHABLE: u8 = 3;
/// Authentication: wrong password, no saved session, a session that has ended.
pub const AUTHENTICATION: u8 = 4;
/// The service refused the request; the message names its gRPC code and stable reason.
pub const REFUSED: u8 = 5;
/// TLS: the server's certificate does not match (--cacert, --servername) or ours was refused.
pub const CERTIFICATE: u8 = 6;
/// A verification found a problem (the ledger or an export is broken).
pub const VERIFICATION_FAILED: u8 = 7;
/// Some of several images were refused (`medai study send`); the summary says which.
pub const PARTIAL: u8 = 8;

/// The exit codes as `--help` shows them.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success
  1  failure not named below (for example a local file that cannot be written)
  2  usage: bad flags or arguments, a URL without scheme, an unreadable input file
  3  unreachable: the gateway (or service) is down or the address is wrong
  4  authentication: wrong password, no saved session, a session that has ended
  5  refused by the service: the message names the gRPC code and the stable reason
  6  certificate: the server's certificate does not match --cacert/--servername
  7  verification failed: the ledger or an export is broken
  8  partial: some images of a study were refused (see the summary)";

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Connect(#[from] ClientError),
    #[error("{0}")]
    Authentication(String),
    #[error("{what} refused: {message} ({code:?}{})", reason_suffix(.reason))]
    Refused {
        what: String,
        code: tonic::Code,
        reason: String,
        message: String,
    },
    #[error("{0}")]
    VerificationFailed(String),
    #[error("{0}")]
    Partial(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

fn reason_suffix(reason: &str) -> String {
    if reason.is_empty() {
        String::new()
    } else {
        format!(" {reason}")
    }
}

impl CliError {
    /// A refusal by a service, keeping its code and stable reason.
    pub fn refused(what: &str, status: &tonic::Status) -> Self {
        Self::Refused {
            what: what.to_owned(),
            code: status.code(),
            reason: medai_runtime::errors::reason_of(status).unwrap_or_default(),
            message: status.message().to_owned(),
        }
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => USAGE,
            Self::Connect(error) => match error {
                ClientError::NoScheme { .. }
                | ClientError::InvalidUrl { .. }
                | ClientError::CaCertificate { .. }
                | ClientError::ClientIdentity { .. }
                | ClientError::IncompleteIdentity => USAGE,
                ClientError::Unreachable { .. } | ClientError::Connect { .. } => UNREACHABLE,
                ClientError::Certificate { .. } | ClientError::Tls { .. } => CERTIFICATE,
            },
            Self::Authentication(_) => AUTHENTICATION,
            Self::Refused { code, .. } if *code == tonic::Code::Unauthenticated => AUTHENTICATION,
            Self::Refused { .. } => REFUSED,
            Self::VerificationFailed(_) => VERIFICATION_FAILED,
            Self::Partial(_) => PARTIAL,
            Self::Other(_) => FAILURE,
        }
    }

    /// A short machine-readable name of the kind of failure, for `-o json`.
    pub fn kind(&self) -> &'static str {
        match self.exit_code() {
            USAGE => "usage",
            UNREACHABLE => "unreachable",
            AUTHENTICATION => "authentication",
            REFUSED => "refused",
            CERTIFICATE => "certificate",
            VERIFICATION_FAILED => "verification_failed",
            PARTIAL => "partial",
            _ => "failure",
        }
    }

    /// The error as one JSON object (`-o json` writes it to stderr).
    pub fn to_json(&self) -> serde_json::Value {
        let mut value = serde_json::json!({
            "error": {
                "kind": self.kind(),
                "exit_code": self.exit_code(),
                "message": format!("{self:#}"),
            }
        });
        if let (Self::Refused { code, reason, .. }, Some(error)) = (self, value.get_mut("error")) {
            error["grpc_code"] = format!("{code:?}").into();
            error["reason"] = reason.clone().into();
        }
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_of_failure_has_its_documented_exit_code() {
        let unauthenticated = tonic::Status::unauthenticated("wrong password");
        assert_eq!(
            CliError::refused("login", &unauthenticated).exit_code(),
            AUTHENTICATION
        );
        let denied = tonic::Status::permission_denied("no");
        assert_eq!(CliError::refused("x", &denied).exit_code(), REFUSED);
        let no_scheme = ClientError::NoScheme {
            endpoint: "localhost:1".to_owned(),
        };
        assert_eq!(CliError::from(no_scheme).exit_code(), USAGE);
        for code in [
            OK,
            FAILURE,
            USAGE,
            UNREACHABLE,
            AUTHENTICATION,
            REFUSED,
            CERTIFICATE,
            VERIFICATION_FAILED,
            PARTIAL,
        ] {
            assert!(
                EXIT_CODES_HELP.contains(&format!("\n  {code}  ")),
                "exit code {code} is documented"
            );
        }
    }
}
