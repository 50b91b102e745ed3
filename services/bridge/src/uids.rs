//! New DICOM UIDs under the configured root. They are derived (a hash of what they name), so
//! a report sent again after a crash carries the same UID and the PACS keeps one copy.

use sha2::{Digest, Sha256};

const MAX_UID_LENGTH: usize = 64;
const MAX_ROOT_LENGTH: usize = 40;

/// Digits and dots, no empty component, no leading zero, at most 40 characters (leaving
/// room for a derived suffix of at least 20 digits).
pub fn is_valid_root(root: &str) -> bool {
    root.len() <= MAX_ROOT_LENGTH && is_valid_uid(root)
}

pub fn is_valid_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= MAX_UID_LENGTH
        && uid.split('.').all(|component| {
            !component.is_empty()
                && component.bytes().all(|byte| byte.is_ascii_digit())
                && (component == "0" || !component.starts_with('0'))
        })
}

/// `<root>.<decimal digits of SHA-256(purpose, parts…)>`, as long as a UID may be.
pub fn derived_uid(root: &str, purpose: &str, parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(purpose.as_bytes());
    for part in parts {
        hasher.update([0u8]);
        hasher.update(part.as_bytes());
    }
    let digest = hasher.finalize();
    let mut high = [0u8; 16];
    high.copy_from_slice(&digest[..16]);
    let number = u128::from_be_bytes(high);
    let budget = MAX_UID_LENGTH - root.len() - 1;
    let mut digits = number.to_string();
    digits.truncate(budget.min(digits.len()));
    // A component never starts with 0; a leading 0 cannot occur in the decimal of a u128
    // other than 0 itself, but truncation keeps the first digits, so only that case remains.
    if digits.starts_with('0') {
        digits.replace_range(0..1, "1");
    }
    format!("{root}.{digits}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_uids_are_valid_stable_and_distinct() {
        let root = "1.2.826.0.1.3680043.10.1234";
        let first = derived_uid(root, "sr", &["1.2.3", "result-a"]);
        assert!(is_valid_uid(&first), "{first}");
        assert_eq!(first.len(), 64);
        assert_eq!(first, derived_uid(root, "sr", &["1.2.3", "result-a"]));
        assert_ne!(first, derived_uid(root, "sr", &["1.2.3", "result-b"]));
        assert_ne!(first, derived_uid(root, "series", &["1.2.3", "result-a"]));
        let longest_root = "1.2.826.0.1.3680043.10.1234.5678.9012.34";
        assert!(is_valid_root(longest_root));
        assert!(is_valid_uid(&derived_uid(longest_root, "sr", &["x"])));
    }

    #[test]
    fn roots_with_letters_leading_zeros_or_empty_components_are_refused() {
        for root in ["", "1..2", "1.02", "1.2a", "1.2.", &"1.".repeat(30)] {
            assert!(!is_valid_root(root), "{root}");
        }
        assert!(is_valid_root("1.2.0.3"));
    }
}
