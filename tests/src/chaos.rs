//! The fault harness of issue 17: the whole mesh on a PostgreSQL primary with a synchronous
//! standby and a Redis of its own, a steady load through the gateway (predictions, study
//! streams, logins, signatures), and faults injected one after another. For each fault it
//! reports the calls that succeeded, were refused with a stable code or failed otherwise, the
//! predictions delivered without their ledger record (must be 0), whether the chain verifies,
//! and how long until a prediction succeeded again.
//!
//! `scripts/chaos.sh` runs every fault (the `chaos` bench program); tests/tests/recovery.rs
//! runs the short form (kill -9 and SIGTERM of each service).

use crate::bench_images::light_png;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use medai_cli::client::{GatewayClient, authorised, connect_gateway};
use medai_cli::launcher::{MeshSettings, RunningMesh};
use medai_proto::common::v1::ImageFormat;
use medai_proto::gateway::v1 as gw;
use medai_testkit::{Assets, PrivatePostgres, PrivateRedis, binaries_dir};
use sea_orm::{ConnectionTrait, Database, DatabaseBackend, Statement};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const ADMIN_PASSWORD: &str = "an admin password for the fault harness";
const CLINICIAN: &str = "chaos.clinician";
const CLINICIAN_PASSWORD: &str = "chaos clinician password 123";
const AUDITOR: &str = "chaos.auditor";
const AUDITOR_PASSWORD: &str = "chaos auditor password 123";
/// Every call of the load and of the probes carries this deadline.
const CALL_DEADLINE: Duration = Duration::from_secs(20);
/// How long a fault may take to heal before the harness gives up on it.
const RECOVERY_LIMIT: Duration = Duration::from_secs(180);

/// One fault the harness injects (and heals).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// `kill -9` of the service; its supervisor starts it again.
    Kill(&'static str),
    /// SIGTERM (a graceful stop); its supervisor starts it again.
    Terminate(&'static str),
    /// PostgreSQL stops (fast) and starts again.
    PostgresRestart,
    /// `kill -9` of the primary and promotion of the synchronous standby.
    PostgresFailover,
    /// Redis killed, down for a few seconds, then started again empty.
    RedisStop,
    /// Latency and dropped connections between the gateway and the inference service (a TCP
    /// proxy: no `tc netem` in this kernel).
    SlowLink,
    /// The ledger table's tablespace (a size-limited tmpfs) filled, then freed.
    LedgerDiskFull,
}

impl Fault {
    pub fn name(&self) -> String {
        match self {
            Self::Kill(service) => format!("kill -9 {service}"),
            Self::Terminate(service) => format!("SIGTERM {service}"),
            Self::PostgresRestart => "PostgreSQL restart".to_owned(),
            Self::PostgresFailover => "PostgreSQL failover".to_owned(),
            Self::RedisStop => "Redis stop (5 s)".to_owned(),
            Self::SlowLink => "gateway->inference 100 ms + 3 % drops".to_owned(),
            Self::LedgerDiskFull => "ledger disk full (5 s)".to_owned(),
        }
    }

    /// kill -9 and SIGTERM of each service: the short form.
    pub fn process_faults() -> Vec<Fault> {
        let services = medai_cli::launcher::SERVICES;
        services
            .iter()
            .map(|&service| Fault::Kill(service))
            .chain(services.iter().map(|&service| Fault::Terminate(service)))
            .collect()
    }

    /// Every fault: the long form.
    pub fn all() -> Vec<Fault> {
        let mut faults = Self::process_faults();
        faults.extend([
            Fault::PostgresRestart,
            Fault::RedisStop,
            Fault::SlowLink,
            Fault::LedgerDiskFull,
            Fault::PostgresFailover,
        ]);
        faults
    }
}

/// What happened to the load's calls during one window.
#[derive(Clone, Debug, Default)]
pub struct Window {
    pub ok: u64,
    /// Refusals with a stable reason code, by code.
    pub refused: BTreeMap<String, u64>,
    /// Failures without one (transport errors, mostly), by gRPC code.
    pub failed: BTreeMap<String, u64>,
    /// Acknowledged predictions: (ledger seq, result id).
    pub predictions: Vec<(u64, String)>,
    /// Latencies of successful predictions, in milliseconds.
    pub prediction_ms: Vec<f64>,
}

/// How one call of the load ended.
#[derive(Clone, Debug)]
enum Outcome {
    Ok,
    /// With its stable reason code.
    Refused(String),
    /// Without one: the gRPC code (a transport error, mostly).
    Failed(String),
}

impl From<tonic::Status> for Outcome {
    fn from(status: tonic::Status) -> Self {
        match medai_runtime::errors::reason_of(&status) {
            Some(reason) => Self::Refused(reason),
            None => Self::Failed(format!("{:?}", status.code())),
        }
    }
}

fn outcome_of(result: Result<(), tonic::Status>) -> Outcome {
    result.map_or_else(Outcome::from, |()| Outcome::Ok)
}

impl Window {
    fn count(&mut self, outcome: &Outcome) {
        match outcome {
            Outcome::Ok => self.ok += 1,
            Outcome::Refused(reason) => *self.refused.entry(reason.clone()).or_default() += 1,
            Outcome::Failed(code) => *self.failed.entry(code.clone()).or_default() += 1,
        }
    }

    pub fn refused_total(&self) -> u64 {
        self.refused.values().sum()
    }

    pub fn failed_total(&self) -> u64 {
        self.failed.values().sum()
    }

    /// The `q` quantile (0..1) of successful prediction latencies.
    pub fn prediction_quantile_ms(&self, q: f64) -> Option<f64> {
        let mut sorted = self.prediction_ms.clone();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
        Some(sorted[index])
    }
}

/// One fault's figures.
#[derive(Clone, Debug)]
pub struct FaultReport {
    pub fault: String,
    pub window: Window,
    /// Acknowledged predictions whose seq is not in the ledger, or names another resource.
    pub unrecorded: usize,
    pub chain_intact: bool,
    pub ledger_entries: u64,
    /// From the injection to the first successful prediction after it.
    pub recovered_after: Duration,
}

impl FaultReport {
    pub fn line(&self) -> String {
        format!(
            "{:<40} ok {:>5}  refused {:>4} {:?}  failed {:>4} {:?}  unrecorded {}  chain {}  ({} entries)  recovered in {:.2} s",
            self.fault,
            self.window.ok,
            self.window.refused_total(),
            self.window.refused,
            self.window.failed_total(),
            self.window.failed,
            self.unrecorded,
            if self.chain_intact {
                "intact"
            } else {
                "BROKEN"
            },
            self.ledger_entries,
            self.recovered_after.as_secs_f64()
        )
    }
}

/// How the gateway-to-inference link misbehaves (the proxy reads it for every chunk).
#[derive(Clone, Copy, Debug, Default)]
struct Impairment {
    delay: Duration,
    /// Per mille of chunks whose connection is cut instead of forwarded.
    drop_per_mille: u32,
}

/// A TCP proxy that forwards to `upstream` with the current [`Impairment`].
async fn impaired_proxy(
    upstream: SocketAddr,
    impairment: Arc<Mutex<Impairment>>,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let impairment = impairment.clone();
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    return;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                let there = pump(client_read, server_write, impairment.clone());
                let back = pump(server_read, client_write, impairment);
                let _ = tokio::join!(there, back);
            });
        }
    });
    Ok(address)
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    impairment: Arc<Mutex<Impairment>>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    let mut chunk_counter: u32 = 0;
    loop {
        let Ok(read) = from.read(&mut buffer).await else {
            return;
        };
        if read == 0 {
            let _ = to.shutdown().await;
            return;
        }
        let now = impairment.lock().map(|guard| *guard).unwrap_or_default();
        if !now.delay.is_zero() {
            tokio::time::sleep(now.delay).await;
        }
        // A deterministic spread of drops (no randomness crate needed): chunk n of every 1000.
        chunk_counter = chunk_counter.wrapping_add(397) % 1000;
        if chunk_counter < now.drop_per_mille {
            return;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}

/// The mesh, its databases and its Redis, under a fault harness.
pub struct ChaosRig {
    pub mesh: RunningMesh,
    pub settings: MeshSettings,
    primary: Option<PrivatePostgres>,
    standby: Option<PrivatePostgres>,
    killed: Vec<PrivatePostgres>,
    redis: Option<PrivateRedis>,
    /// The gateway whose inference link goes through the impairable proxy.
    impaired_gateway: SocketAddr,
    impairment: Arc<Mutex<Impairment>>,
    /// A size-limited tmpfs holding the ledger table's tablespace, when one could be mounted.
    ledger_volume: Option<PathBuf>,
    pub admin_token: String,
    _state: tempfile::TempDir,
}

async fn on_blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(work)
        .await
        .expect("blocking work")
}

fn with_deadline<T>(mut request: tonic::Request<T>) -> tonic::Request<T> {
    request.set_timeout(CALL_DEADLINE);
    request
}

impl ChaosRig {
    pub async fn start() -> Self {
        let (primary, standby) = on_blocking(|| {
            let primary = PrivatePostgres::start_synchronous_primary();
            let standby = PrivatePostgres::start_standby_of(&primary);
            (primary, standby)
        })
        .await;
        let redis = on_blocking(PrivateRedis::start).await;
        let admin = Database::connect(primary.url().as_str())
            .await
            .expect("connect to the primary");
        for name in ["ledger", "identities", "results"] {
            admin
                .execute_unprepared(&format!("CREATE DATABASE {name}"))
                .await
                .expect("create database");
        }
        admin.close().await.expect("close");
        let both = |database: &str| {
            format!(
                "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{database}?target_session_attrs=read-write",
                primary.port, standby.port
            )
        };
        let state = tempfile::tempdir().expect("state dir");
        let assets = Assets::locate();
        let mut settings = MeshSettings::embedded(
            state.path(),
            &binaries_dir(),
            &assets.model_repository,
            &assets.onnxruntime_library,
        );
        settings.audit_database_url = both("ledger");
        settings.auth_database_url = both("identities");
        settings.inference_database_url = both("results");
        settings.admin_password = ADMIN_PASSWORD.to_owned();
        settings.admin_endpoints = true;
        let redis_url = redis.url();
        let revocation = |prefix: &str| {
            vec![
                (format!("{prefix}REVOCATION__MODE"), "production".to_owned()),
                (format!("{prefix}REVOCATION__REDIS_URL"), redis_url.clone()),
            ]
        };
        let mut gateway = revocation("MEDAI_GATEWAY_");
        gateway.push((
            "MEDAI_GATEWAY_LOAD_CONTROL__REDIS_URL".to_owned(),
            redis_url.clone(),
        ));
        settings.extra_environment = BTreeMap::from([
            ("gateway".to_owned(), gateway),
            ("auth".to_owned(), revocation("MEDAI_AUTH_")),
        ]);
        let mut mesh = RunningMesh::start(&settings)
            .await
            .unwrap_or_else(|error| panic!("the mesh did not start: {error}"));
        let impairment = Arc::new(Mutex::new(Impairment::default()));
        let proxy = impaired_proxy(
            mesh.address("inference").expect("inference"),
            impairment.clone(),
        )
        .await
        .expect("proxy");
        let impaired_gateway = mesh
            .start_another(
                "gateway",
                "gateway-impaired-link",
                &settings,
                vec![(
                    "MEDAI_GATEWAY_INFERENCE_ENDPOINT".to_owned(),
                    format!("https://{proxy}"),
                )],
            )
            .await
            .expect("a gateway behind the impairable link");
        let mut rig = Self {
            mesh,
            settings,
            primary: Some(primary),
            standby: Some(standby),
            killed: Vec::new(),
            redis: Some(redis),
            impaired_gateway,
            impairment,
            ledger_volume: None,
            admin_token: String::new(),
            _state: state,
        };
        let mut client = rig.gateway().await;
        rig.admin_token = login(&mut client, "admin", ADMIN_PASSWORD)
            .await
            .expect("admin login");
        for (username, password, role) in [
            (CLINICIAN, CLINICIAN_PASSWORD, "clinician"),
            (AUDITOR, AUDITOR_PASSWORD, "auditor"),
        ] {
            client
                .create_user(authorised(
                    gw::CreateUserRequest {
                        username: username.to_owned(),
                        password: password.to_owned(),
                        role: role.to_owned(),
                    },
                    &rig.admin_token,
                ))
                .await
                .expect("create user");
        }
        rig
    }

    pub async fn gateway(&self) -> GatewayClient {
        self.gateway_at(self.mesh.address("gateway").expect("gateway"))
            .await
    }

    async fn gateway_at(&self, address: SocketAddr) -> GatewayClient {
        connect_gateway(
            &format!("https://{address}"),
            &self.settings.pki().ca_certificate(),
        )
        .await
        .expect("gateway client")
    }

    fn primary(&self) -> &PrivatePostgres {
        self.primary.as_ref().expect("a primary")
    }

    /// Starts the load (`workers` of each kind) against the main gateway.
    pub async fn start_load(&self, workers: usize, pace: Option<Duration>) -> Load {
        let mut load = Load {
            window: Arc::new(Mutex::new(Window::default())),
            stop: Arc::new(AtomicBool::new(false)),
            target: Arc::new(Mutex::new(self.gateway().await)),
            tasks: Vec::new(),
        };
        let assets = Assets::locate();
        let dicom = assets.dicom("MR_small.dcm");
        for _ in 0..workers {
            for kind in [
                LoadKind::Predict,
                LoadKind::Stream,
                LoadKind::Login,
                LoadKind::Sign,
            ] {
                let worker = Worker {
                    kind,
                    window: load.window.clone(),
                    stop: load.stop.clone(),
                    target: load.target.clone(),
                    dicom: dicom.clone(),
                    pace,
                };
                load.tasks.push(tokio::spawn(worker.run()));
            }
        }
        load
    }

    /// One prediction through `client`, with the light model.
    async fn probe(client: &mut GatewayClient, token: &str) -> bool {
        client
            .infer(with_deadline(authorised(light_infer_request(0), token)))
            .await
            .is_ok()
    }

    /// Waits for the first successful prediction through the main gateway.
    async fn until_a_prediction_succeeds(&self, since: Instant) -> Duration {
        let mut client = self.gateway().await;
        loop {
            if Self::probe(&mut client, &self.admin_token).await {
                return since.elapsed();
            }
            assert!(
                since.elapsed() < RECOVERY_LIMIT,
                "no prediction succeeded within {RECOVERY_LIMIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
            // A fresh channel, in case the old one is stuck on a dead connection.
            client = self.gateway().await;
        }
    }

    /// Injects `fault` under `load`, heals it, waits for recovery, lets the load run for
    /// `settle`, and checks the ledger against every prediction acknowledged meanwhile.
    pub async fn run_fault(&mut self, load: &Load, fault: Fault, settle: Duration) -> FaultReport {
        load.take_window();
        let injected = Instant::now();
        let recovered_after = match fault {
            Fault::Kill(service) | Fault::Terminate(service) => {
                let signal = if matches!(fault, Fault::Kill(_)) {
                    "-KILL"
                } else {
                    "-TERM"
                };
                let restarts = self.mesh.restarts(service);
                let pid = self.mesh.pid(service).expect("a running service");
                let status = tokio::process::Command::new("kill")
                    .args([signal, &pid.to_string()])
                    .status()
                    .await
                    .expect("kill");
                assert!(status.success());
                // The supervisor restarts it; then it must answer SERVING.
                while self.mesh.restarts(service) == restarts {
                    assert!(
                        injected.elapsed() < RECOVERY_LIMIT,
                        "{service} not restarted"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                self.mesh
                    .wait_until_serving(service, RECOVERY_LIMIT)
                    .await
                    .expect("serving again");
                self.until_a_prediction_succeeds(injected).await
            }
            Fault::PostgresRestart => {
                let primary = self.primary.take().expect("primary");
                let primary = on_blocking(move || {
                    primary.restart();
                    primary
                })
                .await;
                self.primary = Some(primary);
                self.until_a_prediction_succeeds(injected).await
            }
            Fault::PostgresFailover => {
                let primary = self.primary.take().expect("primary");
                let standby = self.standby.take().expect("a standby to fail over to");
                let (killed, promoted) = on_blocking(move || {
                    primary.kill_hard();
                    standby.promote();
                    (primary, standby)
                })
                .await;
                self.killed.push(killed);
                self.primary = Some(promoted);
                self.until_a_prediction_succeeds(injected).await
            }
            Fault::RedisStop => {
                let mut redis = self.redis.take().expect("redis");
                redis = on_blocking(move || {
                    redis.kill_hard();
                    redis
                })
                .await;
                tokio::time::sleep(Duration::from_secs(5)).await;
                let redis = on_blocking(move || {
                    redis.start_again();
                    redis
                })
                .await;
                self.redis = Some(redis);
                self.until_a_prediction_succeeds(injected).await
            }
            Fault::SlowLink => {
                let main = load.retarget(self.gateway_at(self.impaired_gateway).await);
                if let Ok(mut impairment) = self.impairment.lock() {
                    *impairment = Impairment {
                        delay: Duration::from_millis(100),
                        drop_per_mille: 30,
                    };
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
                if let Ok(mut impairment) = self.impairment.lock() {
                    *impairment = Impairment::default();
                }
                load.retarget(main);
                self.until_a_prediction_succeeds(injected).await
            }
            Fault::LedgerDiskFull => {
                let filler = self.fill_ledger_volume().await;
                tokio::time::sleep(Duration::from_secs(5)).await;
                if let Some(filler) = filler {
                    let _ = std::fs::remove_file(filler);
                }
                self.until_a_prediction_succeeds(injected).await
            }
        };
        tokio::time::sleep(settle).await;
        let window = load.take_window();
        let (unrecorded, ledger_entries) = self.unrecorded(&window.predictions).await;
        let chain_intact = self.chain_intact().await;
        FaultReport {
            fault: fault.name(),
            window,
            unrecorded,
            chain_intact,
            ledger_entries,
            recovered_after,
        }
    }

    /// Moves the ledger table onto a 16 MiB tmpfs (once) and fills that volume; returns the
    /// filler file. `None` when no tmpfs can be mounted here (not root).
    async fn fill_ledger_volume(&mut self) -> Option<PathBuf> {
        if self.ledger_volume.is_none() {
            let volume = tempfile::tempdir().expect("mount point").keep();
            let mounted = tokio::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs"])
                .arg(&volume)
                .status()
                .await
                .is_ok_and(|status| status.success());
            if !mounted {
                eprintln!("ledger disk full: cannot mount a tmpfs here; fault skipped");
                return None;
            }
            let _ = tokio::process::Command::new("chown")
                .args(["postgres"])
                .arg(&volume)
                .status()
                .await;
            let ledger = self.ledger_connection().await;
            ledger
                .execute_unprepared(&format!(
                    "CREATE TABLESPACE ledger_quota LOCATION '{}'",
                    volume.display()
                ))
                .await
                .expect("tablespace");
            ledger
                .execute_unprepared("ALTER TABLE ledger_entries SET TABLESPACE ledger_quota")
                .await
                .expect("move the ledger table");
            ledger.close().await.expect("close");
            self.ledger_volume = Some(volume);
        }
        let volume = self.ledger_volume.clone()?;
        let filler = volume.join("filler");
        // dd stops at ENOSPC; its failure is the point.
        let _ = tokio::process::Command::new("dd")
            .args(["if=/dev/zero", "bs=64k"])
            .arg(format!("of={}", filler.display()))
            .stderr(std::process::Stdio::null())
            .status()
            .await;
        Some(filler)
    }

    async fn ledger_connection(&self) -> sea_orm::DatabaseConnection {
        let url = format!(
            "postgres://postgres@127.0.0.1:{}/ledger",
            self.primary().port
        );
        Database::connect(url.as_str())
            .await
            .expect("connect to the ledger")
    }

    /// How many of `predictions` lack their ledger entry (the seq they were answered with, on
    /// the resource `result/<id>`), and how many entries the ledger holds.
    pub async fn unrecorded(&self, predictions: &[(u64, String)]) -> (usize, u64) {
        let ledger = self.ledger_connection().await;
        let rows = ledger
            .query_all_raw(Statement::from_string(
                DatabaseBackend::Postgres,
                "SELECT seq, resource FROM ledger_entries WHERE resource LIKE 'result/%'",
            ))
            .await
            .expect("ledger entries");
        let recorded: BTreeSet<(u64, String)> = rows
            .iter()
            .map(|row| {
                let seq: i64 = row.try_get("", "seq").expect("seq");
                let resource: String = row.try_get("", "resource").expect("resource");
                (u64::try_from(seq).expect("seq"), resource)
            })
            .collect();
        let total = ledger
            .query_one_raw(Statement::from_string(
                DatabaseBackend::Postgres,
                "SELECT count(*) AS entries FROM ledger_entries",
            ))
            .await
            .expect("count")
            .map(|row| row.try_get::<i64>("", "entries").expect("count"))
            .unwrap_or(0);
        ledger.close().await.expect("close");
        let unrecorded = predictions
            .iter()
            .filter(|(seq, result_id)| !recorded.contains(&(*seq, format!("result/{result_id}"))))
            .count();
        (unrecorded, u64::try_from(total).unwrap_or(0))
    }

    /// The auditor's verification of the whole chain (with its signed checkpoints).
    pub async fn chain_intact(&self) -> bool {
        // A fresh auditor login each time: a soak outlives any one token, and a verification
        // that could not run must not read as a broken chain (nor as an intact one).
        let mut client = self.gateway().await;
        let mut last_refusal = None;
        for _ in 0..10 {
            let verified = match login(&mut client, AUDITOR, AUDITOR_PASSWORD).await {
                Ok(token) => {
                    client
                        .verify_ledger(with_deadline(authorised(
                            gw::VerifyLedgerRequest {},
                            &token,
                        )))
                        .await
                }
                Err(status) => Err(status),
            };
            match verified {
                Ok(answer) => {
                    return answer
                        .into_inner()
                        .verification
                        .is_some_and(|verification| verification.intact);
                }
                Err(status) => last_refusal = Some(status),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        panic!("the chain could not be verified: {last_refusal:?}");
    }

    /// Resident memory (kB) and open file descriptors of each running service.
    pub fn process_figures(&self) -> BTreeMap<&'static str, (u64, usize)> {
        medai_cli::launcher::SERVICES
            .iter()
            .filter_map(|service| {
                let pid = self.mesh.pid(service)?;
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
                let rss = status
                    .lines()
                    .find_map(|line| line.strip_prefix("VmRSS:"))
                    .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())?;
                let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
                Some((*service, (rss, fds)))
            })
            .collect()
    }

    /// Connections to the primary per database (pg_stat_activity), the harness's own excluded.
    pub async fn database_connections(&self) -> BTreeMap<String, i64> {
        let admin = Database::connect(self.primary().url().as_str())
            .await
            .expect("connect");
        let rows = admin
            .query_all_raw(Statement::from_string(
                DatabaseBackend::Postgres,
                "SELECT datname, count(*) AS connections FROM pg_stat_activity \
                 WHERE datname IN ('ledger', 'identities', 'results') AND pid <> pg_backend_pid() \
                 GROUP BY datname",
            ))
            .await
            .expect("pg_stat_activity");
        admin.close().await.expect("close");
        rows.iter()
            .map(|row| {
                (
                    row.try_get::<String>("", "datname").expect("name"),
                    row.try_get::<i64>("", "connections").expect("count"),
                )
            })
            .collect()
    }

    pub async fn stop(mut self) {
        self.mesh.stop(Duration::from_secs(10)).await;
        // The cluster goes before its tablespace's volume (it holds files there).
        drop(self.primary.take());
        if let Some(volume) = self.ledger_volume.take() {
            let _ = tokio::process::Command::new("umount")
                .arg(&volume)
                .status()
                .await;
            let _ = std::fs::remove_dir(&volume);
        }
    }
}

async fn login(
    client: &mut GatewayClient,
    username: &str,
    password: &str,
) -> Result<String, tonic::Status> {
    Ok(grant(client, username, password).await?.access_token)
}

async fn grant(
    client: &mut GatewayClient,
    username: &str,
    password: &str,
) -> Result<medai_proto::auth::v1::TokenGrant, tonic::Status> {
    Ok(client
        .login(with_deadline(tonic::Request::new(gw::LoginRequest {
            username: username.to_owned(),
            password: password.to_owned(),
        })))
        .await?
        .into_inner()
        .grant
        .unwrap_or_default())
}

/// A user's access token, renewed by logging in again once half its lifetime has passed, as a
/// long-running client does (a soak outlives the 10-minute tokens).
struct Session {
    username: &'static str,
    password: &'static str,
    token: String,
    renew_at: Option<Instant>,
}

impl Session {
    fn new(username: &'static str, password: &'static str) -> Self {
        Self {
            username,
            password,
            token: String::new(),
            renew_at: None,
        }
    }

    async fn token(&mut self, client: &mut GatewayClient) -> Result<String, tonic::Status> {
        if self
            .renew_at
            .is_none_or(|renew_at| Instant::now() >= renew_at)
        {
            let grant = grant(client, self.username, self.password).await?;
            self.token = grant.access_token;
            self.renew_at =
                Some(Instant::now() + Duration::from_secs(u64::from(grant.expires_in_seconds) / 2));
        }
        Ok(self.token.clone())
    }

    /// A token refused (auth's keys restarted): log in again before the next call.
    fn forget(&mut self) {
        self.renew_at = None;
    }
}

fn light_infer_request(seed: u8) -> gw::InferRequest {
    gw::InferRequest {
        image: light_png(seed).into(),
        format: ImageFormat::Png.into(),
        model_name: "synthetic-light".to_owned(),
        model_version: String::new(),
        idempotency_key: String::new(),
    }
}

#[derive(Clone, Copy, Debug)]
enum LoadKind {
    /// The real model on a DICOM image.
    Predict,
    /// A study stream of two light images.
    Stream,
    /// A clinician logs in.
    Login,
    /// A clinician predicts, re-authenticates and signs the result.
    Sign,
}

/// The running load; its window collects what happened since it was last taken.
pub struct Load {
    window: Arc<Mutex<Window>>,
    stop: Arc<AtomicBool>,
    target: Arc<Mutex<GatewayClient>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn take_window(&self) -> Window {
        self.window
            .lock()
            .map(|mut window| std::mem::take(&mut *window))
            .unwrap_or_default()
    }

    /// Points the load at another gateway; returns the previous one.
    fn retarget(&self, client: GatewayClient) -> GatewayClient {
        let mut target = self.target.lock().expect("target");
        std::mem::replace(&mut *target, client)
    }

    pub async fn stop(mut self) -> Window {
        self.stop.store(true, Ordering::Relaxed);
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
        self.take_window()
    }
}

struct Worker {
    kind: LoadKind,
    window: Arc<Mutex<Window>>,
    stop: Arc<AtomicBool>,
    target: Arc<Mutex<GatewayClient>>,
    dicom: Vec<u8>,
    pace: Option<Duration>,
}

impl Worker {
    async fn run(self) {
        let mut admin = Session::new("admin", ADMIN_PASSWORD);
        let mut clinician = Session::new(CLINICIAN, CLINICIAN_PASSWORD);
        let mut seed = 0u8;
        while !self.stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            let Ok(client) = self.target.lock().map(|client| client.clone()) else {
                return;
            };
            let mut client = client;
            seed = seed.wrapping_add(1);
            let outcome = match self.kind {
                LoadKind::Predict => {
                    outcome_of(self.predict(&mut client, &mut admin, started).await)
                }
                LoadKind::Stream => self.stream(&mut client, &mut admin, seed).await,
                LoadKind::Login => outcome_of(
                    login(&mut client, CLINICIAN, CLINICIAN_PASSWORD)
                        .await
                        .map(|_| ()),
                ),
                LoadKind::Sign => outcome_of(self.sign(&mut client, &mut clinician, seed).await),
            };
            if let Ok(mut window) = self.window.lock() {
                window.count(&outcome);
            }
            match self.pace {
                Some(pace) => tokio::time::sleep(pace.saturating_sub(started.elapsed())).await,
                // Back to back, but not spinning on instant refusals.
                None if !matches!(outcome, Outcome::Ok) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                None => {}
            }
        }
    }

    fn acknowledged(&self, answer: &gw::InferResponse, started: Option<Instant>) {
        if let Ok(mut window) = self.window.lock() {
            window
                .predictions
                .push((answer.ledger_seq, answer.result_id.clone()));
            if let Some(started) = started {
                window
                    .prediction_ms
                    .push(started.elapsed().as_secs_f64() * 1000.0);
            }
        }
    }

    async fn predict(
        &self,
        client: &mut GatewayClient,
        admin: &mut Session,
        started: Instant,
    ) -> Result<(), tonic::Status> {
        let token = admin.token(client).await?;
        let answer = client
            .infer(with_deadline(authorised(
                gw::InferRequest {
                    image: self.dicom.clone().into(),
                    format: ImageFormat::Unspecified.into(),
                    model_name: String::new(),
                    model_version: String::new(),
                    idempotency_key: String::new(),
                },
                &token,
            )))
            .await
            .inspect_err(|status| {
                if status.code() == tonic::Code::Unauthenticated {
                    admin.forget();
                }
            })?
            .into_inner();
        self.acknowledged(&answer, Some(started));
        Ok(())
    }

    /// A study stream of two light images; an image refused inside the stream counts as a
    /// refusal with its reason.
    async fn stream(&self, client: &mut GatewayClient, admin: &mut Session, seed: u8) -> Outcome {
        let token = match admin.token(client).await {
            Ok(token) => token,
            Err(status) => return status.into(),
        };
        match self.stream_images(client, &token, seed).await {
            Ok(outcome) => outcome,
            Err(status) => {
                if status.code() == tonic::Code::Unauthenticated {
                    admin.forget();
                }
                status.into()
            }
        }
    }

    async fn stream_images(
        &self,
        client: &mut GatewayClient,
        token: &str,
        seed: u8,
    ) -> Result<Outcome, tonic::Status> {
        let images: Vec<gw::StudyStreamRequest> = (0..2u8)
            .map(|index| gw::StudyStreamRequest {
                tag: format!("image-{index}"),
                image: light_png(seed.wrapping_add(index)).into(),
                format: ImageFormat::Png.into(),
                model_name: "synthetic-light".to_owned(),
                ..Default::default()
            })
            .collect();
        let mut answers = client
            .study_stream(with_deadline(authorised(tokio_stream::iter(images), token)))
            .await?
            .into_inner();
        let mut answered = 0;
        while let Some(answer) = answers.message().await? {
            match answer.outcome {
                Some(gw::study_stream_response::Outcome::Result(result)) => {
                    self.acknowledged(&result, None);
                    answered += 1;
                }
                Some(gw::study_stream_response::Outcome::Error(error)) => {
                    return Ok(if error.reason.is_empty() {
                        Outcome::Failed(format!("{:?}", tonic::Code::from(error.code)))
                    } else {
                        Outcome::Refused(error.reason)
                    });
                }
                None => {}
            }
        }
        Ok(if answered == 2 {
            Outcome::Ok
        } else {
            Outcome::Failed("stream ended early".to_owned())
        })
    }

    async fn sign(
        &self,
        client: &mut GatewayClient,
        session: &mut Session,
        seed: u8,
    ) -> Result<(), tonic::Status> {
        let token = session.token(client).await?;
        let clinician = token.as_str();
        let predicted = client
            .infer(with_deadline(authorised(
                light_infer_request(seed),
                clinician,
            )))
            .await;
        let predicted = match predicted {
            Ok(answer) => answer.into_inner(),
            Err(status) => {
                if status.code() == tonic::Code::Unauthenticated {
                    session.forget();
                }
                return Err(status);
            }
        };
        self.acknowledged(&predicted, None);
        let shown = client
            .get_result(with_deadline(authorised(
                gw::GetResultRequest {
                    result_id: predicted.result_id.clone(),
                },
                clinician,
            )))
            .await?
            .into_inner()
            .result
            .ok_or_else(|| tonic::Status::unknown("a result without content"))?;
        let ticket = client
            .reauthenticate(with_deadline(authorised(
                gw::ReauthenticateRequest {
                    password: CLINICIAN_PASSWORD.to_owned(),
                },
                clinician,
            )))
            .await?
            .into_inner()
            .signing_ticket;
        client
            .sign_result(with_deadline(authorised(
                gw::SignResultRequest {
                    result_id: predicted.result_id,
                    signing_ticket: ticket,
                    meaning: "REVIEWED".to_owned(),
                    reason: String::new(),
                    content_sha256: shown.content_sha256,
                },
                clinician,
            )))
            .await?;
        Ok(())
    }
}

/// Runs `faults` one after another under a load of `workers` per kind; prints and returns the
/// reports. The rig is stopped at the end.
pub async fn run_faults(faults: &[Fault], workers: usize, settle: Duration) -> Vec<FaultReport> {
    let mut rig = ChaosRig::start().await;
    let load = rig.start_load(workers, None).await;
    // A quiet start: the load reaches its steady state before the first fault.
    tokio::time::sleep(settle).await;
    let baseline = load.take_window();
    eprintln!(
        "chaos baseline: {} ok, {} refused {:?}, {} failed {:?} in {:.1} s",
        baseline.ok,
        baseline.refused_total(),
        baseline.refused,
        baseline.failed_total(),
        baseline.failed,
        settle.as_secs_f64()
    );
    let mut reports = Vec::new();
    for fault in faults {
        let report = rig.run_fault(&load, *fault, settle).await;
        eprintln!("CHAOS {}", report.line());
        reports.push(report);
    }
    load.stop().await;
    rig.stop().await;
    reports
}

/// The path of `name` under the workspace's target folder (bench output).
pub fn output_file(name: &str) -> PathBuf {
    let dir = binaries_dir()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("target"))
        .join("bench");
    let _ = std::fs::create_dir_all(&dir);
    dir.join(name)
}
