//! Token authentication and role authorisation as one tower layer, so no handler repeats it.
//! Each external method names the roles it allows in [`RolePolicy`]; a method it does not
//! name is refused to everyone. A verified caller travels to the handler as a [`Caller`]
//! request extension.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{BoxFuture, FutureExt};
use medai_runtime::errors::{ErrorKind, refusal_response as refusal, status_with_reason};
use medai_tokens::Role;
use tower::{Layer, Service};

use medai_ledger_client::LedgerClient;
use medai_proto::audit::v1::AppendRequest;
use medai_revocation::TokenFacts;

use crate::revocation_check::RevocationSource;
use crate::signing_keys::{SigningKeyCache, VerifyError};

/// Who is calling, as their verified token says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub subject: String,
    pub role: Role,
    pub token_id: String,
    pub token_expires_at: u64,
    /// The user's token generation when the token was issued (see `medai_tokens::Claims`).
    pub token_generation: u64,
}

#[derive(Clone, Debug, Default)]
pub struct RolePolicy {
    public: BTreeSet<String>,
    public_prefixes: Vec<String>,
    roles: BTreeMap<String, BTreeSet<Role>>,
}

impl RolePolicy {
    pub fn public(mut self, method: &str) -> Self {
        self.public.insert(method.to_owned());
        self
    }

    pub fn public_prefix(mut self, prefix: &str) -> Self {
        self.public_prefixes.push(prefix.to_owned());
        self
    }

    pub fn allow(mut self, method: &str, roles: &[Role]) -> Self {
        self.roles
            .entry(method.to_owned())
            .or_default()
            .extend(roles.iter().copied());
        self
    }

    fn is_public(&self, method: &str) -> bool {
        self.public.contains(method)
            || self
                .public_prefixes
                .iter()
                .any(|prefix| method.starts_with(prefix))
    }

    fn permits(&self, method: &str, role: Role) -> bool {
        self.roles
            .get(method)
            .is_some_and(|roles| roles.contains(&role))
    }
}

/// What the layer needs besides the policy: keys to verify, revocations to consult, and the
/// ledger that records refusals of authenticated callers.
pub struct TokenChecks {
    pub keys: Arc<SigningKeyCache>,
    pub revocations: Arc<RevocationSource>,
    /// The gateway's batching ledger client (shared with its predictions' records).
    pub ledger: LedgerClient,
}

#[derive(Clone)]
pub struct TokenAuthLayer {
    checks: Arc<TokenChecks>,
    policy: Arc<RolePolicy>,
}

impl TokenAuthLayer {
    pub fn new(checks: TokenChecks, policy: RolePolicy) -> Self {
        Self {
            checks: Arc::new(checks),
            policy: Arc::new(policy),
        }
    }
}

impl<S> Layer<S> for TokenAuthLayer {
    type Service = TokenAuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TokenAuthService {
            inner,
            checks: self.checks.clone(),
            policy: self.policy.clone(),
        }
    }
}

#[derive(Clone)]
pub struct TokenAuthService<S> {
    inner: S,
    checks: Arc<TokenChecks>,
    policy: Arc<RolePolicy>,
}

/// Records a refused call of an authenticated caller. The refusal stands whether or not the
/// ledger takes it; a failure to record is logged.
async fn record_denial(
    ledger: &LedgerClient,
    subject: &str,
    role: Role,
    method: &str,
    correlation_id: &str,
) {
    let request = AppendRequest {
        actor: format!("user:{subject}"),
        action: "ACCESS_DENIED".to_owned(),
        resource: format!("rpc{method}"),
        outcome: "DENIED".to_owned(),
        context_json:
            serde_json::json!({ "role": role.as_str(), "correlation_id": correlation_id })
                .to_string(),
    };
    let recorded =
        tokio::time::timeout(std::time::Duration::from_secs(2), ledger.append(request)).await;
    match recorded {
        Ok(Ok(_)) => {}
        Ok(Err(status)) => {
            tracing::error!(code = ?status.code(), method, "a denied call could not be recorded");
        }
        Err(_) => {
            tracing::error!(method, "a denied call could not be recorded in time");
        }
    }
}

const DOMAIN: &str = "medai.gateway";

fn bearer_token<B>(request: &http::Request<B>) -> Option<String> {
    let value = request
        .headers()
        .get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))?;
    Some(token.trim().to_owned())
}

impl<S, B, ResBody> Service<http::Request<B>> for TokenAuthService<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The ready inner service goes with this call; the clone waits for the next one.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let checks = self.checks.clone();
        let policy = self.policy.clone();
        async move {
            let method = request.uri().path().to_owned();
            if policy.is_public(&method) {
                return inner.call(request).await;
            }
            let Some(token) = bearer_token(&request) else {
                metrics::counter!("medai_gateway_token_checks_total", "outcome" => "missing").increment(1);
                return Ok(refusal(status_with_reason(
                    ErrorKind::Unauthenticated,
                    DOMAIN,
                    "TOKEN_MISSING",
                    "an access token is required (authorization: Bearer …)",
                )));
            };
            let claims = match checks.keys.verify(&token).await {
                Ok(claims) => claims,
                Err(VerifyError::Token(error)) => {
                    metrics::counter!("medai_gateway_token_checks_total", "outcome" => error.reason()).increment(1);
                    tracing::info!(reason = error.reason(), method = %method, "token refused");
                    return Ok(refusal(status_with_reason(ErrorKind::Unauthenticated, DOMAIN, error.reason(), error.to_string())));
                }
                Err(VerifyError::KeysUnavailable) => {
                    metrics::counter!("medai_gateway_token_checks_total", "outcome" => "keys_unavailable").increment(1);
                    return Ok(refusal(status_with_reason(
                        ErrorKind::Unavailable,
                        DOMAIN,
                        "SIGNING_KEYS_UNAVAILABLE",
                        "tokens cannot be verified right now",
                    )));
                }
            };
            let facts = TokenFacts { jti: &claims.jti, subject: &claims.sub, generation: claims.generation };
            match checks.revocations.is_revoked(facts).await {
                Ok(false) => {}
                Ok(true) => {
                    metrics::counter!("medai_gateway_token_checks_total", "outcome" => "TOKEN_REVOKED").increment(1);
                    return Ok(refusal(status_with_reason(
                        ErrorKind::Unauthenticated,
                        DOMAIN,
                        "TOKEN_REVOKED",
                        "the token has been revoked",
                    )));
                }
                Err(_) => {
                    metrics::counter!("medai_gateway_token_checks_total", "outcome" => "revocation_unavailable").increment(1);
                    return Ok(refusal(status_with_reason(
                        ErrorKind::Unavailable,
                        DOMAIN,
                        "REVOCATION_UNAVAILABLE",
                        "tokens cannot be checked for revocation right now",
                    )));
                }
            }
            if !policy.permits(&method, claims.role) {
                metrics::counter!("medai_gateway_token_checks_total", "outcome" => "role_denied").increment(1);
                tracing::info!(subject = %claims.sub, role = claims.role.as_str(), method = %method, "role not allowed");
                let correlation = medai_runtime::correlation::accepted_or_new(
                    request
                        .headers()
                        .get(medai_runtime::correlation::CORRELATION_HEADER)
                        .and_then(|value| value.to_str().ok()),
                );
                record_denial(&checks.ledger, &claims.sub, claims.role, &method, &correlation)
                    .await;
                return Ok(refusal(status_with_reason(
                    ErrorKind::PermissionDenied,
                    DOMAIN,
                    "ROLE_NOT_ALLOWED",
                    format!("the {} role may not call {method}", claims.role.as_str()),
                )));
            }
            metrics::counter!("medai_gateway_token_checks_total", "outcome" => "ok").increment(1);
            request.extensions_mut().insert(Caller {
                subject: claims.sub,
                role: claims.role,
                token_id: claims.jti,
                token_expires_at: claims.exp,
                token_generation: claims.generation,
            });
            inner.call(request).await
        }
        .boxed()
    }
}
