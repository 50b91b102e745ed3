//! `medai`: the client people use. Runs the whole mesh on one machine (`up`, `demo`), logs in
//! and keeps the session, sends images and studies, reads and signs results, manages model
//! versions (operators, straight to the inference service) and audits the ledger.

mod backup;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use medai_cli::client::{ConnectOptions, GatewayClient, authorised, connect_gateway_with};
use medai_cli::exit::{CliError, EXIT_CODES_HELP};
use medai_cli::images;
use medai_cli::launcher::{MeshSettings, RunningMesh};
use medai_cli::output::{self, OutputFormat, line};
use medai_cli::session::{PasswordSource, SessionFiles, expires_soon, now_unix_seconds};
use medai_proto::gateway::v1 as gw;
use medai_proto::inference::v1 as inference;
use serde_json::json;
use tonic::Status;

#[derive(Parser)]
#[command(
    name = "medai",
    about = "MedAI Flow: medical-imaging AI behind a mesh of mTLS services",
    version,
    after_help = EXIT_CODES_HELP
)]
struct Cli {
    /// Certificates, databases, logs and the saved session live here.
    #[arg(long, global = true, default_value = ".medai", env = "MEDAI_STATE_DIR")]
    state_dir: PathBuf,
    /// The gateway to talk to (https://HOST:PORT).
    #[arg(
        long,
        global = true,
        default_value = "https://127.0.0.1:50051",
        env = "MEDAI_GATEWAY"
    )]
    gateway: String,
    /// The CA certificate (PEM) that signed the server's certificate [default: <state-dir>/pki/ca.pem].
    #[arg(long, global = true, env = "MEDAI_CACERT")]
    cacert: Option<PathBuf>,
    /// A client certificate (PEM) for mTLS [default for `models`: <state-dir>/pki/operator.pem].
    #[arg(long, global = true, requires = "key")]
    cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, global = true, requires = "cert")]
    key: Option<PathBuf>,
    /// The name the server's certificate must carry [default: medai-gateway, or
    /// medai-inference for `models`].
    #[arg(long, global = true)]
    servername: Option<String>,
    /// How results are printed: a table for people, or one JSON document for programs
    /// (errors then go to stderr as JSON too).
    #[arg(
        short = 'o',
        long = "output",
        global = true,
        value_enum,
        default_value = "table"
    )]
    output: OutputFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start all five services on loopback with the embedded defaults and wait for Ctrl-C
    /// (`-o json`: one line once up, with the endpoints, process ids, CA and password file).
    Up(UpArgs),
    /// Log in; the access and refresh tokens are kept (mode 0600) in the state folder and
    /// refreshed transparently when the access token expires.
    Login {
        #[arg(long, default_value = "admin")]
        username: String,
        #[command(flatten)]
        password: PasswordArgs,
    },
    /// Revoke the saved session at the gateway and delete its tokens.
    Logout,
    /// Run a prediction on an image (DICOM, PNG or JPEG). Files larger than one message are
    /// streamed in chunks through UploadImage.
    Infer {
        file: PathBuf,
        #[arg(long, default_value = "")]
        model: String,
        /// A model version (default: the active one).
        #[arg(long, default_value = "")]
        version: String,
        /// Sent again with the same key, the request gets the stored result back.
        #[arg(long, default_value = "")]
        idempotency_key: String,
    },
    /// Studies: many images on one stream.
    Study {
        #[command(subcommand)]
        command: StudyCommand,
    },
    /// Stored results: list, show, sign.
    Results {
        #[command(subcommand)]
        command: ResultsCommand,
    },
    /// Model versions, straight to the inference service with the operator certificate.
    Models {
        /// The inference service (https://HOST:PORT; `medai up` prints it).
        #[arg(long, env = "MEDAI_INFERENCE")]
        inference: String,
        #[command(subcommand)]
        command: ModelsCommand,
    },
    /// Ledger operations.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Back up the ledger, identities and results databases of a running system (pg_dump).
    Backup(backup::BackupArgs),
    /// Restore a backup into empty databases and verify the ledger against the checkpoint log.
    Restore(backup::RestoreArgs),
    /// Start the mesh, log in, run one prediction on FILE, verify the ledger, stop
    /// (`-o json`: one document with the mesh, the prediction, its decision and the ledger check).
    Demo {
        #[command(flatten)]
        up: UpArgs,
        file: PathBuf,
    },
}

#[derive(clap::Args, Clone)]
struct PasswordArgs {
    /// Read the password from the first line of standard input.
    #[arg(long, conflicts_with = "password_file")]
    password_stdin: bool,
    /// Read the password from this file (default for admin: the bootstrap password file if
    /// there is one; otherwise a prompt without echo).
    #[arg(long)]
    password_file: Option<PathBuf>,
}

impl PasswordArgs {
    fn source(&self, fallback_file: Option<PathBuf>) -> PasswordSource {
        if self.password_stdin {
            PasswordSource::Stdin
        } else if let Some(file) = self.password_file.clone().or(fallback_file) {
            PasswordSource::File(file)
        } else {
            PasswordSource::Prompt
        }
    }
}

#[derive(Subcommand)]
enum StudyCommand {
    /// Stream files and folders (walked recursively) through StudyStream; DICOM instances
    /// carry an idempotency key made of their SOP Instance UID and the model, so a study sent
    /// again gets its stored results back.
    Send {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[arg(long, default_value = "")]
        model: String,
        #[arg(long, default_value = "")]
        version: String,
    },
}

#[derive(Subcommand)]
enum ResultsCommand {
    /// Newest first.
    List {
        #[arg(long, default_value = "")]
        model: String,
        /// PRELIMINARY or SIGNED.
        #[arg(long, default_value = "")]
        status: String,
        /// RFC 3339 lower bound of created_at.
        #[arg(long, default_value = "")]
        from: String,
        /// RFC 3339 upper bound (exclusive).
        #[arg(long, default_value = "")]
        until: String,
        #[arg(long, default_value_t = 50)]
        page_size: u32,
        #[arg(long, default_value = "")]
        page_token: String,
    },
    Show {
        result_id: String,
    },
    /// An electronic signature: asks for the password again (re-authentication), then signs
    /// the content shown.
    Sign {
        result_id: String,
        #[arg(long, value_enum)]
        meaning: SignatureMeaning,
        /// Why (required when rejecting).
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        password: PasswordArgs,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SignatureMeaning {
    Reviewed,
    Approved,
    Rejected,
}

impl SignatureMeaning {
    fn as_str(self) -> &'static str {
        match self {
            Self::Reviewed => "REVIEWED",
            Self::Approved => "APPROVED",
            Self::Rejected => "REJECTED",
        }
    }
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Every model and version with its status and readiness.
    List,
    /// Register a version folder already placed in the repository.
    Stage {
        model: String,
        version: String,
        /// Why (recorded in the ledger, for example a change-control ticket).
        #[arg(long)]
        reason: String,
    },
    /// Serve this staged version; the one it replaces returns to staged.
    Activate {
        model: String,
        version: String,
        #[arg(long)]
        reason: String,
    },
    /// Withdraw a version for good.
    Retire {
        model: String,
        version: String,
        #[arg(long)]
        reason: String,
    },
    /// Serve again the version active before the current one.
    Rollback {
        model: String,
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Ledger entries by time range, actor, action and resource (auditor).
    Query {
        /// RFC 3339 UTC, inclusive.
        #[arg(long, default_value = "")]
        from: String,
        #[arg(long, default_value = "")]
        to: String,
        #[arg(long, default_value = "")]
        actor: String,
        #[arg(long, default_value = "")]
        action: String,
        #[arg(long, default_value = "")]
        resource: String,
        #[arg(long, default_value_t = 100)]
        page_size: u32,
        #[arg(long, default_value = "")]
        page_token: String,
    },
    /// Verify the ledger. Online (default): the audit service recomputes the chain and checks
    /// its signed checkpoints (admin or auditor). Offline (--export): this machine verifies an
    /// export with no database and no service, trusting only the public key you give it.
    Verify {
        /// An export written by `medai audit export`.
        #[arg(long, requires = "public_key")]
        export: Option<PathBuf>,
        /// The checkpoint public key (base64), or a file holding it (`audit-checkpoint.pub`).
        #[arg(long)]
        public_key: Option<String>,
        /// Checkpoints you kept from earlier exports (JSON Lines), checked as well.
        #[arg(long)]
        checkpoints: Option<PathBuf>,
    },
    /// Write the whole ledger and its checkpoints to FILE as JSON Lines (auditor).
    Export {
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(clap::Args, Clone)]
struct UpArgs {
    /// The gateway's port; 0 lets the system choose a free one.
    #[arg(long, default_value_t = 50051)]
    port: u16,
    #[arg(long, default_value = "models")]
    model_repository: PathBuf,
    #[arg(long, default_value = ".cache/onnxruntime/libonnxruntime.so.1.31.1")]
    onnxruntime_library: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    medai_runtime::async_main::run("medai", run_command(cli))
}

async fn run_command(cli: Cli) -> ExitCode {
    let format = cli.output;
    match run(&cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            report_error(format, &error);
            ExitCode::from(error.exit_code())
        }
    }
}

#[allow(clippy::print_stderr)]
fn report_error(format: OutputFormat, error: &CliError) {
    match format {
        OutputFormat::Json => eprintln!("{}", error.to_json()),
        OutputFormat::Table => eprintln!("medai: {error:#}"),
    }
}

async fn run(cli: &Cli) -> Result<(), CliError> {
    match &cli.command {
        Command::Up(args) => {
            let mesh = start_mesh(cli, args).await?;
            if cli.json() {
                // One line, so a program reading stdout line by line gets it whole while the
                // mesh runs.
                output::json_line(&mesh_json(cli, &mesh)?);
            } else {
                line(&format!(
                    "mesh is up: gateway {} (Ctrl-C stops it)",
                    gateway_endpoint(&mesh)?
                ));
                line(&format!(
                    "a service that exits is restarted on its port; see {}",
                    cli.state_dir.join("logs").join("launcher.log").display()
                ));
            }
            medai_runtime::shutdown::termination_signal().await;
            mesh.stop(Duration::from_secs(15)).await;
            if !cli.json() {
                line("mesh stopped");
            }
            Ok(())
        }
        Command::Login { username, password } => {
            let fallback = (username == "admin")
                .then(|| admin_password_file(&cli.state_dir))
                .filter(|file| file.is_file());
            let source = password.source(fallback);
            login(cli, &cli.gateway, username, &source).await
        }
        Command::Backup(args) => Ok(backup::backup(args).await?),
        Command::Restore(args) => Ok(backup::restore(args).await?),
        Command::Logout => logout(cli).await,
        Command::Infer {
            file,
            model,
            version,
            idempotency_key,
        } => {
            let document = infer(cli, &cli.gateway, file, model, version, idempotency_key).await?;
            if cli.json() {
                output::json_document(&document);
            }
            Ok(())
        }
        Command::Study {
            command:
                StudyCommand::Send {
                    paths,
                    model,
                    version,
                },
        } => study_send(cli, paths, model, version).await,
        Command::Results { command } => results(cli, command).await,
        Command::Models { inference, command } => models(cli, inference, command).await,
        Command::Audit {
            command:
                AuditCommand::Verify {
                    export: Some(export),
                    public_key,
                    checkpoints,
                },
        } => verify_offline(
            cli,
            export,
            public_key.as_deref().unwrap_or_default(),
            checkpoints.as_deref(),
        ),
        Command::Audit {
            command: AuditCommand::Verify { export: None, .. },
        } => verify(cli, &cli.gateway).await,
        Command::Audit {
            command: AuditCommand::Export { out },
        } => export(cli, out).await,
        Command::Audit {
            command:
                AuditCommand::Query {
                    from,
                    to,
                    actor,
                    action,
                    resource,
                    page_size,
                    page_token,
                },
        } => {
            let query = medai_proto::audit::v1::QueryEventsRequest {
                recorded_from: from.clone(),
                recorded_to: to.clone(),
                actor: actor.clone(),
                action: action.clone(),
                resource: resource.clone(),
                page_size: *page_size,
                page_token: page_token.clone(),
            };
            audit_query(cli, query).await
        }
        Command::Demo { up, file } => {
            let mesh = start_mesh(cli, up).await?;
            let gateway = gateway_endpoint(&mesh)?;
            let mut document = mesh_json(cli, &mesh)?;
            if !cli.json() {
                line(&format!("mesh is up: gateway {gateway}"));
            }
            let outcome = async {
                let source = PasswordSource::File(admin_password_file(&cli.state_dir));
                let grant = sign_in(cli, &gateway, "admin", &source).await?;
                if !cli.json() {
                    line(&login_line("admin", &grant));
                }
                let prediction = infer(cli, &gateway, file, "", "", "").await?;
                let report = ledger_report(cli, &gateway).await?;
                if !cli.json() && report.intact {
                    line(&intact_line(&report));
                }
                Ok::<_, CliError>((grant, prediction, report))
            }
            .await;
            mesh.stop(Duration::from_secs(15)).await;
            let (grant, prediction, report) = outcome?;
            if cli.json() {
                document["login"] = json!({"username": "admin", "role": grant.role});
                document["prediction"] = prediction;
                document["ledger"] = verification_json(&report);
                document["stopped"] = json!(true);
                output::json_document(&document);
            } else {
                line("mesh stopped");
            }
            verification_outcome(&report)
        }
    }
}

/// What `up -o json` prints and `demo -o json` starts from: where each service listens, its
/// process id and log, the CA to trust and the bootstrap admin's password file.
fn mesh_json(cli: &Cli, mesh: &RunningMesh) -> Result<serde_json::Value, CliError> {
    let services: serde_json::Map<String, serde_json::Value> = medai_cli::launcher::SERVICES
        .iter()
        .map(|service| {
            let admin = mesh.admin_address(service);
            (
                (*service).to_owned(),
                json!({
                    "grpc": mesh.address(service).map(|address| address.to_string()),
                    "admin": admin.map(|address| address.to_string()),
                    "metrics": admin.map(|address| format!("http://{address}/metrics")),
                    "pid": mesh.pid(service),
                    "log": mesh.log_file(service).map(|path| path.display().to_string()),
                }),
            )
        })
        .collect();
    let state_dir = cli.state_dir.canonicalize().context("the state folder")?;
    Ok(json!({
        "gateway": gateway_endpoint(mesh)?,
        "state_dir": state_dir.display().to_string(),
        "ca_certificate": mesh.pki_layout().ca_certificate().display().to_string(),
        "operator_certificate": mesh.pki_layout().certificate(medai_cli::launcher::OPERATOR_IDENTITY).display().to_string(),
        "operator_key": mesh.pki_layout().key(medai_cli::launcher::OPERATOR_IDENTITY).display().to_string(),
        "admin_password_file": admin_password_file(&state_dir).display().to_string(),
        "launcher_log": state_dir.join("logs").join("launcher.log").display().to_string(),
        "services": services,
    }))
}

fn gateway_endpoint(mesh: &RunningMesh) -> Result<String, CliError> {
    let address = mesh
        .address("gateway")
        .context("the gateway has no address")?;
    Ok(format!("https://{address}"))
}

impl Cli {
    fn pki(&self) -> medai_devpki::PkiLayout {
        medai_devpki::PkiLayout::new(self.state_dir.join("pki"))
    }

    fn session(&self) -> SessionFiles {
        SessionFiles::in_state_dir(&self.state_dir)
    }

    fn ca_certificate(&self) -> PathBuf {
        self.cacert
            .clone()
            .unwrap_or_else(|| self.pki().ca_certificate())
    }

    fn client_identity(&self) -> Option<(PathBuf, PathBuf)> {
        self.cert.clone().zip(self.key.clone())
    }

    fn gateway_options(&self, endpoint: &str) -> ConnectOptions {
        ConnectOptions {
            endpoint: endpoint.to_owned(),
            ca_certificate: self.ca_certificate(),
            server_name: self
                .servername
                .clone()
                .unwrap_or_else(|| "medai-gateway".to_owned()),
            identity: self.client_identity(),
        }
    }

    /// The inference service, as the operator: the operator certificate of the state folder
    /// unless --cert/--key name another.
    fn inference_options(&self, endpoint: &str) -> ConnectOptions {
        let pki = self.pki();
        let identity = self.client_identity().unwrap_or_else(|| {
            (
                pki.certificate(medai_cli::launcher::OPERATOR_IDENTITY),
                pki.key(medai_cli::launcher::OPERATOR_IDENTITY),
            )
        });
        ConnectOptions {
            endpoint: endpoint.to_owned(),
            ca_certificate: self.ca_certificate(),
            server_name: self
                .servername
                .clone()
                .unwrap_or_else(|| "medai-inference".to_owned()),
            identity: Some(identity),
        }
    }

    async fn gateway_client(&self, endpoint: &str) -> Result<GatewayClient, CliError> {
        Ok(connect_gateway_with(&self.gateway_options(endpoint)).await?)
    }

    fn json(&self) -> bool {
        self.output == OutputFormat::Json
    }
}

fn admin_password_file(state_dir: &Path) -> PathBuf {
    state_dir.join("admin-password")
}

/// The bootstrap admin's password: generated on first run, kept owner-readable in the state
/// folder, never printed.
fn ensure_admin_password(state_dir: &Path) -> Result<String, CliError> {
    let path = admin_password_file(state_dir);
    if let Ok(existing) = std::fs::read_to_string(&path) {
        return Ok(existing.trim().to_owned());
    }
    let password = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    medai_cli::session::write_private(&path, &password)?;
    Ok(password)
}

async fn start_mesh(cli: &Cli, args: &UpArgs) -> Result<RunningMesh, CliError> {
    std::fs::create_dir_all(&cli.state_dir)
        .with_context(|| format!("cannot create {}", cli.state_dir.display()))?;
    let state_dir = cli.state_dir.canonicalize().context("the state folder")?;
    let binaries_dir = std::env::current_exe()
        .context("cannot locate the service binaries")?
        .parent()
        .map(Path::to_owned)
        .context("cannot locate the service binaries")?;
    let model_repository = args.model_repository.canonicalize().map_err(|_| {
        CliError::Usage(format!(
            "model repository {} not found (run scripts/fetch-assets.sh)",
            args.model_repository.display()
        ))
    })?;
    let onnxruntime_library = args.onnxruntime_library.canonicalize().map_err(|_| {
        CliError::Usage(format!(
            "ONNX Runtime {} not found (run scripts/fetch-assets.sh)",
            args.onnxruntime_library.display()
        ))
    })?;
    let mut settings = MeshSettings::embedded(
        &state_dir,
        &binaries_dir,
        &model_repository,
        &onnxruntime_library,
    );
    settings.admin_password = ensure_admin_password(&state_dir)?;
    settings.gateway_port = args.port;
    settings.admin_endpoints = true;
    let progress = images::progress_bar(0, "{spinner} {msg}");
    progress.set_message("starting audit, auth, validation, inference and gateway");
    let mesh = RunningMesh::start(&settings).await;
    progress.finish_and_clear();
    let mesh = mesh.map_err(|error| CliError::Other(error.into()))?;
    for service in medai_cli::launcher::SERVICES {
        if cli.json() {
            break;
        }
        if let (Some(grpc), admin) = (mesh.address(service), mesh.admin_address(service)) {
            let metrics = admin
                .map(|address| format!(", metrics http://{address}/metrics"))
                .unwrap_or_default();
            line(&format!("  {service:<10} {grpc}{metrics}"));
        }
    }
    Ok(mesh)
}

async fn login(
    cli: &Cli,
    gateway: &str,
    username: &str,
    source: &PasswordSource,
) -> Result<(), CliError> {
    let grant = sign_in(cli, gateway, username, source).await?;
    if cli.json() {
        output::json_document(&json!({
            "username": username,
            "role": grant.role,
            "expires_in_seconds": grant.expires_in_seconds,
            "refresh_expires_in_seconds": grant.refresh_expires_in_seconds,
        }));
    } else {
        line(&login_line(username, &grant));
    }
    Ok(())
}

/// Logs in and keeps the session; prints nothing.
async fn sign_in(
    cli: &Cli,
    gateway: &str,
    username: &str,
    source: &PasswordSource,
) -> Result<medai_proto::auth::v1::TokenGrant, CliError> {
    let password = source.read(&format!("Password for {username}: "))?;
    let mut client = cli.gateway_client(gateway).await?;
    let grant = client
        .login(gw::LoginRequest {
            username: username.to_owned(),
            password,
        })
        .await
        .map_err(|status| CliError::refused("login", &status))?
        .into_inner()
        .grant
        .context("the gateway answered without tokens")?;
    cli.session()
        .save(&grant.access_token, &grant.refresh_token)?;
    Ok(grant)
}

fn login_line(username: &str, grant: &medai_proto::auth::v1::TokenGrant) -> String {
    format!(
        "logged in as {username} ({}); token valid for {} s, refreshed as needed for {} s",
        grant.role, grant.expires_in_seconds, grant.refresh_expires_in_seconds
    )
}

/// Exchanges the saved refresh token for a new pair (the old one is spent: rotation).
async fn refresh_session(cli: &Cli, client: &mut GatewayClient) -> Result<String, CliError> {
    let session = cli.session();
    let Some(refresh_token) = session.refresh_token() else {
        return Err(CliError::Authentication(
            "the session has expired: run `medai login` again".to_owned(),
        ));
    };
    let grant = match client.refresh(gw::RefreshRequest { refresh_token }).await {
        Ok(response) => response
            .into_inner()
            .grant
            .context("the gateway answered without tokens")?,
        Err(status) if status.code() == tonic::Code::Unauthenticated => {
            let reason = medai_runtime::errors::reason_of(&status).unwrap_or_default();
            return Err(CliError::Authentication(format!(
                "the saved session has ended ({reason}): run `medai login` again"
            )));
        }
        Err(status) => return Err(CliError::refused("refresh", &status)),
    };
    session.save(&grant.access_token, &grant.refresh_token)?;
    Ok(grant.access_token)
}

/// The saved access token, refreshed first if it has expired or is about to.
async fn fresh_token(cli: &Cli, client: &mut GatewayClient) -> Result<String, CliError> {
    let session = cli.session();
    let token = session.access_token()?;
    if expires_soon(&token, now_unix_seconds()) && session.refresh_token().is_some() {
        return refresh_session(cli, client).await;
    }
    Ok(token)
}

fn token_expired(status: &Status) -> bool {
    status.code() == tonic::Code::Unauthenticated
        && medai_runtime::errors::reason_of(status).as_deref() == Some("TOKEN_EXPIRED")
}

/// Runs `call` with the saved session; if the gateway says the token has expired, refreshes
/// the session once and runs it again.
async fn with_session<T, F, Fut>(
    cli: &Cli,
    gateway: &str,
    what: &str,
    call: F,
) -> Result<T, CliError>
where
    F: Fn(GatewayClient, String) -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let mut client = cli.gateway_client(gateway).await?;
    let token = fresh_token(cli, &mut client).await?;
    match call(client.clone(), token).await {
        Ok(value) => Ok(value),
        Err(status) if token_expired(&status) && cli.session().refresh_token().is_some() => {
            let token = refresh_session(cli, &mut client).await?;
            call(client, token)
                .await
                .map_err(|status| CliError::refused(what, &status))
        }
        Err(status) => Err(CliError::refused(what, &status)),
    }
}

async fn logout(cli: &Cli) -> Result<(), CliError> {
    let session = cli.session();
    if session.access_token().is_err() && session.refresh_token().is_none() {
        if cli.json() {
            output::json_document(&json!({"logged_out": false, "revoked": false}));
        } else {
            line("no saved session");
        }
        return Ok(());
    }
    let revoked = async {
        let mut client = cli.gateway_client(&cli.gateway).await?;
        let token = fresh_token(cli, &mut client).await?;
        let refresh_token = session.refresh_token().unwrap_or_default();
        client
            .logout(authorised(gw::LogoutRequest { refresh_token }, &token))
            .await
            .map_err(|status| CliError::refused("logout", &status))?;
        Ok::<(), CliError>(())
    }
    .await;
    session.remove();
    match revoked {
        Ok(()) => {
            if cli.json() {
                output::json_document(&json!({"logged_out": true, "revoked": true}));
            } else {
                line("logged out: the session is revoked and its tokens deleted");
            }
            Ok(())
        }
        Err(error) => {
            let code = error.exit_code();
            let message =
                format!("the saved tokens are deleted, but the session was not revoked: {error:#}");
            Err(match code {
                medai_cli::exit::UNREACHABLE | medai_cli::exit::CERTIFICATE => error,
                medai_cli::exit::AUTHENTICATION => CliError::Authentication(message),
                _ => CliError::Other(anyhow::anyhow!(message)),
            })
        }
    }
}

async fn infer(
    cli: &Cli,
    gateway: &str,
    file: &Path,
    model: &str,
    version: &str,
    idempotency_key: &str,
) -> Result<serde_json::Value, CliError> {
    let size = std::fs::metadata(file)
        .map_err(|error| CliError::Usage(format!("cannot read {}: {error}", file.display())))?
        .len();
    let format = images::format_of(file);
    let mut upload = None;
    let response = if size <= images::ONE_MESSAGE_BYTES {
        let image = std::fs::read(file)
            .map_err(|error| CliError::Usage(format!("cannot read {}: {error}", file.display())))?;
        let request = gw::InferRequest {
            image: image.into(),
            format: format.into(),
            model_name: model.to_owned(),
            model_version: version.to_owned(),
            idempotency_key: idempotency_key.to_owned(),
        };
        with_session(cli, gateway, "prediction", |mut client, token| {
            let request = request.clone();
            async move { client.infer(authorised(request, &token)).await }
        })
        .await?
        .into_inner()
    } else {
        let client_request_id = format!("medai-cli-{}", uuid::Uuid::new_v4().simple());
        let header = gw::UploadHeader {
            model_name: model.to_owned(),
            model_version: version.to_owned(),
            format: format.into(),
            client_request_id: client_request_id.clone(),
            declared_size: size,
            idempotency_key: idempotency_key.to_owned(),
            // Resumable: a broken stream continues from what the gateway holds.
            upload_id: client_request_id.clone(),
            offset: 0,
        };
        let response = with_session(cli, gateway, "prediction", |mut client, token| {
            let header = header.clone();
            let file = file.to_owned();
            let upload_id = client_request_id.clone();
            async move {
                let mut resumes = 0;
                let mut offset = 0;
                loop {
                    let progress = images::progress_bar(
                        size,
                        "{spinner} uploading [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                    );
                    progress.set_position(offset);
                    let header = gw::UploadHeader {
                        offset,
                        ..header.clone()
                    };
                    let messages = images::upload_messages(&file, header, progress.clone());
                    let answer = client.upload_image(authorised(messages, &token)).await;
                    progress.finish_and_clear();
                    match answer {
                        Err(status)
                            if resumes < images::MAX_UPLOAD_RESUMES
                                && images::upload_stream_broke(&status) =>
                        {
                            resumes += 1;
                            tokio::time::sleep(Duration::from_millis(200 * u64::from(resumes)))
                                .await;
                            let request = gw::GetUploadStatusRequest {
                                upload_id: upload_id.clone(),
                            };
                            // Unknown (another replica, expired, finished): from the start.
                            offset = client
                                .get_upload_status(authorised(request, &token))
                                .await
                                .map_or(0, |status| status.into_inner().received_bytes);
                        }
                        answer => return answer,
                    }
                }
            }
        })
        .await?
        .into_inner()
        .result
        .context("the gateway answered without a prediction")?;
        upload = Some((client_request_id, size.div_ceil(images::CHUNK_BYTES as u64)));
        response
    };
    if response.prediction.is_none() {
        return Err(anyhow::anyhow!("the gateway answered without a prediction").into());
    }
    let mut document = output::infer_json(&response);
    document["upload"] = match &upload {
        Some((client_request_id, chunks)) => json!({
            "client_request_id": client_request_id,
            "bytes": size,
            "chunks": chunks,
        }),
        None => serde_json::Value::Null,
    };
    if !cli.json() {
        output::infer_table(&response);
        if let Some((client_request_id, chunks)) = &upload {
            line(&format!(
                "upload     {size} bytes in {chunks} chunks through UploadImage (request {client_request_id})"
            ));
        }
    }
    Ok(document)
}

async fn study_send(
    cli: &Cli,
    paths: &[PathBuf],
    model: &str,
    version: &str,
) -> Result<(), CliError> {
    let files = images::collect_files(paths)?;
    let mut client = cli.gateway_client(&cli.gateway).await?;
    let token = fresh_token(cli, &mut client).await?;
    let run = images::send_study(&mut client, &token, files, model, version).await?;
    let predicted = run
        .outcomes
        .iter()
        .filter(|outcome| outcome.result.as_ref().is_ok_and(|result| !result.replayed))
        .count();
    let replayed = run
        .outcomes
        .iter()
        .filter(|outcome| outcome.result.as_ref().is_ok_and(|result| result.replayed))
        .count();
    let refused = run.outcomes.len() - predicted - replayed;
    if cli.json() {
        let images: Vec<serde_json::Value> = run
            .outcomes
            .iter()
            .map(|outcome| match &outcome.result {
                Ok(result) => json!({
                    "file": outcome.file.display().to_string(),
                    "outcome": if result.replayed { "replayed" } else { "predicted" },
                    "keyed_by_sop_instance_uid": outcome.keyed,
                    "result": output::infer_json(result),
                }),
                Err(refusal) => json!({
                    "file": outcome.file.display().to_string(),
                    "outcome": "refused",
                    "keyed_by_sop_instance_uid": outcome.keyed,
                    "error": {"code": refusal.code, "reason": refusal.reason, "message": refusal.message},
                }),
            })
            .collect();
        output::json_document(&json!({
            "images": images,
            "predicted": predicted,
            "replayed": replayed,
            "refused": refused,
        }));
    } else {
        let rows: Vec<Vec<String>> = run
            .outcomes
            .iter()
            .map(|outcome| {
                let name = outcome.file.display().to_string();
                let keyed = if outcome.keyed { "SOP UID" } else { "-" }.to_owned();
                match &outcome.result {
                    Ok(result) => {
                        let prediction = result.prediction.clone().unwrap_or_default();
                        vec![
                            name,
                            if result.replayed {
                                "replayed"
                            } else {
                                "predicted"
                            }
                            .to_owned(),
                            format!(
                                "{} ({:.4})",
                                prediction.top_label, prediction.top_probability
                            ),
                            result.result_id.clone(),
                            result.ledger_seq.to_string(),
                            keyed,
                        ]
                    }
                    Err(refusal) => vec![
                        name,
                        "refused".to_owned(),
                        format!("{} {}", refusal.code, refusal.reason),
                        refusal.message.clone(),
                        "-".to_owned(),
                        keyed,
                    ],
                }
            })
            .collect();
        output::table(
            &[
                "FILE",
                "OUTCOME",
                "LABEL / REASON",
                "RESULT",
                "LEDGER",
                "KEY",
            ],
            &rows,
        );
        line(&format!(
            "{} images: {predicted} predicted, {replayed} replayed, {refused} refused",
            run.outcomes.len()
        ));
    }
    if let Some(status) = run.stream_error {
        return Err(CliError::refused("the study stream", &status));
    }
    if refused > 0 {
        return Err(CliError::Partial(format!(
            "{refused} of {} images were refused",
            run.outcomes.len()
        )));
    }
    Ok(())
}

async fn results(cli: &Cli, command: &ResultsCommand) -> Result<(), CliError> {
    match command {
        ResultsCommand::List {
            model,
            status,
            from,
            until,
            page_size,
            page_token,
        } => {
            let request = gw::ListResultsRequest {
                filter: Some(inference::ListResultsRequest {
                    model_name: model.clone(),
                    status: status.clone(),
                    created_from: from.clone(),
                    created_until: until.clone(),
                    page_size: *page_size,
                    page_token: page_token.clone(),
                    ..Default::default()
                }),
            };
            let page = with_session(cli, &cli.gateway, "listing results", |mut client, token| {
                let request = request.clone();
                async move { client.list_results(authorised(request, &token)).await }
            })
            .await?
            .into_inner();
            if cli.json() {
                output::json_document(&json!({
                    "results": page.results.iter().map(output::result_json).collect::<Vec<_>>(),
                    "next_page_token": page.next_page_token,
                }));
            } else {
                let rows: Vec<Vec<String>> = page.results.iter().map(output::result_row).collect();
                output::table(&output::RESULT_HEADER, &rows);
                if !page.next_page_token.is_empty() {
                    line(&format!("more: --page-token {}", page.next_page_token));
                }
            }
            Ok(())
        }
        ResultsCommand::Show { result_id } => {
            let result = get_result(cli, result_id).await?;
            if cli.json() {
                output::json_document(&output::result_json(&result));
            } else {
                output::result_details(&result);
            }
            Ok(())
        }
        ResultsCommand::Sign {
            result_id,
            meaning,
            reason,
            password,
        } => {
            if matches!(meaning, SignatureMeaning::Rejected) && reason.trim().is_empty() {
                return Err(CliError::Usage("a rejection needs --reason".to_owned()));
            }
            // What the signer is shown is what the signature binds to (its content hash).
            let shown = get_result(cli, result_id).await?;
            if !cli.json() {
                output::result_details(&shown);
                line(&format!(
                    "signing    {} (21 CFR 11.50): enter your password again",
                    meaning.as_str()
                ));
            }
            let password = password
                .source(None)
                .read("Password (re-authentication for the signature): ")?;
            let ticket = with_session(
                cli,
                &cli.gateway,
                "re-authentication",
                |mut client, token| {
                    let request = gw::ReauthenticateRequest {
                        password: password.clone(),
                    };
                    async move { client.reauthenticate(authorised(request, &token)).await }
                },
            )
            .await?
            .into_inner()
            .signing_ticket;
            let request = gw::SignResultRequest {
                result_id: result_id.clone(),
                signing_ticket: ticket,
                meaning: meaning.as_str().to_owned(),
                reason: reason.clone(),
                content_sha256: shown.content_sha256.clone(),
            };
            let signed = with_session(cli, &cli.gateway, "signature", |mut client, token| {
                let request = request.clone();
                async move { client.sign_result(authorised(request, &token)).await }
            })
            .await?
            .into_inner();
            let result = signed.result.unwrap_or_default();
            if cli.json() {
                let mut document = output::result_json(&result);
                document["signature_ledger_seq"] = signed.ledger_seq.into();
                output::json_document(&document);
            } else {
                line(&format!(
                    "signed     {} {} (ledger seq {})",
                    result.result_id,
                    meaning.as_str(),
                    signed.ledger_seq
                ));
            }
            Ok(())
        }
    }
}

async fn get_result(cli: &Cli, result_id: &str) -> Result<inference::StoredResult, CliError> {
    let request = gw::GetResultRequest {
        result_id: result_id.to_owned(),
    };
    with_session(
        cli,
        &cli.gateway,
        "reading the result",
        |mut client, token| {
            let request = request.clone();
            async move { client.get_result(authorised(request, &token)).await }
        },
    )
    .await?
    .into_inner()
    .result
    .context("the gateway answered without a result")
    .map_err(CliError::from)
}

async fn models(cli: &Cli, endpoint: &str, command: &ModelsCommand) -> Result<(), CliError> {
    let mut client = medai_cli::client::connect_inference(&cli.inference_options(endpoint)).await?;
    let change = |model: &str, version: &str, reason: &str| {
        Some(inference::ModelChange {
            model_name: model.to_owned(),
            model_version: version.to_owned(),
            reason: reason.to_owned(),
        })
    };
    let outcome = match command {
        ModelsCommand::List => {
            let versions = client
                .list_models(inference::ListModelsRequest {})
                .await
                .map_err(|status| CliError::refused("listing models", &status))?
                .into_inner()
                .versions;
            if cli.json() {
                output::json_document(&json!({
                    "versions": versions.iter().map(output::model_json).collect::<Vec<_>>(),
                }));
            } else {
                let rows: Vec<Vec<String>> = versions.iter().map(output::model_row).collect();
                output::table(&output::MODEL_HEADER, &rows);
            }
            return Ok(());
        }
        ModelsCommand::Stage {
            model,
            version,
            reason,
        } => client
            .stage_model_version(inference::StageModelVersionRequest {
                change: change(model, version, reason),
            })
            .await
            .map(|response| response.into_inner().outcome),
        ModelsCommand::Activate {
            model,
            version,
            reason,
        } => client
            .activate_model_version(inference::ActivateModelVersionRequest {
                change: change(model, version, reason),
            })
            .await
            .map(|response| response.into_inner().outcome),
        ModelsCommand::Retire {
            model,
            version,
            reason,
        } => client
            .retire_model_version(inference::RetireModelVersionRequest {
                change: change(model, version, reason),
            })
            .await
            .map(|response| response.into_inner().outcome),
        ModelsCommand::Rollback { model, reason } => client
            .rollback_model(inference::RollbackModelRequest {
                change: change(model, "", reason),
            })
            .await
            .map(|response| response.into_inner().outcome),
    }
    .map_err(|status| CliError::refused("the model change", &status))?
    .context("the inference service answered without an outcome")?;
    let changed = outcome.changed.unwrap_or_default();
    if cli.json() {
        output::json_document(&json!({
            "changed": output::model_json(&changed),
            "ledger_seq": outcome.ledger_seq,
        }));
    } else {
        output::table(&output::MODEL_HEADER, &[output::model_row(&changed)]);
        line(&format!(
            "recorded in the ledger at seq {}",
            outcome.ledger_seq
        ));
    }
    Ok(())
}

async fn audit_query(
    cli: &Cli,
    query: medai_proto::audit::v1::QueryEventsRequest,
) -> Result<(), CliError> {
    let request = gw::QueryLedgerRequest { query: Some(query) };
    let page = with_session(
        cli,
        &cli.gateway,
        "the ledger query",
        |mut client, token| {
            let request = request.clone();
            async move { client.query_ledger(authorised(request, &token)).await }
        },
    )
    .await?
    .into_inner()
    .result
    .unwrap_or_default();
    if cli.json() {
        output::json_document(&json!({
            "entries": page.entries.iter().map(output::ledger_entry_json).collect::<Vec<_>>(),
            "next_page_token": page.next_page_token,
        }));
    } else {
        let rows: Vec<Vec<String>> = page.entries.iter().map(output::ledger_entry_row).collect();
        output::table(&output::LEDGER_HEADER, &rows);
        if !page.next_page_token.is_empty() {
            line(&format!("more: --page-token {}", page.next_page_token));
        }
    }
    Ok(())
}

async fn verify(cli: &Cli, gateway: &str) -> Result<(), CliError> {
    let report = ledger_report(cli, gateway).await?;
    if cli.json() {
        output::json_document(&verification_json(&report));
    } else if report.intact {
        line(&intact_line(&report));
    }
    verification_outcome(&report)
}

/// The gateway's verification of the whole chain; prints nothing.
async fn ledger_report(
    cli: &Cli,
    gateway: &str,
) -> Result<medai_proto::audit::v1::VerifyResponse, CliError> {
    Ok(with_session(
        cli,
        gateway,
        "verification",
        |mut client, token| async move {
            client
                .verify_ledger(authorised(gw::VerifyLedgerRequest {}, &token))
                .await
        },
    )
    .await?
    .into_inner()
    .verification
    .context("the gateway answered without a report")?)
}

fn verification_json(report: &medai_proto::audit::v1::VerifyResponse) -> serde_json::Value {
    json!({
        "intact": report.intact,
        "entries_checked": report.entries_checked,
        "head_hash": report.head_hash,
        "first_bad_seq": (!report.intact).then_some(report.first_bad_seq),
        "problem": report.problem,
    })
}

fn intact_line(report: &medai_proto::audit::v1::VerifyResponse) -> String {
    format!(
        "ledger intact: {} entries, head {}",
        report.entries_checked, report.head_hash
    )
}

/// A broken chain is the command's failure (exit code and message), whatever was printed.
fn verification_outcome(report: &medai_proto::audit::v1::VerifyResponse) -> Result<(), CliError> {
    if report.intact {
        Ok(())
    } else {
        Err(CliError::VerificationFailed(format!(
            "ledger BROKEN at seq {}: {} ({} entries checked before it)",
            report.first_bad_seq, report.problem, report.entries_checked
        )))
    }
}

async fn export(cli: &Cli, out: &Path) -> Result<(), CliError> {
    use std::io::Write;
    let mut stream = with_session(
        cli,
        &cli.gateway,
        "export",
        |mut client, token| async move {
            client
                .export_ledger(authorised(gw::ExportLedgerRequest {}, &token))
                .await
        },
    )
    .await?
    .into_inner();
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?,
    );
    let mut lines = 0usize;
    while let Some(chunk) = stream
        .message()
        .await
        .map_err(|status| CliError::refused("export", &status))?
    {
        lines += chunk.lines.lines().count();
        file.write_all(chunk.lines.as_bytes())
            .with_context(|| format!("cannot write {}", out.display()))?;
    }
    file.flush()
        .with_context(|| format!("cannot write {}", out.display()))?;
    if cli.json() {
        output::json_document(&json!({"records": lines, "file": out.display().to_string()}));
    } else {
        line(&format!("exported {lines} records to {}", out.display()));
    }
    Ok(())
}

/// Verifies an export file streaming, line by line: memory stays flat however large the file
/// (two passes over it: its checkpoints first, then its entries).
fn verify_export_file(
    export: &Path,
    kept_checkpoints: Option<&Path>,
    key: &[u8],
) -> Result<medai_ledger::export::OfflineReport, CliError> {
    let open = |path: &Path| {
        std::fs::File::open(path)
            .map(std::io::BufReader::new)
            .map_err(|error| CliError::Usage(format!("cannot read {}: {error}", path.display())))
    };
    let kept = match kept_checkpoints {
        Some(kept) => {
            medai_ledger::export::read_checkpoints(open(kept)?).context("the kept checkpoints")?
        }
        None => Vec::new(),
    };
    Ok(
        medai_ledger::export::verify_export_with_kept(open(export)?, kept, key)
            .context("the export")?,
    )
}

/// Offline verification: no database, no service; every hash and root recomputed here.
fn verify_offline(
    cli: &Cli,
    export: &Path,
    public_key: &str,
    kept_checkpoints: Option<&Path>,
) -> Result<(), CliError> {
    use base64::Engine;
    let key_text = if Path::new(public_key).is_file() {
        std::fs::read_to_string(public_key).context("the public key file")?
    } else {
        public_key.to_owned()
    };
    let key = base64::engine::general_purpose::STANDARD
        .decode(key_text.trim())
        .map_err(|_| CliError::Usage("the public key is not base64".to_owned()))?;
    let report = verify_export_file(export, kept_checkpoints, &key)?;
    if cli.json() {
        output::json_document(&json!({
            "intact": report.first_bad_seq.is_none(),
            "entries_verified": report.entries_verified,
            "checkpoints_verified": report.checkpoints_verified,
            "head_hash": report.head_hash,
            "first_bad_seq": report.first_bad_seq,
            "problem": report.problem,
        }));
    }
    match report.first_bad_seq {
        None => {
            if !cli.json() {
                line(&format!(
                    "export intact: {} entries, {} signed checkpoints verified, head {}",
                    report.entries_verified, report.checkpoints_verified, report.head_hash
                ));
            }
            Ok(())
        }
        Some(seq) => Err(CliError::VerificationFailed(format!(
            "export BROKEN at seq {seq}: {}",
            report.problem
        ))),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use medai_ledger::chain::{self, EntryContent};
    use medai_ledger::export::{ExportRecord, ExportedEntry};

    use super::*;

    /// The process's peak resident memory so far, in bytes (Linux).
    fn peak_rss() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").expect("proc status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|value| {
                value
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .expect("VmHWM")
            * 1024
    }

    /// Writes a chained export of `count` entries and one signed checkpoint over them, line by
    /// line (never held in memory), and returns its size in bytes.
    fn write_export(
        path: &Path,
        signer: &medai_ledger::checkpoint::CheckpointSigner,
        count: u64,
    ) -> u64 {
        let mut file = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
        let mut head = chain::genesis_hash();
        let mut frontier = medai_ledger::merkle::MerkleFrontier::new();
        for seq in 1..=count {
            let content = EntryContent {
                seq,
                recorded_at: "2026-11-22T00:00:00.000000Z".to_owned(),
                actor: "user:4f0c1a52-8d4b-4e8e-9a55-0123456789ab".to_owned(),
                action: "INFERENCE".to_owned(),
                resource: format!("result/{seq}"),
                outcome: "SUCCESS".to_owned(),
                context: format!(
                    r#"{{"image_sha256":"{}","model":"brain-mri-tumor"}}"#,
                    hex::encode(head)
                ),
            };
            let hash = chain::entry_hash(&head, &content);
            let record = ExportRecord::Entry(ExportedEntry {
                seq,
                recorded_at: content.recorded_at,
                actor: content.actor,
                action: content.action,
                resource: content.resource,
                outcome: content.outcome,
                context: content.context,
                prev_hash: hex::encode(head),
                hash: hex::encode(hash),
                encoding_version: chain::ENCODING_VERSION,
            });
            serde_json::to_writer(&mut file, &record).expect("write");
            file.write_all(b"\n").expect("write");
            frontier.push(&hash);
            head = hash;
        }
        let checkpoint = signer.sign(
            count,
            &head,
            &frontier.root(),
            "2026-11-22T00:00:00.000000Z",
        );
        serde_json::to_writer(&mut file, &ExportRecord::Checkpoint(checkpoint)).expect("write");
        file.write_all(b"\n").expect("write");
        file.flush().expect("flush");
        std::fs::metadata(path).expect("size").len()
    }

    #[test]
    fn offline_verification_streams_a_large_export_in_flat_memory() {
        let folder = std::env::temp_dir().join(format!("medai-cli-stream-{}", std::process::id()));
        std::fs::create_dir_all(&folder).expect("folder");
        let signer =
            medai_ledger::checkpoint::CheckpointSigner::load_or_create(&folder.join("key"))
                .expect("key");
        let export = folder.join("ledger.jsonl");
        let entries = 300_000;
        let bytes = write_export(&export, &signer, entries);
        assert!(bytes > 100_000_000, "the export is large: {bytes} bytes");
        let before = peak_rss();
        let report = verify_export_file(&export, None, signer.public_key()).expect("verify");
        let growth = peak_rss().saturating_sub(before);
        std::fs::remove_dir_all(&folder).expect("clean up");
        assert_eq!(
            (
                report.first_bad_seq,
                report.entries_verified,
                report.checkpoints_verified
            ),
            (None, entries, 1),
            "{report:?}"
        );
        // Reading the file whole would add its size; a stream adds a line buffer and a
        // Merkle frontier.
        assert!(
            growth < 16 * 1024 * 1024,
            "peak memory grew by {growth} bytes verifying a {bytes}-byte export"
        );
    }
}
