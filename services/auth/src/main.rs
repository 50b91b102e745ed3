use std::process::ExitCode;

use medai_auth::config::ENV_PREFIX;

#[tokio::main]
async fn main() -> ExitCode {
    medai_runtime::process::run_service("auth", ENV_PREFIX, medai_auth::serve).await
}
