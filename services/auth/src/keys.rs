//! Signing keys: Ed25519, generated on first start and kept in the auth database. Every key in
//! the table is published (JWKS); the newest one signs.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::{EncodingKey, Header};
use medai_tokens::{ALGORITHM, AccessClaims, JWT_ALGORITHM_NAME, PublishedKey};
use sea_orm::{ActiveModelTrait, DatabaseConnection, DbErr, EntityTrait, QueryOrder, Set};
use sha2::{Digest, Sha256};

use crate::store::signing_key;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key generation failed: {0}")]
    Generate(String),
    #[error("a stored signing key is unreadable")]
    Corrupt,
    #[error(transparent)]
    Database(#[from] DbErr),
    #[error("signing failed: {0}")]
    Sign(String),
}

pub struct ActiveSigningKey {
    kid: String,
    encoding_key: EncodingKey,
}

impl ActiveSigningKey {
    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn sign(&self, claims: &AccessClaims) -> Result<String, KeyError> {
        let mut header = Header::new(ALGORITHM);
        header.kid = Some(self.kid.clone());
        header.typ = Some("at+jwt".to_owned());
        jsonwebtoken::encode(&header, claims, &self.encoding_key)
            .map_err(|error| KeyError::Sign(error.to_string()))
    }
}

/// Returns the newest signing key, generating and storing the first one if there is none.
pub async fn ensure_signing_key(
    connection: &DatabaseConnection,
) -> Result<ActiveSigningKey, KeyError> {
    let newest = signing_key::Entity::find()
        .order_by_desc(signing_key::Column::CreatedAt)
        .one(connection)
        .await?;
    let row = match newest {
        Some(row) => row,
        None => generate_and_store(connection).await?,
    };
    let pkcs8 = STANDARD
        .decode(&row.private_key_pkcs8)
        .map_err(|_| KeyError::Corrupt)?;
    Ok(ActiveSigningKey {
        kid: row.kid,
        encoding_key: EncodingKey::from_ed_der(&pkcs8),
    })
}

async fn generate_and_store(
    connection: &DatabaseConnection,
) -> Result<signing_key::Model, KeyError> {
    let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
        .map_err(|error| KeyError::Generate(error.to_string()))?;
    let public_key = key_pair.public_key_raw().to_vec();
    let kid = hex::encode(&Sha256::digest(&public_key)[..8]);
    let row = signing_key::ActiveModel {
        kid: Set(kid.clone()),
        algorithm: Set(JWT_ALGORITHM_NAME.to_owned()),
        private_key_pkcs8: Set(STANDARD.encode(key_pair.serialize_der())),
        public_key: Set(URL_SAFE_NO_PAD.encode(&public_key)),
        created_at: Set(crate::unix_now() as i64),
    };
    let stored = row.insert(connection).await?;
    tracing::info!(kid = %kid, "generated a new signing key");
    Ok(stored)
}

/// Every stored key, for the JWKS.
pub async fn published_keys(
    connection: &DatabaseConnection,
) -> Result<Vec<PublishedKey>, KeyError> {
    let rows = signing_key::Entity::find()
        .order_by_desc(signing_key::Column::CreatedAt)
        .all(connection)
        .await?;
    Ok(rows
        .into_iter()
        .map(|row| PublishedKey {
            kid: row.kid,
            kty: "OKP".to_owned(),
            crv: "Ed25519".to_owned(),
            alg: row.algorithm,
            x: row.public_key,
        })
        .collect())
}
