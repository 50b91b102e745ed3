//! Who is calling: the service identity in the peer's mTLS certificate and, when the gateway
//! relays a request for a signed-in user, that user's token subject. Ledger records name this
//! caller as their actor; no request field can.

use medai_runtime::ServiceIdentity;
use tonic::metadata::MetadataMap;

use crate::error::InferenceError;

/// Metadata in which the gateway relays the verified token subject of the user it acts for.
/// Honoured from the gateway's certificate only; any other peer sending it is refused.
pub const RELAYED_SUBJECT_HEADER: &str = "x-medai-user-subject";

/// The identity that relays users' subjects.
const RELAYING_SERVICE: &str = "gateway";

/// Longest relayed subject accepted (auth's subjects are UUIDs).
const MAX_SUBJECT_CHARS: usize = 128;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The service identity the peer's certificate names.
    pub service: String,
    /// The user the gateway acts for, if it relayed one.
    pub user_subject: Option<String>,
}

impl Caller {
    /// The caller of `request`, from its verified certificate and (from the gateway only) the
    /// relayed subject.
    pub fn of<T>(request: &tonic::Request<T>) -> Result<Self, InferenceError> {
        let service = ServiceIdentity::of_grpc_peer(request)
            .map(|identity| identity.name().to_owned())
            .ok_or(InferenceError::CallerUnknown)?;
        Self::from_parts(service, request.metadata())
    }

    pub fn from_parts(service: String, metadata: &MetadataMap) -> Result<Self, InferenceError> {
        let Some(value) = metadata.get(RELAYED_SUBJECT_HEADER) else {
            return Ok(Self {
                service,
                user_subject: None,
            });
        };
        if service != RELAYING_SERVICE {
            return Err(InferenceError::RelayRefused);
        }
        let subject = value
            .to_str()
            .ok()
            .filter(|subject| {
                !subject.is_empty()
                    && subject.chars().count() <= MAX_SUBJECT_CHARS
                    && subject.chars().all(|c| c.is_ascii_graphic())
            })
            .ok_or_else(|| {
                InferenceError::QueryInvalid(format!(
                    "{RELAYED_SUBJECT_HEADER} must be 1 to {MAX_SUBJECT_CHARS} printable characters"
                ))
            })?;
        Ok(Self {
            service,
            user_subject: Some(subject.to_owned()),
        })
    }

    /// The ledger actor: the relayed user (`user:<subject>`) or the service itself
    /// (`service:<name>`).
    pub fn actor(&self) -> String {
        match &self.user_subject {
            Some(subject) => format!("user:{subject}"),
            None => format!("service:{}", self.service),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(subject: Option<&str>) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        if let Some(subject) = subject {
            metadata.insert(RELAYED_SUBJECT_HEADER, subject.parse().expect("ascii"));
        }
        metadata
    }

    #[test]
    fn the_actor_is_the_certificate_or_the_subject_the_gateway_relays() {
        let operator = Caller::from_parts("operator".to_owned(), &metadata(None)).expect("ok");
        assert_eq!(operator.actor(), "service:operator");
        let relayed =
            Caller::from_parts("gateway".to_owned(), &metadata(Some("user-1"))).expect("ok");
        assert_eq!(relayed.actor(), "user:user-1");
        assert!(matches!(
            Caller::from_parts("operator".to_owned(), &metadata(Some("user-1"))),
            Err(InferenceError::RelayRefused)
        ));
        assert!(matches!(
            Caller::from_parts("gateway".to_owned(), &metadata(Some(&"x".repeat(129)))),
            Err(InferenceError::QueryInvalid(_))
        ));
    }
}
