use std::process::ExitCode;

use medai_inference::config::ENV_PREFIX;

#[tokio::main]
async fn main() -> ExitCode {
    medai_runtime::process::run_service("inference", ENV_PREFIX, medai_inference::serve).await
}
