//! `medai`: run the whole mesh on one machine, log in, run a prediction, verify the ledger.

mod backup;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use medai_cli::client::{authorised, connect_gateway};
use medai_cli::launcher::{MeshSettings, RunningMesh};
use medai_proto::common::v1::ImageFormat;
use medai_proto::gateway::v1::{InferRequest, LoginRequest, VerifyLedgerRequest};

#[derive(Parser)]
#[command(
    name = "medai",
    about = "MedAI Flow: medical-imaging AI behind a mesh of mTLS services",
    version
)]
struct Cli {
    /// Certificates, databases, logs and the saved token live here.
    #[arg(long, global = true, default_value = ".medai", env = "MEDAI_STATE_DIR")]
    state_dir: PathBuf,
    /// The gateway to talk to.
    #[arg(
        long,
        global = true,
        default_value = "https://127.0.0.1:50051",
        env = "MEDAI_GATEWAY"
    )]
    gateway: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start all five services on loopback with the embedded defaults and wait for Ctrl-C.
    Up(UpArgs),
    /// Log in and save the access token in the state folder.
    Login {
        #[arg(long, default_value = "admin")]
        username: String,
        /// Read the password from this file (default: the bootstrap admin's password file).
        #[arg(long)]
        password_file: Option<PathBuf>,
    },
    /// Run a prediction on an image (DICOM, PNG or JPEG) with the saved token.
    Infer {
        file: PathBuf,
        #[arg(long, default_value = "")]
        model: String,
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
    /// Start the mesh, log in, run one prediction on FILE, verify the ledger, stop.
    Demo {
        #[command(flatten)]
        up: UpArgs,
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
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

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("medai: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Up(args) => {
            let mesh = start_mesh(&cli, args).await?;
            say(&format!(
                "mesh is up: gateway {} (Ctrl-C stops it)",
                gateway_endpoint(&mesh)?
            ));
            say(&format!(
                "a service that exits is restarted on its port; see {}",
                cli.state_dir.join("logs").join("launcher.log").display()
            ));
            medai_runtime::shutdown::termination_signal().await;
            mesh.stop(Duration::from_secs(15)).await;
            say("mesh stopped");
            Ok(())
        }
        Command::Login {
            username,
            password_file,
        } => {
            let password_file = password_file
                .clone()
                .unwrap_or_else(|| admin_password_file(&cli.state_dir));
            login(&cli, &cli.gateway, username, &password_file).await
        }
        Command::Infer { file, model } => infer(&cli, &cli.gateway, file, model).await,
        Command::Backup(args) => backup::backup(args).await,
        Command::Restore(args) => backup::restore(args).await,
        Command::Audit {
            command:
                AuditCommand::Verify {
                    export: Some(export),
                    public_key,
                    checkpoints,
                },
        } => verify_offline(
            export,
            public_key.as_deref().unwrap_or_default(),
            checkpoints.as_deref(),
        ),
        Command::Audit {
            command: AuditCommand::Verify { export: None, .. },
        } => verify(&cli, &cli.gateway).await,
        Command::Audit {
            command: AuditCommand::Export { out },
        } => export(&cli, &cli.gateway, out).await,
        Command::Demo { up, file } => {
            let mesh = start_mesh(&cli, up).await?;
            let gateway = gateway_endpoint(&mesh)?;
            say(&format!("mesh is up: gateway {gateway}"));
            let outcome = async {
                login(
                    &cli,
                    &gateway,
                    "admin",
                    &admin_password_file(&cli.state_dir),
                )
                .await?;
                infer(&cli, &gateway, file, "").await?;
                verify(&cli, &gateway).await
            }
            .await;
            mesh.stop(Duration::from_secs(15)).await;
            say("mesh stopped");
            outcome
        }
    }
}

fn gateway_endpoint(mesh: &RunningMesh) -> Result<String> {
    let address = mesh
        .address("gateway")
        .context("the gateway has no address")?;
    Ok(format!("https://{address}"))
}

impl Cli {
    fn ca_certificate(&self) -> PathBuf {
        self.state_dir.join("pki").join("ca.pem")
    }
}

#[allow(clippy::print_stdout)]
fn say(line: &str) {
    println!("{line}");
}

fn admin_password_file(state_dir: &Path) -> PathBuf {
    state_dir.join("admin-password")
}

/// The bootstrap admin's password: generated on first run, kept owner-readable in the state
/// folder, never printed.
fn ensure_admin_password(state_dir: &Path) -> Result<String> {
    let path = admin_password_file(state_dir);
    if let Ok(existing) = std::fs::read_to_string(&path) {
        return Ok(existing.trim().to_owned());
    }
    let password = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    std::fs::write(&path, &password).with_context(|| format!("cannot write {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(password)
}

async fn start_mesh(cli: &Cli, args: &UpArgs) -> Result<RunningMesh> {
    std::fs::create_dir_all(&cli.state_dir)
        .with_context(|| format!("cannot create {}", cli.state_dir.display()))?;
    let state_dir = cli.state_dir.canonicalize()?;
    let binaries_dir = std::env::current_exe()?
        .parent()
        .map(Path::to_owned)
        .context("cannot locate the service binaries")?;
    let model_repository = args.model_repository.canonicalize().with_context(|| {
        format!(
            "model repository {} not found (run scripts/fetch-assets.sh)",
            args.model_repository.display()
        )
    })?;
    let onnxruntime_library = args.onnxruntime_library.canonicalize().with_context(|| {
        format!(
            "ONNX Runtime {} not found (run scripts/fetch-assets.sh)",
            args.onnxruntime_library.display()
        )
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
    let progress = indicatif::ProgressBar::new_spinner();
    progress.set_message("starting audit, auth, validation, inference and gateway");
    progress.enable_steady_tick(Duration::from_millis(120));
    let mesh = RunningMesh::start(&settings).await;
    progress.finish_and_clear();
    let mesh = mesh?;
    for service in medai_cli::launcher::SERVICES {
        if let (Some(grpc), admin) = (mesh.address(service), mesh.admin_address(service)) {
            let metrics = admin
                .map(|address| format!(", metrics http://{address}/metrics"))
                .unwrap_or_default();
            say(&format!("  {service:<10} {grpc}{metrics}"));
        }
    }
    Ok(mesh)
}

fn token_file(state_dir: &Path) -> PathBuf {
    state_dir.join("token")
}

async fn login(cli: &Cli, gateway: &str, username: &str, password_file: &Path) -> Result<()> {
    let password = std::fs::read_to_string(password_file)
        .with_context(|| format!("cannot read the password file {}", password_file.display()))?;
    let mut client = connect_gateway(gateway, &cli.ca_certificate()).await?;
    let grant = client
        .login(LoginRequest {
            username: username.to_owned(),
            password: password.trim().to_owned(),
        })
        .await
        .map_err(|status| {
            anyhow::anyhow!("login refused: {} ({:?})", status.message(), status.code())
        })?
        .into_inner()
        .grant
        .context("the gateway answered without tokens")?;
    let path = token_file(&cli.state_dir);
    std::fs::write(&path, &grant.access_token)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    say(&format!(
        "logged in as {username} ({}); token valid for {} s",
        grant.role, grant.expires_in_seconds
    ));
    Ok(())
}

fn saved_token(cli: &Cli) -> Result<String> {
    std::fs::read_to_string(token_file(&cli.state_dir))
        .map(|token| token.trim().to_owned())
        .context("no saved token: run `medai login` first")
}

async fn infer(cli: &Cli, gateway: &str, file: &Path, model: &str) -> Result<()> {
    let image = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let token = saved_token(cli)?;
    let mut client = connect_gateway(gateway, &cli.ca_certificate()).await?;
    let request = InferRequest {
        image,
        format: ImageFormat::Unspecified.into(),
        model_name: model.to_owned(),
        model_version: String::new(),
        idempotency_key: String::new(),
    };
    let response = client
        .infer(authorised(request, &token))
        .await
        .map_err(|status| {
            let reason = medai_runtime::errors::reason_of(&status).unwrap_or_default();
            anyhow::anyhow!(
                "prediction refused: {} ({:?} {reason})",
                status.message(),
                status.code()
            )
        })?
        .into_inner();
    let Some(prediction) = response.prediction else {
        bail!("the gateway answered without a prediction")
    };
    say(&format!("result     {}", response.result_id));
    say(&format!(
        "model      {} version {}",
        prediction.model_name, prediction.model_version
    ));
    say(&format!(
        "label      {} ({:.4})",
        prediction.top_label, prediction.top_probability
    ));
    for entry in &prediction.probabilities {
        say(&format!("  {:<12} {:.4}", entry.label, entry.probability));
    }
    say(&format!(
        "decision   {} (threshold {:.2}), status PRELIMINARY until signed",
        prediction.decision, prediction.decision_threshold
    ));
    say(&format!(
        "ledger     seq {} hash {}",
        response.ledger_seq, response.ledger_hash
    ));
    say(&format!("NOTE       {}", prediction.intended_use));
    Ok(())
}

async fn verify(cli: &Cli, gateway: &str) -> Result<()> {
    let token = saved_token(cli)?;
    let mut client = connect_gateway(gateway, &cli.ca_certificate()).await?;
    let report = client
        .verify_ledger(authorised(VerifyLedgerRequest {}, &token))
        .await
        .map_err(|status| {
            anyhow::anyhow!(
                "verification refused: {} ({:?})",
                status.message(),
                status.code()
            )
        })?
        .into_inner()
        .verification
        .context("the gateway answered without a report")?;
    if report.intact {
        say(&format!(
            "ledger intact: {} entries, head {}",
            report.entries_checked, report.head_hash
        ));
        Ok(())
    } else {
        bail!(
            "ledger BROKEN at seq {}: {} ({} entries checked before it)",
            report.first_bad_seq,
            report.problem,
            report.entries_checked
        )
    }
}

async fn export(cli: &Cli, gateway: &str, out: &Path) -> Result<()> {
    use std::io::Write;
    let token = saved_token(cli)?;
    let mut client = connect_gateway(gateway, &cli.ca_certificate()).await?;
    let mut stream = client
        .export_ledger(authorised(
            medai_proto::gateway::v1::ExportLedgerRequest {},
            &token,
        ))
        .await
        .map_err(|status| {
            anyhow::anyhow!("export refused: {} ({:?})", status.message(), status.code())
        })?
        .into_inner();
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?,
    );
    let mut lines = 0usize;
    while let Some(chunk) = stream
        .message()
        .await
        .map_err(|status| anyhow::anyhow!("export failed: {}", status.message()))?
    {
        lines += chunk.lines.lines().count();
        file.write_all(chunk.lines.as_bytes())?;
    }
    file.flush()?;
    say(&format!("exported {lines} records to {}", out.display()));
    Ok(())
}

/// Verifies an export file streaming, line by line: memory stays flat however large the file
/// (two passes over it: its checkpoints first, then its entries).
fn verify_export_file(
    export: &Path,
    kept_checkpoints: Option<&Path>,
    key: &[u8],
) -> Result<medai_ledger::export::OfflineReport> {
    let open = |path: &Path| {
        std::fs::File::open(path)
            .map(std::io::BufReader::new)
            .with_context(|| format!("cannot read {}", path.display()))
    };
    let kept = match kept_checkpoints {
        Some(kept) => medai_ledger::export::read_checkpoints(open(kept)?)?,
        None => Vec::new(),
    };
    Ok(medai_ledger::export::verify_export_with_kept(
        open(export)?,
        kept,
        key,
    )?)
}

/// Offline verification: no database, no service; every hash and root recomputed here.
fn verify_offline(export: &Path, public_key: &str, kept_checkpoints: Option<&Path>) -> Result<()> {
    use base64::Engine;
    let key_text = if Path::new(public_key).is_file() {
        std::fs::read_to_string(public_key)?
    } else {
        public_key.to_owned()
    };
    let key = base64::engine::general_purpose::STANDARD
        .decode(key_text.trim())
        .context("the public key is not base64")?;
    let report = verify_export_file(export, kept_checkpoints, &key)?;
    match report.first_bad_seq {
        None => {
            say(&format!(
                "export intact: {} entries, {} signed checkpoints verified, head {}",
                report.entries_verified, report.checkpoints_verified, report.head_hash
            ));
            Ok(())
        }
        Some(seq) => bail!("export BROKEN at seq {seq}: {}", report.problem),
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
