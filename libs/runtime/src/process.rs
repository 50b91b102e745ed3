//! What every service binary does, once: load typed config from the environment (and the file
//! named by `<PREFIX>CONFIG`), install JSON logs, bind the gRPC and admin listeners, serve until
//! SIGTERM/Ctrl-C, then drain: report NOT_SERVING at once, keep the listener open and serving
//! for `drain_seconds` (so load balancers and clients watching health move away first), then
//! close it and give in-flight calls a grace period to finish. While serving, required
//! dependencies are probed in the background and the health status follows them.
//!
//! `<binary> --print-config` prints the effective config (credentials redacted) and exits;
//! `<binary> --probe` exits non-zero unless the running service reports SERVING;
//! `<binary> --migrate` (services that own a schema) applies the migrations and exits.
//! `<binary> --help` and `--version` answer without needing any configuration. Any other
//! argument is a usage error (exit code 2).

use std::fmt::Display;
use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt, Shared};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::config::{from_str_or_native, load_from_process};
use crate::health::{Dependency, Readiness};

/// Where a service listens and how it logs; part of every service's config as `process`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProcessConfig {
    pub listen_addr: SocketAddr,
    /// Prometheus `/metrics` and `/livez`; no admin endpoint when absent.
    #[serde(default)]
    pub admin_addr: Option<SocketAddr>,
    #[serde(default = "default_log_filter")]
    pub log_filter: String,
    #[serde(
        default = "default_grace_seconds",
        deserialize_with = "from_str_or_native"
    )]
    pub shutdown_grace_seconds: u64,
    /// If set, the bound addresses are written here as JSON (`{"grpc": …, "admin": …}`) once
    /// the listeners are open, so a launcher can use port 0 instead of guessing free ports.
    #[serde(default)]
    pub address_file: Option<std::path::PathBuf>,
    /// An OTLP/gRPC collector (`http://collector:4317`) to export traces to; none when absent.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// After SIGTERM: how long to keep serving while reporting NOT_SERVING, before the
    /// listener closes.
    #[serde(
        default = "default_drain_seconds",
        deserialize_with = "from_str_or_native"
    )]
    pub drain_seconds: u64,
    /// How often required dependencies (the ledger, an active model) are checked.
    #[serde(
        default = "default_dependency_probe_seconds",
        deserialize_with = "from_str_or_native"
    )]
    pub dependency_probe_seconds: u64,
    /// Whether a service that owns a database schema (auth, audit, inference) applies its
    /// migrations at start. On by default (`medai up`, the tests); the Helm chart turns it off
    /// and runs them once in a pre-install/pre-upgrade Job (`<binary> --migrate`), so replicas
    /// connect with a role that cannot change the schema and refuse to start while a migration
    /// is missing. Services without a database ignore it.
    #[serde(
        default = "default_run_migrations",
        deserialize_with = "from_str_or_native"
    )]
    pub run_migrations: bool,
    /// Bounds on the connections peers hold open on the gRPC listener.
    #[serde(default)]
    pub connections: crate::connections::ConnectionLimits,
}

/// What a service writes to its `address_file`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct BoundAddresses {
    pub grpc: SocketAddr,
    pub admin: Option<SocketAddr>,
}

fn default_log_filter() -> String {
    "info".to_owned()
}

fn default_grace_seconds() -> u64 {
    10
}

fn default_drain_seconds() -> u64 {
    3
}

fn default_dependency_probe_seconds() -> u64 {
    2
}

fn default_run_migrations() -> bool {
    true
}

/// Implemented by each service's config.
pub trait ServiceConfig: DeserializeOwned + Serialize {
    fn process(&self) -> &ProcessConfig;
    fn tls(&self) -> &crate::TlsFiles;
}

/// A shutdown signal that several tasks can await.
pub type ShutdownSignal = Shared<BoxFuture<'static, ()>>;

/// What the command line asks of a service binary. Settings never come from arguments (only
/// from the environment and the config file), so the few flags are the whole grammar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandLine {
    Serve,
    PrintConfig,
    Probe,
    Help,
    Version,
}

impl CommandLine {
    /// `--help`/`-h` and `--version`/`-V` win over everything else, wherever they stand;
    /// otherwise an unknown argument is returned as the error.
    pub fn parse(arguments: &[String]) -> Result<Self, String> {
        let given = |flags: [&str; 2]| {
            arguments
                .iter()
                .any(|argument| flags.contains(&argument.as_str()))
        };
        if given(["--help", "-h"]) {
            return Ok(Self::Help);
        }
        if given(["--version", "-V"]) {
            return Ok(Self::Version);
        }
        let mut request = Self::Serve;
        for argument in arguments {
            match argument.as_str() {
                "--print-config" => request = Self::PrintConfig,
                "--probe" if request == Self::Serve => request = Self::Probe,
                "--probe" => {}
                other => return Err(other.to_owned()),
            }
        }
        Ok(request)
    }
}

fn help_text(service: &str, env_prefix: &str) -> String {
    let version = env!("CARGO_PKG_VERSION");
    [
        format!("medai-{service} {version}: the MedAI Flow {service} service"),
        String::new(),
        format!("Usage: medai-{service} [--print-config | --probe | --help | --version]"),
        String::new(),
        "Without arguments it serves until SIGTERM or Ctrl-C, then drains.".to_owned(),
        String::new(),
        "Options:".to_owned(),
        "  --print-config  print the effective configuration (credentials redacted) and exit".to_owned(),
        "  --probe         exit 0 if the running service reports SERVING, non-zero otherwise".to_owned(),
        "  --migrate       (audit, auth, inference) apply the database migrations and exit".to_owned(),
        "  -h, --help      print this help".to_owned(),
        "  -V, --version   print the version".to_owned(),
        String::new(),
        format!("Settings come from {env_prefix}* environment variables (nested keys joined by __,"),
        format!("for example {env_prefix}PROCESS__LISTEN_ADDR) or the TOML file named by {env_prefix}CONFIG."),
        String::new(),
        "Exit codes: 0 success, 1 failure while running, 2 usage or configuration error".to_owned(),
    ]
    .join("\n")
}

/// Runs one service binary to completion and returns its exit code.
pub async fn run_service<C, F, Fut, E>(
    service: &'static str,
    env_prefix: &str,
    serve: F,
) -> ExitCode
where
    C: ServiceConfig,
    F: FnOnce(C, TcpListener, ShutdownSignal) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    run_service_with_dependencies(service, env_prefix, serve, |_: &C| Vec::new()).await
}

/// [`run_service`] for a service that is only ready while `dependencies` (read from its
/// config) are available.
pub async fn run_service_with_dependencies<C, F, Fut, E, D>(
    service: &'static str,
    env_prefix: &str,
    serve: F,
    dependencies: D,
) -> ExitCode
where
    C: ServiceConfig,
    F: FnOnce(C, TcpListener, ShutdownSignal) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
    D: FnOnce(&C) -> Vec<Dependency>,
{
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    match CommandLine::parse(&arguments) {
        Ok(CommandLine::Help) => {
            #[allow(clippy::print_stdout)]
            {
                println!("{}", help_text(service, env_prefix));
            }
            return ExitCode::SUCCESS;
        }
        Ok(CommandLine::Version) => {
            #[allow(clippy::print_stdout)]
            {
                println!("medai-{service} {}", env!("CARGO_PKG_VERSION"));
            }
            return ExitCode::SUCCESS;
        }
        Ok(CommandLine::Serve | CommandLine::PrintConfig | CommandLine::Probe) => {}
        Err(unknown) => {
            eprintln!("medai-{service}: unknown argument {unknown:?} (try --help)");
            return ExitCode::from(2);
        }
    }
    let config: C = match load_from_process(env_prefix) {
        Ok(config) => config,
        Err(error) => {
            eprintln!(
                "medai-{service}: {error} (settings come from {env_prefix}* variables or the file named by {env_prefix}CONFIG)"
            );
            return ExitCode::from(2);
        }
    };
    if let Err(error) = config.process().connections.validate() {
        eprintln!("medai-{service}: {error}");
        return ExitCode::from(2);
    }
    if CommandLine::parse(&arguments) == Ok(CommandLine::PrintConfig) {
        let shown = crate::config::redacted_view(&config)
            .and_then(|view| toml::to_string_pretty(&view).map_err(|error| error.to_string()));
        match shown {
            Ok(text) => {
                #[allow(clippy::print_stdout)]
                {
                    println!("{text}");
                }
                return ExitCode::SUCCESS;
            }
            Err(error) => {
                eprintln!("medai-{service}: cannot print config: {error}");
                return ExitCode::FAILURE;
            }
        }
    }
    let process = config.process().clone();
    if CommandLine::parse(&arguments) == Ok(CommandLine::Probe) {
        return probe_own_health(service, &process, config.tls()).await;
    }
    let telemetry = match crate::telemetry::init(
        service,
        &process.log_filter,
        process.otlp_endpoint.as_deref(),
    ) {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("medai-{service}: {error}");
            return ExitCode::from(2);
        }
    };

    let listener = match TcpListener::bind(process.listen_addr).await {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(address = %process.listen_addr, error = %error, "cannot bind the gRPC listener");
            return ExitCode::FAILURE;
        }
    };
    let readiness = Readiness::new();
    let drain = Duration::from_secs(process.drain_seconds);
    let shutdown: ShutdownSignal = {
        let readiness = readiness.clone();
        async move {
            crate::shutdown::termination_signal().await;
            readiness.start_draining();
            tracing::info!(
                service,
                drain_seconds = drain.as_secs(),
                "draining: NOT_SERVING, still serving until the listener closes"
            );
            tokio::time::sleep(drain).await;
        }
        .boxed()
        .shared()
    };
    let mut admin = None;
    if let Some(admin_addr) = process.admin_addr {
        match start_admin(admin_addr, shutdown.clone()).await {
            Ok(bound) => admin = Some(bound),
            Err(error) => {
                tracing::error!(address = %admin_addr, error = %error, "cannot start the admin endpoint");
                return ExitCode::FAILURE;
            }
        }
    }
    let grpc = match listener.local_addr() {
        Ok(address) => address,
        Err(error) => {
            tracing::error!(error = %error, "cannot read the bound address");
            return ExitCode::FAILURE;
        }
    };
    if let Some(path) = &process.address_file
        && let Err(error) = write_addresses(path, &BoundAddresses { grpc, admin })
    {
        tracing::error!(path = %path.display(), error = %error, "cannot write the address file");
        return ExitCode::FAILURE;
    }
    tracing::info!(service, address = %grpc, admin = ?admin, "serving");
    let dependencies = dependencies(&config);
    let probes = if dependencies.is_empty() {
        None
    } else {
        match crate::tls::TlsMaterial::load(config.tls()) {
            Ok(tls) => {
                // The probes' reconnections present the rotated certificate too.
                tls.watch_files(crate::tls::RELOAD_INTERVAL);
                Some(tokio::spawn(crate::health::probe_dependencies(
                    dependencies,
                    tls,
                    readiness.clone(),
                    Duration::from_secs(process.dependency_probe_seconds.max(1)),
                )))
            }
            Err(error) => {
                tracing::error!(error = %error, "cannot load the TLS material");
                return ExitCode::FAILURE;
            }
        }
    };

    let grace = Duration::from_secs(process.shutdown_grace_seconds);
    let drain_deadline = shutdown.clone().then(move |()| tokio::time::sleep(grace));
    // Boxed: a service's whole server is a large future, and it lives as long as the process.
    let serving = Box::pin(readiness.scope(serve(config, listener, shutdown)));
    let exit = tokio::select! {
        result = serving => match result {
            Ok(()) => {
                tracing::info!(service, "stopped");
                ExitCode::SUCCESS
            }
            Err(error) => {
                tracing::error!(service, error = %error, "service failed");
                ExitCode::FAILURE
            }
        },
        () = drain_deadline => {
            tracing::warn!(service, grace_seconds = grace.as_secs(), "grace period over; stopping with calls in flight");
            ExitCode::FAILURE
        }
    };
    if let Some(probes) = probes {
        probes.abort();
    }
    telemetry.shutdown().await;
    exit
}

/// What `<binary> --migrate` reads from the service's settings: the URL to migrate with (the
/// schema owner's `migration_database_url` when the service's own role is narrower, else
/// `database_url`). Every other setting is ignored, so a migration Job needs no certificates,
/// keys or listeners.
#[derive(Deserialize)]
struct MigrationTarget {
    database_url: String,
    #[serde(default)]
    migration_database_url: Option<String>,
}

/// Whether the binary was started as `<binary> --migrate`.
pub fn migrate_requested() -> bool {
    std::env::args().any(|argument| argument == "--migrate")
}

/// `<binary> --migrate`: applies the service's migrations with `migrate(database URL)` and
/// exits 0 when the schema is up to date (the chart's pre-install/pre-upgrade Job).
pub async fn run_migrations<F, Fut, E>(
    service: &'static str,
    env_prefix: &str,
    migrate: F,
) -> ExitCode
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    let target: MigrationTarget = match load_from_process(env_prefix) {
        Ok(target) => target,
        Err(error) => {
            eprintln!(
                "medai-{service}: {error} (--migrate reads {env_prefix}DATABASE_URL, or {env_prefix}MIGRATION_DATABASE_URL when set)"
            );
            return ExitCode::from(2);
        }
    };
    crate::telemetry::init_json_logging("info");
    let url = target.migration_database_url.unwrap_or(target.database_url);
    match migrate(url).await {
        Ok(()) => {
            tracing::info!(service, "schema migrated");
            ExitCode::SUCCESS
        }
        Err(error) => {
            tracing::error!(service, error = %error, "migrations failed");
            ExitCode::FAILURE
        }
    }
}

/// `--probe`: asks the running service, over mTLS with its own certificate, whether it is
/// SERVING. Kubernetes' built-in gRPC probe cannot speak TLS; this exec probe can.
async fn probe_own_health(
    service: &'static str,
    process: &ProcessConfig,
    tls: &crate::TlsFiles,
) -> ExitCode {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let port = process.listen_addr.port();
    let answer = async {
        let material = crate::tls::TlsMaterial::load(tls).map_err(|error| error.to_string())?;
        let channel = material
            .channel(
                &format!("https://127.0.0.1:{port}"),
                &crate::ServiceIdentity::new(service),
            )
            .map_err(|error| error.to_string())?;
        let response = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map_err(|status| status.message().to_owned())?;
        Ok::<_, String>(response.into_inner().status() == ServingStatus::Serving)
    };
    match tokio::time::timeout(Duration::from_secs(5), answer).await {
        Ok(Ok(true)) => ExitCode::SUCCESS,
        Ok(Ok(false)) => {
            eprintln!("medai-{service}: not serving");
            ExitCode::FAILURE
        }
        Ok(Err(reason)) => {
            eprintln!("medai-{service}: health check failed: {reason}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("medai-{service}: health check timed out");
            ExitCode::FAILURE
        }
    }
}

async fn start_admin(
    address: SocketAddr,
    shutdown: ShutdownSignal,
) -> Result<SocketAddr, crate::admin::AdminError> {
    let handle = crate::admin::install_prometheus_recorder()?;
    let listener = TcpListener::bind(address).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(error) = crate::admin::serve_admin(listener, handle, shutdown).await {
            tracing::error!(error = %error, "admin endpoint failed");
        }
    });
    Ok(bound)
}

/// Written to a temporary name and renamed, so a reader never sees half a file.
fn write_addresses(path: &std::path::Path, addresses: &BoundAddresses) -> std::io::Result<()> {
    let text = serde_json::to_string(addresses).map_err(std::io::Error::other)?;
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, text)?;
    std::fs::rename(&temporary, path)
}

#[cfg(test)]
mod command_line_tests {
    use super::CommandLine;

    fn parse(arguments: &[&str]) -> Result<CommandLine, String> {
        let arguments: Vec<String> = arguments
            .iter()
            .map(|argument| (*argument).to_owned())
            .collect();
        CommandLine::parse(&arguments)
    }

    #[test]
    fn help_and_version_are_answered_and_unknown_arguments_refused() {
        assert_eq!(parse(&[]), Ok(CommandLine::Serve));
        assert_eq!(parse(&["--help"]), Ok(CommandLine::Help));
        assert_eq!(parse(&["-h"]), Ok(CommandLine::Help));
        assert_eq!(parse(&["--version"]), Ok(CommandLine::Version));
        assert_eq!(parse(&["--probe", "--version"]), Ok(CommandLine::Version));
        assert_eq!(parse(&["--probe"]), Ok(CommandLine::Probe));
        assert_eq!(parse(&["--print-config"]), Ok(CommandLine::PrintConfig));
        assert_eq!(parse(&["--listen", "x"]), Err("--listen".to_owned()));
    }
}
