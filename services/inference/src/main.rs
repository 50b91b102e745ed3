use std::process::ExitCode;

use medai_inference::ServedModels;
use medai_inference::config::ENV_PREFIX;
use medai_runtime::health::Dependency;

fn main() -> ExitCode {
    medai_runtime::async_main::run("medai-inference", serve_until_stopped())
}

async fn serve_until_stopped() -> ExitCode {
    if medai_runtime::process::migrate_requested() {
        return medai_runtime::process::run_migrations(
            "inference",
            ENV_PREFIX,
            medai_inference::results::ResultsStore::migrate,
        )
        .await;
    }
    // Lifecycle changes are recorded before they take effect, and a service with no model
    // version served (the lifecycle store names none active, or this replica cannot load it)
    // has nothing to serve.
    let served = ServedModels::default();
    let reported = served.clone();
    medai_runtime::process::run_service_with_dependencies(
        "inference",
        ENV_PREFIX,
        move |config, listener, shutdown| {
            medai_inference::serve_reporting(config, listener, shutdown, reported)
        },
        |config: &medai_inference::InferenceConfig| {
            vec![
                Dependency::mesh_service("ledger", &config.audit_endpoint, "audit"),
                Dependency::condition("active model", move || served.any()),
            ]
        },
    )
    .await
}
