use std::process::ExitCode;

use medai_gateway::config::ENV_PREFIX;
use medai_runtime::health::Dependency;

/// mimalloc instead of glibc's malloc: a prediction's buffers (the image as it arrives, is
/// hashed and is sent on; each hop's HTTP/2 and TLS frames) made glibc's malloc and free 16 %
/// of the gateway's CPU under load, most of it consolidating freed chunks (issue 14).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    medai_runtime::async_main::run("medai-gateway", serve_until_stopped())
}

async fn serve_until_stopped() -> ExitCode {
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
