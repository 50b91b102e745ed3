//! DICOMweb STOW-RS out: the Structured Reports sent to a configured DICOMweb endpoint (for
//! example Orthanc's DICOMweb plugin) instead of by C-STORE, one report per request, with the
//! same attempts and back-off as the C-STORE destination. A report counts as delivered only when
//! the endpoint answers 200, or 202 without the report in its Failed SOP Sequence.

use std::time::Duration;

use bytes::Bytes;
use dicom_dictionary_std::uids;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use http_body_util::{BodyExt, Full, Limited};
use hyper::http::{Request, StatusCode, Uri, header};
use hyper_util::rt::TokioIo;
use medai_runtime::config::Secret;
use serde::{Deserialize, Serialize};

use crate::delivery::{DeliverySummary, ReportDelivery};
use crate::outbox::StoredInstance;
use crate::scu::DeliveryError;

const TIMEOUT: Duration = Duration::from_secs(30);
/// A Store Instances response for one instance is a few hundred bytes.
const MAX_ANSWER_BYTES: usize = 1024 * 1024;

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DicomWebDestination {
    /// The DICOMweb service root, `http://host:port/path` (`/studies` is appended), for
    /// example `http://orthanc:8042/dicom-web`.
    pub url: String,
    /// Sent as `Authorization: Bearer <token>` when set.
    #[serde(default)]
    pub bearer_token: Option<Secret>,
}

impl DicomWebDestination {
    pub fn validate(&self) -> Result<(), &'static str> {
        self.studies_uri().map(|_| ())
    }

    /// The Store Instances resource: the service root with `/studies` appended.
    fn studies_uri(&self) -> Result<Uri, &'static str> {
        const PROBLEM: &str = "results.dicomweb.url must be http://host:port/path (plain HTTP: put the endpoint on a trusted network or behind a TLS proxy on the bridge's host)";
        let uri: Uri = format!("{}/studies", self.url.trim_end_matches('/'))
            .parse()
            .map_err(|_| PROBLEM)?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() || uri.query().is_some() {
            return Err(PROBLEM);
        }
        Ok(uri)
    }
}

/// The report as one Part 10 instance in a `multipart/related; type="application/dicom"` body.
pub fn stow_body(
    sop_instance_uid: &str,
    dataset: &InMemDicomObject,
    boundary: &str,
) -> Result<Vec<u8>, DeliveryError> {
    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(uids::COMPREHENSIVE_SR_STORAGE)
        .media_storage_sop_instance_uid(sop_instance_uid)
        .transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN);
    let file = dataset
        .clone()
        .with_meta(meta)
        .map_err(|error| DeliveryError::Encode(error.to_string()))?;
    let mut body = format!("--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").into_bytes();
    file.write_all(&mut body)
        .map_err(|error| DeliveryError::Encode(error.to_string()))?;
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    Ok(body)
}

/// Reads a Store Instances response: `Ok` when the instance is not among the failed ones,
/// otherwise its failure reason.
pub fn judge_answer(
    status: StatusCode,
    answer: &[u8],
    sop_instance_uid: &str,
) -> Result<(), DeliveryError> {
    let failure_of_ours = || -> Option<u16> {
        let answer: serde_json::Value = serde_json::from_slice(answer).ok()?;
        answer["00081198"]["Value"]
            .as_array()?
            .iter()
            .find(|item| item["00081155"]["Value"][0].as_str() == Some(sop_instance_uid))
            .map(|item| {
                item["00081197"]["Value"][0]
                    .as_u64()
                    .and_then(|reason| u16::try_from(reason).ok())
                    .unwrap_or(0x0110)
            })
    };
    match status {
        StatusCode::OK | StatusCode::ACCEPTED => match failure_of_ours() {
            None => Ok(()),
            Some(reason) => Err(DeliveryError::Refused(reason)),
        },
        StatusCode::CONFLICT => Err(DeliveryError::Refused(failure_of_ours().unwrap_or(0x0110))),
        other => Err(DeliveryError::Transport(format!(
            "the DICOMweb endpoint answered HTTP {}",
            other.as_u16()
        ))),
    }
}

/// Sends one report by STOW-RS.
pub async fn send_report(
    destination: &DicomWebDestination,
    sop_instance_uid: &str,
    dataset: &InMemDicomObject,
) -> Result<(), DeliveryError> {
    let uri = destination
        .studies_uri()
        .map_err(|problem| DeliveryError::Associate(problem.to_owned()))?;
    let boundary = format!("medai-{}", uuid::Uuid::new_v4().simple());
    let body = stow_body(sop_instance_uid, dataset, &boundary)?;
    let host = uri.host().unwrap_or_default().to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let stream = tokio::time::timeout(
        TIMEOUT,
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .map_err(|_| DeliveryError::Associate("connect timed out".to_owned()))?
    .map_err(|error| DeliveryError::Associate(error.to_string()))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|error| DeliveryError::Transport(error.to_string()))?;
    let driver = tokio::spawn(connection);
    let mut request = Request::post(uri.path())
        .header(
            header::HOST,
            uri.authority()
                .map(|authority| authority.as_str())
                .unwrap_or(""),
        )
        .header(
            header::CONTENT_TYPE,
            format!("multipart/related; type=\"application/dicom\"; boundary={boundary}"),
        )
        .header(header::ACCEPT, "application/dicom+json")
        .header(header::CONTENT_LENGTH, body.len());
    if let Some(token) = &destination.bearer_token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {}", token.expose()));
    }
    let request = request
        .body(Full::new(Bytes::from(body)))
        .map_err(|error| DeliveryError::Encode(error.to_string()))?;
    let exchange = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|error| DeliveryError::Transport(error.to_string()))?;
        let status = response.status();
        let answer = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|error| DeliveryError::Transport(error.to_string()))?
            .to_bytes();
        Ok::<_, DeliveryError>((status, answer))
    };
    let outcome = tokio::time::timeout(TIMEOUT, exchange).await.map_err(|_| {
        DeliveryError::Transport("the DICOMweb endpoint did not answer in time".to_owned())
    });
    driver.abort();
    let (status, answer) = outcome??;
    judge_answer(status, &answer, sop_instance_uid)
}

impl ReportDelivery {
    /// Sends the due reports by STOW-RS; an unreachable endpoint defers the whole batch.
    pub(crate) async fn deliver_over_dicomweb(
        &self,
        due: &[StoredInstance],
        destination: &DicomWebDestination,
    ) -> Result<DeliverySummary, sea_orm::DbErr> {
        let mut summary = DeliverySummary::default();
        for (index, row) in due.iter().enumerate() {
            let sent = match self.report_of(row) {
                Ok(report) => send_report(destination, &report.sop_instance_uid, &report.dataset)
                    .await
                    .map(|()| report.sop_instance_uid),
                Err(error) => Err(error),
            };
            match sent {
                Ok(report_uid) => {
                    self.outbox.record_reported(&row.tag, &report_uid).await?;
                    metrics::counter!("medai_bridge_reports_delivered_total").increment(1);
                    summary.delivered += 1;
                }
                Err(error) => {
                    tracing::warn!(error = %error, attempts = row.report_attempts + 1, "report not delivered by STOW-RS");
                    let unreachable = matches!(
                        error,
                        DeliveryError::Associate(_) | DeliveryError::Transport(_)
                    );
                    let deferred = if unreachable {
                        &due[index..]
                    } else {
                        &due[index..=index]
                    };
                    for row in deferred {
                        self.failed(row).await?;
                        summary.failed += 1;
                    }
                    if unreachable {
                        return Ok(summary);
                    }
                }
            }
        }
        Ok(summary)
    }
}
