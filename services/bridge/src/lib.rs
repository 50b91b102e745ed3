//! The PACS bridge (`medai-bridge`): a client of the gateway deployed next to the PACS. It
//! receives images as a DICOM Storage SCP, keeps them and the UIDs the mesh never sees in its
//! own outbox, streams each complete study to the gateway, and returns each result to the PACS
//! as a DICOM Structured Report.

pub mod amendment;
pub mod config;
pub mod delivery;
pub mod dicom_tls;
pub mod dicomweb;
pub mod dimse;
pub mod forwarder;
pub mod outbox;
pub mod outcome;
pub mod report;
pub mod scp;
pub mod scu;
pub mod signatures;
pub mod stow;
pub mod telemetry;
pub mod uids;

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::net::TcpListener;
use tracing::Instrument;

use crate::config::BridgeConfig;
use crate::delivery::ReportDelivery;
use crate::forwarder::StudyForwarder;
use crate::outbox::Outbox;
use crate::scp::StorageScp;
use crate::stow::StowServer;

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("invalid configuration: {0}")]
    Config(#[from] config::ConfigProblem),
    #[error("the outbox cannot be opened: {0}")]
    Outbox(#[from] sea_orm::DbErr),
    #[error("the DICOM TLS material cannot be used: {0}")]
    Tls(#[from] medai_runtime::tls::TlsError),
}

/// The listeners the bridge serves on, bound by the caller (tests bind port 0).
pub struct BridgeListeners {
    /// DIMSE (C-ECHO, C-STORE).
    pub dicom: TcpListener,
    /// DICOMweb STOW-RS (`POST /studies`), when `stow` is configured.
    pub stow: Option<TcpListener>,
}

/// Serves until `shutdown` completes: the Storage SCP, the study forwarder and the report
/// delivery, all over one outbox.
pub async fn serve(
    config: BridgeConfig,
    listeners: BridgeListeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), BridgeError> {
    config.validate()?;
    let outbox = Outbox::open(&config.database_url).await?;
    let shutdown = shutdown.boxed().shared();

    let mut scp = StorageScp::new(config.scp.clone(), outbox.clone());
    if let Some(tls) = &config.scp.tls {
        scp = scp.with_tls(tls.server_config()?);
    }
    let scp = Arc::new(scp);
    let scp_task = tokio::spawn(scp.run(listeners.dicom, shutdown.clone()));
    let stow_task = match (config.stow.clone(), listeners.stow) {
        (Some(settings), Some(listener)) => {
            let server = StowServer::new(settings, config.scp.max_instance_bytes, outbox.clone());
            Some(tokio::spawn(server.run(listener, shutdown.clone())))
        }
        (Some(_), None) => {
            tracing::warn!("stow is configured but no listener was handed in; STOW-RS is off");
            None
        }
        (None, _) => None,
    };

    let poll = Duration::from_millis(config.poll_interval_ms.max(10));
    let quiet_period_ms = config.study_quiet_period_ms;
    let signature_poll = Duration::from_millis(config.signature_poll_interval_ms.max(100));
    let mut forwarder = StudyForwarder::new(config.gateway.clone(), outbox.clone());
    let forwarding_outbox = outbox.clone();
    // Boxed: the loops' state is large and would otherwise sit in every caller's future.
    let forwarding = Box::pin(async move {
        let mut signatures_looked_at = std::time::Instant::now();
        loop {
            if signatures_looked_at.elapsed() >= signature_poll {
                signatures_looked_at = std::time::Instant::now();
                crate::signatures::record_new_signatures(&mut forwarder, &forwarding_outbox).await;
            }
            match forwarding_outbox.quiet_studies(quiet_period_ms).await {
                Ok(studies) => {
                    for study in studies {
                        // One trace per study: the gateway calls are CLIENT spans under it.
                        let span = tracing::info_span!(
                            "bridge.forward_study",
                            images = study.instances.len()
                        );
                        let forwarded = forwarder.forward(&study).instrument(span.clone()).await;
                        // Its log lines name the study's trace.
                        let sent = span.in_scope(|| match forwarded {
                            Ok(summary) => {
                                count_forwarded(&summary);
                                tracing::info!(
                                    images = study.instances.len(),
                                    results = summary.results,
                                    refused = summary.refused,
                                    retry_later = summary.retry_later,
                                    "study forwarded"
                                );
                                true
                            }
                            Err(error) => {
                                metrics::counter!(telemetry::RETRIES, "stage" => telemetry::stage::STUDY)
                                    .increment(1);
                                tracing::warn!(error = %error, "study not forwarded; retried later");
                                false
                            }
                        });
                        if !sent {
                            break;
                        }
                    }
                }
                Err(error) => tracing::error!(error = %error, "the outbox cannot be read"),
            }
            match forwarding_outbox.counts_by_state().await {
                Ok(counts) => telemetry::record_outbox_depth(&counts),
                Err(error) => tracing::error!(error = %error, "the outbox cannot be read"),
            }
            tokio::time::sleep(poll).await;
        }
    });

    let delivery = ReportDelivery {
        destination: config.results.clone(),
        calling_ae_title: config.scp.ae_title.clone(),
        uid_root: config.uid_root.clone(),
        outbox,
    };
    let delivering = Box::pin(async move {
        loop {
            match delivery.deliver_due().await {
                Ok(summary) if summary.delivered + summary.failed > 0 => {
                    metrics::counter!(telemetry::RETRIES, "stage" => telemetry::stage::REPORT)
                        .increment(u64::try_from(summary.failed).unwrap_or(u64::MAX));
                    tracing::info!(
                        delivered = summary.delivered,
                        failed = summary.failed,
                        "reports sent"
                    );
                }
                Ok(_) => {}
                Err(error) => tracing::error!(error = %error, "the outbox cannot be read"),
            }
            tokio::time::sleep(poll).await;
        }
    });

    tokio::select! {
        () = shutdown.clone() => {}
        () = forwarding => {}
        () = delivering => {}
    }
    let _ = scp_task.await;
    if let Some(stow_task) = stow_task
        && let Ok(Err(error)) = stow_task.await
    {
        tracing::warn!(error = %error, "the STOW-RS server ended with an error");
    }
    tracing::info!("bridge stopped");
    Ok(())
}

/// A study's answers as counted by the bridge's metrics (see [`telemetry`]).
fn count_forwarded(summary: &forwarder::ForwardSummary) {
    let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
    metrics::counter!(telemetry::INSTANCES_FORWARDED, "outcome" => "result")
        .increment(count(summary.results));
    metrics::counter!(telemetry::INSTANCES_FORWARDED, "outcome" => "refused")
        .increment(count(summary.refused));
    metrics::counter!(telemetry::RETRIES, "stage" => telemetry::stage::IMAGE)
        .increment(count(summary.retry_later));
}
