//! The PACS bridge as operators run it: the `medai-bridge` binary as a process of its own,
//! configured by a TOML file and `MEDAI_BRIDGE_*` variables, in front of a running mesh, with
//! its admin (metrics) port and, when asked, OTLP traces. Images reach it by DIMSE C-STORE
//! from dcmtk's `storescu`, as a modality would send them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use medai_testkit::{binaries_dir, sqlite_url};

use crate::MeshUnderTest;

/// The bridge's own AE title, and the calling AE title `storescu` uses.
pub const BRIDGE_AE: &str = "MEDAI_BRIDGE";
pub const MODALITY_AE: &str = "STORESCU";
/// The model the bridge asks for (the light synthetic one, so a study is answered quickly).
pub const BRIDGE_MODEL: &str = "synthetic-light";

/// A running `medai-bridge`; killed on drop, [`BridgeProcess::stop`] asks nicely first.
pub struct BridgeProcess {
    pub dicom: SocketAddr,
    pub admin: SocketAddr,
    child: tokio::process::Child,
    log: PathBuf,
    _directory: tempfile::TempDir,
}

/// A loopback port nothing listens on: the result destination of a bridge whose reports are
/// not under test (their delivery fails and is retried).
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("address")
        .port()
}

impl BridgeProcess {
    /// Starts the bridge against `mesh`'s gateway as the gateway user `username`, with
    /// `environment` added (for example an OTLP endpoint), and waits until it has written its
    /// bound addresses.
    pub async fn start(
        mesh: &MeshUnderTest,
        username: &str,
        password: &str,
        environment: &[(String, String)],
    ) -> Self {
        let directory = tempfile::tempdir().expect("bridge dir");
        let address_file = directory.path().join("addresses.json");
        let configuration = format!(
            r#"
dicom_listen_addr = "127.0.0.1:0"
database_url = "{database}"
address_file = "{address_file}"
uid_root = "1.2.826.0.1.3680043.10.1234.16"
study_quiet_period_ms = 300
poll_interval_ms = 100
[telemetry]
admin_addr = "127.0.0.1:0"
[scp]
ae_title = "{BRIDGE_AE}"
allowed_calling_ae_titles = ["{MODALITY_AE}"]
[gateway]
endpoint = "{endpoint}"
ca_certificate = "{ca}"
username = "{username}"
password = "{password}"
model_name = "{BRIDGE_MODEL}"
model_version = "1"
[results]
address = "127.0.0.1:{results_port}"
ae_title = "RESULTS"
initial_backoff_ms = 100
"#,
            database = sqlite_url(directory.path(), "bridge.db"),
            address_file = address_file.display(),
            endpoint = mesh.gateway_endpoint(),
            ca = mesh.mesh.pki_layout().ca_certificate().display(),
            results_port = closed_port(),
        );
        let configuration_file = directory.path().join("bridge.toml");
        std::fs::write(&configuration_file, configuration).expect("write the bridge config");
        let log = directory.path().join("bridge.log");
        let log_file = std::fs::File::create(&log).expect("bridge log");
        let child = tokio::process::Command::new(binaries_dir().join("medai-bridge"))
            .env_clear()
            .env("MEDAI_BRIDGE_CONFIG", &configuration_file)
            .envs(environment.iter().map(|(name, value)| (name, value)))
            .stdout(log_file.try_clone().expect("log"))
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .expect("start medai-bridge (cargo build --workspace --bins)");
        let (dicom, admin) = wait_for_addresses(&address_file, &log).await;
        Self {
            dicom,
            admin,
            child,
            log,
            _directory: directory,
        }
    }

    /// Every line the bridge wrote so far (JSON logs).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `file` to the bridge with dcmtk's `storescu`, as a modality would.
    pub async fn store(&self, file: &Path) {
        let port = self.dicom.port().to_string();
        let output = tokio::process::Command::new("storescu")
            .args(["-aet", MODALITY_AE, "-aec", BRIDGE_AE, "127.0.0.1", &port])
            .arg(file)
            .output()
            .await
            .expect("storescu runs (scripts/pacs-tools.sh installs dcmtk)");
        assert!(
            output.status.success(),
            "storescu: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// SIGTERM, then waits for the process to exit (its queued spans are exported first).
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = tokio::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()
                .await;
        }
        if tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// The addresses the bridge writes once its listeners are bound.
async fn wait_for_addresses(path: &Path, log: &Path) -> (SocketAddr, SocketAddr) {
    let started = Instant::now();
    loop {
        if let Some(addresses) = std::fs::read_to_string(path)
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        {
            let address = |key: &str| -> SocketAddr {
                addresses[key]
                    .as_str()
                    .and_then(|text| text.parse().ok())
                    .unwrap_or_else(|| panic!("no {key} address in {addresses}"))
            };
            return (address("dicom"), address("admin"));
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the bridge did not start: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
