//! Login: check the password at the same cost whether or not the user exists, record the
//! attempt in the ledger, and only then issue a token.

use std::sync::Arc;

use medai_tokens::{AccessClaims, Role};
use sea_orm::{ActiveModelTrait, ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, Set};

use crate::config::{BootstrapAdmin, TokenSettings};
use crate::error::AuthError;
use crate::keys::ActiveSigningKey;
use crate::ledger::LedgerClient;
use crate::passwords;
use crate::store::user;

/// A token issued after a recorded, successful login.
#[derive(Debug)]
pub struct IssuedToken {
    pub access_token: String,
    pub expires_in_seconds: u32,
    pub role: Role,
}

pub struct LoginService {
    pub connection: DatabaseConnection,
    pub signing_key: Arc<ActiveSigningKey>,
    pub ledger: LedgerClient,
    pub tokens: TokenSettings,
    pub decoy_hash: String,
}

impl LoginService {
    pub async fn login(
        &self,
        username: &str,
        password: &str,
        correlation_id: &str,
    ) -> Result<IssuedToken, AuthError> {
        if username.is_empty() || password.is_empty() {
            return Err(AuthError::MissingCredentials);
        }
        let found = user::Entity::find()
            .filter(user::Column::Username.eq(username))
            .one(&self.connection)
            .await
            .map_err(|error| AuthError::Internal(error.to_string()))?;
        let stored_hash = found.as_ref().map_or_else(
            || self.decoy_hash.clone(),
            |user| user.password_hash.clone(),
        );
        let password = password.to_owned();
        let password_matches = tokio::task::spawn_blocking(move || {
            passwords::verify_password(&password, &stored_hash)
        })
        .await
        .map_err(|error| AuthError::Internal(error.to_string()))?;

        let actor = format!("user:{}", truncate(username, 128));
        let user = match found {
            Some(user) if password_matches => user,
            _ => {
                metrics::counter!("medai_auth_logins_total", "outcome" => "invalid_credentials")
                    .increment(1);
                self.record_failure(&actor, "INVALID_CREDENTIALS", correlation_id)
                    .await;
                return Err(AuthError::InvalidCredentials);
            }
        };
        if user.status != "active" {
            metrics::counter!("medai_auth_logins_total", "outcome" => "disabled").increment(1);
            self.record_failure(&actor, "ACCOUNT_DISABLED", correlation_id)
                .await;
            return Err(AuthError::AccountDisabled);
        }
        let role = Role::parse(&user.role)
            .ok_or_else(|| AuthError::Internal("a stored role is unknown".to_owned()))?;
        let claims = self.claims_for(&user.id, role);
        let access_token = self
            .signing_key
            .sign(&claims)
            .map_err(|error| AuthError::Internal(error.to_string()))?;
        let context = serde_json::json!({
            "correlation_id": correlation_id,
            "jti": claims.jti,
            "kid": self.signing_key.kid(),
            "role": role.as_str(),
            "subject": user.id,
        });
        self.ledger.record(&actor, "LOGIN", "session", "SUCCESS", context).await.map_err(|status| {
            tracing::error!(code = ?status.code(), "login not recorded; refusing to issue a token");
            AuthError::LedgerUnavailable
        })?;
        metrics::counter!("medai_auth_logins_total", "outcome" => "success").increment(1);
        tracing::info!(subject = %user.id, role = role.as_str(), "login succeeded");
        Ok(IssuedToken {
            access_token,
            expires_in_seconds: u32::try_from(self.tokens.access_token_ttl_seconds)
                .unwrap_or(u32::MAX),
            role,
        })
    }

    fn claims_for(&self, subject: &str, role: Role) -> AccessClaims {
        let now = crate::unix_now();
        AccessClaims {
            iss: self.tokens.issuer.clone(),
            aud: self.tokens.audience.clone(),
            sub: subject.to_owned(),
            exp: now + self.tokens.access_token_ttl_seconds,
            iat: now,
            nbf: now,
            jti: uuid::Uuid::new_v4().to_string(),
            role,
        }
    }

    /// A failed login is still answered if the ledger is down, but the gap is logged loudly.
    async fn record_failure(&self, actor: &str, reason: &str, correlation_id: &str) {
        let context = serde_json::json!({ "correlation_id": correlation_id, "reason": reason });
        if let Err(status) = self
            .ledger
            .record(actor, "LOGIN", "session", "FAILURE", context)
            .await
        {
            tracing::error!(code = ?status.code(), "failed login could not be recorded in the ledger");
        }
    }
}

fn truncate(text: &str, max_chars: usize) -> String {
    text.chars().take(max_chars).collect()
}

/// Creates the bootstrap admin if no user of that name exists. Its password is hashed and
/// never logged.
pub async fn ensure_bootstrap_admin(
    connection: &DatabaseConnection,
    admin: &BootstrapAdmin,
) -> Result<(), AuthError> {
    let existing = user::Entity::find()
        .filter(user::Column::Username.eq(admin.username.as_str()))
        .one(connection)
        .await
        .map_err(|error| AuthError::Internal(error.to_string()))?;
    if existing.is_some() {
        return Ok(());
    }
    let password = admin.password.expose().to_owned();
    let password_hash = tokio::task::spawn_blocking(move || passwords::hash_password(&password))
        .await
        .map_err(|error| AuthError::Internal(error.to_string()))?
        .map_err(AuthError::Internal)?;
    let now = crate::unix_now() as i64;
    let id = uuid::Uuid::new_v4().to_string();
    user::ActiveModel {
        id: Set(id.clone()),
        username: Set(admin.username.clone()),
        password_hash: Set(password_hash),
        role: Set(Role::Admin.as_str().to_owned()),
        status: Set("active".to_owned()),
        failed_attempts: Set(0),
        locked_until: Set(0),
        password_changed_at: Set(now),
        created_at: Set(now),
    }
    .insert(connection)
    .await
    .map_err(|error| AuthError::Internal(error.to_string()))?;
    tracing::info!(subject = %id, "bootstrap admin created");
    Ok(())
}
