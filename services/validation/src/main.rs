use std::process::ExitCode;

use medai_validation::config::ENV_PREFIX;

fn main() -> ExitCode {
    medai_runtime::async_main::run("medai-validation", serve_until_stopped())
}

async fn serve_until_stopped() -> ExitCode {
    medai_runtime::process::run_service("validation", ENV_PREFIX, medai_validation::serve).await
}
