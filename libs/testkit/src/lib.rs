//! Fixtures for service and whole-mesh tests. Nothing here mutates the process environment:
//! the suite's servers are announced by `scripts/test.sh` through variables that are only read.

#![allow(clippy::missing_panics_doc)]

pub mod bench;
pub mod bench_images;
pub mod otlp;

pub use rustls;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use medai_devpki::PkiLayout;
use medai_runtime::process::ProcessConfig;
use medai_runtime::tls::TlsMaterial;
use medai_runtime::{ServiceIdentity, TlsFiles};
use sea_orm::{ConnectionTrait, Database};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Every identity a test may need: the five services, the operator tool, and one that no
/// policy names.
pub const IDENTITIES: [&str; 7] = [
    "audit",
    "auth",
    "validation",
    "inference",
    "gateway",
    "operator",
    "stranger",
];

/// The repository root, found from this crate's manifest directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// The directory of the workspace's built binaries (`target/debug`), found from the running
/// test executable (`target/debug/deps/<test>`).
pub fn binaries_dir() -> PathBuf {
    let executable = std::env::current_exe().expect("current exe");
    let deps = executable.parent().expect("deps dir");
    deps.parent().expect("profile dir").to_owned()
}

/// Assets fetched by `scripts/fetch-assets.sh`.
pub struct Assets {
    pub onnxruntime_library: PathBuf,
    pub model_repository: PathBuf,
    pub dicom_dir: PathBuf,
}

impl Assets {
    pub fn locate() -> Self {
        let root = workspace_root();
        let assets = Self {
            onnxruntime_library: root.join(".cache/onnxruntime/libonnxruntime.so.1.31.1"),
            model_repository: root.join("models"),
            dicom_dir: root.join(".cache/dicom"),
        };
        let model = assets.model_repository.join("brain-mri-tumor/1/model.onnx");
        for required in [
            &assets.onnxruntime_library,
            &model,
            &assets.dicom_dir.join("MR_small.dcm"),
        ] {
            assert!(
                required.exists(),
                "{} is missing: run scripts/fetch-assets.sh (scripts/test.sh does)",
                required.display()
            );
        }
        assets
    }

    pub fn dicom(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dicom_dir.join(name)).expect("DICOM test file")
    }
}

/// A development CA and a certificate for each of [`IDENTITIES`], in a temporary folder.
pub struct TestPki {
    _directory: tempfile::TempDir,
    pub layout: PkiLayout,
}

impl TestPki {
    pub fn new() -> Self {
        let directory = tempfile::tempdir().expect("tempdir");
        let layout = PkiLayout::new(directory.path().join("pki"));
        layout.ensure(&IDENTITIES).expect("test PKI");
        Self {
            _directory: directory,
            layout,
        }
    }

    pub fn files(&self, identity: &str) -> TlsFiles {
        TlsFiles {
            ca_cert: self.layout.ca_certificate(),
            cert: self.layout.certificate(identity),
            key: self.layout.key(identity),
        }
    }

    pub fn material(&self, identity: &str) -> TlsMaterial {
        TlsMaterial::load(&self.files(identity)).expect("tls material")
    }

    /// A channel to `service` at `address`, presenting `identity`'s certificate.
    pub fn channel_as(&self, identity: &str, address: SocketAddr, service: &str) -> Channel {
        self.material(identity)
            .channel(
                &format!("https://{address}"),
                &ServiceIdentity::new(service),
            )
            .expect("channel")
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

/// A folder laid out as the kubelet lays out a cert-manager Secret's volume: `ca.crt`, `tls.crt`
/// and `tls.key` are symlinks through `..data`, itself a symlink to the current timestamped
/// folder, so a new revision replaces all three at once.
pub struct SecretVolume {
    root: PathBuf,
    revision: u32,
}

impl SecretVolume {
    pub fn new(root: &Path) -> Self {
        std::fs::create_dir_all(root).expect("volume folder");
        Self {
            root: root.to_owned(),
            revision: 0,
        }
    }

    pub fn files(&self) -> TlsFiles {
        TlsFiles {
            ca_cert: self.root.join("ca.crt"),
            cert: self.root.join("tls.crt"),
            key: self.root.join("tls.key"),
        }
    }

    /// Writes a new revision and swaps it in atomically, as the kubelet's AtomicWriter does.
    pub fn publish(&mut self, ca_pem: &str, certificate_pem: &str, key_pem: &str) {
        self.revision += 1;
        let folder = format!("..2026_11_29_rev{}", self.revision);
        let path = self.root.join(&folder);
        std::fs::create_dir(&path).expect("revision folder");
        std::fs::write(path.join("ca.crt"), ca_pem).expect("ca.crt");
        std::fs::write(path.join("tls.crt"), certificate_pem).expect("tls.crt");
        std::fs::write(path.join("tls.key"), key_pem).expect("tls.key");
        let previous = std::fs::read_link(self.root.join("..data")).ok();
        std::os::unix::fs::symlink(&folder, self.root.join("..data_tmp")).expect("..data_tmp");
        std::fs::rename(self.root.join("..data_tmp"), self.root.join("..data")).expect("swap");
        for name in ["ca.crt", "tls.crt", "tls.key"] {
            let link = self.root.join(name);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(format!("..data/{name}"), &link).expect("file link");
            }
        }
        if let Some(previous) = previous {
            std::fs::remove_dir_all(self.root.join(previous)).expect("old revision");
        }
    }
}

/// Opens a new TLS connection to `service` at `address` with `client`'s current configuration
/// (the one its channels use) and returns the serial of the certificate the server presented.
pub async fn served_certificate_serial(
    client: &TlsMaterial,
    address: SocketAddr,
    service: &str,
) -> Result<String, String> {
    let connector = tokio_rustls::TlsConnector::from(client.client_config());
    let stream = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|error| error.to_string())?;
    let server_name = rustls::pki_types::ServerName::try_from(medai_runtime::tls::server_dns_name(
        &ServiceIdentity::new(service),
    ))
    .map_err(|error| error.to_string())?;
    let connection = connector
        .connect(server_name, stream)
        .await
        .map_err(|error| error.to_string())?;
    let leaf = connection
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or("no server certificate")?;
    medai_runtime::tls::certificate_serial(leaf.as_ref())
        .ok_or_else(|| "unparsable certificate".to_owned())
}

/// Process settings for a service started in-process: loopback, port 0, no admin endpoint.
pub fn test_process_config() -> ProcessConfig {
    ProcessConfig {
        listen_addr: "127.0.0.1:0".parse().expect("address"),
        admin_addr: None,
        log_filter: "warn".to_owned(),
        shutdown_grace_seconds: 5,
        address_file: None,
        otlp_endpoint: None,
        drain_seconds: 0,
        dependency_probe_seconds: 1,
        run_migrations: true,
        connections: medai_runtime::connections::ConnectionLimits::default(),
    }
}

/// A server started in-process on a port-0 listener; stops when dropped.
pub struct TestServer {
    pub address: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    /// Binds `127.0.0.1:0` and runs `serve(listener, shutdown)` on it.
    pub async fn start<F, Fut, E>(serve: F) -> Self
    where
        F: FnOnce(TcpListener, std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = Box::pin(async move {
            let _ = stopped.await;
        });
        let future = serve(listener, shutdown);
        let task = tokio::spawn(async move {
            if let Err(error) = future.await {
                panic!("test server failed: {error}");
            }
        });
        Self {
            address,
            stop: Some(stop),
            task,
        }
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.task).await;
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Waits until `service` at `address` reports SERVING, asking as the operator.
pub async fn wait_until_serving(pki: &TestPki, address: SocketAddr, service: &str) {
    let mut health = HealthClient::new(pki.channel_as("operator", address, service));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answer = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await;
        if answer.is_ok_and(|response| response.into_inner().status() == ServingStatus::Serving) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{service} at {address} never became healthy"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The suite's PostgreSQL server (a superuser URL), started by `scripts/test.sh`.
pub fn suite_postgres_url() -> String {
    std::env::var("MEDAI_TEST_POSTGRES_URL").unwrap_or_else(|_| {
        panic!("MEDAI_TEST_POSTGRES_URL is not set: run the suite with scripts/test.sh, which starts its own PostgreSQL")
    })
}

/// Creates an empty database on the suite's PostgreSQL and returns its URL.
pub async fn fresh_postgres_database() -> String {
    let admin_url = suite_postgres_url();
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    let admin = Database::connect(admin_url.as_str())
        .await
        .expect("connect to the suite's PostgreSQL");
    admin
        .execute_unprepared(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
    admin.close().await.expect("close");
    let (base, _) = admin_url
        .rsplit_once('/')
        .expect("a URL with a database name");
    format!("{base}/{name}")
}

/// Holds every result row's commit in a results database (PostgreSQL) until the returned
/// transaction ends: a deferred trigger makes each commit wait on the advisory lock `lock`,
/// which the returned transaction holds. Tests use it to see what happens while a row commits.
pub async fn hold_result_commits(
    results: &sea_orm::DatabaseConnection,
    lock: i64,
) -> sea_orm::DatabaseTransaction {
    use sea_orm::TransactionTrait;
    results
        .execute_unprepared(&format!(
            "CREATE FUNCTION hold_commit() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN PERFORM pg_advisory_xact_lock_shared({lock}); RETURN NEW; END $$; \
             CREATE CONSTRAINT TRIGGER hold_commit AFTER INSERT ON inference_results \
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION hold_commit();"
        ))
        .await
        .expect("the trigger that holds commits");
    let holder = results.begin().await.expect("transaction");
    holder
        .execute_unprepared(&format!("SELECT pg_advisory_xact_lock({lock})"))
        .await
        .expect("the commits' lock");
    holder
}

/// A SQLite URL in `directory`.
pub fn sqlite_url(directory: &Path, name: &str) -> String {
    format!("sqlite://{}?mode=rwc", directory.join(name).display())
}

/// A path in a fresh temporary folder that lives until the test process ends.
pub fn scratch_file(name: &str) -> PathBuf {
    let directory = tempfile::tempdir().expect("tempdir").keep();
    directory.join(name)
}

/// A PostgreSQL cluster of this test's own, for tests that must stop or restart the server.
/// Uses the binaries `scripts/test.sh` found (MEDAI_TEST_PG_BIN); runs as `postgres` when the
/// test runs as root, as PostgreSQL requires.
pub struct PrivatePostgres {
    directory: tempfile::TempDir,
    pub port: u16,
    bin: PathBuf,
    as_postgres: bool,
    /// Server settings beyond the port, socket folder and listen address (`-c name=value …`).
    settings: String,
}

/// What a primary needs so that a standby streams from it and every commit waits for that
/// standby (`synchronous_standby_names = '*'`, `synchronous_commit = on`): an acknowledged
/// commit is then on both servers.
const SYNCHRONOUS_PRIMARY_SETTINGS: &str = "-c wal_level=replica -c max_wal_senders=5 \
     -c synchronous_standby_names=* -c synchronous_commit=on -c max_connections=200";

/// A standby's settings: hot standby (reads) and, once promoted, a primary that commits alone.
const STANDBY_SETTINGS: &str = "-c wal_level=replica -c max_wal_senders=5 -c max_connections=200";

impl PrivatePostgres {
    pub fn start() -> Self {
        Self::start_with_settings("")
    }

    /// A primary whose commits wait for a synchronous standby ([`PrivatePostgres::start_standby_of`]).
    /// Until a standby is connected, commits on it wait.
    pub fn start_synchronous_primary() -> Self {
        Self::start_with_settings(SYNCHRONOUS_PRIMARY_SETTINGS)
    }

    fn new_unstarted(settings: &str) -> Self {
        let bin = PathBuf::from(std::env::var("MEDAI_TEST_PG_BIN").unwrap_or_else(|_| {
            panic!("MEDAI_TEST_PG_BIN is not set: run the suite with scripts/test.sh")
        }));
        let directory = tempfile::tempdir().expect("tempdir");
        let as_postgres = std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|out| out.stdout.starts_with(b"0"));
        if as_postgres {
            let status = std::process::Command::new("chown")
                .arg("postgres")
                .arg(directory.path())
                .status()
                .expect("chown");
            assert!(status.success());
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("address")
            .port();
        Self {
            directory,
            port,
            bin,
            as_postgres,
            settings: settings.to_owned(),
        }
    }

    fn start_with_settings(settings: &str) -> Self {
        let cluster = Self::new_unstarted(settings);
        cluster.run(
            "initdb",
            &[
                "-D",
                &cluster.data(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ],
        );
        cluster.run(
            "pg_ctl",
            &[
                "-D",
                &cluster.data(),
                "-l",
                &cluster.log(),
                "-w",
                "-o",
                &cluster.options(),
                "start",
            ],
        );
        cluster
    }

    fn data(&self) -> String {
        self.directory.path().join("data").display().to_string()
    }

    fn log(&self) -> String {
        self.directory
            .path()
            .join("server.log")
            .display()
            .to_string()
    }

    fn options(&self) -> String {
        format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 {}",
            self.port,
            self.directory.path().display(),
            self.settings
        )
    }

    /// A streaming-replication standby of `primary`, made with `pg_basebackup -R` and started
    /// on a port of its own; returns once it streams (the primary's synchronous commits then
    /// wait for it). It serves reads only until [`PrivatePostgres::promote`].
    pub fn start_standby_of(primary: &PrivatePostgres) -> Self {
        // Without synchronous_standby_names: once promoted it runs alone, and its commits must
        // not wait for a standby it does not have.
        let standby = Self::new_unstarted(STANDBY_SETTINGS);
        let port = primary.port.to_string();
        standby.run(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-D",
                &standby.data(),
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
            ],
        );
        standby.run(
            "pg_ctl",
            &[
                "-D",
                &standby.data(),
                "-l",
                &standby.log(),
                "-w",
                "-o",
                &standby.options(),
                "start",
            ],
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        while primary.query("SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync' AND state = 'streaming'") != "1" {
            assert!(Instant::now() < deadline, "the standby never streamed synchronously");
            std::thread::sleep(Duration::from_millis(100));
        }
        standby
    }

    /// One value from `sql` run with `psql` (empty when the server does not answer).
    pub fn query(&self, sql: &str) -> String {
        let port = self.port.to_string();
        let arguments = [
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-tAc",
            sql,
        ];
        let binary = self.bin.join("psql");
        let output = if self.as_postgres {
            std::process::Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&binary)
                .args(arguments)
                .output()
        } else {
            std::process::Command::new(&binary).args(arguments).output()
        }
        .expect("run psql");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// The server dies as in a crash: `kill -9` of the postmaster and of every process it
    /// started, with no shutdown checkpoint. Returns once none of them runs.
    pub fn kill_hard(&self) {
        let pid_file = std::fs::read_to_string(self.directory.path().join("data/postmaster.pid"))
            .expect("postmaster.pid");
        let postmaster: u32 = pid_file
            .lines()
            .next()
            .and_then(|line| line.trim().parse().ok())
            .expect("a postmaster pid");
        let mut victims = vec![postmaster];
        for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // The parent pid is the second field after the parenthesised command name.
            let parent = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|field| field.parse::<u32>().ok());
            if parent == Some(postmaster) {
                victims.push(pid);
            }
        }
        for pid in &victims {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while victims.iter().any(|pid| {
            Path::new(&format!("/proc/{pid}")).exists()
                && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|stat| stat.contains(") Z "))
        }) {
            assert!(Instant::now() < deadline, "the killed server still runs");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Promotes a standby to primary (`pg_ctl promote -w`): returns once it takes writes.
    pub fn promote(&self) {
        self.run("pg_ctl", &["-D", &self.data(), "-w", "promote"]);
    }

    fn run(&self, program: &str, arguments: &[&str]) {
        let binary = self.bin.join(program);
        let output = if self.as_postgres {
            std::process::Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&binary)
                .args(arguments)
                .output()
        } else {
            std::process::Command::new(&binary).args(arguments).output()
        }
        .expect("run a PostgreSQL tool");
        assert!(
            output.status.success(),
            "{program} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// A fast restart: the server stops (ending every connection) and starts again.
    pub fn restart(&self) {
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-l",
                &self.log(),
                "-w",
                "-m",
                "fast",
                "-o",
                &self.options(),
                "restart",
            ],
        );
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let binary = self.bin.join("pg_ctl");
        let data = self.data();
        let arguments = ["-D", data.as_str(), "-m", "immediate", "stop"];
        let _ = if self.as_postgres {
            std::process::Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&binary)
                .args(arguments)
                .output()
        } else {
            std::process::Command::new(&binary).args(arguments).output()
        };
    }
}

/// A Redis server of this test's own, without persistence (as the suite runs it), for tests
/// that kill it and start it again empty on the same port.
pub struct PrivateRedis {
    pub port: u16,
    server: Option<std::process::Child>,
}

impl PrivateRedis {
    pub fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("address")
            .port();
        let mut redis = Self { port, server: None };
        redis.start_again();
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `kill -9`: every key is lost (nothing is saved). Returns once the process is gone.
    pub fn kill_hard(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
    }

    /// Starts the server again, empty, on the same port; returns once it answers PING.
    pub fn start_again(&mut self) {
        self.kill_hard();
        let server = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start redis-server (scripts/test-servers.sh installs it)");
        self.server = Some(server);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.cli(&["PING"]) != "PONG" {
            assert!(Instant::now() < deadline, "redis-server never answered");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A `redis-cli` command's output, trimmed (empty when the server does not answer).
    pub fn cli(&self, arguments: &[&str]) -> String {
        std::process::Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(arguments)
            .output()
            .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
            .unwrap_or_default()
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill_hard();
    }
}

/// Opens a TLS 1.3 connection to `address` that trusts the CA in `ca_certificate` but offers
/// no client certificate, and returns the TLS error the server's refusal ends it with (for a
/// mesh server: the certificate-required alert). Panics if the server answers instead.
pub fn tls_refusal_without_client_certificate(
    address: SocketAddr,
    ca_certificate: &Path,
    server_name: &str,
) -> rustls::Error {
    use std::io::{Read, Write};
    use std::sync::Arc;

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};

    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_file_iter(ca_certificate).expect("read the CA") {
        roots
            .add(certificate.expect("a PEM certificate"))
            .expect("a CA certificate");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("TLS 1.3")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut connection = rustls::ClientConnection::new(
        Arc::new(config),
        ServerName::try_from(server_name.to_owned()).expect("a server name"),
    )
    .expect("a TLS client");
    let mut socket = std::net::TcpStream::connect(address).expect("connect");
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    let mut stream = rustls::Stream::new(&mut connection, &mut socket);
    // The client's side of a TLS 1.3 handshake completes before the server has judged the
    // client's (empty) certificate; the refusal arrives on the first read.
    let outcome = stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .and_then(|()| {
            let mut answer = [0_u8; 64];
            stream.read(&mut answer)
        });
    let error = match outcome {
        Ok(read) => panic!("the server answered {read} bytes to a client without a certificate"),
        Err(error) => error,
    };
    let description = format!("{error:?}");
    *error
        .into_inner()
        .and_then(|inner| inner.downcast::<rustls::Error>().ok())
        .unwrap_or_else(|| panic!("not a TLS refusal: {description}"))
}

/// Structured Reports read back by highdicom (PyPI, pinned in `.cache/pacs-venv` by
/// scripts/pacs-tools.sh) through scripts/sr-readback.py: the document class, the algorithm
/// identification, the referenced source instances and the coded findings, as JSON, one per
/// file (one Python process for all). Panics with highdicom's own message when it cannot read
/// a file as an SR document.
pub fn highdicom_readback(reports: &[PathBuf]) -> Vec<serde_json::Value> {
    let root = workspace_root();
    let python = root.join(".cache/pacs-venv/bin/python");
    let output = std::process::Command::new(&python)
        .arg(root.join("scripts/sr-readback.py"))
        .args(reports)
        .output()
        .unwrap_or_else(|error| {
            panic!(
                "{} cannot run ({error}): run scripts/pacs-tools.sh",
                python.display()
            )
        });
    assert!(
        output.status.success(),
        "highdicom cannot read the report: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("the read-back prints a JSON list")
}
