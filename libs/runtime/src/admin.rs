//! The admin port of every service: Prometheus metrics at `/metrics` and a liveness probe at
//! `/livez`. It is plain HTTP on a separate listener so scraping never competes with gRPC.

use std::future::Future;

use axum::Router;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot install the metrics recorder: {0}")]
    Recorder(String),
    #[error("admin server failed: {0}")]
    Serve(#[from] std::io::Error),
}

/// Installs the process-wide Prometheus recorder. Histograms, not summaries, so dashboards can
/// aggregate across replicas.
pub fn install_prometheus_recorder() -> Result<PrometheusHandle, AdminError> {
    let buckets = [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    // Counts, not seconds: how many rows one model run held.
    let batch_sizes = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];
    PrometheusBuilder::new()
        .set_buckets(&buckets)
        .map_err(|error| AdminError::Recorder(error.to_string()))?
        .set_buckets_for_metric(Matcher::Suffix("batch_size".to_owned()), &batch_sizes)
        .map_err(|error| AdminError::Recorder(error.to_string()))?
        .install_recorder()
        .map_err(|error| AdminError::Recorder(error.to_string()))
}

/// Serves `/metrics` and `/livez` on `listener` until `shutdown` resolves.
pub async fn serve_admin(
    listener: TcpListener,
    handle: PrometheusHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AdminError> {
    let router = Router::new()
        .route("/metrics", get(move || std::future::ready(handle.render())))
        .route("/livez", get(|| std::future::ready("ok")));
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}
