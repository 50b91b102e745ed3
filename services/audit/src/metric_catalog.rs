//! Every family the audit service exports, with its HELP text, and the counters alerts watch
//! (append failures, a chain that no longer verifies, anchor violations) registered at zero.

pub const APPEND_FAILURES: &str = "medai_ledger_append_failures_total";
/// Verifications that found the stored chain broken, by `check`: `verify` (the Verify RPC)
/// or `checkpoint` (the incremental check before a checkpoint is signed).
pub const CHAIN_VERIFICATION_FAILURES: &str = "medai_ledger_chain_verification_failures_total";

/// Describes the audit service's families and registers its watched counters at zero.
/// Idempotent; without an installed recorder it does nothing.
pub fn describe() {
    metrics::describe_counter!(
        "medai_ledger_appends_total",
        "Ledger entries appended, by action."
    );
    metrics::describe_histogram!(
        "medai_ledger_group_commit_size",
        "Entries written by one group commit."
    );
    metrics::describe_counter!(
        APPEND_FAILURES,
        "Ledger entries whose append failed in the database (the caller was answered with an error)."
    );
    metrics::describe_counter!(
        CHAIN_VERIFICATION_FAILURES,
        "Verifications that found the stored hash chain broken, by check (verify or checkpoint)."
    );
    metrics::describe_counter!(
        crate::anchor::VIOLATION_COUNTER,
        "Ledger appends refused because the stored chain does not extend the head last committed or the newest signed checkpoint."
    );
    metrics::describe_gauge!(
        crate::anchor::VIOLATION_GAUGE,
        "1 while appends are refused because the stored chain does not extend its anchor; 0 otherwise."
    );
    metrics::describe_counter!(
        "medai_ledger_checkpoint_entries_verified_total",
        "Ledger entries verified incrementally before checkpoints were signed."
    );
    metrics::describe_counter!(
        "medai_ledger_checkpoints_total",
        "Signed checkpoints created."
    );
    metrics::counter!(APPEND_FAILURES).increment(0);
    for check in ["verify", "checkpoint"] {
        metrics::counter!(CHAIN_VERIFICATION_FAILURES, "check" => check).increment(0);
    }
    metrics::counter!(crate::anchor::VIOLATION_COUNTER).increment(0);
    metrics::gauge!(crate::anchor::VIOLATION_GAUGE).increment(0.0);
    metrics::counter!("medai_ledger_checkpoints_total").increment(0);
}
