use std::process::ExitCode;

use medai_bridge::config::{BridgeConfig, ENV_PREFIX};
use medai_bridge::{BridgeListeners, serve};

const HELP: &str = "\
medai-bridge: the MedAI Flow DICOM bridge (a C-STORE SCP in front of the gateway)

Usage: medai-bridge [--print-config | --help | --version]

Without arguments it serves DICOM until SIGTERM or Ctrl-C.

Options:
  --print-config  print the effective configuration and exit
  -h, --help      print this help
  -V, --version   print the version

Settings come from MEDAI_BRIDGE_* environment variables (nested keys joined by __) or the
TOML file named by MEDAI_BRIDGE_CONFIG.

Exit codes: 0 success, 1 failure while running, 2 usage or configuration error";

#[tokio::main]
async fn main() -> ExitCode {
    // The same grammar as the other service binaries, less `--probe` (the bridge has no gRPC
    // health endpoint of its own).
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    match medai_runtime::process::CommandLine::parse(&arguments) {
        Ok(medai_runtime::process::CommandLine::Help) => {
            #[allow(clippy::print_stdout)]
            {
                println!("{HELP}");
            }
            return ExitCode::SUCCESS;
        }
        Ok(medai_runtime::process::CommandLine::Version) => {
            #[allow(clippy::print_stdout)]
            {
                println!("medai-bridge {}", env!("CARGO_PKG_VERSION"));
            }
            return ExitCode::SUCCESS;
        }
        Ok(medai_runtime::process::CommandLine::Probe) => {
            eprintln!("medai-bridge: unknown argument \"--probe\" (try --help)");
            return ExitCode::from(2);
        }
        Ok(_) => {}
        Err(unknown) => {
            eprintln!("medai-bridge: unknown argument {unknown:?} (try --help)");
            return ExitCode::from(2);
        }
    }
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
    let stow = match &config.stow {
        Some(settings) => match tokio::net::TcpListener::bind(settings.listen_addr).await {
            Ok(listener) => Some(listener),
            Err(error) => {
                tracing::error!(address = %settings.listen_addr, error = %error, "cannot bind the STOW-RS listener");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    if let (Some(path), Ok(address)) = (&config.address_file, dicom.local_addr()) {
        let stow_address = stow
            .as_ref()
            .and_then(|listener| listener.local_addr().ok())
            .map(|address| format!(",\"stow\":\"{address}\""))
            .unwrap_or_default();
        let written = std::fs::write(
            path.with_extension("tmp"),
            format!("{{\"dicom\":\"{address}\"{stow_address}}}"),
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
        BridgeListeners { dicom, stow },
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
