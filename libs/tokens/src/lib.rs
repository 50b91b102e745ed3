//! Access tokens of the mesh: the claims auth signs and the verification every verifier runs.
//! Verification pins the algorithm (EdDSA), the issuer and the audience, requires every
//! registered claim, and looks keys up by `kid` only among the published keys.

use std::collections::HashMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde::{Deserialize, Serialize};

pub const ALGORITHM: Algorithm = Algorithm::EdDSA;
pub const JWT_ALGORITHM_NAME: &str = "EdDSA";

/// What a user may do in the mesh. Each external RPC names the roles it allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Clinician,
    Viewer,
    Auditor,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Clinician => "clinician",
            Self::Viewer => "viewer",
            Self::Auditor => "auditor",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "admin" => Some(Self::Admin),
            "clinician" => Some(Self::Clinician),
            "viewer" => Some(Self::Viewer),
            "auditor" => Some(Self::Auditor),
            _ => None,
        }
    }
}

/// The claims of an access token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    pub iss: String,
    pub aud: String,
    /// The user's stable id (not a name, not a patient identifier).
    pub sub: String,
    pub exp: u64,
    pub iat: u64,
    pub nbf: u64,
    pub jti: String,
    pub role: Role,
}

/// A published public key (the fields of an OKP/Ed25519 JWK that verification needs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishedKey {
    pub kid: String,
    pub kty: String,
    pub crv: String,
    pub alg: String,
    /// Base64url (no padding) of the raw 32-byte public key.
    pub x: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("the token is malformed")]
    Malformed,
    #[error("the token's algorithm is not allowed")]
    AlgorithmNotAllowed,
    #[error("the token names no key id")]
    MissingKeyId,
    #[error("the token's key is not published")]
    UnknownKey,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token's issuer is not trusted")]
    WrongIssuer,
    #[error("the token is not meant for this audience")]
    WrongAudience,
    #[error("the token's signature is invalid")]
    BadSignature,
    #[error("the token lacks a required claim")]
    MissingClaim,
}

impl TokenError {
    /// The stable code sent to callers.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed => "TOKEN_MALFORMED",
            Self::AlgorithmNotAllowed => "TOKEN_ALGORITHM_NOT_ALLOWED",
            Self::MissingKeyId | Self::UnknownKey => "TOKEN_UNKNOWN_KEY",
            Self::Expired => "TOKEN_EXPIRED",
            Self::NotYetValid => "TOKEN_NOT_YET_VALID",
            Self::WrongIssuer => "TOKEN_WRONG_ISSUER",
            Self::WrongAudience => "TOKEN_WRONG_AUDIENCE",
            Self::BadSignature => "TOKEN_BAD_SIGNATURE",
            Self::MissingClaim => "TOKEN_MISSING_CLAIM",
        }
    }
}

/// Verifies tokens against a set of published keys.
#[derive(Clone)]
pub struct TokenVerifier {
    keys: HashMap<String, DecodingKey>,
    validation: Validation,
}

impl TokenVerifier {
    /// Keys of another type or algorithm than Ed25519/EdDSA are ignored, never trusted.
    pub fn new(issuer: &str, audience: &str, keys: &[PublishedKey]) -> Self {
        let mut validation = Validation::new(ALGORITHM);
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "nbf", "iat", "iss", "aud", "sub", "jti"]);
        validation.validate_nbf = true;
        validation.leeway = 5;
        let keys = keys
            .iter()
            .filter(|key| key.kty == "OKP" && key.crv == "Ed25519" && key.alg == JWT_ALGORITHM_NAME)
            .filter(|key| {
                URL_SAFE_NO_PAD
                    .decode(&key.x)
                    .is_ok_and(|raw| raw.len() == 32)
            })
            .filter_map(|key| {
                DecodingKey::from_ed_components(&key.x)
                    .ok()
                    .map(|decoding| (key.kid.clone(), decoding))
            })
            .collect();
        Self { keys, validation }
    }

    pub fn knows_key(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }

    /// The `kid` a token names, read before verification to pick (or fetch) its key.
    pub fn key_id(token: &str) -> Result<String, TokenError> {
        let header = decode_header(token).map_err(|_| TokenError::Malformed)?;
        if header.alg != ALGORITHM {
            return Err(TokenError::AlgorithmNotAllowed);
        }
        header.kid.ok_or(TokenError::MissingKeyId)
    }

    pub fn verify(&self, token: &str) -> Result<AccessClaims, TokenError> {
        let kid = Self::key_id(token)?;
        let key = self.keys.get(&kid).ok_or(TokenError::UnknownKey)?;
        decode::<AccessClaims>(token, key, &self.validation)
            .map(|data| data.claims)
            .map_err(|error| classify(&error))
    }
}

fn classify(error: &jsonwebtoken::errors::Error) -> TokenError {
    use jsonwebtoken::errors::ErrorKind;
    match error.kind() {
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
        ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
        ErrorKind::InvalidAudience => TokenError::WrongAudience,
        ErrorKind::InvalidSignature => TokenError::BadSignature,
        ErrorKind::InvalidAlgorithm => TokenError::AlgorithmNotAllowed,
        ErrorKind::MissingRequiredClaim(_) => TokenError::MissingClaim,
        _ => TokenError::Malformed,
    }
}
