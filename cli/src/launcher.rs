//! Starts the five services as separate processes on loopback, each with its own certificate
//! from a development CA, in dependency order (audit → auth → validation, inference →
//! gateway), waits until every one reports SERVING, and stops them all on request.
//! Ports come from the services themselves (port 0 + address files) unless fixed.
//!
//! Once the mesh is up, each service is supervised the way Kubernetes supervises a pod's
//! container: a service that exits is started again after an exponential back-off (1 s,
//! doubling to 30 s; back to 1 s once it has run for a minute), on the ports it had, so its
//! clients reconnect by themselves. Each exit and restart is a JSON line in
//! `<state>/logs/launcher.log`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use medai_devpki::PkiLayout;
use medai_runtime::ServiceIdentity;
use medai_runtime::process::BoundAddresses;
use medai_runtime::tls::TlsMaterial;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

pub const SERVICES: [&str; 5] = ["audit", "auth", "validation", "inference", "gateway"];
/// glibc's allocator settings for the inference process (issue 14), read by glibc when the
/// process starts, so they are given in its environment (as the chart and Dockerfile.service
/// do). A fixed mmap threshold stops glibc from raising it after ONNX Runtime frees its first
/// large blocks, so every block of 128 KiB or more (the model's load copies, each run's
/// activations) goes back to the system when freed instead of staying in a fragmented heap;
/// two malloc arenas instead of one per thread. Measured (release, brain-MRI model): the
/// inference process holds 109 MiB idle and 110 after four predictions, instead of 193 and 255.
pub const INFERENCE_MALLOC_TUNABLES: &str =
    "glibc.malloc.mmap_threshold=131072:glibc.malloc.arena_max=2";

/// The `GLIBC_TUNABLES` the inference process is given: the launcher's own when it has one (an
/// operator's choice wins), else [`INFERENCE_MALLOC_TUNABLES`].
pub fn inference_malloc_tunables(inherited: Option<String>) -> String {
    inherited.unwrap_or_else(|| INFERENCE_MALLOC_TUNABLES.to_owned())
}

/// Tokio worker threads for each service when all of them share one host, as under `medai up`:
/// the host's cores split between the services, at least one each (issue 14). Tokio's default,
/// a worker per core in every process, put ten workers on two cores; each woke its idle
/// siblings to look for work on every request. Measured (release, 2 cores, `versus_monolith`,
/// alternated twice): one worker each took concurrency 1 from 369/370 to 404/388
/// predictions/s and concurrency 64 from 1,323/1,377 to 1,406/1,471, gateway CPU per
/// prediction 820/781 → 684/723 µs at 1 and 312/306 → 286/260 at 64. The decodes and model
/// runs go to each service's blocking pool, which this does not bound.
pub fn colocated_worker_threads(cores: usize) -> usize {
    (cores / SERVICES.len()).max(1)
}

/// The `TOKIO_WORKER_THREADS` each service is given: the launcher's own when it has one (an
/// operator's choice wins), else [`colocated_worker_threads`] of the cores this process may use.
pub fn service_worker_threads(inherited: Option<String>) -> String {
    inherited.unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        colocated_worker_threads(cores).to_string()
    })
}

/// The identity the command-line tool and the tests use to reach internal health endpoints.
pub const OPERATOR_IDENTITY: &str = "operator";
/// The identity for internal teams' KServe v2 clients (inference and metadata, no lifecycle).
pub const KSERVE_CLIENT_IDENTITY: &str = "kserve-client";

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot prepare {path}: {reason}")]
    Prepare { path: PathBuf, reason: String },
    #[error(
        "the binary {0} was not found; build the workspace first (cargo build --workspace --bins)"
    )]
    MissingBinary(PathBuf),
    #[error("cannot start {service}: {reason}")]
    Spawn { service: String, reason: String },
    #[error("{service} exited during start-up ({status}); see {log}")]
    Exited {
        service: String,
        status: String,
        log: PathBuf,
    },
    #[error("{service} did not become healthy within {seconds} s; see {log}")]
    NotHealthy {
        service: String,
        seconds: u64,
        log: PathBuf,
    },
    #[error(transparent)]
    Pki(#[from] medai_devpki::PkiError),
    #[error(transparent)]
    Tls(#[from] medai_runtime::tls::TlsError),
}

/// Everything the mesh needs from its surroundings.
#[derive(Clone, Debug)]
pub struct MeshSettings {
    /// Certificates, logs, address files and (by default) the SQLite databases.
    pub state_dir: PathBuf,
    /// Where the service binaries are (normally next to the `medai` binary).
    pub binaries_dir: PathBuf,
    pub model_repository: PathBuf,
    pub onnxruntime_library: PathBuf,
    /// `sqlite://…` (default under `state_dir`) or `postgres://…`.
    pub audit_database_url: String,
    pub auth_database_url: String,
    /// The inference service's results store.
    pub inference_database_url: String,
    pub admin_username: String,
    pub admin_password: String,
    /// A fixed gateway port (`medai up`); 0 lets the system choose (tests).
    pub gateway_port: u16,
    /// Expose Prometheus metrics on admin ports chosen by the system.
    pub admin_endpoints: bool,
    /// Extra variables per service (`"gateway" → [("MEDAI_GATEWAY_…", "…")]`).
    pub extra_environment: BTreeMap<String, Vec<(String, String)>>,
    pub startup_timeout: Duration,
    /// How long each service keeps serving (NOT_SERVING) after SIGTERM before it closes its
    /// listener. Nothing balances load in front of a local mesh, so none by default.
    pub drain_seconds: u64,
}

impl MeshSettings {
    /// Embedded defaults: SQLite files in the state folder.
    pub fn embedded(
        state_dir: &Path,
        binaries_dir: &Path,
        model_repository: &Path,
        onnxruntime_library: &Path,
    ) -> Self {
        Self {
            state_dir: state_dir.to_owned(),
            binaries_dir: binaries_dir.to_owned(),
            model_repository: model_repository.to_owned(),
            onnxruntime_library: onnxruntime_library.to_owned(),
            audit_database_url: sqlite_url(&state_dir.join("audit.sqlite")),
            auth_database_url: sqlite_url(&state_dir.join("auth.sqlite")),
            inference_database_url: sqlite_url(&state_dir.join("results.sqlite")),
            admin_username: "admin".to_owned(),
            admin_password: String::new(),
            gateway_port: 0,
            admin_endpoints: false,
            extra_environment: BTreeMap::new(),
            startup_timeout: Duration::from_secs(120),
            drain_seconds: 0,
        }
    }

    pub fn pki(&self) -> PkiLayout {
        PkiLayout::new(self.state_dir.join("pki"))
    }
}

pub fn sqlite_url(path: &Path) -> String {
    format!("sqlite://{}?mode=rwc", path.display())
}

/// The first restart waits this long; each further one twice as long, up to the cap.
const FIRST_RESTART_DELAY: Duration = Duration::from_secs(1);
const LONGEST_RESTART_DELAY: Duration = Duration::from_secs(30);
/// A service that ran this long before exiting starts again after the first delay.
const RAN_WELL_FOR: Duration = Duration::from_secs(60);

struct RunningService {
    name: &'static str,
    instance: String,
    addresses: BoundAddresses,
    log: PathBuf,
    /// What it was started with; a restart uses it with the ports pinned to `addresses`.
    environment: Vec<(String, String)>,
    process: ServiceProcess,
}

enum ServiceProcess {
    /// Started, not yet known healthy: an exit now is a failed start, not a crash.
    Starting(Child),
    Supervised(Supervisor),
    Stopped,
}

/// The task that owns a running service's process and restarts it when it exits.
struct Supervisor {
    control: mpsc::UnboundedSender<Control>,
    pid: watch::Receiver<Option<u32>>,
    restarts: watch::Receiver<u32>,
    task: tokio::task::JoinHandle<()>,
}

enum Control {
    /// SIGTERM, then SIGKILL after the grace period; no restart.
    Stop(Duration),
    /// SIGKILL; no restart.
    Kill,
}

/// How to start a service again.
#[derive(Clone)]
struct RestartSpec {
    name: &'static str,
    instance: String,
    binary: PathBuf,
    environment: Vec<(String, String)>,
    log: PathBuf,
    launcher_log: PathBuf,
}

impl RestartSpec {
    fn spawn(&self) -> std::io::Result<Child> {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        Command::new(&self.binary)
            .envs(self.environment.iter().cloned())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file))
            .kill_on_drop(true)
            .spawn()
    }

    /// One JSON line in the launcher's log.
    fn record(&self, event: &str, fields: serde_json::Value) {
        use std::io::Write;
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_millis());
        let mut line = serde_json::json!({
            "timestamp_ms": timestamp,
            "level": if event == "restarted" { "INFO" } else { "WARN" },
            "event": event,
            "service": self.name,
            "instance": self.instance,
        });
        if let (Some(line), serde_json::Value::Object(fields)) = (line.as_object_mut(), fields) {
            line.extend(fields);
        }
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.launcher_log)
        {
            let _ = writeln!(file, "{line}");
        }
    }
}

impl Supervisor {
    fn start(child: Child, spec: RestartSpec) -> Self {
        let (control, commands) = mpsc::unbounded_channel();
        let (pid_sender, pid) = watch::channel(child.id());
        let (restart_sender, restarts) = watch::channel(0);
        let task = tokio::spawn(supervise(child, spec, commands, pid_sender, restart_sender));
        Self {
            control,
            pid,
            restarts,
            task,
        }
    }
}

async fn supervise(
    mut child: Child,
    spec: RestartSpec,
    mut commands: mpsc::UnboundedReceiver<Control>,
    pid: watch::Sender<Option<u32>>,
    restarts: watch::Sender<u32>,
) {
    let mut delay = FIRST_RESTART_DELAY;
    let mut started = Instant::now();
    loop {
        let status = tokio::select! {
            status = child.wait() => status,
            command = commands.recv() => {
                match command {
                    Some(Control::Stop(grace)) => terminate(&mut child, grace).await,
                    Some(Control::Kill) | None => {
                        let _ = child.kill().await;
                    }
                }
                pid.send_replace(None);
                return;
            }
        };
        pid.send_replace(None);
        if started.elapsed() >= RAN_WELL_FOR {
            delay = FIRST_RESTART_DELAY;
        }
        let exit = status.map_or_else(|error| error.to_string(), |status| status.to_string());
        loop {
            spec.record(
                "exited",
                serde_json::json!({
                    "exit": exit,
                    "restart_in_ms": delay.as_millis(),
                    "restarts_so_far": *restarts.borrow(),
                }),
            );
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                // Asked to stop while nothing runs: nothing to stop.
                _ = commands.recv() => return,
            }
            delay = (delay * 2).min(LONGEST_RESTART_DELAY);
            match spec.spawn() {
                Ok(restarted) => {
                    child = restarted;
                    started = Instant::now();
                    pid.send_replace(child.id());
                    restarts.send_modify(|count| *count += 1);
                    spec.record(
                        "restarted",
                        serde_json::json!({ "pid": child.id(), "restarts": *restarts.borrow() }),
                    );
                    break;
                }
                Err(error) => {
                    spec.record(
                        "restart failed",
                        serde_json::json!({ "error": error.to_string() }),
                    );
                }
            }
        }
    }
}

/// SIGTERM, then SIGKILL if it is still running after `grace`.
async fn terminate(child: &mut Child, grace: Duration) {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .await;
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

/// The five services, running. Dropping it kills them; [`RunningMesh::stop`] asks nicely first.
pub struct RunningMesh {
    services: Vec<RunningService>,
    pki: PkiLayout,
    binaries_dir: PathBuf,
}

impl RunningMesh {
    pub async fn start(settings: &MeshSettings) -> Result<Self, LaunchError> {
        let prepare = |path: &Path, error: std::io::Error| LaunchError::Prepare {
            path: path.to_owned(),
            reason: error.to_string(),
        };
        let logs = settings.state_dir.join("logs");
        std::fs::create_dir_all(&logs).map_err(|error| prepare(&logs, error))?;
        let pki = settings.pki();
        let mut identities: Vec<&str> = SERVICES.to_vec();
        identities.push(OPERATOR_IDENTITY);
        identities.push(KSERVE_CLIENT_IDENTITY);
        pki.ensure(&identities)?;

        let mut mesh = Self {
            services: Vec::new(),
            pki,
            binaries_dir: settings.binaries_dir.clone(),
        };
        for name in SERVICES {
            let environment = mesh.environment_for(name, settings);
            let service = spawn_service(name, name, environment, settings, &logs).await?;
            mesh.services.push(service);
        }
        mesh.wait_until_healthy(settings.startup_timeout).await?;
        mesh.supervise_started(settings);
        Ok(mesh)
    }

    /// Hands every healthy, freshly started service to a supervisor.
    fn supervise_started(&mut self, settings: &MeshSettings) {
        let launcher_log = settings.state_dir.join("logs").join("launcher.log");
        for service in &mut self.services {
            if !matches!(service.process, ServiceProcess::Starting(_)) {
                continue;
            }
            let ServiceProcess::Starting(child) =
                std::mem::replace(&mut service.process, ServiceProcess::Stopped)
            else {
                continue;
            };
            let spec = RestartSpec {
                name: service.name,
                instance: service.instance.clone(),
                binary: settings
                    .binaries_dir
                    .join(format!("medai-{}", service.name)),
                environment: pinned_environment(
                    service.name,
                    &service.environment,
                    &service.addresses,
                ),
                log: service.log.clone(),
                launcher_log: launcher_log.clone(),
            };
            service.process = ServiceProcess::Supervised(Supervisor::start(child, spec));
        }
    }

    /// How often `service` has been restarted since the mesh started.
    pub fn restarts(&self, service: &str) -> u32 {
        self.find(service)
            .and_then(|running| match &running.process {
                ServiceProcess::Supervised(supervisor) => Some(*supervisor.restarts.borrow()),
                _ => None,
            })
            .unwrap_or(0)
    }

    /// Waits until `service` answers SERVING (after a restart, for example).
    pub async fn wait_until_serving(
        &self,
        service: &str,
        timeout: Duration,
    ) -> Result<(), LaunchError> {
        let running = self.find(service).ok_or_else(|| LaunchError::Spawn {
            service: service.to_owned(),
            reason: "not part of this mesh".to_owned(),
        })?;
        let tls = self.operator_tls()?;
        let channel = tls.channel(
            &format!("https://{}", running.addresses.grpc),
            &ServiceIdentity::new(running.name),
        )?;
        let mut health = HealthClient::new(channel);
        let deadline = Instant::now() + timeout;
        loop {
            let request = HealthCheckRequest {
                service: String::new(),
            };
            if let Ok(response) = health.check(request).await
                && response.into_inner().status() == ServingStatus::Serving
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(LaunchError::NotHealthy {
                    service: service.to_owned(),
                    seconds: timeout.as_secs(),
                    log: running.log.clone(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts again a service stopped with [`RunningMesh::kill`], on the ports it had, and
    /// supervises it; returns once it is healthy.
    pub async fn restart(
        &mut self,
        service: &str,
        settings: &MeshSettings,
    ) -> Result<(), LaunchError> {
        let index = self
            .services
            .iter()
            .position(|running| running.name == service)
            .ok_or_else(|| LaunchError::Spawn {
                service: service.to_owned(),
                reason: "not part of this mesh".to_owned(),
            })?;
        let running = &mut self.services[index];
        let environment =
            pinned_environment(running.name, &running.environment, &running.addresses);
        let logs = settings.state_dir.join("logs");
        let restarted = spawn_service(
            running.name,
            &running.instance,
            environment,
            settings,
            &logs,
        )
        .await?;
        running.process = restarted.process;
        self.wait_until_healthy_from(index, settings.startup_timeout)
            .await?;
        self.supervise_started(settings);
        Ok(())
    }

    /// The command that runs `service`'s binary with exactly the configuration it runs with
    /// (its bound port included), for one-shot modes such as `--probe` and `--print-config`.
    pub fn service_command(
        &self,
        service: &str,
        arguments: &[&str],
    ) -> Option<std::process::Command> {
        let running = self.find(service)?;
        let mut command =
            std::process::Command::new(self.binaries_dir.join(format!("medai-{}", running.name)));
        command.args(arguments).env_clear().envs(pinned_environment(
            running.name,
            &running.environment,
            &running.addresses,
        ));
        Some(command)
    }

    fn find(&self, service: &str) -> Option<&RunningService> {
        self.services.iter().find(|running| running.name == service)
    }

    fn operator_tls(&self) -> Result<TlsMaterial, LaunchError> {
        Ok(TlsMaterial::load(&medai_runtime::TlsFiles {
            ca_cert: self.pki.ca_certificate(),
            cert: self.pki.certificate(OPERATOR_IDENTITY),
            key: self.pki.key(OPERATOR_IDENTITY),
        })?)
    }

    fn endpoint(&self, service: &str) -> String {
        self.services
            .iter()
            .find(|running| running.name == service)
            .map(|running| format!("https://{}", running.addresses.grpc))
            .unwrap_or_default()
    }

    pub fn address(&self, service: &str) -> Option<SocketAddr> {
        self.services
            .iter()
            .find(|running| running.name == service)
            .map(|running| running.addresses.grpc)
    }

    pub fn admin_address(&self, service: &str) -> Option<SocketAddr> {
        self.services
            .iter()
            .find(|running| running.name == service)
            .and_then(|running| running.addresses.admin)
    }

    /// The admin addresses of every instance of `service`, in start order.
    pub fn admin_addresses(&self, service: &str) -> Vec<SocketAddr> {
        self.services
            .iter()
            .filter(|running| running.name == service)
            .filter_map(|running| running.addresses.admin)
            .collect()
    }

    /// The operating-system process id of `service`, while it runs (it changes when the
    /// service is restarted).
    pub fn pid(&self, service: &str) -> Option<u32> {
        match &self.find(service)?.process {
            ServiceProcess::Starting(child) => child.id(),
            ServiceProcess::Supervised(supervisor) => *supervisor.pid.borrow(),
            ServiceProcess::Stopped => None,
        }
    }

    pub fn log_file(&self, service: &str) -> Option<PathBuf> {
        self.services
            .iter()
            .find(|running| running.name == service)
            .map(|running| running.log.clone())
    }

    pub fn pki_layout(&self) -> &PkiLayout {
        &self.pki
    }

    fn environment_for(
        &self,
        name: &'static str,
        settings: &MeshSettings,
    ) -> Vec<(String, String)> {
        let prefix = format!("MEDAI_{}_", name.to_ascii_uppercase());
        let pki = &self.pki;
        let port = if name == "gateway" {
            settings.gateway_port
        } else {
            0
        };
        let mut environment = vec![
            (
                "PROCESS__LISTEN_ADDR".to_owned(),
                format!("127.0.0.1:{port}"),
            ),
            (
                "PROCESS__DRAIN_SECONDS".to_owned(),
                settings.drain_seconds.to_string(),
            ),
            // A local mesh notices a service gone (and back) within a second.
            (
                "PROCESS__DEPENDENCY_PROBE_SECONDS".to_owned(),
                "1".to_owned(),
            ),
            (
                "PROCESS__ADDRESS_FILE".to_owned(),
                address_file(settings, name).display().to_string(),
            ),
            ("PROCESS__LOG_FILTER".to_owned(), "info".to_owned()),
            (
                "TLS__CA_CERT".to_owned(),
                pki.ca_certificate().display().to_string(),
            ),
            (
                "TLS__CERT".to_owned(),
                pki.certificate(name).display().to_string(),
            ),
            ("TLS__KEY".to_owned(), pki.key(name).display().to_string()),
        ];
        if settings.admin_endpoints {
            environment.push(("PROCESS__ADMIN_ADDR".to_owned(), "127.0.0.1:0".to_owned()));
        }
        match name {
            "audit" => {
                environment.push((
                    "DATABASE_URL".to_owned(),
                    settings.audit_database_url.clone(),
                ));
                let key = settings.state_dir.join("audit-checkpoint.key");
                environment.push(("CHECKPOINT_KEY_FILE".to_owned(), key.display().to_string()));
            }
            "auth" => {
                environment.push((
                    "DATABASE_URL".to_owned(),
                    settings.auth_database_url.clone(),
                ));
                environment.push(("AUDIT_ENDPOINT".to_owned(), self.endpoint("audit")));
                environment.push((
                    "BOOTSTRAP_ADMIN__USERNAME".to_owned(),
                    settings.admin_username.clone(),
                ));
                environment.push((
                    "BOOTSTRAP_ADMIN__PASSWORD".to_owned(),
                    settings.admin_password.clone(),
                ));
            }
            "validation" => {
                let secret = ensure_secret(&settings.state_dir.join("patient-key.secret"));
                environment.push(("PATIENT_KEY_SECRET".to_owned(), secret));
            }
            "inference" => {
                environment.push((
                    "MODEL_REPOSITORY".to_owned(),
                    settings.model_repository.display().to_string(),
                ));
                environment.push((
                    "ONNXRUNTIME_LIBRARY".to_owned(),
                    settings.onnxruntime_library.display().to_string(),
                ));
                environment.push((
                    "DATABASE_URL".to_owned(),
                    settings.inference_database_url.clone(),
                ));
                environment.push(("AUDIT_ENDPOINT".to_owned(), self.endpoint("audit")));
            }
            "gateway" => {
                for upstream in ["auth", "validation", "inference", "audit"] {
                    environment.push((
                        format!("{}_ENDPOINT", upstream.to_ascii_uppercase()),
                        self.endpoint(upstream),
                    ));
                }
            }
            _ => {}
        }
        let mut environment: Vec<(String, String)> = environment
            .into_iter()
            .map(|(key, value)| (format!("{prefix}{key}"), value))
            .collect();
        environment.push((
            "TOKIO_WORKER_THREADS".to_owned(),
            service_worker_threads(std::env::var("TOKIO_WORKER_THREADS").ok()),
        ));
        if name == "inference" {
            let inherited = std::env::var("GLIBC_TUNABLES").ok();
            environment.push((
                "GLIBC_TUNABLES".to_owned(),
                inference_malloc_tunables(inherited),
            ));
        }
        if let Some(extra) = settings.extra_environment.get(name) {
            environment.extend(extra.iter().cloned());
        }
        environment
    }

    /// Starts one more instance of `service` (for example a second gateway sharing the same
    /// Redis), configured like the first but for `overrides`, and waits until it is healthy.
    pub async fn start_another(
        &mut self,
        service: &'static str,
        instance: &str,
        settings: &MeshSettings,
        overrides: Vec<(String, String)>,
    ) -> Result<SocketAddr, LaunchError> {
        let logs = settings.state_dir.join("logs");
        let prefix = format!("MEDAI_{}_", service.to_ascii_uppercase());
        let mut environment = self.environment_for(service, settings);
        environment.retain(|(key, _)| {
            *key != format!("{prefix}PROCESS__LISTEN_ADDR")
                && *key != format!("{prefix}PROCESS__ADDRESS_FILE")
        });
        environment.push((
            format!("{prefix}PROCESS__LISTEN_ADDR"),
            "127.0.0.1:0".to_owned(),
        ));
        environment.push((
            format!("{prefix}PROCESS__ADDRESS_FILE"),
            address_file(settings, instance).display().to_string(),
        ));
        environment.extend(overrides);
        let running = spawn_service(service, instance, environment, settings, &logs).await?;
        let address = running.addresses.grpc;
        self.services.push(running);
        let first_new = self.services.len() - 1;
        self.wait_until_healthy_from(first_new, settings.startup_timeout)
            .await?;
        self.supervise_started(settings);
        Ok(address)
    }

    async fn wait_until_healthy(&mut self, timeout: Duration) -> Result<(), LaunchError> {
        self.wait_until_healthy_from(0, timeout).await
    }

    async fn wait_until_healthy_from(
        &mut self,
        first: usize,
        timeout: Duration,
    ) -> Result<(), LaunchError> {
        let tls = self.operator_tls()?;
        let deadline = Instant::now() + timeout;
        for index in first..self.services.len() {
            let (name, endpoint, log) = {
                let service = &self.services[index];
                (
                    service.name,
                    format!("https://{}", service.addresses.grpc),
                    service.log.clone(),
                )
            };
            let channel = tls.channel(&endpoint, &ServiceIdentity::new(name))?;
            let mut health = HealthClient::new(channel);
            loop {
                let request = HealthCheckRequest {
                    service: String::new(),
                };
                if let Ok(response) = health.check(request).await
                    && response.into_inner().status() == ServingStatus::Serving
                {
                    break;
                }
                if let ServiceProcess::Starting(child) = &mut self.services[index].process
                    && let Ok(Some(status)) = child.try_wait()
                {
                    return Err(LaunchError::Exited {
                        service: name.to_owned(),
                        status: status.to_string(),
                        log,
                    });
                }
                if Instant::now() > deadline {
                    return Err(LaunchError::NotHealthy {
                        service: name.to_owned(),
                        seconds: timeout.as_secs(),
                        log,
                    });
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// Kills one service at once and stops supervising it (tests of what the others do when
    /// it is gone); [`RunningMesh::restart`] brings it back.
    pub async fn kill(&mut self, service: &str) {
        if let Some(running) = self
            .services
            .iter_mut()
            .find(|running| running.name == service)
        {
            running.process.end(None).await;
        }
    }

    /// Stops the running instance of `service` started first as the kubelet stops a pod
    /// (SIGTERM, so it drains; SIGKILL after `grace`) and stops supervising it; the others
    /// keep running (a rolling restart's old replica).
    pub async fn terminate(&mut self, service: &str, grace: Duration) {
        if let Some(running) = self.services.iter_mut().find(|running| {
            running.name == service && !matches!(running.process, ServiceProcess::Stopped)
        }) {
            running.process.end(Some(grace)).await;
        }
    }

    /// SIGTERM to every service (gateway first, ledger last), then waits for each to exit;
    /// a service still running after `grace` is killed. None is restarted.
    pub async fn stop(mut self, grace: Duration) {
        while let Some(mut service) = self.services.pop() {
            service.process.end(Some(grace)).await;
        }
    }
}

impl ServiceProcess {
    /// Stops the process (SIGTERM and `grace`, or SIGKILL when `None`) and its supervision.
    async fn end(&mut self, grace: Option<Duration>) {
        match std::mem::replace(self, Self::Stopped) {
            Self::Starting(mut child) => match grace {
                Some(grace) => terminate(&mut child, grace).await,
                None => {
                    let _ = child.kill().await;
                }
            },
            Self::Supervised(supervisor) => {
                let command = grace.map_or(Control::Kill, Control::Stop);
                let _ = supervisor.control.send(command);
                let _ = supervisor.task.await;
            }
            Self::Stopped => {}
        }
    }
}

impl Drop for RunningMesh {
    fn drop(&mut self) {
        for service in &mut self.services {
            match &mut service.process {
                ServiceProcess::Starting(child) => {
                    let _ = child.start_kill();
                }
                ServiceProcess::Supervised(supervisor) => {
                    let _ = supervisor.control.send(Control::Kill);
                }
                ServiceProcess::Stopped => {}
            }
        }
    }
}

/// `environment` with the listen and admin addresses fixed to the ones first bound, so a
/// restarted service is where its clients expect it.
fn pinned_environment(
    name: &str,
    environment: &[(String, String)],
    addresses: &BoundAddresses,
) -> Vec<(String, String)> {
    let prefix = format!("MEDAI_{}_", name.to_ascii_uppercase());
    let listen = format!("{prefix}PROCESS__LISTEN_ADDR");
    let admin = format!("{prefix}PROCESS__ADMIN_ADDR");
    let mut pinned: Vec<(String, String)> = environment
        .iter()
        .filter(|(key, _)| *key != listen && *key != admin)
        .cloned()
        .collect();
    pinned.push((listen, addresses.grpc.to_string()));
    if let Some(address) = addresses.admin {
        pinned.push((admin, address.to_string()));
    }
    pinned
}

/// A random secret kept owner-readable in the state folder, created on first use.
fn ensure_secret(path: &Path) -> String {
    if let Ok(existing) = std::fs::read_to_string(path) {
        return existing.trim().to_owned();
    }
    let secret = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    if std::fs::write(path, &secret).is_ok() {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
    }
    secret
}

fn address_file(settings: &MeshSettings, instance: &str) -> PathBuf {
    settings.state_dir.join(format!("{instance}.address.json"))
}

async fn spawn_service(
    name: &'static str,
    instance: &str,
    environment: Vec<(String, String)>,
    settings: &MeshSettings,
    logs: &Path,
) -> Result<RunningService, LaunchError> {
    let binary = settings.binaries_dir.join(format!("medai-{name}"));
    if !binary.is_file() {
        return Err(LaunchError::MissingBinary(binary));
    }
    let addresses = address_file(settings, instance);
    let _stale = std::fs::remove_file(&addresses);
    let log = logs.join(format!("{instance}.log"));
    let spawn_error = |reason: String| LaunchError::Spawn {
        service: name.to_owned(),
        reason,
    };
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(|error| spawn_error(error.to_string()))?;
    let mut command = Command::new(&binary);
    command
        .envs(environment.iter().cloned())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log_file))
        .kill_on_drop(true);
    let mut child = command
        .spawn()
        .map_err(|error| spawn_error(error.to_string()))?;
    let deadline = Instant::now() + settings.startup_timeout;
    loop {
        if let Ok(text) = std::fs::read_to_string(&addresses)
            && let Ok(bound) = serde_json::from_str::<BoundAddresses>(&text)
        {
            return Ok(RunningService {
                name,
                instance: instance.to_owned(),
                addresses: bound,
                log,
                environment,
                process: ServiceProcess::Starting(child),
            });
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(LaunchError::Exited {
                service: name.to_owned(),
                status: status.to_string(),
                log,
            });
        }
        if Instant::now() > deadline {
            return Err(LaunchError::NotHealthy {
                service: name.to_owned(),
                seconds: settings.startup_timeout.as_secs(),
                log,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colocated_services_split_the_cores_and_each_keeps_one_worker() {
        assert_eq!(colocated_worker_threads(1), 1);
        assert_eq!(colocated_worker_threads(2), 1);
        assert_eq!(colocated_worker_threads(9), 1);
        assert_eq!(colocated_worker_threads(10), 2);
        assert_eq!(colocated_worker_threads(32), 6);
    }

    #[test]
    fn an_operators_worker_count_wins() {
        assert_eq!(service_worker_threads(Some("3".to_owned())), "3");
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        assert_eq!(
            service_worker_threads(None),
            colocated_worker_threads(cores).to_string()
        );
    }
}
