//! The auth service's published keys, cached. A token naming an unknown `kid` triggers a
//! refetch, at most once per `REFETCH_INTERVAL`, so a flood of forged kids cannot flood auth.

use std::sync::Arc;
use std::time::{Duration, Instant};

use medai_proto::auth::v1::GetSigningKeysRequest;
use medai_proto::auth::v1::auth_service_client::AuthServiceClient;
use medai_runtime::rpc_trace::MeshChannel;
use medai_tokens::{AccessClaims, PublishedKey, TokenError, TokenVerifier, VerifiedTokens};
use tokio::sync::{Mutex, RwLock};

/// At most one fetch per interval when tokens name unknown keys.
const REFETCH_INTERVAL: Duration = Duration::from_secs(1);
/// Most verified tokens kept (each a few hundred bytes): far more than the callers one gateway
/// serves within a token's lifetime.
const VERIFIED_TOKENS_KEPT: usize = 50_000;
/// Refetches the published keys every `period` until the task is aborted, so a new key is
/// known here during auth's publication lead, before it signs.
pub async fn refresh_periodically(keys: Arc<SigningKeyCache>, period: Duration) {
    let mut ticks = tokio::time::interval(period.max(Duration::from_secs(1)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let _unavailable_now = keys.refetch().await;
    }
}

pub struct SigningKeyCache {
    auth: AuthServiceClient<MeshChannel>,
    issuer: String,
    audience: String,
    verifier: RwLock<Arc<TokenVerifier>>,
    last_fetch: Mutex<Option<Instant>>,
    /// A token's signature is checked once; later uses check expiry and key only.
    verified: VerifiedTokens,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("the signing keys cannot be fetched")]
    KeysUnavailable,
}

impl SigningKeyCache {
    pub fn new(auth: AuthServiceClient<MeshChannel>, issuer: String, audience: String) -> Self {
        let verifier = Arc::new(TokenVerifier::new(&issuer, &audience, &[]));
        Self {
            auth,
            issuer,
            audience,
            verifier: RwLock::new(verifier),
            last_fetch: Mutex::new(None),
            verified: VerifiedTokens::new(VERIFIED_TOKENS_KEPT),
        }
    }

    pub async fn verify(&self, token: &str) -> Result<AccessClaims, VerifyError> {
        let kid = TokenVerifier::key_id(token)?;
        let mut verifier = self.verifier.read().await.clone();
        if !verifier.knows_key(&kid) {
            verifier = self.refetch().await?;
        }
        let (claims, verification) = self.verified.verify(&verifier, token)?;
        metrics::counter!(crate::metric_catalog::TOKEN_VERIFICATIONS, "verification" => verification.as_str())
            .increment(1);
        Ok(claims)
    }

    async fn refetch(&self) -> Result<Arc<TokenVerifier>, VerifyError> {
        let mut last_fetch = self.last_fetch.lock().await;
        if last_fetch.is_some_and(|at| at.elapsed() < REFETCH_INTERVAL) {
            return Ok(self.verifier.read().await.clone());
        }
        *last_fetch = Some(Instant::now());
        let response = self
            .auth
            .clone()
            .get_signing_keys(GetSigningKeysRequest {})
            .await
            .map_err(|status| {
                tracing::warn!(code = ?status.code(), "cannot fetch signing keys");
                // Let the next request try again rather than wait out the interval.
                VerifyError::KeysUnavailable
            });
        let response = match response {
            Ok(response) => response,
            Err(error) => {
                *last_fetch = None;
                return Err(error);
            }
        };
        let keys: Vec<PublishedKey> = response
            .into_inner()
            .keys
            .into_iter()
            .map(|key| PublishedKey {
                kid: key.kid,
                kty: key.kty,
                crv: key.crv,
                alg: key.alg,
                x: key.x,
            })
            .collect();
        tracing::info!(keys = keys.len(), "signing keys fetched");
        let verifier = Arc::new(TokenVerifier::new(&self.issuer, &self.audience, &keys));
        *self.verifier.write().await = verifier.clone();
        Ok(verifier)
    }
}
