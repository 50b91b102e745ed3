//! The auth service's domain: who may log in, the tokens they get, and every change to users.
//! Each state change is made in a database transaction that commits only after its ledger
//! record is durable, so nothing changes unrecorded. Two safety responses are the exception
//! (compliance/state-changes.md): a failed-login count and the revocation of a reused refresh
//! token's family are recorded first too, but take effect even when the ledger refuses, so an
//! outage of the ledger cannot switch off lockout or reuse detection.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use medai_revocation::{RevocationStore, TokenFacts};
use medai_tokens::{AccessClaims, Role};
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DatabaseConnection, DatabaseTransaction,
    EntityTrait, IntoActiveModel, QueryFilter, Set, TransactionTrait,
};
use sha2::{Digest, Sha256};

use crate::config::{BootstrapAdmin, LockoutSettings, TokenSettings};
use crate::error::AuthError;
use crate::keys::KeyRing;
use crate::passwords::{self, HashGate};
use crate::revocation_record::{record_revoked_token, record_subject_floor};
use crate::store::{refresh_token, signing_ticket, user};
use medai_ledger_client::LedgerClient;

/// An access token and a refresh token.
#[derive(Debug)]
pub struct TokenGrant {
    pub access_token: String,
    pub expires_in_seconds: u32,
    pub role: Role,
    pub refresh_token: String,
    pub refresh_expires_in_seconds: u32,
}

/// Who asked, for the ledger: the caller's subject (from its verified token, as the gateway
/// passes it) and the request's correlation id.
#[derive(Clone, Debug)]
pub struct Actor {
    pub subject: String,
    pub correlation_id: String,
}

pub struct Authority {
    pub connection: DatabaseConnection,
    pub keys: Arc<KeyRing>,
    pub ledger: LedgerClient,
    pub revocations: Arc<RevocationStore>,
    pub tokens: TokenSettings,
    pub lockout: LockoutSettings,
    pub decoy_hash: String,
    /// Every argon2 hash and verification, the decoy's included, runs through this bound.
    pub hash_gate: Arc<HashGate>,
}

/// What a wrong password did to the account.
enum FailedAttempt {
    /// Counted (this attempt may have reached the limit and locked the account).
    Counted,
    /// The account was already locked: nothing was counted.
    AlreadyLocked,
}

/// The SET expressions of one failed attempt, from the row's current values (so concurrent
/// attempts each see the previous one's result): `failed_attempts` + 1, restarting at 1 after
/// an expired lock; `locked_until` set when the new count reaches `limit`.
fn failed_attempt_updates(limit: i32, restart_lock_until: i64, lock_until: i64) -> (Expr, Expr) {
    use sea_orm::sea_query::ExprTrait;
    let failed = || Expr::col(user::Column::FailedAttempts);
    let next_failed = Expr::case(failed().gte(limit), Expr::value(1))
        .finally(failed().add(1))
        .into();
    let next_locked_until = Expr::case(failed().gte(limit), Expr::value(restart_lock_until))
        .case(failed().add(1).gte(limit), Expr::value(lock_until))
        .finally(Expr::value(0_i64))
        .into();
    (next_failed, next_locked_until)
}

fn opaque_secret() -> String {
    URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
}

fn secret_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn seconds(value: u64) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

async fn verify_password_off_thread(
    gate: &HashGate,
    password: &str,
    stored_hash: String,
) -> Result<bool, AuthError> {
    let password = password.to_owned();
    gate.run(move || passwords::verify_password(&password, &stored_hash))
        .await
        .map_err(AuthError::from)
}

async fn hash_password_off_thread(gate: &HashGate, password: &str) -> Result<String, AuthError> {
    passwords::check_strength(password).map_err(AuthError::PasswordTooWeak)?;
    let password = password.to_owned();
    gate.run(move || passwords::hash_password(&password))
        .await?
        .map_err(AuthError::Internal)
}

impl Authority {
    async fn record(
        &self,
        actor: &str,
        action: &str,
        resource: &str,
        outcome: &str,
        context: serde_json::Value,
    ) -> Result<(), AuthError> {
        self.ledger.record(actor, action, resource, outcome, context).await.map(|_| ()).map_err(|status| {
            tracing::error!(code = ?status.code(), action, "not recorded in the ledger; refusing");
            AuthError::LedgerUnavailable
        })
    }

    /// Records an event whose outcome stands whether or not the ledger takes it (refusals).
    async fn record_best_effort(
        &self,
        actor: &str,
        action: &str,
        resource: &str,
        outcome: &str,
        context: serde_json::Value,
    ) {
        if let Err(error) = self.record(actor, action, resource, outcome, context).await {
            tracing::error!(action, error = %error, "refusal could not be recorded");
        }
    }

    /// A login refused because the account is locked: counted, recorded (the refusal stands
    /// whether or not the ledger takes it), and answered `ACCOUNT_LOCKED`.
    async fn refuse_locked(&self, actor: &str, user_id: &str, correlation_id: &str) -> AuthError {
        metrics::counter!("medai_auth_logins_total", "outcome" => "locked").increment(1);
        self.record_best_effort(
            actor,
            "LOGIN",
            &format!("user/{user_id}"),
            "FAILURE",
            serde_json::json!({ "correlation_id": correlation_id, "reason": "ACCOUNT_LOCKED" }),
        )
        .await;
        AuthError::AccountLocked
    }

    async fn user_by_name(
        &self,
        connection: &impl ConnectionTrait,
        username: &str,
    ) -> Result<Option<user::Model>, AuthError> {
        Ok(user::Entity::find()
            .filter(user::Column::Username.eq(username))
            .one(connection)
            .await?)
    }

    async fn user_by_id(
        &self,
        connection: &impl ConnectionTrait,
        id: &str,
    ) -> Result<Option<user::Model>, AuthError> {
        Ok(user::Entity::find_by_id(id.to_owned())
            .one(connection)
            .await?)
    }

    /// Signs an access token and stores a refresh token of `family_id` in `transaction`.
    async fn grant(
        &self,
        transaction: &DatabaseTransaction,
        user: &user::Model,
        family_id: &str,
    ) -> Result<(TokenGrant, AccessClaims), AuthError> {
        let role = Role::parse(&user.role)
            .ok_or_else(|| AuthError::Internal("a stored role is unknown".to_owned()))?;
        let now = crate::unix_now();
        let claims = AccessClaims {
            iss: self.tokens.issuer.clone(),
            aud: self.tokens.audience.clone(),
            sub: user.id.clone(),
            exp: now + self.tokens.access_token_ttl_seconds,
            iat: now,
            nbf: now,
            jti: uuid::Uuid::new_v4().to_string(),
            role,
            generation: u64::try_from(user.token_generation).unwrap_or(0),
        };
        let access_token = self
            .keys
            .sign(transaction, &claims)
            .await
            .map_err(|error| AuthError::Internal(error.to_string()))?;
        let refresh_token = opaque_secret();
        refresh_token::ActiveModel {
            token_hash: Set(secret_hash(&refresh_token)),
            family_id: Set(family_id.to_owned()),
            user_id: Set(user.id.clone()),
            access_jti: Set(claims.jti.clone()),
            access_expires_at: Set(claims.exp as i64),
            expires_at: Set((now + self.tokens.refresh_token_ttl_seconds) as i64),
            used: Set(false),
            revoked: Set(false),
            created_at: Set(now as i64),
        }
        .insert(transaction)
        .await?;
        let grant = TokenGrant {
            access_token,
            expires_in_seconds: seconds(self.tokens.access_token_ttl_seconds),
            role,
            refresh_token,
            refresh_expires_in_seconds: seconds(self.tokens.refresh_token_ttl_seconds),
        };
        Ok((grant, claims))
    }

    pub async fn login(
        &self,
        username: &str,
        password: &str,
        correlation_id: &str,
    ) -> Result<TokenGrant, AuthError> {
        if username.is_empty() || password.is_empty() {
            return Err(AuthError::MissingCredentials);
        }
        let found = self.user_by_name(&self.connection, username).await?;
        // The same argon2 work whether or not the user exists.
        let stored_hash = found.as_ref().map_or_else(
            || self.decoy_hash.clone(),
            |user| user.password_hash.clone(),
        );
        let password_matches =
            verify_password_off_thread(&self.hash_gate, password, stored_hash).await?;
        let actor = format!("user:{}", username.chars().take(128).collect::<String>());
        let now = crate::unix_now() as i64;
        let failure = |reason: &'static str| serde_json::json!({ "correlation_id": correlation_id, "reason": reason });

        let Some(user) = found else {
            metrics::counter!("medai_auth_logins_total", "outcome" => "invalid_credentials")
                .increment(1);
            self.record_best_effort(
                &actor,
                "LOGIN",
                "session",
                "FAILURE",
                failure("INVALID_CREDENTIALS"),
            )
            .await;
            return Err(AuthError::InvalidCredentials);
        };
        if user.locked_until > now {
            return Err(self.refuse_locked(&actor, &user.id, correlation_id).await);
        }
        if !password_matches {
            return match self
                .register_failed_attempt(&actor, &user, correlation_id)
                .await?
            {
                FailedAttempt::Counted => {
                    metrics::counter!("medai_auth_logins_total", "outcome" => "invalid_credentials")
                        .increment(1);
                    Err(AuthError::InvalidCredentials)
                }
                FailedAttempt::AlreadyLocked => {
                    metrics::counter!("medai_auth_logins_total", "outcome" => "locked")
                        .increment(1);
                    self.record_best_effort(
                        &actor,
                        "LOGIN",
                        &format!("user/{}", user.id),
                        "FAILURE",
                        failure("ACCOUNT_LOCKED"),
                    )
                    .await;
                    Err(AuthError::AccountLocked)
                }
            };
        }
        if user.status != "active" {
            metrics::counter!("medai_auth_logins_total", "outcome" => "disabled").increment(1);
            self.record_best_effort(
                &actor,
                "LOGIN",
                &format!("user/{}", user.id),
                "FAILURE",
                failure("ACCOUNT_DISABLED"),
            )
            .await;
            return Err(AuthError::AccountDisabled);
        }

        let transaction = self.connection.begin().await?;
        // Checked again under the row lock: a lock set by a concurrent wrong password since the
        // user was read wins.
        let unlocked = user::Entity::update_many()
            .col_expr(user::Column::FailedAttempts, Expr::value(0))
            .filter(user::Column::Id.eq(user.id.clone()))
            .filter(user::Column::LockedUntil.lte(now))
            .exec(&transaction)
            .await?;
        if unlocked.rows_affected != 1 {
            drop(transaction);
            return Err(self.refuse_locked(&actor, &user.id, correlation_id).await);
        }
        let family_id = uuid::Uuid::new_v4().to_string();
        let (grant, claims) = self.grant(&transaction, &user, &family_id).await?;
        let context = serde_json::json!({
            "correlation_id": correlation_id,
            "jti": claims.jti,
            "refresh_family": family_id,
            "role": claims.role.as_str(),
            "subject": user.id,
        });
        self.record(
            &actor,
            "LOGIN",
            &format!("user/{}", user.id),
            "SUCCESS",
            context,
        )
        .await?;
        transaction.commit().await?;
        metrics::counter!("medai_auth_logins_total", "outcome" => "success").increment(1);
        tracing::info!(subject = %user.id, role = claims.role.as_str(), "login succeeded");
        Ok(grant)
    }

    /// Counts a wrong password; the Nth locks the account for M minutes. The count is one
    /// conditional UPDATE … RETURNING (failed = failed + 1 where not locked), so concurrent
    /// wrong passwords are counted one by one and exactly the Nth locks; its row lock is held
    /// while the attempt (and the lockout) is recorded, and the count commits after that.
    /// A ledger that refuses does not stop the count (a safety response), it is logged.
    async fn register_failed_attempt(
        &self,
        actor: &str,
        user: &user::Model,
        correlation_id: &str,
    ) -> Result<FailedAttempt, AuthError> {
        let limit = i32::try_from(self.lockout.max_failed_attempts).unwrap_or(i32::MAX);
        let now = crate::unix_now() as i64;
        let lock_until = now + self.lockout.lock_minutes as i64 * 60;
        // A lock that expired left the counter at the limit: counting restarts at 1.
        let restart_lock_until = if limit <= 1 { lock_until } else { 0 };
        let (next_failed, next_locked_until) =
            failed_attempt_updates(limit, restart_lock_until, lock_until);
        let transaction = self.connection.begin().await?;
        let counted = user::Entity::update_many()
            .col_expr(user::Column::FailedAttempts, next_failed)
            .col_expr(user::Column::LockedUntil, next_locked_until)
            .filter(user::Column::Id.eq(user.id.clone()))
            .filter(user::Column::LockedUntil.lte(now))
            .exec_with_returning(&transaction)
            .await?;
        let Some(counted) = counted.into_iter().next() else {
            return Ok(FailedAttempt::AlreadyLocked);
        };
        let locked = counted.locked_until > now;
        let resource = format!("user/{}", user.id);
        let context = serde_json::json!({ "correlation_id": correlation_id, "reason": "INVALID_CREDENTIALS", "failed_attempts": counted.failed_attempts });
        self.record_best_effort(actor, "LOGIN", &resource, "FAILURE", context)
            .await;
        if locked {
            let context = serde_json::json!({ "correlation_id": correlation_id, "locked_until": counted.locked_until });
            self.record_best_effort(
                "service:auth",
                "ACCOUNT_LOCKOUT",
                &resource,
                "SUCCESS",
                context,
            )
            .await;
        }
        transaction.commit().await?;
        if locked {
            metrics::counter!("medai_auth_lockouts_total").increment(1);
            tracing::warn!(subject = %user.id, minutes = self.lockout.lock_minutes, "account locked after failed logins");
        }
        Ok(FailedAttempt::Counted)
    }

    /// Rotates a refresh token. A used one coming back means it was stolen or replayed: the
    /// whole family, and the access tokens issued with it, are revoked.
    pub async fn refresh(
        &self,
        presented: &str,
        correlation_id: &str,
    ) -> Result<TokenGrant, AuthError> {
        let hash = secret_hash(presented);
        let transaction = self.connection.begin().await?;
        let Some(row) = refresh_token::Entity::find_by_id(hash)
            .one(&transaction)
            .await?
        else {
            return Err(AuthError::RefreshTokenInvalid);
        };
        let now = crate::unix_now() as i64;
        if row.used && !row.revoked {
            drop(transaction);
            self.revoke_reused_family(&row, correlation_id).await?;
            return Err(AuthError::RefreshTokenReused);
        }
        if row.revoked || row.expires_at <= now {
            metrics::counter!("medai_auth_refresh_total", "outcome" => "invalid").increment(1);
            return Err(AuthError::RefreshTokenInvalid);
        }
        let user = self
            .user_by_id(&transaction, &row.user_id)
            .await?
            .ok_or(AuthError::RefreshTokenInvalid)?;
        if user.status != "active" {
            return Err(AuthError::AccountDisabled);
        }
        if user.locked_until > now {
            return Err(AuthError::AccountLocked);
        }
        // Only one of two concurrent uses can flip `used`; the other is a reuse.
        let claimed = refresh_token::Entity::update_many()
            .col_expr(refresh_token::Column::Used, Expr::value(true))
            .filter(refresh_token::Column::TokenHash.eq(row.token_hash.clone()))
            .filter(refresh_token::Column::Used.eq(false))
            .exec(&transaction)
            .await?;
        if claimed.rows_affected != 1 {
            drop(transaction);
            self.revoke_reused_family(&row, correlation_id).await?;
            return Err(AuthError::RefreshTokenReused);
        }
        let (grant, claims) = self.grant(&transaction, &user, &row.family_id).await?;
        let context = serde_json::json!({ "correlation_id": correlation_id, "jti": claims.jti, "refresh_family": row.family_id });
        self.record(
            &format!("user:{}", user.id),
            "TOKEN_REFRESH",
            &format!("user/{}", user.id),
            "SUCCESS",
            context,
        )
        .await?;
        transaction.commit().await?;
        metrics::counter!("medai_auth_refresh_total", "outcome" => "success").increment(1);
        Ok(grant)
    }

    /// Marks every refresh token of a family revoked and records the access tokens issued with
    /// them as revoked, in `transaction`; returns those tokens, to publish after the commit.
    async fn revoke_family_in(
        &self,
        transaction: &DatabaseTransaction,
        family_id: &str,
    ) -> Result<Vec<(String, u64)>, AuthError> {
        let members = refresh_token::Entity::find()
            .filter(refresh_token::Column::FamilyId.eq(family_id))
            .all(transaction)
            .await?;
        refresh_token::Entity::update_many()
            .col_expr(refresh_token::Column::Revoked, Expr::value(true))
            .filter(refresh_token::Column::FamilyId.eq(family_id))
            .exec(transaction)
            .await?;
        let mut revoked = Vec::new();
        for member in members {
            let expires_at = u64::try_from(member.access_expires_at).unwrap_or(0);
            if expires_at > crate::unix_now() {
                record_revoked_token(transaction, &member.access_jti, &member.user_id, expires_at)
                    .await?;
                revoked.push((member.access_jti, expires_at));
            }
        }
        Ok(revoked)
    }

    /// Makes committed token revocations take effect in the revocation store.
    async fn publish_revoked_tokens(&self, revoked: &[(String, u64)]) -> Result<(), AuthError> {
        for (jti, expires_at) in revoked {
            self.revocations.revoke_token(jti, *expires_at).await?;
        }
        Ok(())
    }

    /// A used refresh token came back: its family is revoked (a safety response: recorded
    /// first, applied even if the ledger refuses).
    async fn revoke_reused_family(
        &self,
        row: &refresh_token::Model,
        correlation_id: &str,
    ) -> Result<(), AuthError> {
        metrics::counter!("medai_auth_refresh_total", "outcome" => "reuse").increment(1);
        let transaction = self.connection.begin().await?;
        let revoked = self.revoke_family_in(&transaction, &row.family_id).await?;
        let context = serde_json::json!({ "correlation_id": correlation_id, "refresh_family": row.family_id });
        self.record_best_effort(
            &format!("user:{}", row.user_id),
            "REFRESH_TOKEN_REUSE",
            &format!("user/{}", row.user_id),
            "DENIED",
            context,
        )
        .await;
        transaction.commit().await?;
        self.publish_revoked_tokens(&revoked).await
    }

    /// Revokes the caller's access token and its refresh family: recorded in auth's database
    /// and in the ledger, committed, then published to the revocation store.
    pub async fn logout(
        &self,
        actor: &Actor,
        access_jti: &str,
        access_expires_at: u64,
        refresh: Option<&str>,
    ) -> Result<(), AuthError> {
        let transaction = self.connection.begin().await?;
        record_revoked_token(&transaction, access_jti, &actor.subject, access_expires_at).await?;
        let mut revoked = vec![(access_jti.to_owned(), access_expires_at)];
        let family = match refresh {
            Some(presented) => refresh_token::Entity::find_by_id(secret_hash(presented))
                .one(&transaction)
                .await?
                .filter(|row| row.user_id == actor.subject)
                .map(|row| row.family_id),
            None => refresh_token::Entity::find()
                .filter(refresh_token::Column::AccessJti.eq(access_jti))
                .one(&transaction)
                .await?
                .map(|row| row.family_id),
        };
        if let Some(family_id) = &family {
            revoked.extend(self.revoke_family_in(&transaction, family_id).await?);
        }
        let context = serde_json::json!({ "correlation_id": actor.correlation_id, "jti": access_jti, "refresh_family": family });
        self.record(
            &format!("user:{}", actor.subject),
            "LOGOUT",
            &format!("user/{}", actor.subject),
            "SUCCESS",
            context,
        )
        .await?;
        transaction.commit().await?;
        self.publish_revoked_tokens(&revoked).await
    }

    pub async fn is_revoked(&self, token: TokenFacts<'_>) -> Result<bool, AuthError> {
        Ok(self.revocations.is_revoked(token).await?)
    }

    /// Raises a user's token generation so every token they hold stops working, and revokes
    /// their refresh tokens. Runs inside the caller's transaction, which also records the new
    /// floor in the database; the revocation is published by
    /// [`Authority::publish_generation`] after the commit.
    async fn invalidate_tokens(
        &self,
        transaction: &DatabaseTransaction,
        user: &user::Model,
    ) -> Result<i64, AuthError> {
        // Incremented in place, not from the value read earlier: the row lock makes concurrent
        // changes to one user take turns, so each raises the generation past the one before.
        user::Entity::update_many()
            .col_expr(
                user::Column::TokenGeneration,
                Expr::col(user::Column::TokenGeneration).add(1),
            )
            .filter(user::Column::Id.eq(user.id.clone()))
            .exec(transaction)
            .await?;
        let generation = user::Entity::find_by_id(user.id.clone())
            .one(transaction)
            .await?
            .ok_or(AuthError::UserNotFound)?
            .token_generation;
        refresh_token::Entity::update_many()
            .col_expr(refresh_token::Column::Revoked, Expr::value(true))
            .filter(refresh_token::Column::UserId.eq(user.id.clone()))
            .exec(transaction)
            .await?;
        record_subject_floor(transaction, &user.id, generation).await?;
        Ok(generation)
    }

    async fn publish_generation(&self, subject: &str, generation: i64) -> Result<(), AuthError> {
        Ok(self
            .revocations
            .revoke_subject_below(subject, u64::try_from(generation).unwrap_or(0))
            .await?)
    }

    pub async fn create_user(
        &self,
        actor: &Actor,
        username: &str,
        password: &str,
        role: &str,
    ) -> Result<String, AuthError> {
        let role = Role::parse(role)
            .ok_or_else(|| AuthError::RoleUnknown(role.chars().take(32).collect()))?;
        if username.trim().is_empty() || username.len() > 128 {
            return Err(AuthError::MissingCredentials);
        }
        let password_hash = hash_password_off_thread(&self.hash_gate, password).await?;
        let transaction = self.connection.begin().await?;
        if self.user_by_name(&transaction, username).await?.is_some() {
            return Err(AuthError::UserExists);
        }
        let now = crate::unix_now() as i64;
        let id = uuid::Uuid::new_v4().to_string();
        new_user(&id, username, password_hash, role, now)
            .insert(&transaction)
            .await?;
        let context =
            serde_json::json!({ "correlation_id": actor.correlation_id, "role": role.as_str() });
        self.record(
            &format!("user:{}", actor.subject),
            "USER_CREATE",
            &format!("user/{id}"),
            "SUCCESS",
            context,
        )
        .await?;
        transaction.commit().await?;
        Ok(id)
    }

    /// One administrative change to a user: in a transaction, every token they hold stops
    /// working, `change` is applied, the change is recorded, and only then is it committed and
    /// the revocation published. `change` returns what the ledger context says of it.
    async fn change_user(
        &self,
        actor: &Actor,
        username: &str,
        action: &str,
        change: impl FnOnce(&user::Model, &mut user::ActiveModel) -> serde_json::Value,
    ) -> Result<(), AuthError> {
        let transaction = self.connection.begin().await?;
        let user = self
            .user_by_name(&transaction, username)
            .await?
            .ok_or(AuthError::UserNotFound)?;
        let generation = self.invalidate_tokens(&transaction, &user).await?;
        let mut changed = user.clone().into_active_model();
        let mut context = change(&user, &mut changed);
        changed.update(&transaction).await?;
        context["correlation_id"] = serde_json::Value::from(actor.correlation_id.clone());
        self.record(
            &format!("user:{}", actor.subject),
            action,
            &format!("user/{}", user.id),
            "SUCCESS",
            context,
        )
        .await?;
        transaction.commit().await?;
        self.publish_generation(&user.id, generation).await
    }

    /// A role change takes effect at once: tokens carrying the old role stop working.
    pub async fn set_role(
        &self,
        actor: &Actor,
        username: &str,
        role: &str,
    ) -> Result<(), AuthError> {
        let role = Role::parse(role)
            .ok_or_else(|| AuthError::RoleUnknown(role.chars().take(32).collect()))?;
        self.change_user(actor, username, "USER_ROLE_SET", |user, changed| {
            changed.role = Set(role.as_str().to_owned());
            serde_json::json!({ "from": user.role, "to": role.as_str() })
        })
        .await
    }

    pub async fn disable(&self, actor: &Actor, username: &str) -> Result<(), AuthError> {
        self.change_user(actor, username, "USER_DISABLE", |_, changed| {
            changed.status = Set("disabled".to_owned());
            serde_json::json!({})
        })
        .await
    }

    /// An admin's reset also lifts a lockout.
    pub async fn reset_password(
        &self,
        actor: &Actor,
        username: &str,
        new_password: &str,
    ) -> Result<(), AuthError> {
        let password_hash = hash_password_off_thread(&self.hash_gate, new_password).await?;
        self.change_user(actor, username, "USER_PASSWORD_RESET", |_, changed| {
            changed.password_hash = Set(password_hash);
            changed.password_changed_at = Set(crate::unix_now() as i64);
            changed.failed_attempts = Set(0);
            changed.locked_until = Set(0);
            serde_json::json!({})
        })
        .await
    }

    pub async fn delete(&self, actor: &Actor, username: &str) -> Result<(), AuthError> {
        let transaction = self.connection.begin().await?;
        let user = self
            .user_by_name(&transaction, username)
            .await?
            .ok_or(AuthError::UserNotFound)?;
        let generation = self.invalidate_tokens(&transaction, &user).await?;
        refresh_token::Entity::delete_many()
            .filter(refresh_token::Column::UserId.eq(user.id.clone()))
            .exec(&transaction)
            .await?;
        signing_ticket::Entity::delete_many()
            .filter(signing_ticket::Column::UserId.eq(user.id.clone()))
            .exec(&transaction)
            .await?;
        user::Entity::delete_by_id(user.id.clone())
            .exec(&transaction)
            .await?;
        let context = serde_json::json!({ "correlation_id": actor.correlation_id });
        self.record(
            &format!("user:{}", actor.subject),
            "USER_DELETE",
            &format!("user/{}", user.id),
            "SUCCESS",
            context,
        )
        .await?;
        transaction.commit().await?;
        self.publish_generation(&user.id, generation).await
    }

    pub async fn change_password(
        &self,
        actor: &Actor,
        current: &str,
        new_password: &str,
    ) -> Result<(), AuthError> {
        let user = self
            .user_by_id(&self.connection, &actor.subject)
            .await?
            .ok_or(AuthError::InvalidCredentials)?;
        if !verify_password_off_thread(&self.hash_gate, current, user.password_hash.clone()).await?
        {
            let context = serde_json::json!({ "correlation_id": actor.correlation_id, "reason": "INVALID_CREDENTIALS" });
            self.record_best_effort(
                &format!("user:{}", user.id),
                "PASSWORD_CHANGE",
                &format!("user/{}", user.id),
                "FAILURE",
                context,
            )
            .await;
            return Err(AuthError::InvalidCredentials);
        }
        let password_hash = hash_password_off_thread(&self.hash_gate, new_password).await?;
        let transaction = self.connection.begin().await?;
        let generation = self.invalidate_tokens(&transaction, &user).await?;
        let mut changed = user.clone().into_active_model();
        changed.password_hash = Set(password_hash);
        changed.password_changed_at = Set(crate::unix_now() as i64);
        changed.update(&transaction).await?;
        let context = serde_json::json!({ "correlation_id": actor.correlation_id });
        self.record(
            &format!("user:{}", user.id),
            "PASSWORD_CHANGE",
            &format!("user/{}", user.id),
            "SUCCESS",
            context,
        )
        .await?;
        transaction.commit().await?;
        self.publish_generation(&user.id, generation).await
    }

    /// A new signing key: stored in a transaction that commits only after the rotation is
    /// recorded, so a key is never published (nor signs) unrecorded.
    pub async fn rotate_signing_key(&self, actor: &Actor) -> Result<(String, u64), AuthError> {
        let transaction = self.connection.begin().await?;
        let (kid, signs_from) = self
            .keys
            .add_key(&transaction, self.tokens.key_publication_lead_seconds)
            .await
            .map_err(|error| AuthError::Internal(error.to_string()))?;
        let context = serde_json::json!({ "correlation_id": actor.correlation_id, "kid": kid, "signs_from": signs_from });
        self.record(
            &format!("user:{}", actor.subject),
            "SIGNING_KEY_ROTATE",
            &format!("key/{kid}"),
            "SUCCESS",
            context,
        )
        .await?;
        transaction.commit().await?;
        tracing::info!(kid = %kid, signs_from, "signing key rotated");
        Ok((kid, signs_from))
    }

    /// Re-authentication for an electronic signature: the password again, for a single-use ticket.
    pub async fn reauthenticate(
        &self,
        actor: &Actor,
        password: &str,
    ) -> Result<(String, u32), AuthError> {
        let user = self
            .user_by_id(&self.connection, &actor.subject)
            .await?
            .ok_or(AuthError::InvalidCredentials)?;
        let resource = format!("user/{}", user.id);
        if user.status != "active" || user.locked_until > crate::unix_now() as i64 {
            return Err(AuthError::AccountDisabled);
        }
        if !verify_password_off_thread(&self.hash_gate, password, user.password_hash.clone())
            .await?
        {
            let attempt = self
                .register_failed_attempt(&format!("user:{}", user.id), &user, &actor.correlation_id)
                .await?;
            return Err(match attempt {
                FailedAttempt::Counted => AuthError::InvalidCredentials,
                FailedAttempt::AlreadyLocked => AuthError::AccountLocked,
            });
        }
        let ticket = opaque_secret();
        let transaction = self.connection.begin().await?;
        signing_ticket::ActiveModel {
            ticket_hash: Set(secret_hash(&ticket)),
            user_id: Set(user.id.clone()),
            expires_at: Set((crate::unix_now() + self.tokens.signing_ticket_ttl_seconds) as i64),
            used: Set(false),
        }
        .insert(&transaction)
        .await?;
        let context = serde_json::json!({ "correlation_id": actor.correlation_id });
        self.record(
            &format!("user:{}", user.id),
            "REAUTHENTICATION",
            &resource,
            "SUCCESS",
            context,
        )
        .await?;
        transaction.commit().await?;
        Ok((ticket, seconds(self.tokens.signing_ticket_ttl_seconds)))
    }

    /// Uses up a signing ticket: once, by its own user, before it expires.
    pub async fn consume_signing_ticket(
        &self,
        actor: &Actor,
        ticket: &str,
    ) -> Result<(String, Role), AuthError> {
        let transaction = self.connection.begin().await?;
        // Marking it used in the same statement that checks it makes a second use impossible
        // even when two arrive at once.
        let used = signing_ticket::Entity::update_many()
            .col_expr(signing_ticket::Column::Used, Expr::value(true))
            .filter(signing_ticket::Column::TicketHash.eq(secret_hash(ticket)))
            .filter(signing_ticket::Column::UserId.eq(actor.subject.clone()))
            .filter(signing_ticket::Column::Used.eq(false))
            .filter(signing_ticket::Column::ExpiresAt.gt(crate::unix_now() as i64))
            .exec(&transaction)
            .await?;
        if used.rows_affected != 1 {
            return Err(AuthError::SigningTicketInvalid);
        }
        let user = self
            .user_by_id(&transaction, &actor.subject)
            .await?
            .ok_or(AuthError::SigningTicketInvalid)?;
        let role = Role::parse(&user.role)
            .ok_or_else(|| AuthError::Internal("a stored role is unknown".to_owned()))?;
        let context = serde_json::json!({ "correlation_id": actor.correlation_id });
        self.record(
            &format!("user:{}", user.id),
            "SIGNING_TICKET_CONSUME",
            &format!("user/{}", user.id),
            "SUCCESS",
            context,
        )
        .await?;
        transaction.commit().await?;
        Ok((user.username, role))
    }
}

fn new_user(
    id: &str,
    username: &str,
    password_hash: String,
    role: Role,
    now: i64,
) -> user::ActiveModel {
    user::ActiveModel {
        id: Set(id.to_owned()),
        username: Set(username.to_owned()),
        password_hash: Set(password_hash),
        role: Set(role.as_str().to_owned()),
        status: Set("active".to_owned()),
        failed_attempts: Set(0),
        locked_until: Set(0),
        password_changed_at: Set(now),
        created_at: Set(now),
        token_generation: Set(0),
    }
}

/// Creates the bootstrap admin if no user of that name exists. Its password is hashed and
/// never logged.
pub async fn ensure_bootstrap_admin(
    connection: &DatabaseConnection,
    admin: &BootstrapAdmin,
    hash_gate: &HashGate,
) -> Result<(), AuthError> {
    let existing = user::Entity::find()
        .filter(user::Column::Username.eq(admin.username.as_str()))
        .one(connection)
        .await?;
    if existing.is_some() {
        return Ok(());
    }
    let password_hash = hash_password_off_thread(hash_gate, admin.password.expose()).await?;
    let id = uuid::Uuid::new_v4().to_string();
    new_user(
        &id,
        &admin.username,
        password_hash,
        Role::Admin,
        crate::unix_now() as i64,
    )
    .insert(connection)
    .await?;
    tracing::info!(subject = %id, "bootstrap admin created");
    Ok(())
}
