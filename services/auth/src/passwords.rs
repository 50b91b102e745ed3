//! Password hashing with argon2id (OWASP parameters: 19 MiB, 2 passes, 1 lane).
//! Hashing is CPU-bound and runs on the blocking pool.

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

fn hasher() -> Argon2<'static> {
    // The parameters are constants that argon2 accepts; fall back to its defaults otherwise.
    let params = Params::new(19 * 1024, 2, 1, None).unwrap_or_default();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

pub const MIN_PASSWORD_CHARS: usize = 12;

/// The password policy: long enough; length beats composition rules (NIST SP 800-63B).
pub fn check_strength(password: &str) -> Result<(), String> {
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(format!(
            "must have at least {MIN_PASSWORD_CHARS} characters"
        ));
    }
    if password.chars().count() > 256 {
        return Err("must have at most 256 characters".to_owned());
    }
    Ok(())
}

pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    hasher()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|error| error.to_string())
}

/// True only for the right password. A malformed stored hash never verifies.
pub fn verify_password(password: &str, stored_hash: &str) -> bool {
    PasswordHash::new(stored_hash).is_ok_and(|parsed| {
        hasher()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
}

/// A hash of a random password, verified against when the user does not exist so that an
/// unknown username costs the same time as a wrong password.
pub fn decoy_hash() -> String {
    let random: String = uuid_like();
    hash_password(&random).unwrap_or_default()
}

fn uuid_like() -> String {
    SaltString::generate(&mut OsRng).as_str().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn right_password_verifies_and_wrong_one_does_not() {
        let hash = hash_password("correct horse battery").expect("hash");
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password("correct horse battery", &hash));
        assert!(!verify_password("correct horse battery!", &hash));
        assert!(!verify_password("anything", "not a phc string"));
    }
}
