use std::path::Path;
use std::process::ExitCode;

use medai_inference::config::ENV_PREFIX;
use medai_inference::manifest::{ModelManifest, ModelStatus};
use medai_runtime::health::Dependency;

#[tokio::main]
async fn main() -> ExitCode {
    if medai_runtime::process::migrate_requested() {
        return medai_runtime::process::run_migrations(
            "inference",
            ENV_PREFIX,
            medai_inference::results::ResultsStore::migrate,
        )
        .await;
    }
    // Lifecycle changes are recorded before they take effect, and a service with no active
    // model has nothing to serve.
    medai_runtime::process::run_service_with_dependencies(
        "inference",
        ENV_PREFIX,
        medai_inference::serve,
        |config: &medai_inference::InferenceConfig| {
            let repository = config.model_repository.clone();
            vec![
                Dependency::mesh_service("ledger", &config.audit_endpoint, "audit"),
                Dependency::condition("active model", move || some_version_is_active(&repository)),
            ]
        },
    )
    .await
}

/// Whether any `<model>/<version>/manifest.toml` under `repository` says `active`; lifecycle
/// changes rewrite those files before they take effect.
fn some_version_is_active(repository: &Path) -> bool {
    let Ok(models) = std::fs::read_dir(repository) else {
        return false;
    };
    models.flatten().any(|model| {
        std::fs::read_dir(model.path()).is_ok_and(|versions| {
            versions.flatten().any(|version| {
                ModelManifest::load(&version.path().join("manifest.toml"))
                    .is_ok_and(|manifest| manifest.status == ModelStatus::Active)
            })
        })
    })
}
