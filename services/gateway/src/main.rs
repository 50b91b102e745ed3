use std::process::ExitCode;

use medai_gateway::config::ENV_PREFIX;
use medai_runtime::health::Dependency;

#[tokio::main]
async fn main() -> ExitCode {
    // No prediction leaves without its ledger record: no ledger, no gateway.
    medai_runtime::process::run_service_with_dependencies(
        "gateway",
        ENV_PREFIX,
        medai_gateway::serve,
        |config: &medai_gateway::GatewayConfig| {
            vec![Dependency::mesh_service(
                "ledger",
                &config.audit_endpoint,
                "audit",
            )]
        },
    )
    .await
}
