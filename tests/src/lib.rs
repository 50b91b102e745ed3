//! The whole mesh for tests and benchmarks: the five service binaries started as separate
//! processes over mTLS by the same launcher `medai up` uses.

#![allow(clippy::missing_panics_doc)]

pub use medai_testkit::bench_images;
pub mod bridge;
pub mod chaos;
pub mod cluster;
pub mod process_cpu;

use std::collections::BTreeMap;
use std::time::Duration;

pub use medai_cli::client::authorised;
use medai_cli::client::{GatewayClient, connect_gateway};
use medai_cli::launcher::{MeshSettings, RunningMesh};
use medai_proto::gateway::v1::LoginRequest;
use medai_testkit::{Assets, binaries_dir, fresh_postgres_database};

pub const ADMIN_PASSWORD: &str = "an admin password for the whole-mesh tests";

pub struct MeshUnderTest {
    pub mesh: RunningMesh,
    pub settings: MeshSettings,
    _state: tempfile::TempDir,
}

/// Where the mesh keeps its databases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    /// The suite's real PostgreSQL, one fresh database per service.
    Postgres,
    /// The embedded default: SQLite files in the state folder.
    Sqlite,
}

impl MeshUnderTest {
    pub async fn start(storage: Storage) -> Self {
        Self::start_with(storage, BTreeMap::new()).await
    }

    /// Starts the mesh with extra environment per service (`"auth" → [(variable, value)]`).
    pub async fn start_with(
        storage: Storage,
        extra_environment: BTreeMap<String, Vec<(String, String)>>,
    ) -> Self {
        let state = tempfile::tempdir().expect("state dir");
        let assets = Assets::locate();
        let mut settings = MeshSettings::embedded(
            state.path(),
            &binaries_dir(),
            &assets.model_repository,
            &assets.onnxruntime_library,
        );
        if storage == Storage::Postgres {
            settings.audit_database_url = fresh_postgres_database().await;
            settings.auth_database_url = fresh_postgres_database().await;
            settings.inference_database_url = fresh_postgres_database().await;
        }
        settings.admin_password = ADMIN_PASSWORD.to_owned();
        settings.admin_endpoints = true;
        settings.extra_environment = extra_environment;
        let mesh = RunningMesh::start(&settings)
            .await
            .unwrap_or_else(|error| panic!("the mesh did not start: {error}"));
        Self {
            mesh,
            settings,
            _state: state,
        }
    }

    pub fn gateway_endpoint(&self) -> String {
        format!(
            "https://{}",
            self.mesh.address("gateway").expect("gateway address")
        )
    }

    /// A client of the gateway at `address` (another instance, for example).
    pub async fn gateway_at(&self, address: std::net::SocketAddr) -> GatewayClient {
        connect_gateway(
            &format!("https://{address}"),
            &self.mesh.pki_layout().ca_certificate(),
        )
        .await
        .expect("gateway client")
    }

    pub async fn gateway(&self) -> GatewayClient {
        connect_gateway(
            &self.gateway_endpoint(),
            &self.mesh.pki_layout().ca_certificate(),
        )
        .await
        .expect("gateway client")
    }

    pub async fn admin_token(&self) -> String {
        let request = LoginRequest {
            username: "admin".to_owned(),
            password: ADMIN_PASSWORD.to_owned(),
        };
        self.gateway()
            .await
            .login(request)
            .await
            .expect("admin login")
            .into_inner()
            .grant
            .expect("tokens")
            .access_token
    }

    /// Creates a user with `role` (as the admin holding `admin_token`) and logs in as them.
    pub async fn user_token(&self, admin_token: &str, username: &str, role: &str) -> String {
        let mut gateway = self.gateway().await;
        let password = format!("{username} password 123");
        gateway
            .create_user(authorised(
                medai_proto::gateway::v1::CreateUserRequest {
                    username: username.to_owned(),
                    password: password.clone(),
                    role: role.to_owned(),
                },
                admin_token,
            ))
            .await
            .expect("create user");
        gateway
            .login(LoginRequest {
                username: username.to_owned(),
                password,
            })
            .await
            .expect("login")
            .into_inner()
            .grant
            .expect("tokens")
            .access_token
    }

    /// Every log line the five services wrote so far.
    pub fn all_logs(&self) -> String {
        medai_cli::launcher::SERVICES
            .iter()
            .filter_map(|service| self.mesh.log_file(service))
            .map(|path| std::fs::read_to_string(path).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub async fn stop(self) {
        self.mesh.stop(Duration::from_secs(10)).await;
    }
}

/// Environment that makes every service export its traces to `collector_endpoint` over
/// OTLP, in batches sent every 100 ms (instead of the default 5 s) so tests need not wait.
pub fn traced_environment(collector_endpoint: &str) -> BTreeMap<String, Vec<(String, String)>> {
    medai_cli::launcher::SERVICES
        .iter()
        .map(|service| {
            let prefix = format!("MEDAI_{}_", service.to_ascii_uppercase());
            (
                (*service).to_owned(),
                vec![
                    (
                        format!("{prefix}PROCESS__OTLP_ENDPOINT"),
                        collector_endpoint.to_owned(),
                    ),
                    ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "100".to_owned()),
                ],
            )
        })
        .collect()
}

/// One sample of a gRPC handling-time histogram (`grpc_server_handling_seconds` or
/// `grpc_client_handling_seconds`) as a service's Prometheus endpoint gives it.
#[derive(Clone, Debug, PartialEq)]
pub struct HandlingSample {
    /// The mesh service that reported it.
    pub process: &'static str,
    /// `bucket`, `sum` or `count`.
    pub part: String,
    /// The call, as `Service/Method` (the gRPC service's last dotted name).
    pub call: String,
    /// A bucket's upper bound (`le`); empty for the sum and the count.
    pub le: String,
    pub value: f64,
}

/// Every sample of the histogram `family` on each running mesh service's admin endpoint.
pub async fn handling_samples(mesh: &MeshUnderTest, family: &str) -> Vec<HandlingSample> {
    let mut samples = Vec::new();
    for process in medai_cli::launcher::SERVICES {
        let Some(admin) = mesh.mesh.admin_address(process) else {
            continue;
        };
        let exposition = http_get(admin, "/metrics").await;
        for line in exposition.lines() {
            let Some(rest) = line
                .strip_prefix(family)
                .and_then(|rest| rest.strip_prefix('_'))
            else {
                continue;
            };
            let Some((part, rest)) = rest.split_once('{') else {
                continue;
            };
            let Some((labels, value)) = rest.rsplit_once("} ") else {
                continue;
            };
            let Ok(value) = value.trim().parse::<f64>() else {
                continue;
            };
            let label = |name: &str| {
                labels
                    .split(',')
                    .find_map(|pair| pair.strip_prefix(&format!("{name}=\"")))
                    .map(|value| value.trim_end_matches('"').to_owned())
                    .unwrap_or_default()
            };
            let service = label("grpc_service");
            let short_service = service.rsplit('.').next().unwrap_or_default();
            samples.push(HandlingSample {
                process,
                part: part.to_owned(),
                call: format!("{short_service}/{}", label("grpc_method")),
                le: label("le"),
                value,
            });
        }
    }
    samples
}

/// Plain HTTP/1.1 GET against a service's admin port.
pub async fn http_get(address: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect to the admin port");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    response
}

/// The suite's Redis, started by `scripts/test.sh`.
pub fn suite_redis_url() -> String {
    std::env::var("MEDAI_TEST_REDIS_URL").unwrap_or_else(|_| {
        panic!("MEDAI_TEST_REDIS_URL is not set: run the suite with scripts/test.sh")
    })
}

/// The concurrency levels a benchmark runs: `MEDAI_BENCH_LEVELS` (separated by commas or spaces,
/// e.g. `1,64`) when set, `default` otherwise. Read it before starting anything, so a bad value
/// stops the benchmark before it leaves processes behind.
pub fn bench_levels(default: &[usize]) -> Vec<usize> {
    std::env::var("MEDAI_BENCH_LEVELS").map_or_else(
        |_| default.to_vec(),
        |levels| {
            parse_levels(&levels).unwrap_or_else(|refusal| panic!("MEDAI_BENCH_LEVELS: {refusal}"))
        },
    )
}

/// Concurrency levels separated by commas or spaces; each a whole number of at least 1.
pub fn parse_levels(levels: &str) -> Result<Vec<usize>, String> {
    let parsed = levels
        .split(|separator: char| separator == ',' || separator.is_whitespace())
        .filter(|level| !level.is_empty())
        .map(|level| match level.parse::<usize>() {
            Ok(level) if level >= 1 => Ok(level),
            _ => Err(format!("{level:?} is not a concurrency of at least 1")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if parsed.is_empty() {
        return Err("no level given".to_owned());
    }
    Ok(parsed)
}

/// The sum of a metric's series whose labels include `labels`, in a Prometheus exposition.
pub fn metric_sum(exposition: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let label_text = match series.strip_prefix(name)? {
                "" => "",
                rest => rest.strip_prefix('{')?.strip_suffix('}')?,
            };
            labels
                .iter()
                .all(|(key, wanted)| {
                    label_text
                        .split(',')
                        .any(|pair| pair == format!("{key}=\"{wanted}\""))
                })
                .then(|| value.trim().parse::<f64>().ok())?
        })
        .sum()
}

/// A prediction request for the light model (`synthetic-light`, its active version), format
/// detected from the bytes, under `idempotency_key` (none when empty).
pub fn light_model_request(
    image: Vec<u8>,
    idempotency_key: &str,
) -> medai_proto::gateway::v1::InferRequest {
    medai_proto::gateway::v1::InferRequest {
        image: image.into(),
        format: medai_proto::common::v1::ImageFormat::Unspecified.into(),
        model_name: "synthetic-light".to_owned(),
        model_version: String::new(),
        idempotency_key: idempotency_key.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_levels;

    #[test]
    fn bench_levels_are_separated_by_commas_or_spaces_and_bad_ones_are_refused() {
        assert_eq!(parse_levels("1,64"), Ok(vec![1, 64]));
        assert_eq!(parse_levels(" 1 4, 16 ,64 "), Ok(vec![1, 4, 16, 64]));
        for bad in ["", " , ", "0", "1,x", "-4", "1.5"] {
            assert!(parse_levels(bad).is_err(), "{bad:?} was taken");
        }
    }
}
