//! Access tokens of the mesh: the claims auth signs and the verification every verifier runs.
//! Verification pins the algorithm (EdDSA), the issuer and the audience, requires every
//! registered claim, and looks keys up by `kid` only among the published keys.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde::{Deserialize, Serialize};

pub const ALGORITHM: Algorithm = Algorithm::EdDSA;
pub const JWT_ALGORITHM_NAME: &str = "EdDSA";
/// Clock skew allowed on `exp` and `nbf`.
const LEEWAY_SECONDS: u64 = 5;

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
    /// The user's token generation when this token was issued. Disabling a user, resetting or
    /// changing their password, or deleting them raises the generation; verifiers refuse tokens
    /// below the subject's current floor (see medai-revocation).
    pub generation: u64,
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
        validation.leeway = LEEWAY_SECONDS;
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

/// Tokens whose signature was checked, with their claims, so a client sending many requests
/// with one token pays for one signature check, not one per request.
///
/// What a cached answer still checks on every use: the token is byte-for-byte the one
/// verified (the whole token is the key, signature included), its key is still published by
/// the verifier in use (a key withdrawn from the published set invalidates its tokens at
/// once), and it has not expired (the same leeway as a full verification). Revocation is not
/// this cache's business: callers check it after every verification, cached or not.
pub struct VerifiedTokens {
    capacity: usize,
    entries: Mutex<HashMap<String, VerifiedToken>>,
    signature_checks: AtomicU64,
}

struct VerifiedToken {
    kid: String,
    claims: AccessClaims,
}

/// Whether a verification needed the signature check or was answered from the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verification {
    SignatureChecked,
    Cached,
}

impl Verification {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SignatureChecked => "signature_checked",
            Self::Cached => "cached",
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

impl VerifiedTokens {
    /// Keeps at most `capacity` tokens; past it, expired ones are dropped first, then all.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: Mutex::default(),
            signature_checks: AtomicU64::new(0),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, VerifiedToken>> {
        // A panic while holding the lock cannot leave the map inconsistent; keep serving.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Verifies `token` with `verifier`: from the cache when it was verified before and is
    /// still in force, otherwise in full (and then cached if valid).
    pub fn verify(
        &self,
        verifier: &TokenVerifier,
        token: &str,
    ) -> Result<(AccessClaims, Verification), TokenError> {
        self.verify_at(verifier, token, unix_now())
    }

    fn verify_at(
        &self,
        verifier: &TokenVerifier,
        token: &str,
        now: u64,
    ) -> Result<(AccessClaims, Verification), TokenError> {
        {
            let mut entries = self.entries();
            if let Some(entry) = entries.get(token) {
                if !verifier.knows_key(&entry.kid) {
                    entries.remove(token);
                    return Err(TokenError::UnknownKey);
                }
                if entry.claims.exp.saturating_add(LEEWAY_SECONDS) < now {
                    entries.remove(token);
                    return Err(TokenError::Expired);
                }
                return Ok((entry.claims.clone(), Verification::Cached));
            }
        }
        self.signature_checks.fetch_add(1, Ordering::Relaxed);
        let claims = verifier.verify(token)?;
        let kid = TokenVerifier::key_id(token)?;
        let mut entries = self.entries();
        if entries.len() >= self.capacity {
            entries.retain(|_, entry| entry.claims.exp.saturating_add(LEEWAY_SECONDS) >= now);
            if entries.len() >= self.capacity {
                entries.clear();
            }
        }
        if self.capacity > 0 {
            entries.insert(
                token.to_owned(),
                VerifiedToken {
                    kid,
                    claims: claims.clone(),
                },
            );
        }
        Ok((claims, Verification::SignatureChecked))
    }

    /// Full verifications (signature checks) made so far.
    pub fn signature_checks(&self) -> u64 {
        self.signature_checks.load(Ordering::Relaxed)
    }

    pub fn len(&self) -> usize {
        self.entries().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};

    struct Signer {
        kid: String,
        key: EncodingKey,
        public: PublishedKey,
    }

    fn signer(kid: &str) -> Signer {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key");
        let public = PublishedKey {
            kid: kid.to_owned(),
            kty: "OKP".to_owned(),
            crv: "Ed25519".to_owned(),
            alg: JWT_ALGORITHM_NAME.to_owned(),
            x: URL_SAFE_NO_PAD.encode(pair.public_key_raw()),
        };
        Signer {
            kid: kid.to_owned(),
            key: EncodingKey::from_ed_der(&pair.serialize_der()),
            public,
        }
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs()
    }

    fn claims() -> AccessClaims {
        let now = now();
        AccessClaims {
            iss: "medai-auth".to_owned(),
            aud: "medai".to_owned(),
            sub: "user-1".to_owned(),
            exp: now + 600,
            iat: now,
            nbf: now,
            jti: "jti-1".to_owned(),
            role: Role::Clinician,
            generation: 0,
        }
    }

    fn sign(signer: &Signer, claims: &impl Serialize) -> String {
        let mut header = Header::new(ALGORITHM);
        header.kid = Some(signer.kid.clone());
        encode(&header, claims, &signer.key).expect("sign")
    }

    fn verifier(signer: &Signer) -> TokenVerifier {
        TokenVerifier::new("medai-auth", "medai", std::slice::from_ref(&signer.public))
    }

    #[test]
    fn a_valid_token_verifies_with_every_claim() {
        let signer = signer("k1");
        let verified = verifier(&signer)
            .verify(&sign(&signer, &claims()))
            .expect("valid");
        assert_eq!(verified, claims_with_times(&verified));
        assert_eq!(verified.role, Role::Clinician);
    }

    fn claims_with_times(verified: &AccessClaims) -> AccessClaims {
        AccessClaims {
            exp: verified.exp,
            iat: verified.iat,
            nbf: verified.nbf,
            ..claims()
        }
    }

    #[test]
    fn alg_none_is_refused() {
        let signer = signer("k1");
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT","kid":"k1"}"#);
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims()).expect("json"));
        let token = format!("{header}.{payload}.");
        assert!(verifier(&signer).verify(&token).is_err());
    }

    #[test]
    fn hs256_signed_with_the_public_key_is_refused() {
        let signer = signer("k1");
        let secret = URL_SAFE_NO_PAD.decode(&signer.public.x).expect("raw key");
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("k1".to_owned());
        let token = encode(&header, &claims(), &EncodingKey::from_secret(&secret)).expect("sign");
        assert_eq!(
            verifier(&signer).verify(&token),
            Err(TokenError::AlgorithmNotAllowed)
        );
        let token = encode(
            &header,
            &claims(),
            &EncodingKey::from_secret(signer.public.x.as_bytes()),
        )
        .expect("sign");
        assert_eq!(
            verifier(&signer).verify(&token),
            Err(TokenError::AlgorithmNotAllowed)
        );
    }

    #[test]
    fn time_issuer_and_audience_are_enforced() {
        let signer = signer("k1");
        let verifier = verifier(&signer);
        let expired = AccessClaims {
            exp: now() - 120,
            iat: now() - 900,
            nbf: now() - 900,
            ..claims()
        };
        assert_eq!(
            verifier.verify(&sign(&signer, &expired)),
            Err(TokenError::Expired)
        );
        let early = AccessClaims {
            nbf: now() + 600,
            exp: now() + 1200,
            ..claims()
        };
        assert_eq!(
            verifier.verify(&sign(&signer, &early)),
            Err(TokenError::NotYetValid)
        );
        let issuer = AccessClaims {
            iss: "someone-else".to_owned(),
            ..claims()
        };
        assert_eq!(
            verifier.verify(&sign(&signer, &issuer)),
            Err(TokenError::WrongIssuer)
        );
        let audience = AccessClaims {
            aud: "other-system".to_owned(),
            ..claims()
        };
        assert_eq!(
            verifier.verify(&sign(&signer, &audience)),
            Err(TokenError::WrongAudience)
        );
    }

    #[test]
    fn another_key_is_refused_whether_or_not_it_borrows_a_known_kid() {
        let trusted = signer("k1");
        let impostor = signer("k1");
        assert_eq!(
            verifier(&trusted).verify(&sign(&impostor, &claims())),
            Err(TokenError::BadSignature)
        );
        let stranger = signer("k2");
        assert_eq!(
            verifier(&trusted).verify(&sign(&stranger, &claims())),
            Err(TokenError::UnknownKey)
        );
    }

    #[test]
    fn a_token_lacking_a_claim_is_refused() {
        #[derive(Serialize)]
        struct NoJti {
            iss: String,
            aud: String,
            sub: String,
            exp: u64,
            iat: u64,
            nbf: u64,
            role: Role,
        }
        let signer = signer("k1");
        let c = claims();
        let token = sign(
            &signer,
            &NoJti {
                iss: c.iss,
                aud: c.aud,
                sub: c.sub,
                exp: c.exp,
                iat: c.iat,
                nbf: c.nbf,
                role: c.role,
            },
        );
        assert!(verifier(&signer).verify(&token).is_err());
    }

    #[test]
    fn garbage_is_malformed() {
        let signer = signer("k1");
        assert_eq!(
            verifier(&signer).verify("not.a.token"),
            Err(TokenError::Malformed)
        );
        assert_eq!(verifier(&signer).verify(""), Err(TokenError::Malformed));
    }

    #[test]
    fn a_cached_token_is_checked_once_yet_refused_once_expired_or_its_key_withdrawn() {
        let signer = signer("k1");
        let verifier = verifier(&signer);
        let cache = VerifiedTokens::new(16);
        let short = AccessClaims {
            exp: now() + 30,
            ..claims()
        };
        let token = sign(&signer, &short);
        for _ in 0..100 {
            let (verified, _) = cache.verify(&verifier, &token).expect("valid");
            assert_eq!(verified.jti, "jti-1");
        }
        assert_eq!(cache.signature_checks(), 1, "one signature check per token");
        assert_eq!(
            cache.verify(&verifier, &token).expect("valid").1,
            Verification::Cached
        );

        // Past its expiry (and the leeway) the cached token is refused like any expired one.
        assert_eq!(
            cache.verify_at(&verifier, &token, short.exp + LEEWAY_SECONDS + 1),
            Err(TokenError::Expired)
        );
        assert!(cache.is_empty(), "an expired token leaves the cache");

        // A key no longer published takes its cached tokens with it.
        cache.verify(&verifier, &token).expect("valid again");
        let rotated = TokenVerifier::new("medai-auth", "medai", &[signer_of_other_key().public]);
        assert_eq!(cache.verify(&rotated, &token), Err(TokenError::UnknownKey));
    }

    fn signer_of_other_key() -> Signer {
        signer("k2")
    }

    #[test]
    fn a_forged_variant_of_a_cached_token_is_verified_in_full_and_refused() {
        let trusted = signer("k1");
        let verifier = verifier(&trusted);
        let cache = VerifiedTokens::new(16);
        let token = sign(&trusted, &claims());
        cache.verify(&verifier, &token).expect("valid");
        // Same header and claims, another key's signature: another cache key, a full check.
        let impostor = signer("k1");
        let forged = sign(&impostor, &claims());
        assert_eq!(
            cache.verify(&verifier, &forged),
            Err(TokenError::BadSignature)
        );
        let expired = AccessClaims {
            exp: now() - 120,
            iat: now() - 900,
            nbf: now() - 900,
            ..claims()
        };
        assert_eq!(
            cache.verify(&verifier, &sign(&trusted, &expired)),
            Err(TokenError::Expired)
        );
        assert_eq!(cache.len(), 1, "refused tokens are never cached");
        assert_eq!(cache.signature_checks(), 3);
    }

    #[test]
    fn the_cache_stays_within_its_capacity() {
        let signer = signer("k1");
        let verifier = verifier(&signer);
        let cache = VerifiedTokens::new(4);
        for index in 0..10 {
            let token = sign(
                &signer,
                &AccessClaims {
                    jti: format!("jti-{index}"),
                    ..claims()
                },
            );
            cache.verify(&verifier, &token).expect("valid");
            assert!(cache.len() <= 4);
        }
    }
}
