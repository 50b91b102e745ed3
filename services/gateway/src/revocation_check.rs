//! Where the gateway learns whether a verified token was revoked: Redis, shared with auth and
//! every other gateway, or, in the embedded mesh that runs without Redis, auth's own store.

use std::sync::Arc;

use medai_proto::auth::v1::CheckRevocationRequest;
use medai_proto::auth::v1::auth_service_client::AuthServiceClient;
use medai_revocation::{RevocationStore, TokenFacts};
use medai_runtime::grpc_client_metrics::MeteredChannel;

pub enum RevocationSource {
    Shared(Arc<RevocationStore>),
    ThroughAuth(AuthServiceClient<MeteredChannel>),
}

/// The check could not be made; the token is not trusted.
#[derive(Debug)]
pub struct RevocationUnavailable;

impl RevocationSource {
    /// After a revoking action: no cached "not revoked" answer may outlive it here.
    pub fn forget_recent_checks(&self) {
        if let Self::Shared(store) = self {
            store.forget_recent_checks();
        }
    }

    pub async fn is_revoked(&self, token: TokenFacts<'_>) -> Result<bool, RevocationUnavailable> {
        match self {
            Self::Shared(store) => store
                .is_revoked(token)
                .await
                .map_err(|_| RevocationUnavailable),
            Self::ThroughAuth(auth) => {
                let request = CheckRevocationRequest {
                    token_id: token.jti.to_owned(),
                    subject: token.subject.to_owned(),
                    generation: token.generation,
                };
                auth.clone()
                    .check_revocation(request)
                    .await
                    .map(|response| response.into_inner().revoked)
                    .map_err(|_| RevocationUnavailable)
            }
        }
    }
}
