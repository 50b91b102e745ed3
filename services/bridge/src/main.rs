use std::process::ExitCode;

use medai_bridge::config::{BridgeConfig, ENV_PREFIX};
use medai_bridge::{BridgeListeners, serve};

#[tokio::main]
async fn main() -> ExitCode {
    let config: BridgeConfig = match medai_runtime::config::load_from_process(ENV_PREFIX) {
        Ok(config) => config,
        Err(error) => {
            eprintln!(
                "medai-bridge: {error} (settings come from {ENV_PREFIX}* variables or the file named by {ENV_PREFIX}CONFIG)"
            );
            return ExitCode::from(2);
        }
    };
    if std::env::args().any(|argument| argument == "--print-config") {
        #[allow(clippy::print_stdout)]
        match toml::to_string_pretty(&config) {
            Ok(text) => println!("{text}"),
            Err(error) => eprintln!("medai-bridge: cannot print config: {error}"),
        }
        return ExitCode::SUCCESS;
    }
    medai_runtime::telemetry::init_json_logging(&config.log_filter);
    let dicom = match tokio::net::TcpListener::bind(config.dicom_listen_addr).await {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(address = %config.dicom_listen_addr, error = %error, "cannot bind the DICOM listener");
            return ExitCode::FAILURE;
        }
    };
    if let (Some(path), Ok(address)) = (&config.address_file, dicom.local_addr()) {
        let written = std::fs::write(
            path.with_extension("tmp"),
            format!("{{\"dicom\":\"{address}\"}}"),
        )
        .and_then(|()| std::fs::rename(path.with_extension("tmp"), path));
        if let Err(error) = written {
            tracing::error!(error = %error, "cannot write the address file");
            return ExitCode::FAILURE;
        }
    }
    tracing::info!(address = ?dicom.local_addr().ok(), "bridge serving DICOM");
    match serve(
        config,
        BridgeListeners { dicom },
        medai_runtime::shutdown::termination_signal(),
    )
    .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = %error, "bridge failed");
            ExitCode::FAILURE
        }
    }
}
