//! The admin port of every service: Prometheus metrics at `/metrics` and a liveness probe at
//! `/livez`. It is plain HTTP on a separate listener so scraping never competes with gRPC.
//!
//! Every family carries HELP text (`describe_*`), the `process_*` families and
//! `medai_build_info` are always there, and the counters alerts watch are registered at zero
//! when the recorder is installed (the runtime's here, each service's in its own `metrics`
//! module), so a rule sees 0 rather than nothing before the first event.

use std::future::Future;

use axum::Router;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use crate::connections::{ADMIN, ADMIN_LIMITS, BoundedListener, ConnectionSlots};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot install the metrics recorder: {0}")]
    Recorder(String),
    #[error("admin server failed: {0}")]
    Serve(#[from] std::io::Error),
}

/// Installs the process-wide Prometheus recorder. Histograms, not summaries, so dashboards can
/// aggregate across replicas. The runtime's own families are described and registered.
pub fn install_prometheus_recorder() -> Result<PrometheusHandle, AdminError> {
    let buckets = [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    // Counts, not seconds: how many rows one model run held.
    let batch_sizes = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];
    let handle = PrometheusBuilder::new()
        .set_buckets(&buckets)
        .map_err(|error| AdminError::Recorder(error.to_string()))?
        .set_buckets_for_metric(Matcher::Suffix("batch_size".to_owned()), &batch_sizes)
        .map_err(|error| AdminError::Recorder(error.to_string()))?
        .install_recorder()
        .map_err(|error| AdminError::Recorder(error.to_string()))?;
    describe_runtime_metrics();
    Ok(handle)
}

/// HELP text for the families the runtime records, `medai_build_info`, and the runtime's
/// counters at zero. Idempotent.
pub fn describe_runtime_metrics() {
    crate::grpc_metrics::describe();
    crate::grpc_client_metrics::describe();
    crate::process_metrics::describe();
    crate::certificate_expiry::describe();
    crate::connections::describe();
    metrics::describe_counter!(
        "medai_peer_policy_denials_total",
        "Calls refused because the calling peer's certificate is not named for the method."
    );
    metrics::describe_counter!(
        "medai_grpc_deadline_exceeded_total",
        "Calls answered DEADLINE_EXCEEDED because the caller's grpc-timeout passed first."
    );
    metrics::describe_counter!(
        crate::errors::ERRORS_COUNTER,
        "Errors answered to callers, by error domain and stable reason code."
    );
    metrics::counter!("medai_grpc_deadline_exceeded_total").increment(0);
}

/// The exposition a scrape gets: the recorder's families, then the `process_*` families read
/// from `/proc` at that moment.
pub fn render(handle: &PrometheusHandle) -> String {
    let mut text = handle.render();
    text.push_str(&crate::process_metrics::render());
    text
}

/// Serves `/metrics` and `/livez` on `listener` until `shutdown` resolves, its connections
/// bounded by [`ADMIN_LIMITS`].
pub async fn serve_admin(
    listener: TcpListener,
    handle: PrometheusHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AdminError> {
    let router = Router::new()
        .route("/metrics", get(move || std::future::ready(render(&handle))))
        .route("/livez", get(|| std::future::ready("ok")));
    let slots = ConnectionSlots::new(&ADMIN_LIMITS, ADMIN);
    axum::serve(BoundedListener::new(listener, slots), router)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}
