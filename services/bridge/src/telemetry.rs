//! What the bridge tells operators, as every mesh service does: JSON logs naming the trace and
//! span they were written in, OTLP traces (a CLIENT span around every call to the gateway, the
//! gateway's SERVER span its child), and an admin port with Prometheus `/metrics` (the
//! standard `process_*` families, `medai_build_info`, the `grpc_client_*` families of its
//! gateway calls and the bridge's own counters below) and `/livez`.
//!
//! Labels hold states, reasons and stages from fixed lists, never a UID, an AE title or any
//! other identifier a DICOM instance carries.

use std::net::SocketAddr;

use medai_runtime::rpc_trace::TracedChannel;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::outbox::state;

/// `telemetry` in the bridge's configuration (`MEDAI_BRIDGE_TELEMETRY__…`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    /// Prometheus `/metrics` and `/livez`; no admin endpoint when absent.
    #[serde(default)]
    pub admin_addr: Option<SocketAddr>,
    /// An OTLP/gRPC collector (`http://collector:4317`) to export traces to; none when absent.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
}

/// Instances a C-STORE (or STOW-RS) handed over and the bridge acknowledged.
pub const INSTANCES_RECEIVED: &str = "medai_bridge_instances_received_total";
/// Instances committed to the outbox for the first time (a resent instance is received again,
/// stored once).
pub const INSTANCES_STORED: &str = "medai_bridge_instances_stored_total";
/// Instances the gateway answered, by `outcome` (result or refused).
pub const INSTANCES_FORWARDED: &str = "medai_bridge_instances_forwarded_total";
/// Instances refused at the door, by `reason`.
pub const INSTANCES_REFUSED: &str = "medai_bridge_instances_refused_total";
/// Associations refused, by `reason`.
pub const ASSOCIATIONS_REFUSED: &str = "medai_bridge_associations_refused_total";
/// Structured Reports the result destination accepted.
pub const REPORTS_DELIVERED: &str = "medai_bridge_reports_delivered_total";
/// Work left for a later round, by `stage`: a study whose stream failed, an image the gateway
/// could not answer yet, a report the destination did not accept.
pub const RETRIES: &str = "medai_bridge_retries_total";
/// Instances in the outbox, by `state`.
pub const OUTBOX_INSTANCES: &str = "medai_bridge_outbox_instances";

/// The outbox states [`OUTBOX_INSTANCES`] reports, each present from the start.
pub const OUTBOX_STATES: [&str; 5] = [
    state::RECEIVED,
    state::INFERRED,
    state::REPORTED,
    state::REFUSED,
    state::UNDELIVERABLE,
];

/// Where work is retried: the values of [`RETRIES`]' `stage` label.
pub mod stage {
    pub const STUDY: &str = "study";
    pub const IMAGE: &str = "image";
    pub const REPORT: &str = "report";
}

/// HELP text for the bridge's families, each registered at zero so rates and alerts see them
/// before the first event. Idempotent.
pub fn describe_bridge_metrics() {
    metrics::describe_counter!(
        INSTANCES_RECEIVED,
        "DICOM instances received and acknowledged (resent instances included)."
    );
    metrics::describe_counter!(
        INSTANCES_STORED,
        "DICOM instances committed to the outbox for the first time."
    );
    metrics::describe_counter!(
        INSTANCES_FORWARDED,
        "Instances the gateway answered, by outcome (result or refused)."
    );
    metrics::describe_counter!(
        INSTANCES_REFUSED,
        "Instances refused before they were stored, by reason."
    );
    metrics::describe_counter!(
        ASSOCIATIONS_REFUSED,
        "DICOM associations refused, by reason."
    );
    metrics::describe_counter!(
        REPORTS_DELIVERED,
        "Structured Reports the result destination accepted."
    );
    metrics::describe_counter!(
        RETRIES,
        "Work left for a later round, by stage (study, image, report)."
    );
    metrics::describe_gauge!(
        OUTBOX_INSTANCES,
        "Instances in the bridge's outbox, by state."
    );
    metrics::counter!(INSTANCES_RECEIVED).increment(0);
    metrics::counter!(INSTANCES_STORED).increment(0);
    metrics::counter!(REPORTS_DELIVERED).increment(0);
    for outcome in ["result", "refused"] {
        metrics::counter!(INSTANCES_FORWARDED, "outcome" => outcome).increment(0);
    }
    for reason in ["too_large", "unreadable"] {
        metrics::counter!(INSTANCES_REFUSED, "reason" => reason).increment(0);
    }
    for reason in ["limit", "negotiation"] {
        metrics::counter!(ASSOCIATIONS_REFUSED, "reason" => reason).increment(0);
    }
    for stage in [stage::STUDY, stage::IMAGE, stage::REPORT] {
        metrics::counter!(RETRIES, "stage" => stage).increment(0);
    }
    for state in OUTBOX_STATES {
        metrics::gauge!(OUTBOX_INSTANCES, "state" => state).set(0.0);
    }
}

/// Sets [`OUTBOX_INSTANCES`] from the outbox's counts by state (a state without rows is 0).
pub fn record_outbox_depth(counts: &[(String, i64)]) {
    for state in OUTBOX_STATES {
        let count = counts
            .iter()
            .find(|(counted, _)| counted == state)
            .map_or(0, |(_, count)| *count);
        #[allow(clippy::cast_precision_loss)]
        metrics::gauge!(OUTBOX_INSTANCES, "state" => state).set(count as f64);
    }
}

/// The channel to the gateway with a CLIENT span around every call (its W3C context sent
/// along) over the `grpc_client_*` metrics: the same layers the mesh services' channels have.
pub fn traced_gateway_channel(channel: tonic::transport::Channel, endpoint: &str) -> TracedChannel {
    medai_runtime::rpc_trace::traced_channel(channel, endpoint)
}

#[derive(Debug, thiserror::Error)]
pub enum AdminStartError {
    #[error("cannot install the metrics recorder: {0}")]
    Recorder(#[from] medai_runtime::admin::AdminError),
    #[error("cannot bind the admin listener: {0}")]
    Bind(#[from] std::io::Error),
}

/// Installs the Prometheus recorder with the bridge's families, binds `address` and serves
/// `/metrics` and `/livez` until `shutdown`. Returns the bound address.
pub async fn start_admin(
    address: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<SocketAddr, AdminStartError> {
    let handle = medai_runtime::admin::install_prometheus_recorder()?;
    describe_bridge_metrics();
    let listener = TcpListener::bind(address).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(error) = medai_runtime::admin::serve_admin(listener, handle, shutdown).await {
            tracing::error!(error = %error, "admin endpoint failed");
        }
    });
    Ok(bound)
}
