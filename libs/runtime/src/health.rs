//! Health means ready. A service answers SERVING on the standard gRPC health check only while
//! it can do its work: NOT_SERVING from the moment it starts draining (SIGTERM) and while a
//! dependency it needs is gone (for example the ledger, without which a fail-closed path
//! refuses everything).
//!
//! One [`Readiness`] per process holds those facts. `run_service` scopes it around the
//! service's `serve`, so the [`HealthLayer`] that [`crate::server::mesh_server`] installs
//! answers every health call from it (the health service a service registers itself is never
//! reached); a server started directly in a test gets a readiness of its own that stays ready.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt};
use tokio::sync::watch;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tower::{Layer, Service};

use crate::identity::ServiceIdentity;
use crate::tls::TlsMaterial;

/// Paths of the standard health service.
pub const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";
pub const HEALTH_METHODS: [&str; 2] = [
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
];

/// Why a process is (not) ready.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadinessState {
    pub draining: bool,
    /// Required dependencies that are gone, by name (`ledger`, `active model`).
    pub missing: BTreeSet<&'static str>,
}

impl ReadinessState {
    pub fn is_ready(&self) -> bool {
        !self.draining && self.missing.is_empty()
    }
}

/// The readiness of one process; clones share it.
#[derive(Clone, Debug)]
pub struct Readiness {
    state: Arc<watch::Sender<ReadinessState>>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self::new()
    }
}

tokio::task_local! {
    static PROCESS_READINESS: Readiness;
}

impl Readiness {
    pub fn new() -> Self {
        Self {
            state: Arc::new(watch::Sender::new(ReadinessState::default())),
        }
    }

    /// The readiness `run_service` scoped around this service's `serve`, or a new one.
    pub fn of_this_process() -> Self {
        PROCESS_READINESS
            .try_with(Clone::clone)
            .unwrap_or_else(|_| Self::new())
    }

    /// Runs `future` (a service's `serve`) with `self` as the readiness its servers report.
    pub async fn scope<F: Future>(self, future: F) -> F::Output {
        PROCESS_READINESS.scope(self, future).await
    }

    /// From now on NOT_SERVING, for good: the process is going away.
    pub fn start_draining(&self) {
        self.state.send_if_modified(|state| {
            let changed = !state.draining;
            state.draining = true;
            changed
        });
    }

    /// Records whether the dependency `name` is available; logs each change.
    pub fn set_dependency(&self, name: &'static str, available: bool) {
        let changed = self.state.send_if_modified(|state| {
            if available {
                state.missing.remove(name)
            } else {
                state.missing.insert(name)
            }
        });
        if changed && available {
            tracing::info!(
                dependency = name,
                "dependency back; ready if nothing else is missing"
            );
        } else if changed {
            tracing::warn!(dependency = name, "dependency gone; reporting NOT_SERVING");
        }
    }

    pub fn state(&self) -> ReadinessState {
        self.state.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<ReadinessState> {
        self.state.subscribe()
    }
}

/// A required dependency, checked in the background by [`probe_dependencies`].
#[derive(Clone)]
pub enum Dependency {
    /// Another mesh service that must answer SERVING on its health check, asked over mTLS
    /// with this service's own certificate.
    MeshService {
        name: &'static str,
        endpoint: String,
        service: ServiceIdentity,
    },
    /// A condition of this process's own (for example: some model version is active).
    Condition {
        name: &'static str,
        holds: Arc<dyn Fn() -> bool + Send + Sync>,
    },
}

impl std::fmt::Debug for Dependency {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::MeshService { name, endpoint, .. } => {
                write!(formatter, "MeshService({name} at {endpoint})")
            }
            Self::Condition { name, .. } => write!(formatter, "Condition({name})"),
        }
    }
}

impl Dependency {
    pub fn mesh_service(name: &'static str, endpoint: &str, service: &str) -> Self {
        Self::MeshService {
            name,
            endpoint: endpoint.to_owned(),
            service: ServiceIdentity::new(service),
        }
    }

    pub fn condition(name: &'static str, holds: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        Self::Condition {
            name,
            holds: Arc::new(holds),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::MeshService { name, .. } | Self::Condition { name, .. } => name,
        }
    }
}

/// Checks every dependency each `interval` and records the answers in `readiness`, until the
/// process drains. A check that does not answer within the interval counts as gone.
pub async fn probe_dependencies(
    dependencies: Vec<Dependency>,
    tls: TlsMaterial,
    readiness: Readiness,
    interval: Duration,
) {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    if dependencies.is_empty() {
        return;
    }
    let mut channels = BTreeMap::new();
    for dependency in &dependencies {
        if let Dependency::MeshService {
            name,
            endpoint,
            service,
        } = dependency
        {
            match tls.channel(endpoint, service) {
                Ok(channel) => {
                    channels.insert(*name, channel);
                }
                Err(error) => {
                    tracing::error!(dependency = name, error = %error, "cannot reach the dependency");
                }
            }
        }
    }
    let timeout = interval.max(Duration::from_millis(500));
    loop {
        if readiness.state().draining {
            return;
        }
        for dependency in &dependencies {
            let available = match dependency {
                Dependency::MeshService { name, .. } => match channels.get(name) {
                    Some(channel) => {
                        let mut client = HealthClient::new(channel.clone());
                        let check = client.check(HealthCheckRequest {
                            service: String::new(),
                        });
                        matches!(
                            tokio::time::timeout(timeout, check).await,
                            Ok(Ok(response)) if response.get_ref().status() == ServingStatus::Serving
                        )
                    }
                    None => false,
                },
                Dependency::Condition { holds, .. } => {
                    let holds = holds.clone();
                    tokio::task::spawn_blocking(move || holds())
                        .await
                        .unwrap_or(false)
                }
            };
            readiness.set_dependency(dependency.name(), available);
        }
        tokio::time::sleep(interval).await;
    }
}

/// Answers the health service of a server from the process's [`Readiness`]: the overall
/// status ("") and each service the server holds follow it.
#[derive(Clone)]
pub struct HealthLayer {
    server: HealthServer<HealthService>,
    // Held so the status follower lives as long as the server does.
    _readiness: Readiness,
}

impl HealthLayer {
    /// `services` are the gRPC service names the server holds
    /// (`medai.audit.v1.AuditService`). Call inside a tokio runtime.
    pub fn new(readiness: Readiness, services: BTreeSet<String>) -> Self {
        let reporter = HealthReporter::new();
        let server = HealthServer::new(HealthService::from_health_reporter(reporter.clone()));
        let mut names: Vec<String> = services.into_iter().collect();
        names.push(String::new());
        tokio::spawn(follow_readiness(reporter, names, readiness.subscribe()));
        Self {
            server,
            _readiness: readiness,
        }
    }
}

async fn follow_readiness(
    reporter: HealthReporter,
    services: Vec<String>,
    mut readiness: watch::Receiver<ReadinessState>,
) {
    loop {
        let status = if readiness.borrow_and_update().is_ready() {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        for service in &services {
            reporter.set_service_status(service, status).await;
        }
        if readiness.changed().await.is_err() {
            return;
        }
    }
}

impl<S> Layer<S> for HealthLayer {
    type Service = HealthRouted<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HealthRouted {
            inner,
            health: self.server.clone(),
        }
    }
}

#[derive(Clone)]
pub struct HealthRouted<S> {
    inner: S,
    health: HealthServer<HealthService>,
}

impl<S> Service<http::Request<tonic::body::Body>> for HealthRouted<S>
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        if !request.uri().path().starts_with(HEALTH_PREFIX) {
            return self.inner.call(request).boxed();
        }
        let mut health = self.health.clone();
        async move {
            match health.call(request).await {
                Ok(response) => Ok(response),
                Err(never) => match never {},
            }
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draining_or_a_missing_dependency_is_not_ready() {
        let readiness = Readiness::new();
        assert!(readiness.state().is_ready());
        readiness.set_dependency("ledger", false);
        assert!(!readiness.state().is_ready());
        readiness.set_dependency("ledger", true);
        assert!(readiness.state().is_ready());
        readiness.start_draining();
        readiness.set_dependency("ledger", true);
        assert!(!readiness.state().is_ready(), "draining is for good");
    }
}
