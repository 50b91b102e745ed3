use std::process::ExitCode;

use medai_validation::config::ENV_PREFIX;

#[tokio::main]
async fn main() -> ExitCode {
    medai_runtime::process::run_service("validation", ENV_PREFIX, medai_validation::serve).await
}
