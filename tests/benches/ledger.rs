//! The ledger's speed as production runs it, in one run against the suite's PostgreSQL:
//!
//! - The ledger is pre-filled with 1,000,000 correctly chained entries (a raw bulk INSERT)
//!   before anything is measured, and the audit service runs with its production defaults,
//!   periodic signed checkpoints included (every 60 s), so each measuring window of 65 s
//!   holds at least one checkpoint over a ledger of a million entries or more.
//! - Durable appends/s and p50/p99/max latency over mTLS with 1, 16 and 256 concurrent writers
//!   in one process appending through `LedgerClient`, as production's services do: concurrent
//!   calls are coalesced into `AppendBatch` RPCs (a lone one goes as `Append`), each writer
//!   answered once its own event is durable. Labelled apart, the same writers each making one
//!   raw `Append` RPC per event over one shared channel (what this bench measured before
//!   `AppendBatch`), at 256 writers (`MEDAI_BENCH_LEDGER_RAW=all`: at 1, 16 and 256, alternating
//!   with the `LedgerClient` windows; `MEDAI_BENCH_LEDGER_RAW=none`: never;
//!   `MEDAI_BENCH_LEDGER_WRITERS=256`, a comma list, picks the writer counts). For every window: CPU-seconds per append of this process
//!   (the writers and the audit service share it) and of PostgreSQL (postmaster and every
//!   backend, from /proc), and the mean group commit size (entries per distinct `recorded_at`:
//!   one group, one instant). The fair baseline: durable single-row INSERTs (one transaction
//!   each, no chain, no RPC) from the same number of concurrent clients into a table of the
//!   same shape. The bulk INSERT rate of the pre-fill is printed too, labelled as what it is
//!   (1000 rows per statement, 10 statements per transaction): an upper bound, not a peer.
//! - Verification in entries/s including reading and parsing: the offline verifier streaming
//!   an export file from disk (the same API `medai audit verify --export` uses), and the
//!   service's Verify reading PostgreSQL.
//!
//! It takes about 5 to 10 minutes on two cores (pre-fill about a minute; three 65 s windows
//! of appends and three baseline windows of 10 s; one export and two verifications of the
//! whole ledger). `MEDAI_BENCH_LEDGER_WINDOW_SECONDS` shortens the append windows (below 60 s
//! they may hold no checkpoint; the report says how many each window held).
//! `MEDAI_BENCH_LEDGER_PREFILL` pre-fills fewer (or more) entries than 1,000,000, for quick
//! runs only; `MEDAI_BENCH_LEDGER_ONLY=appends` runs the append windows alone (no baseline, no
//! verification) and writes target/bench/ledger-appends.json.
//! `MEDAI_BENCH_LEDGER_ONLY=verify` runs the verification section alone (about 2 minutes):
//! each verifier beside the one-thread walk it replaced (measured in the same run) and beside
//! PostgreSQL's own rate of sending the rows, with the load average it ran under (periodic
//! checkpoints off, so the service's own verification at start does not run beside them); it
//! writes target/bench/ledger-verify.json.
//!
//! Prints figures and writes target/bench/ledger.json. Run with scripts/bench.sh, or
//! `source scripts/test-servers.sh; cargo bench -p medai-e2e --bench ledger`.

#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use medai_audit::AuditConfig;
use medai_ledger::chain::{self, EntryContent};
use medai_proto::audit::v1 as pb;
use medai_proto::audit::v1::audit_service_client::AuditServiceClient;
use medai_runtime::identity::ServiceIdentity;
use medai_testkit::{
    TestPki, TestServer, fresh_postgres_database, scratch_file, test_process_config,
    wait_until_serving,
};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection};

const DEFAULT_PREFILL_ENTRIES: u64 = 1_000_000;
/// Production's default checkpoint period (`checkpoint_interval_seconds`).
const CHECKPOINT_INTERVAL_SECONDS: u64 = 60;
const BASELINE_WINDOW: Duration = Duration::from_secs(10);

fn content(seq: u64) -> EntryContent {
    EntryContent {
        seq,
        recorded_at: "2026-11-22T00:00:00.000000Z".to_owned(),
        actor: "user:4f0c1a52-8d4b-4e8e-9a55-bench".to_owned(),
        action: "INFERENCE".to_owned(),
        resource: format!("result/{seq}"),
        outcome: "SUCCESS".to_owned(),
        context: r#"{"image_sha256":"3f27d1c22f1a66e80d7bb7c911e8610fd0bb70325a76746a7adb1c0ddefcf2bb","model":"brain-mri-tumor"}"#.to_owned(),
    }
}

fn quoted(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn row_values(content: &EntryContent, prev_hash: &str, hash: &str) -> String {
    format!(
        "({}, {}, {}, {}, {}, {}, {}, {}, {}, 1)",
        content.seq,
        quoted(&content.recorded_at),
        quoted(&content.actor),
        quoted(&content.action),
        quoted(&content.resource),
        quoted(&content.outcome),
        quoted(&content.context),
        quoted(prev_hash),
        quoted(hash)
    )
}

const COLUMNS: &str = "(seq, recorded_at, actor, action, resource, outcome, context, prev_hash, hash, encoding_version)";

/// Raw bulk INSERT of `count` chained rows, 1000 per statement, 10 statements per transaction.
async fn bulk_prefill(database: &DatabaseConnection, count: u64) {
    let mut head = chain::genesis_hash();
    let mut seq = 0;
    while seq < count {
        let mut sql = String::from("BEGIN;");
        for _ in 0..10 {
            if seq >= count {
                break;
            }
            let values: Vec<String> = (seq + 1..=(seq + 1000).min(count))
                .map(|next| {
                    let content = content(next);
                    let hash = chain::entry_hash(&head, &content);
                    let row = row_values(&content, &hex::encode(head), &hex::encode(hash));
                    head = hash;
                    row
                })
                .collect();
            seq += values.len() as u64;
            sql.push_str(&format!(
                "INSERT INTO ledger_entries {COLUMNS} VALUES {};",
                values.join(",")
            ));
        }
        sql.push_str("COMMIT;");
        database
            .execute_unprepared(&sql)
            .await
            .expect("bulk insert");
    }
}

async fn audit_service(
    pki: &TestPki,
    database_url: &str,
    key_file: &std::path::Path,
    checkpoint_interval_seconds: u64,
) -> TestServer {
    let config = AuditConfig {
        process: test_process_config(),
        tls: pki.files("audit"),
        database_url: database_url.to_owned(),
        migration_database_url: None,
        checkpoint_key_file: key_file.to_path_buf(),
        checkpoint_key_mode: medai_audit::config::CheckpointKeyMode::Generate,
        checkpoint_log_file: None,
        checkpoint_interval_seconds,
    };
    let server =
        TestServer::start(|listener, shutdown| medai_audit::serve(config, listener, shutdown))
            .await;
    wait_until_serving(pki, server.address, "audit").await;
    server
}

struct Window {
    clients: usize,
    operations: usize,
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

impl Window {
    fn of(clients: usize, mut latencies: Vec<Duration>, elapsed: Duration) -> Self {
        latencies.sort_unstable();
        let at = |quantile: f64| {
            let index = ((latencies.len() as f64 * quantile) as usize).min(latencies.len() - 1);
            latencies[index].as_secs_f64() * 1000.0
        };
        Self {
            clients,
            operations: latencies.len(),
            rate: latencies.len() as f64 / elapsed.as_secs_f64(),
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            max_ms: latencies
                .last()
                .map_or(0.0, |max| max.as_secs_f64() * 1000.0),
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "clients": self.clients,
            "operations": self.operations,
            "per_second": self.rate,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "max_ms": self.max_ms,
        })
    }
}

/// `clients` tasks run `operation` back to back until `window` has passed.
async fn measure<F, Fut>(clients: usize, window: Duration, operation: F) -> Window
where
    F: Fn(usize, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|client| {
            let operation = operation.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut index = 0;
                while started.elapsed() < window {
                    let began = Instant::now();
                    operation(client, index).await;
                    latencies.push(began.elapsed());
                    index += 1;
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.expect("client task"));
    }
    Window::of(clients, latencies, started.elapsed())
}

async fn count(database: &DatabaseConnection, table: &str) -> i64 {
    database
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DatabaseBackend::Postgres,
            format!("SELECT count(*) AS n FROM {table}"),
        ))
        .await
        .expect("count")
        .expect("row")
        .try_get("", "n")
        .expect("n")
}

/// CPU-seconds (user + system) this process has used.
fn own_cpu_seconds() -> f64 {
    cpu_seconds_of("self", false)
}

/// User + system CPU-seconds of `/proc/<pid>/stat` (with `children`, also of its reaped
/// children), at Linux's USER_HZ of 100 ticks per second.
fn cpu_seconds_of(pid: &str, children: bool) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which is in parentheses and may hold spaces).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |index: usize| -> f64 {
        fields
            .get(index)
            .and_then(|value| value.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime, stime, cutime, cstime are fields 14 to 17 of the line (11 to 14 here).
    let mut ticks = field(11) + field(12);
    if children {
        ticks += field(13) + field(14);
    }
    ticks / 100.0
}

/// The parent pid in `/proc/<pid>/stat`.
fn parent_of(pid: &str) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1).map(str::to_owned)
}

/// The postmaster's pid: the parent of this connection's backend.
async fn postmaster_pid(database: &DatabaseConnection) -> Option<String> {
    let backend: i32 = database
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DatabaseBackend::Postgres,
            "SELECT pg_backend_pid() AS pid",
        ))
        .await
        .ok()??
        .try_get("", "pid")
        .ok()?;
    parent_of(&backend.to_string())
}

/// CPU-seconds of the whole PostgreSQL server: the postmaster, its reaped children and every
/// live child (backends, WAL writer, checkpointer, …).
fn postgres_cpu_seconds(postmaster: &str) -> f64 {
    let mut seconds = cpu_seconds_of(postmaster, true);
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.bytes().all(|byte| byte.is_ascii_digit())
                && parent_of(&name).as_deref() == Some(postmaster)
            {
                seconds += cpu_seconds_of(&name, false);
            }
        }
    }
    seconds
}

/// Entries appended after `after_seq` and in how many group commits (distinct instants).
async fn entries_and_groups(database: &DatabaseConnection, after_seq: i64) -> (i64, i64) {
    let row = database
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DatabaseBackend::Postgres,
            format!(
                "SELECT count(*) AS n, count(DISTINCT recorded_at) AS groups                  FROM ledger_entries WHERE seq > {after_seq}"
            ),
        ))
        .await
        .expect("count")
        .expect("row");
    (
        row.try_get("", "n").expect("n"),
        row.try_get("", "groups").expect("groups"),
    )
}

async fn head_seq(database: &DatabaseConnection) -> i64 {
    database
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DatabaseBackend::Postgres,
            "SELECT coalesce(max(seq), 0) AS n FROM ledger_entries",
        ))
        .await
        .expect("head")
        .expect("row")
        .try_get("", "n")
        .expect("n")
}

/// How the writers of a window append.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    /// Through `LedgerClient` (batched, as production).
    LedgerClient,
    /// One raw `Append` RPC per event over one shared channel.
    RawAppend,
}

impl Path {
    fn label(self) -> &'static str {
        match self {
            Self::LedgerClient => "LedgerClient (AppendBatch)",
            Self::RawAppend => "raw Append RPC per event",
        }
    }
}

/// One append window with what it cost.
struct AppendWindow {
    path: Path,
    measured: Window,
    checkpoints: i64,
    process_cpu_us_per_append: f64,
    postgres_cpu_us_per_append: f64,
    mean_group: f64,
    load: String,
}

impl AppendWindow {
    fn json(&self) -> serde_json::Value {
        let mut json = self.measured.json();
        json["path"] = serde_json::json!(self.path.label());
        json["checkpoints_in_window"] = serde_json::json!(self.checkpoints);
        json["bench_process_cpu_us_per_append"] = serde_json::json!(self.process_cpu_us_per_append);
        json["postgres_cpu_us_per_append"] = serde_json::json!(self.postgres_cpu_us_per_append);
        json["mean_group_commit_size"] = serde_json::json!(self.mean_group);
        json["load_average_after"] = serde_json::json!(self.load);
        json
    }
}

/// The 1-minute load average, to say how disturbed the figures were.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned())
}

fn print_appends(appends: &[AppendWindow], baseline: &[Window], prefill: u64, window: Duration) {
    println!(
        "ledger appends, durable (acknowledged after COMMIT), over mTLS, PostgreSQL, ledger \
         pre-filled with {prefill} entries, checkpoints every {CHECKPOINT_INTERVAL_SECONDS} s, \
         {} s per window; writers append through LedgerClient as production's services do \
         (concurrent calls coalesced into AppendBatch), or, labelled, one raw Append RPC each",
        window.as_secs()
    );
    for append in appends {
        let measured = &append.measured;
        let fair = baseline
            .iter()
            .find(|fair| fair.clients == measured.clients)
            .map(|fair| {
                format!(
                    "  vs durable single-row INSERT {:.0} rows/s (p99 {:.2} ms): {:.2}x",
                    fair.rate,
                    fair.p99_ms,
                    measured.rate / fair.rate
                )
            })
            .unwrap_or_default();
        println!(
            "  {:>3} writers  {:<27} {:>8.0} appends/s  p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>8.2} ms  \
             ({} checkpoints in the window; CPU per append: this process (writers + audit) {:.0} µs, \
             PostgreSQL {:.0} µs; mean group commit {:.1} entries; load {}){fair}",
            measured.clients,
            append.path.label(),
            measured.rate,
            measured.p50_ms,
            measured.p99_ms,
            measured.max_ms,
            append.checkpoints,
            append.process_cpu_us_per_append,
            append.postgres_cpu_us_per_append,
            append.mean_group,
            append.load,
        );
    }
}

#[tokio::main]
async fn main() {
    let window = Duration::from_secs(
        std::env::var("MEDAI_BENCH_LEDGER_WINDOW_SECONDS")
            .ok()
            .and_then(|seconds| seconds.parse().ok())
            .unwrap_or(65),
    );
    let only = std::env::var("MEDAI_BENCH_LEDGER_ONLY").unwrap_or_default();
    let verify_only = only == "verify";
    let appends_only = only == "appends";
    let prefill_entries: u64 = std::env::var("MEDAI_BENCH_LEDGER_PREFILL")
        .ok()
        .and_then(|entries| entries.parse().ok())
        .unwrap_or(DEFAULT_PREFILL_ENTRIES);
    let raw = std::env::var("MEDAI_BENCH_LEDGER_RAW").unwrap_or_default();
    let raw_at_every_count = raw == "all";
    let writer_counts: Vec<usize> = std::env::var("MEDAI_BENCH_LEDGER_WRITERS")
        .ok()
        .map(|counts| {
            counts
                .split(',')
                .filter_map(|count| count.trim().parse().ok())
                .collect()
        })
        .filter(|counts: &Vec<usize>| !counts.is_empty())
        .unwrap_or_else(|| vec![1, 16, 256]);
    let pki = TestPki::new();
    let database_url = fresh_postgres_database().await;
    let key_file = scratch_file("checkpoint.key");

    // The schema, then a million chained entries before anything is measured.
    audit_service(&pki, &database_url, &key_file, 0)
        .await
        .stop()
        .await;
    let database = Database::connect(database_url.as_str())
        .await
        .expect("connect");
    let started = Instant::now();
    bulk_prefill(&database, prefill_entries).await;
    let prefill_seconds = started.elapsed().as_secs_f64();
    let bulk_rate = prefill_entries as f64 / prefill_seconds;
    println!(
        "pre-filled {prefill_entries} chained entries in {prefill_seconds:.1} s (raw bulk INSERT)"
    );

    // Production defaults: periodic checkpoints on. The service verifies what is stored once
    // at start (in the background, appends do not wait), then each checkpoint reads new
    // entries only.
    // With the verification section alone, periodic checkpoints stay off: the service's
    // verification of the stored ledger at start would run beside the measured walks.
    let interval = if verify_only {
        0
    } else {
        CHECKPOINT_INTERVAL_SECONDS
    };
    let server = audit_service(&pki, &database_url, &key_file, interval).await;
    let client = AuditServiceClient::new(pki.channel_as("gateway", server.address, "audit"));
    // The writers of a production service: one LedgerClient on one mesh channel.
    let ledger_client = medai_ledger_client::LedgerClient::new(
        pki.material("inference")
            .mesh_channel(
                &format!("https://{}", server.address),
                &ServiceIdentity::new("audit"),
            )
            .expect("mesh channel"),
    );
    let postmaster = postmaster_pid(&database).await.unwrap_or_default();
    let mut plan = Vec::new();
    for clients in writer_counts {
        plan.push((clients, Path::LedgerClient));
        if raw != "none" && (raw_at_every_count || clients == 256) {
            plan.push((clients, Path::RawAppend));
        }
    }
    let mut appends: Vec<AppendWindow> = Vec::new();
    for (clients, path) in plan {
        if verify_only {
            break;
        }
        let checkpoints_before = count(&database, "ledger_checkpoints").await;
        let seq_before = head_seq(&database).await;
        let process_before = own_cpu_seconds();
        let postgres_before = postgres_cpu_seconds(&postmaster);
        let client = client.clone();
        let ledger_client = ledger_client.clone();
        let measured = measure(clients, window, move |task, index| {
            let mut client = client.clone();
            let ledger_client = ledger_client.clone();
            async move {
                let c = content(index as u64);
                let resource = format!("result/{task}/{index}");
                match path {
                    Path::LedgerClient => {
                        let context: serde_json::Value =
                            serde_json::from_str(&c.context).expect("context");
                        ledger_client
                            .record(&c.actor, &c.action, &resource, &c.outcome, context)
                            .await
                            .expect("record");
                    }
                    Path::RawAppend => {
                        let request = pb::AppendRequest {
                            actor: c.actor,
                            action: c.action,
                            resource,
                            outcome: c.outcome,
                            context_json: c.context,
                        };
                        client.append(request).await.expect("append");
                    }
                }
            }
        })
        .await;
        let process_cpu = own_cpu_seconds() - process_before;
        let postgres_cpu = postgres_cpu_seconds(&postmaster) - postgres_before;
        let (entries, groups) = entries_and_groups(&database, seq_before).await;
        let checkpoints = count(&database, "ledger_checkpoints").await - checkpoints_before;
        let per_append = |seconds: f64| seconds * 1e6 / (measured.operations.max(1) as f64);
        appends.push(AppendWindow {
            path,
            checkpoints,
            process_cpu_us_per_append: per_append(process_cpu),
            postgres_cpu_us_per_append: per_append(postgres_cpu),
            mean_group: entries as f64 / (groups.max(1) as f64),
            load: load_average(),
            measured,
        });
    }
    let ledger_size = u64::try_from(count(&database, "ledger_entries").await).unwrap_or(0);

    // The fair baseline: durable single-row INSERTs, one transaction each, same client counts.
    database
        .execute_unprepared("CREATE TABLE baseline_rows (LIKE ledger_entries INCLUDING ALL)")
        .await
        .expect("baseline table");
    let mut baseline = Vec::new();
    for clients in [1usize, 16, 256] {
        if verify_only || appends_only {
            break;
        }
        let mut options = ConnectOptions::new(database_url.clone());
        options
            .max_connections(u32::try_from(clients).unwrap_or(u32::MAX))
            .min_connections(u32::try_from(clients).unwrap_or(u32::MAX))
            .sqlx_logging(false);
        let pool = Database::connect(options).await.expect("pool");
        let next = Arc::new(std::sync::atomic::AtomicU64::new(
            u64::try_from(count(&database, "baseline_rows").await).unwrap_or(0),
        ));
        let measured = measure(clients, BASELINE_WINDOW, move |_, _| {
            let pool = pool.clone();
            let next = next.clone();
            async move {
                let seq = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                let content = content(seq);
                let row = row_values(&content, &"0".repeat(64), &"0".repeat(64));
                pool.execute_unprepared(&format!(
                    "INSERT INTO baseline_rows {COLUMNS} VALUES {row}"
                ))
                .await
                .expect("insert");
            }
        })
        .await;
        baseline.push(measured);
    }

    if appends_only {
        server.stop().await;
        print_appends(&appends, &baseline, prefill_entries, window);
        let report = serde_json::json!({
            "benchmark": "ledger",
            "prefill_entries": prefill_entries,
            "checkpoint_interval_seconds": interval,
            "window_seconds": window.as_secs(),
            "appends": appends.iter().map(AppendWindow::json).collect::<Vec<_>>(),
        });
        let directory = medai_testkit::workspace_root().join("target/bench");
        std::fs::create_dir_all(&directory).expect("bench folder");
        std::fs::write(
            directory.join("ledger-appends.json"),
            serde_json::to_string_pretty(&report).expect("json"),
        )
        .expect("write");
        return;
    }

    // Verification, reading and parsing included: PostgreSQL sending the rows to a client that
    // only counts them (the ceiling for any verifier reading them), the service's Verify, the
    // paged one-entry-at-a-time walk it replaced; then the offline verifier streaming an
    // export from disk, beside the one-thread walk it replaced.
    let public_key = medai_ledger::checkpoint::CheckpointSigner::load_or_create(&key_file)
        .expect("key")
        .public_key()
        .to_vec();
    let load_before = load_average();
    let pool = medai_audit::verify::postgres_pool(&database).expect("PostgreSQL");
    let started = Instant::now();
    let mut rows = sea_orm::sqlx::query(
        "SELECT seq, recorded_at, actor, action, resource, outcome, context, prev_hash, hash, \
         encoding_version FROM ledger_entries ORDER BY seq",
    )
    .fetch(pool);
    let mut sent = 0_u64;
    while let Some(row) = tokio_stream::StreamExt::next(&mut rows).await {
        row.expect("row");
        sent += 1;
    }
    drop(rows);
    let postgres_rate = sent as f64 / started.elapsed().as_secs_f64();

    let mut verifier = client.clone();
    let started = Instant::now();
    let verified = verifier
        .verify(pb::VerifyRequest {})
        .await
        .expect("verify")
        .into_inner();
    let service_rate = verified.entries_checked as f64 / started.elapsed().as_secs_f64();
    assert!(verified.intact, "{verified:?}");

    let started = Instant::now();
    let paged = medai_audit::verify::verify_ledger_paged(&database, &public_key)
        .await
        .expect("paged walk");
    let paged_rate = paged.entries_verified as f64 / started.elapsed().as_secs_f64();
    assert_eq!(paged.first_bad_seq, None, "{paged:?}");

    let folder = tempfile::tempdir().expect("tempdir");
    let export_file = folder.path().join("ledger.jsonl");
    {
        use std::io::Write;
        let mut file = std::io::BufWriter::new(std::fs::File::create(&export_file).expect("file"));
        let mut stream = verifier
            .export_ledger(pb::ExportLedgerRequest {})
            .await
            .expect("export")
            .into_inner();
        while let Some(chunk) = stream.message().await.expect("chunk") {
            file.write_all(chunk.lines.as_bytes()).expect("write");
        }
        file.flush().expect("flush");
    }
    server.stop().await;
    let export_bytes = std::fs::metadata(&export_file).expect("size").len();
    let open = || std::io::BufReader::new(std::fs::File::open(&export_file).expect("open"));
    let started = Instant::now();
    let offline = medai_ledger::export::verify_export_with_kept(open(), Vec::new(), &public_key)
        .expect("readable");
    let offline_rate = offline.entries_verified as f64 / started.elapsed().as_secs_f64();
    assert_eq!(offline.first_bad_seq, None, "{offline:?}");
    let started = Instant::now();
    let sequential =
        medai_ledger::export::verify_export_sequential(open(), Vec::new(), &public_key)
            .expect("readable");
    let sequential_rate = sequential.entries_verified as f64 / started.elapsed().as_secs_f64();
    assert_eq!(sequential, offline);
    let load_after = load_average();

    if !verify_only {
        print_appends(&appends, &baseline, prefill_entries, window);
    }
    println!(
        "  bulk INSERT (1000 rows per statement, 10 per transaction; an upper bound, not a peer): {bulk_rate:.0} rows/s"
    );
    println!(
        "ledger verification over {ledger_size} entries, reading and parsing included \
         (load average {load_before} before, {load_after} after)"
    );
    println!(
        "  offline, streaming a {:.0} MB export from disk: {offline_rate:>10.0} entries/s \
         (one-thread walk: {sequential_rate:.0}/s, {:.2}x)",
        export_bytes as f64 / 1e6,
        offline_rate / sequential_rate
    );
    println!(
        "  audit service Verify from PostgreSQL:        {service_rate:>10.0} entries/s \
         (paged walk: {paged_rate:.0}/s, {:.2}x)",
        service_rate / paged_rate
    );
    println!(
        "  PostgreSQL sending the rows, only counted:   {postgres_rate:>10.0} rows/s \
         (Verify reaches {:.0} % of it)",
        100.0 * service_rate / postgres_rate
    );

    let report = serde_json::json!({
        "benchmark": "ledger",
        "prefill_entries": prefill_entries,
        "prefill_seconds": prefill_seconds,
        "checkpoint_interval_seconds": interval,
        "window_seconds": window.as_secs(),
        "appends": appends.iter().map(AppendWindow::json).collect::<Vec<_>>(),
        "baseline_durable_single_row_insert": baseline.iter().map(Window::json).collect::<Vec<_>>(),
        "baseline_bulk_insert_rows_per_second": bulk_rate,
        "verify_entries": ledger_size,
        "verify_offline_streaming_entries_per_second": offline_rate,
        "verify_offline_export_bytes": export_bytes,
        "verify_service_entries_per_second": service_rate,
        "verify_offline_one_thread_entries_per_second": sequential_rate,
        "verify_service_paged_entries_per_second": paged_rate,
        "verify_postgres_row_send_rows_per_second": postgres_rate,
        "verify_load_average_before": load_before,
        "verify_load_average_after": load_after,
    });
    let directory = medai_testkit::workspace_root().join("target/bench");
    std::fs::create_dir_all(&directory).expect("bench folder");
    std::fs::write(
        directory.join(if verify_only {
            "ledger-verify.json"
        } else {
            "ledger.json"
        }),
        serde_json::to_string_pretty(&report).expect("json"),
    )
    .expect("write");
}
