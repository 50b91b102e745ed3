//! `medai backup` and `medai restore`: logical backups of the three PostgreSQL databases
//! (ledger, identities, results) taken on a running system, and their restore into a fresh
//! PostgreSQL with proof that the ledger lost nothing a signed checkpoint covers.
//!
//! Backup: each database is dumped by `pg_dump --format=custom` from one consistent snapshot
//! (`--serializable-deferrable`; the ledger's from a snapshot this command exports so the
//! manifest names the head that snapshot holds). Identities and results are dumped first and
//! the ledger last: every state change is recorded in the ledger before it takes effect, so
//! whatever the earlier dumps hold has its ledger record in the later one. Cluster roles
//! (no passwords) go to `roles.sql`. `manifest.json` lists every file with its size and
//! SHA-256, the ledger's head seq and hash, and its newest stored checkpoint.
//!
//! Restore: files are checked against the manifest, roles created where missing, each dump
//! restored with `pg_restore --exit-on-error` into an existing empty database, then the
//! restored ledger is verified: the whole chain recomputed from genesis, its head equal to
//! the manifest's, and (with `--checkpoint-log`) compared with the newest checkpoint the
//! audit key signed outside the database: a ledger behind it is reported with the missing
//! seq range (`LEDGER_BEHIND_CHECKPOINT`, exit status 1), as the audit service would refuse it.

use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use medai_ledger::chain::{ChainVerifier, EntryContent, StoredEntry};
use medai_ledger::checkpoint::Checkpoint;
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, Statement};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The databases, in the order they are dumped (the ledger last).
const DATABASES: [&str; 3] = ["identities", "results", "ledger"];
const MANIFEST: &str = "manifest.json";
const ROLES: &str = "roles.sql";
const MANIFEST_FORMAT: u32 = 1;

#[derive(clap::Args, Clone, Debug)]
pub struct DatabaseUrls {
    /// The audit service's ledger database (`postgres://…`).
    #[arg(long, env = "MEDAI_BACKUP_LEDGER_URL")]
    ledger_url: String,
    /// The auth service's database (users, credentials, keys, revocations).
    #[arg(long, env = "MEDAI_BACKUP_IDENTITIES_URL")]
    identities_url: String,
    /// The inference service's database (models, results).
    #[arg(long, env = "MEDAI_BACKUP_RESULTS_URL")]
    results_url: String,
    /// Where pg_dump, pg_restore, pg_dumpall and psql are (default: PATH). Use the server's
    /// major version or newer.
    #[arg(long, env = "MEDAI_PG_BIN")]
    pg_bin: Option<PathBuf>,
}

impl DatabaseUrls {
    fn url_of(&self, database: &str) -> &str {
        match database {
            "ledger" => &self.ledger_url,
            "identities" => &self.identities_url,
            _ => &self.results_url,
        }
    }

    fn tool(&self, name: &str) -> PathBuf {
        self.pg_bin
            .as_ref()
            .map_or_else(|| PathBuf::from(name), |bin| bin.join(name))
    }
}

#[derive(clap::Args, Clone, Debug)]
pub struct BackupArgs {
    /// A new (or empty) directory for the dumps and the manifest.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    urls: DatabaseUrls,
}

#[derive(clap::Args, Clone, Debug)]
pub struct RestoreArgs {
    /// A directory written by `medai backup`.
    #[arg(long)]
    from: PathBuf,
    /// The target databases: they must exist and be empty (`createdb`).
    #[command(flatten)]
    urls: DatabaseUrls,
    /// The audit service's checkpoint log (`audit-checkpoint.checkpoints.jsonl` beside its
    /// key) or an auditor's export: the restored ledger must reach its newest checkpoint.
    #[arg(long, requires = "public_key")]
    checkpoint_log: Option<PathBuf>,
    /// The checkpoint public key (base64), or a file holding it (`audit-checkpoint.pub`).
    #[arg(long)]
    public_key: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub created_at: String,
    pub pg_dump_version: String,
    pub databases: Vec<DumpedDatabase>,
    pub roles_file: Option<String>,
    pub ledger: LedgerAtBackup,
    pub seconds: f64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DumpedDatabase {
    /// `ledger`, `identities` or `results`.
    pub role: String,
    /// The database's name on the server it came from (never credentials).
    pub database: String,
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct LedgerAtBackup {
    /// The last seq in the dump (0: empty).
    pub head_seq: u64,
    pub head_hash: String,
    /// The newest checkpoint stored in the dump, if any.
    pub newest_checkpoint: Option<Checkpoint>,
}

pub async fn backup(args: &BackupArgs) -> Result<()> {
    let started = Instant::now();
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    if std::fs::read_dir(&args.out)?.next().is_some() {
        bail!(
            "{} is not empty: write each backup to a new directory",
            args.out.display()
        );
    }
    let urls = &args.urls;
    let mut databases = Vec::new();
    let mut ledger = None;
    for role in DATABASES {
        let url = urls.url_of(role);
        let file = format!("{role}.dump");
        let path = args.out.join(&file);
        let dump_started = Instant::now();
        if role == "ledger" {
            ledger = Some(dump_ledger(urls, url, &path).await?);
        } else {
            run_tool(
                urls.tool("pg_dump"),
                &[
                    "--format=custom",
                    "--serializable-deferrable",
                    "--file",
                    &path.display().to_string(),
                    url,
                ],
            )?;
        }
        let (bytes, sha256) = size_and_digest(&path)?;
        say(&format!(
            "{role:<10} {bytes:>12} bytes  sha256 {}…  {:.2} s",
            &sha256[..16],
            dump_started.elapsed().as_secs_f64()
        ));
        databases.push(DumpedDatabase {
            role: role.to_owned(),
            database: database_name(url),
            file,
            bytes,
            sha256,
        });
    }
    let roles_file = dump_roles(urls, &args.out.join(ROLES));
    let ledger = ledger.context("the ledger was not dumped")?;
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        created_at: now_rfc3339(),
        pg_dump_version: tool_version(&urls.tool("pg_dump")),
        databases,
        roles_file,
        ledger,
        seconds: started.elapsed().as_secs_f64(),
    };
    std::fs::write(
        args.out.join(MANIFEST),
        serde_json::to_string_pretty(&manifest)? + "\n",
    )?;
    say(&format!(
        "backup written to {}: ledger head seq {}, newest checkpoint {}, {:.2} s",
        args.out.display(),
        manifest.ledger.head_seq,
        manifest
            .ledger
            .newest_checkpoint
            .as_ref()
            .map_or_else(|| "none".to_owned(), |c| c.tree_size.to_string()),
        manifest.seconds
    ));
    Ok(())
}

/// Dumps the ledger from a snapshot this connection exports, and reads its head (and newest
/// checkpoint) in that same snapshot, so the manifest describes exactly what the dump holds.
async fn dump_ledger(urls: &DatabaseUrls, url: &str, path: &Path) -> Result<LedgerAtBackup> {
    let connection = single_connection(url).await?;
    connection
        .execute_unprepared("BEGIN ISOLATION LEVEL SERIALIZABLE, READ ONLY, DEFERRABLE")
        .await?;
    let snapshot: String = query_one(&connection, "SELECT pg_export_snapshot() AS value")
        .await?
        .try_get("", "value")?;
    let ledger = ledger_head(&connection).await?;
    let dumped = run_tool(
        urls.tool("pg_dump"),
        &[
            "--format=custom",
            &format!("--snapshot={snapshot}"),
            "--file",
            &path.display().to_string(),
            url,
        ],
    );
    connection.execute_unprepared("COMMIT").await?;
    connection.close().await?;
    dumped?;
    Ok(ledger)
}

async fn ledger_head(connection: &DatabaseConnection) -> Result<LedgerAtBackup> {
    let head = connection
        .query_one_raw(statement(
            "SELECT seq, hash FROM ledger_entries ORDER BY seq DESC LIMIT 1",
        ))
        .await?;
    let (head_seq, head_hash) = match head {
        Some(row) => (
            u64::try_from(row.try_get::<i64>("", "seq")?)?,
            row.try_get::<String>("", "hash")?,
        ),
        None => (0, hex::encode(medai_ledger::chain::genesis_hash())),
    };
    let checkpoint = connection
        .query_one_raw(statement(
            "SELECT tree_size, head_hash, merkle_root, created_at, key_id, signature \
             FROM ledger_checkpoints ORDER BY tree_size DESC LIMIT 1",
        ))
        .await?;
    let newest_checkpoint = match checkpoint {
        Some(row) => Some(Checkpoint {
            tree_size: u64::try_from(row.try_get::<i64>("", "tree_size")?)?,
            head_hash: row.try_get("", "head_hash")?,
            merkle_root: row.try_get("", "merkle_root")?,
            created_at: row.try_get("", "created_at")?,
            key_id: row.try_get("", "key_id")?,
            signature: row.try_get("", "signature")?,
        }),
        None => None,
    };
    Ok(LedgerAtBackup {
        head_seq,
        head_hash,
        newest_checkpoint,
    })
}

/// Cluster roles without passwords (who owns what, `medai_ledger_writer`); a role that may
/// not read them (not a superuser) leaves the file out and says so.
fn dump_roles(urls: &DatabaseUrls, path: &Path) -> Option<String> {
    let dumped = run_tool(
        urls.tool("pg_dumpall"),
        &[
            "--roles-only",
            "--no-role-passwords",
            "--file",
            &path.display().to_string(),
            "--dbname",
            urls.url_of("ledger"),
        ],
    );
    match dumped {
        Ok(()) => Some(ROLES.to_owned()),
        Err(error) => {
            warn(&format!(
                "roles not backed up (create them before a restore): {error:#}"
            ));
            None
        }
    }
}

pub async fn restore(args: &RestoreArgs) -> Result<()> {
    let started = Instant::now();
    let manifest: Manifest = serde_json::from_slice(
        &std::fs::read(args.from.join(MANIFEST))
            .with_context(|| format!("no {MANIFEST} in {}", args.from.display()))?,
    )
    .context("the manifest is not valid")?;
    if manifest.format != MANIFEST_FORMAT {
        bail!("manifest format {} is not known", manifest.format);
    }
    // Every file must be the one the backup wrote.
    for dumped in &manifest.databases {
        let (bytes, sha256) = size_and_digest(&args.from.join(&dumped.file))?;
        if bytes != dumped.bytes || sha256 != dumped.sha256 {
            bail!(
                "BACKUP_CORRUPT: {} does not match the manifest (sha256 {sha256}, manifest {})",
                dumped.file,
                dumped.sha256
            );
        }
    }
    let urls = &args.urls;
    if let Some(roles) = &manifest.roles_file {
        create_missing_roles(urls, &args.from.join(roles))?;
    }
    for dumped in &manifest.databases {
        let restore_started = Instant::now();
        run_tool(
            urls.tool("pg_restore"),
            &[
                "--exit-on-error",
                "--dbname",
                urls.url_of(&dumped.role),
                &args.from.join(&dumped.file).display().to_string(),
            ],
        )
        .with_context(|| format!("restoring {}", dumped.role))?;
        say(&format!(
            "{:<10} restored in {:.2} s",
            dumped.role,
            restore_started.elapsed().as_secs_f64()
        ));
    }
    let restored = verify_restored_ledger(urls.url_of("ledger"), &manifest).await?;
    say(&format!(
        "ledger verified: {} entries recomputed from genesis, head seq {} as in the manifest",
        restored.entries, restored.head_seq
    ));
    if let Some(log) = &args.checkpoint_log {
        let public_key = public_key_bytes(args.public_key.as_deref().unwrap_or_default())?;
        check_against_checkpoint_log(&restored, log, &public_key)?;
    }
    say(&format!(
        "restore complete in {:.2} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// What the restored ledger holds, recomputed.
pub struct RestoredLedger {
    pub entries: u64,
    pub head_seq: u64,
    /// Recomputed hash of every entry, by seq - 1 (to find the one a checkpoint names).
    hashes: Vec<[u8; 32]>,
}

async fn verify_restored_ledger(url: &str, manifest: &Manifest) -> Result<RestoredLedger> {
    let connection = single_connection(url).await?;
    let mut verifier = ChainVerifier::new();
    let mut hashes = Vec::new();
    let mut after = 0i64;
    loop {
        let rows = connection
            .query_all_raw(statement(&format!(
                "SELECT seq, recorded_at, actor, action, resource, outcome, context, prev_hash, \
                 hash, encoding_version FROM ledger_entries WHERE seq > {after} ORDER BY seq LIMIT 5000"
            )))
            .await?;
        let Some(last) = rows.last() else { break };
        after = last.try_get("", "seq")?;
        for row in rows {
            let entry = StoredEntry {
                content: EntryContent {
                    seq: u64::try_from(row.try_get::<i64>("", "seq")?)?,
                    recorded_at: row.try_get("", "recorded_at")?,
                    actor: row.try_get("", "actor")?,
                    action: row.try_get("", "action")?,
                    resource: row.try_get("", "resource")?,
                    outcome: row.try_get("", "outcome")?,
                    context: row.try_get("", "context")?,
                },
                encoding_version: u32::try_from(row.try_get::<i32>("", "encoding_version")?)?,
                prev_hash_hex: row.try_get("", "prev_hash")?,
                hash_hex: row.try_get("", "hash")?,
            };
            if let Err(chain_break) = verifier.check(&entry) {
                bail!(
                    "LEDGER_CHAIN_BROKEN: the restored ledger does not verify at seq {}: {}",
                    chain_break.seq,
                    chain_break.problem
                );
            }
            hashes.push(verifier.head());
        }
    }
    connection.close().await?;
    let head_seq = verifier.entries_checked();
    if head_seq != manifest.ledger.head_seq
        || hex::encode(verifier.head()) != manifest.ledger.head_hash
    {
        bail!(
            "the restored ledger ends at seq {head_seq}, the manifest says seq {} (hash {})",
            manifest.ledger.head_seq,
            manifest.ledger.head_hash
        );
    }
    Ok(RestoredLedger {
        entries: head_seq,
        head_seq,
        hashes,
    })
}

/// The restored ledger must reach, and pass through, the newest checkpoint the key signed.
fn check_against_checkpoint_log(
    restored: &RestoredLedger,
    log: &Path,
    public_key: &[u8],
) -> Result<()> {
    let file = std::fs::File::open(log)
        .with_context(|| format!("cannot read the checkpoint log {}", log.display()))?;
    // Lines that do not parse (a torn last line) are skipped, as the audit service does.
    let newest = std::io::BufReader::new(file)
        .lines()
        .map_while(std::result::Result::ok)
        .filter_map(|line| {
            match serde_json::from_str::<medai_ledger::export::ExportRecord>(&line) {
                Ok(medai_ledger::export::ExportRecord::Checkpoint(checkpoint)) => Some(checkpoint),
                _ => None,
            }
        })
        .filter(|checkpoint| checkpoint.signature_is_valid(public_key))
        .max_by_key(|checkpoint| checkpoint.tree_size);
    let Some(newest) = newest else {
        say(&format!(
            "checkpoint log {}: no checkpoint signed by this key",
            log.display()
        ));
        return Ok(());
    };
    if restored.head_seq < newest.tree_size {
        bail!(
            "LEDGER_BEHIND_CHECKPOINT: the restored ledger ends at seq {}, but checkpoint {} was signed over seq {}: entries {}..={} are missing; restore a newer backup (the audit service will refuse appends onto this one)",
            restored.head_seq,
            newest.created_at,
            newest.tree_size,
            restored.head_seq + 1,
            newest.tree_size
        );
    }
    let at_checkpoint = usize::try_from(newest.tree_size)
        .ok()
        .and_then(|size| size.checked_sub(1))
        .and_then(|index| restored.hashes.get(index))
        .map_or_else(
            || hex::encode(medai_ledger::chain::genesis_hash()),
            hex::encode,
        );
    if at_checkpoint != newest.head_hash {
        bail!(
            "LEDGER_ANCHOR_VIOLATION: the restored entry at seq {} has hash {at_checkpoint}, not the signed checkpoint's {}",
            newest.tree_size,
            newest.head_hash
        );
    }
    say(&format!(
        "checkpoint log: the restored ledger passes through the newest signed checkpoint (seq {}, {}); {} entries after it",
        newest.tree_size,
        newest.created_at,
        restored.head_seq - newest.tree_size
    ));
    Ok(())
}

/// Runs `roles.sql` statement by statement; a role that already exists is fine.
fn create_missing_roles(urls: &DatabaseUrls, roles: &Path) -> Result<()> {
    let output = Command::new(urls.tool("psql"))
        .args(["--no-psqlrc", "--quiet", "--dbname", urls.url_of("ledger")])
        .arg("--file")
        .arg(roles)
        .output()
        .context("cannot run psql")?;
    let errors = String::from_utf8_lossy(&output.stderr);
    let unexpected: Vec<&str> = errors
        .lines()
        .filter(|line| line.contains("ERROR") && !line.contains("already exists"))
        .collect();
    if !output.status.success() || !unexpected.is_empty() {
        bail!("creating roles failed: {}", unexpected.join("; "));
    }
    Ok(())
}

async fn single_connection(url: &str) -> Result<DatabaseConnection> {
    let mut options = ConnectOptions::new(url.to_owned());
    options
        .sqlx_logging(false)
        .max_connections(1)
        .min_connections(1);
    Database::connect(options)
        .await
        .with_context(|| format!("cannot connect to the database {}", database_name(url)))
}

fn statement(sql: &str) -> Statement {
    Statement::from_string(sea_orm::DatabaseBackend::Postgres, sql.to_owned())
}

async fn query_one(connection: &DatabaseConnection, sql: &str) -> Result<sea_orm::QueryResult> {
    connection
        .query_one_raw(statement(sql))
        .await?
        .context("no row")
}

fn run_tool(program: PathBuf, arguments: &[&str]) -> Result<()> {
    let output = Command::new(&program)
        .args(arguments)
        .output()
        .with_context(|| format!("cannot run {}", program.display()))?;
    if !output.status.success() {
        bail!(
            "{} failed: {}",
            program.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

fn tool_version(program: &Path) -> String {
    Command::new(program)
        .arg("--version")
        .output()
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn size_and_digest(path: &Path) -> Result<(u64, String)> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 16];
    let mut bytes = 0u64;
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        bytes += read as u64;
        hasher.update(&buffer[..read]);
    }
    Ok((bytes, hex::encode(hasher.finalize())))
}

/// The database name of a URL, without user, password, host or parameters.
fn database_name(url: &str) -> String {
    url.rsplit('/')
        .next()
        .and_then(|tail| tail.split('?').next())
        .unwrap_or_default()
        .to_owned()
}

/// One line of the command's report on stdout.
#[allow(clippy::print_stdout)]
fn say(line: &str) {
    println!("{line}");
}

/// A warning on stderr; the command goes on.
#[allow(clippy::print_stderr)]
fn warn(line: &str) {
    eprintln!("medai: {line}");
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// A base64 public key, or a file holding one.
fn public_key_bytes(public_key: &str) -> Result<Vec<u8>> {
    use base64::Engine;
    let text = if Path::new(public_key).is_file() {
        std::fs::read_to_string(public_key)?
    } else {
        public_key.to_owned()
    };
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .context("the public key is not base64")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_name_never_carries_credentials() {
        assert_eq!(
            database_name("postgres://medai:secret@db:5432/ledger?sslmode=require"),
            "ledger"
        );
    }
}
