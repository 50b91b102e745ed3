use std::process::ExitCode;

use futures::future::{BoxFuture, FutureExt, Shared};
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
TOML file named by MEDAI_BRIDGE_CONFIG. MEDAI_BRIDGE_TELEMETRY__ADMIN_ADDR opens Prometheus
/metrics and /livez; MEDAI_BRIDGE_TELEMETRY__OTLP_ENDPOINT exports traces over OTLP/gRPC.

Exit codes: 0 success, 1 failure while running, 2 usage or configuration error";

fn main() -> ExitCode {
    medai_runtime::async_main::run("medai-bridge", serve_until_stopped())
}

async fn serve_until_stopped() -> ExitCode {
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
    let telemetry = match medai_runtime::telemetry::init(
        "bridge",
        &config.log_filter,
        config.telemetry.otlp_endpoint.as_deref(),
    ) {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("medai-bridge: {error}");
            return ExitCode::from(2);
        }
    };
    let shutdown = medai_runtime::shutdown::termination_signal()
        .boxed()
        .shared();
    let exit = run(config, shutdown).await;
    telemetry.shutdown().await;
    exit
}

/// Binds the listeners, writes their addresses, serves until `shutdown`.
async fn run(config: BridgeConfig, shutdown: Shared<BoxFuture<'static, ()>>) -> ExitCode {
    let dicom = match tokio::net::TcpListener::bind(config.dicom_listen_addr).await {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(address = %config.dicom_listen_addr, error = %error, "cannot bind the DICOM listener");
            return ExitCode::FAILURE;
        }
    };
    let mut admin = None;
    if let Some(address) = config.telemetry.admin_addr {
        match medai_bridge::telemetry::start_admin(address, shutdown.clone()).await {
            Ok(bound) => admin = Some(bound),
            Err(error) => {
                tracing::error!(address = %address, error = %error, "cannot start the admin endpoint");
                return ExitCode::FAILURE;
            }
        }
    }
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
            .and_then(|listener| listener.local_addr().ok());
        let addresses =
            serde_json::json!({ "dicom": address, "admin": admin, "stow": stow_address });
        let written = std::fs::write(path.with_extension("tmp"), addresses.to_string())
            .and_then(|()| std::fs::rename(path.with_extension("tmp"), path));
        if let Err(error) = written {
            tracing::error!(error = %error, "cannot write the address file");
            return ExitCode::FAILURE;
        }
    }
    tracing::info!(address = ?dicom.local_addr().ok(), admin = ?admin, "bridge serving DICOM");
    match serve(config, BridgeListeners { dicom, stow }, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = %error, "bridge failed");
            ExitCode::FAILURE
        }
    }
}
