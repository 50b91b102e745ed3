//! Delivers a Structured Report per answered instance to the destination AE, with retry and
//! exponential back-off. A report's UID is derived from its source and result, so a report
//! sent again (after a crash between sending and recording) replaces, never duplicates.

use crate::amendment::{SignatureOutcome, build_amended_report};
use crate::config::ResultDestination;
use crate::outbox::{Outbox, StoredInstance, now_ms};
use crate::outcome::InferenceOutcome;
use crate::report::{Report, SourceInstance, build_report};
use crate::scu::{DeliveryError, ReportSender};

/// Reports sent per association.
const BATCH: u64 = 32;

pub struct ReportDelivery {
    pub destination: ResultDestination,
    pub calling_ae_title: String,
    pub uid_root: String,
    pub outbox: Outbox,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DeliverySummary {
    pub delivered: usize,
    pub failed: usize,
}

impl ReportDelivery {
    /// The delay before attempt `attempts + 1`: initial × 2^attempts, at most the maximum.
    pub fn backoff_ms(&self, attempts: i32) -> u64 {
        let exponent = u32::try_from(attempts.clamp(0, 30)).unwrap_or(30);
        self.destination
            .initial_backoff_ms
            .saturating_mul(1u64 << exponent)
            .min(self.destination.max_backoff_ms)
    }

    /// Sends every report that is due; returns what happened.
    pub async fn deliver_due(&self) -> Result<DeliverySummary, sea_orm::DbErr> {
        let due = self.outbox.due_reports(BATCH).await?;
        let amendments = self.outbox.due_amendments(BATCH).await?;
        if due.is_empty() && amendments.is_empty() {
            return Ok(DeliverySummary::default());
        }
        if let Some(destination) = &self.destination.dicomweb {
            return self
                .deliver_over_dicomweb(&due, &amendments, destination)
                .await;
        }
        match &self.destination.tls {
            None => {
                let connected = ReportSender::connect(
                    &self.destination.address,
                    &self.destination.ae_title,
                    &self.calling_ae_title,
                )
                .await;
                self.deliver_on(connected, &due, &amendments).await
            }
            Some(tls) => {
                let connected = match tls.client_config() {
                    Ok(config) => {
                        ReportSender::connect_tls(
                            &self.destination.address,
                            &self.destination.ae_title,
                            &self.calling_ae_title,
                            config,
                            &tls.server_name,
                        )
                        .await
                    }
                    Err(error) => Err(DeliveryError::Associate(error.to_string())),
                };
                self.deliver_on(connected, &due, &amendments).await
            }
        }
    }

    /// Sends `due` on one association (plain or TLS), or counts each as failed when there is none.
    async fn deliver_on<S>(
        &self,
        connected: Result<ReportSender<S>, DeliveryError>,
        due: &[StoredInstance],
        amendments: &[StoredInstance],
    ) -> Result<DeliverySummary, sea_orm::DbErr>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
    {
        let mut summary = DeliverySummary::default();
        let mut sender = match connected {
            Ok(sender) => sender,
            Err(error) => {
                tracing::warn!(error = %error, reports = due.len(), "report destination unreachable; retried with back-off");
                for row in due {
                    self.failed(row).await?;
                    summary.failed += 1;
                }
                return Ok(summary);
            }
        };
        for row in due {
            match self.send_one(&mut sender, row).await {
                Ok(report_uid) => {
                    self.outbox.record_reported(&row.tag, &report_uid).await?;
                    metrics::counter!("medai_bridge_reports_delivered_total").increment(1);
                    summary.delivered += 1;
                }
                Err(error) => {
                    tracing::warn!(error = %error, attempts = row.report_attempts + 1, "report not delivered");
                    self.failed(row).await?;
                    summary.failed += 1;
                    if matches!(
                        error,
                        DeliveryError::Transport(_) | DeliveryError::UnexpectedAnswer
                    ) {
                        // The association is no longer usable; the rest waits for the next round.
                        return Ok(summary);
                    }
                }
            }
        }
        // Amended reports of results signed since: retried at the next round when refused.
        for row in amendments {
            match self.send_amended(&mut sender, row).await {
                Ok(report_uid) => {
                    self.outbox.record_amended(&row.tag, &report_uid).await?;
                    metrics::counter!("medai_bridge_amended_reports_delivered_total").increment(1);
                    summary.delivered += 1;
                }
                Err(error) => {
                    tracing::warn!(error = %error, attempts = row.report_attempts + 1, "amended report not delivered; retried with back-off");
                    self.amendment_failed(row).await?;
                    summary.failed += 1;
                    break;
                }
            }
        }
        sender.release().await;
        Ok(summary)
    }

    async fn send_amended<S>(
        &self,
        sender: &mut ReportSender<S>,
        row: &StoredInstance,
    ) -> Result<String, DeliveryError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
    {
        let report = self.amended_report_of(row)?;
        sender
            .store(&report.sop_instance_uid, &report.dataset)
            .await?;
        Ok(report.sop_instance_uid)
    }

    /// The amended (signed) report of a reported instance. Its UID is derived from the source,
    /// the result and the signature, so sending it again (after a crash between the
    /// destination's answer and the record) replaces, never duplicates.
    pub(crate) fn amended_report_of(&self, row: &StoredInstance) -> Result<Report, DeliveryError> {
        let unreadable = |error: serde_json::Error| {
            DeliveryError::Encode(format!("stored record unreadable: {error}"))
        };
        let outcome: InferenceOutcome =
            serde_json::from_str(row.result_json.as_deref().unwrap_or("")).map_err(unreadable)?;
        let signature: SignatureOutcome =
            serde_json::from_str(row.signature_json.as_deref().unwrap_or(""))
                .map_err(unreadable)?;
        let preliminary = row.report_sop_instance_uid.as_deref().unwrap_or_default();
        let source = SourceInstance {
            sop_class_uid: &row.sop_class_uid,
            sop_instance_uid: &row.sop_instance_uid,
            series_instance_uid: &row.series_instance_uid,
            study_instance_uid: &row.study_instance_uid,
            dicom: &row.dicom,
        };
        build_amended_report(
            &self.uid_root,
            &source,
            &outcome,
            &signature,
            preliminary,
            time::OffsetDateTime::now_utc(),
        )
        .map_err(|error| DeliveryError::Encode(error.to_string()))
    }

    /// An amended report not delivered waits for the back-off of its attempt count.
    pub(crate) async fn amendment_failed(
        &self,
        row: &StoredInstance,
    ) -> Result<(), sea_orm::DbErr> {
        let delay = i64::try_from(self.backoff_ms(row.report_attempts)).unwrap_or(i64::MAX);
        self.outbox
            .record_amendment_failure(row, now_ms().saturating_add(delay))
            .await
    }

    pub(crate) async fn failed(&self, row: &StoredInstance) -> Result<(), sea_orm::DbErr> {
        let delay = i64::try_from(self.backoff_ms(row.report_attempts)).unwrap_or(i64::MAX);
        self.outbox
            .record_delivery_failure(
                row,
                self.destination.max_attempts,
                now_ms().saturating_add(delay),
            )
            .await
    }

    async fn send_one<S>(
        &self,
        sender: &mut ReportSender<S>,
        row: &StoredInstance,
    ) -> Result<String, DeliveryError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
    {
        let report = self.report_of(row)?;
        sender
            .store(&report.sop_instance_uid, &report.dataset)
            .await?;
        Ok(report.sop_instance_uid)
    }

    /// The Structured Report for an answered instance.
    pub(crate) fn report_of(&self, row: &StoredInstance) -> Result<Report, DeliveryError> {
        let outcome: InferenceOutcome =
            serde_json::from_str(row.result_json.as_deref().unwrap_or("")).map_err(|error| {
                DeliveryError::Encode(format!("stored result unreadable: {error}"))
            })?;
        let source = SourceInstance {
            sop_class_uid: &row.sop_class_uid,
            sop_instance_uid: &row.sop_instance_uid,
            series_instance_uid: &row.series_instance_uid,
            study_instance_uid: &row.study_instance_uid,
            dicom: &row.dicom,
        };
        build_report(
            &self.uid_root,
            &source,
            &outcome,
            time::OffsetDateTime::now_utc(),
        )
        .map_err(|error| DeliveryError::Encode(error.to_string()))
    }
}
