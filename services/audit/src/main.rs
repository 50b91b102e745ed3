use std::process::ExitCode;

use medai_audit::config::ENV_PREFIX;

#[tokio::main]
async fn main() -> ExitCode {
    medai_runtime::process::run_service("audit", ENV_PREFIX, medai_audit::serve).await
}
