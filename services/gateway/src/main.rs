use std::process::ExitCode;

use medai_gateway::config::ENV_PREFIX;

#[tokio::main]
async fn main() -> ExitCode {
    medai_runtime::process::run_service("gateway", ENV_PREFIX, medai_gateway::serve).await
}
