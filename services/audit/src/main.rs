use std::process::ExitCode;

use medai_audit::config::ENV_PREFIX;

fn main() -> ExitCode {
    medai_runtime::async_main::run("medai-audit", serve_until_stopped())
}

async fn serve_until_stopped() -> ExitCode {
    if medai_runtime::process::migrate_requested() {
        return medai_runtime::process::run_migrations(
            "audit",
            ENV_PREFIX,
            medai_audit::store::migrate,
        )
        .await;
    }
    medai_runtime::process::run_service("audit", ENV_PREFIX, medai_audit::serve).await
}
