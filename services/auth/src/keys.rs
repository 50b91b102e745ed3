//! Signing keys: Ed25519, kept in the auth database. A new key is published at once and signs
//! only after the publication lead, so verifiers that cache keys learn it first; a superseded
//! key stays published until the last token it signed has expired.

use std::collections::HashMap;
use std::sync::Mutex;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::{EncodingKey, Header};
use medai_tokens::{ALGORITHM, AccessClaims, JWT_ALGORITHM_NAME, PublishedKey};
use sea_orm::{
    ActiveModelTrait, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait, QueryOrder, Set,
};
use sha2::{Digest, Sha256};

use crate::store::signing_key;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key generation failed: {0}")]
    Generate(String),
    #[error("a stored signing key is unreadable")]
    Corrupt,
    #[error("no signing key is active")]
    NoActiveKey,
    #[error(transparent)]
    Database(#[from] DbErr),
    #[error("signing failed: {0}")]
    Sign(String),
}

/// Every signing key, read from the database each time it matters (logins are not hot
/// enough to need more), with decoded private keys cached by kid.
pub struct KeyRing {
    connection: DatabaseConnection,
    /// Longest access-token life, which bounds how long a superseded key must stay published.
    access_token_ttl_seconds: u64,
    decoded: Mutex<HashMap<String, std::sync::Arc<EncodingKey>>>,
}

impl KeyRing {
    pub fn new(connection: DatabaseConnection, access_token_ttl_seconds: u64) -> Self {
        Self {
            connection,
            access_token_ttl_seconds,
            decoded: Mutex::new(HashMap::new()),
        }
    }

    /// Creates the first key, active at once, if there is none.
    pub async fn ensure_a_key(&self) -> Result<(), KeyError> {
        let any = signing_key::Entity::find().one(&self.connection).await?;
        if any.is_none() {
            self.add_key(&self.connection, 0).await?;
        }
        Ok(())
    }

    /// Adds a key that signs `lead_seconds` from now; returns (kid, signs_from). It is
    /// published once `connection` (a transaction, for a recorded rotation) commits.
    pub async fn add_key(
        &self,
        connection: &impl ConnectionTrait,
        lead_seconds: u64,
    ) -> Result<(String, u64), KeyError> {
        let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
            .map_err(|error| KeyError::Generate(error.to_string()))?;
        let public_key = key_pair.public_key_raw().to_vec();
        let kid = hex::encode(&Sha256::digest(&public_key)[..8]);
        let now = crate::unix_now();
        let signs_from = now + lead_seconds;
        signing_key::ActiveModel {
            kid: Set(kid.clone()),
            algorithm: Set(JWT_ALGORITHM_NAME.to_owned()),
            private_key_pkcs8: Set(STANDARD.encode(key_pair.serialize_der())),
            public_key: Set(URL_SAFE_NO_PAD.encode(&public_key)),
            created_at: Set(now as i64),
            activates_at: Set(signs_from as i64),
        }
        .insert(connection)
        .await?;
        Ok((kid, signs_from))
    }

    async fn keys_by_activation(&self) -> Result<Vec<signing_key::Model>, KeyError> {
        keys_by_activation_on(&self.connection).await
    }

    /// Signs `claims` with the newest key that is already active, reading the keys through
    /// `connection`: a caller inside a transaction passes it, so signing never waits for a
    /// second pooled connection while the transaction holds one and its row locks (concurrent
    /// logins of one user would otherwise fill the pool with transactions waiting for the
    /// lock while its holder waits for the pool).
    pub async fn sign<C: ConnectionTrait>(
        &self,
        connection: &C,
        claims: &AccessClaims,
    ) -> Result<String, KeyError> {
        let now = crate::unix_now() as i64;
        let keys = keys_by_activation_on(connection).await?;
        let active = keys
            .iter()
            .rev()
            .find(|key| key.activates_at <= now)
            .ok_or(KeyError::NoActiveKey)?;
        let encoding_key = {
            let mut decoded = self
                .decoded
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match decoded.get(&active.kid) {
                Some(key) => key.clone(),
                None => {
                    let pkcs8 = STANDARD
                        .decode(&active.private_key_pkcs8)
                        .map_err(|_| KeyError::Corrupt)?;
                    let key = std::sync::Arc::new(EncodingKey::from_ed_der(&pkcs8));
                    decoded.insert(active.kid.clone(), key.clone());
                    key
                }
            }
        };
        let mut header = Header::new(ALGORITHM);
        header.kid = Some(active.kid.clone());
        header.typ = Some("at+jwt".to_owned());
        jsonwebtoken::encode(&header, claims, &encoding_key)
            .map_err(|error| KeyError::Sign(error.to_string()))
    }

    /// The keys verifiers must know: every key not yet active, the active one, and each
    /// superseded key until the tokens it signed have expired.
    pub async fn published(&self) -> Result<Vec<PublishedKey>, KeyError> {
        let now = crate::unix_now() as i64;
        let keys = self.keys_by_activation().await?;
        let keep_for = self.access_token_ttl_seconds as i64 + 60;
        let published = keys
            .iter()
            .enumerate()
            .filter(|(index, _)| {
                // A key stops signing when the next one activates; it is kept while its tokens live.
                let superseded_at = keys[index + 1..]
                    .iter()
                    .map(|next| next.activates_at)
                    .find(|at| *at <= now);
                superseded_at.is_none_or(|at| now < at + keep_for)
            })
            .map(|(_, key)| PublishedKey {
                kid: key.kid.clone(),
                kty: "OKP".to_owned(),
                crv: "Ed25519".to_owned(),
                alg: key.algorithm.clone(),
                x: key.public_key.clone(),
            })
            .collect();
        Ok(published)
    }
}

async fn keys_by_activation_on<C: ConnectionTrait>(
    connection: &C,
) -> Result<Vec<signing_key::Model>, KeyError> {
    Ok(signing_key::Entity::find()
        .order_by_asc(signing_key::Column::ActivatesAt)
        .order_by_asc(signing_key::Column::CreatedAt)
        .all(connection)
        .await?)
}
