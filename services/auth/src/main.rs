use std::process::ExitCode;

use medai_auth::config::ENV_PREFIX;
use medai_runtime::health::Dependency;

fn main() -> ExitCode {
    medai_runtime::async_main::run("medai-auth", serve_until_stopped())
}

async fn serve_until_stopped() -> ExitCode {
    if medai_runtime::process::migrate_requested() {
        return medai_runtime::process::run_migrations(
            "auth",
            ENV_PREFIX,
            medai_auth::store::migrate,
        )
        .await;
    }
    // Logins, refreshes and revocations are recorded before they take effect: no ledger, no auth.
    // Boxed: auth's serve future is large (its stores and authority are built inside it).
    Box::pin(medai_runtime::process::run_service_with_dependencies(
        "auth",
        ENV_PREFIX,
        medai_auth::serve,
        |config: &medai_auth::AuthConfig| {
            vec![Dependency::mesh_service(
                "ledger",
                &config.audit_endpoint,
                "audit",
            )]
        },
    ))
    .await
}
