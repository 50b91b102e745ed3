//! Every family the auth service exports, with its HELP text, and the counters alerts watch
//! (refused logins, lockouts, refresh-token reuse) registered at zero.

pub const LOGINS: &str = "medai_auth_logins_total";
pub const REFRESHES: &str = "medai_auth_refresh_total";

/// Describes the auth service's families and registers its watched counters at zero.
/// Idempotent; without an installed recorder it does nothing.
pub fn describe() {
    metrics::describe_counter!(
        LOGINS,
        "Login attempts by outcome: success, invalid_credentials, locked, disabled."
    );
    metrics::describe_counter!(
        "medai_auth_lockouts_total",
        "Accounts locked after too many failed logins."
    );
    metrics::describe_counter!(
        REFRESHES,
        "Refresh-token exchanges by outcome: success, invalid, reuse (a rotated token presented again: its family is revoked)."
    );
    metrics::describe_gauge!(
        crate::passwords::HASHES_IN_PROGRESS,
        "Password hashes (argon2id, 19 MiB each) running now; at most passwords.max_concurrent_hashes."
    );
    metrics::describe_gauge!(
        crate::passwords::HASHES_PEAK,
        "The most password hashes that ran at once since the service started."
    );
    metrics::describe_counter!(
        crate::passwords::HASHES_REFUSED,
        "Logins and password changes refused with AUTH_BUSY because the hash queue was full."
    );
    medai_revocation::describe_metrics();
    for outcome in ["success", "invalid_credentials", "locked", "disabled"] {
        metrics::counter!(LOGINS, "outcome" => outcome).increment(0);
    }
    for outcome in ["success", "invalid", "reuse"] {
        metrics::counter!(REFRESHES, "outcome" => outcome).increment(0);
    }
    metrics::counter!("medai_auth_lockouts_total").increment(0);
    metrics::counter!(crate::passwords::HASHES_REFUSED).increment(0);
}
