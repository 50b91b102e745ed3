//! DICOMweb STOW-RS out: the Structured Reports (preliminary, and amended once signed) sent to a
//! configured DICOMweb endpoint (for example Orthanc's DICOMweb plugin) instead of by C-STORE,
//! one report per request, with the same attempts and back-off as the C-STORE destination. A
//! report counts as delivered only when the endpoint answers 200, or 202 without the report in
//! its Failed SOP Sequence. Over `https://` the endpoint's certificate must come from the
//! configured CA bundle (rustls, no system roots), and the bridge may present a client
//! certificate; an endpoint that cannot prove itself gets nothing and the report stays due.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dicom_dictionary_std::uids;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use http_body_util::{BodyExt, Full, Limited};
use hyper::http::{Request, StatusCode, Uri, header};
use hyper_util::rt::TokioIo;
use medai_runtime::config::Secret;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::delivery::{DeliverySummary, ReportDelivery};
use crate::outbox::StoredInstance;
use crate::scu::DeliveryError;

const TIMEOUT: Duration = Duration::from_secs(30);
/// A Store Instances response for one instance is a few hundred bytes.
const MAX_ANSWER_BYTES: usize = 1024 * 1024;

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DicomWebDestination {
    /// The DICOMweb service root, `http(s)://host:port/path` (`/studies` is appended), for
    /// example `https://orthanc:8042/dicom-web`.
    pub url: String,
    /// Sent as `Authorization: Bearer <token>` when set.
    #[serde(default)]
    pub bearer_token: Option<Secret>,
    /// `https` only, and required there: the CA bundle (PEM) that must vouch for the endpoint's
    /// certificate. Re-read at each delivery round, so a rotated bundle is taken without a restart.
    #[serde(default)]
    pub ca_certificate: Option<PathBuf>,
    /// `https` only: a client certificate (PEM chain) the bridge presents, with `key`.
    #[serde(default)]
    pub certificate: Option<PathBuf>,
    /// `https` only: the private key (PEM) of `certificate`.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// `https` only: the name the endpoint's certificate must carry, when it is not the URL's host.
    #[serde(default)]
    pub server_name: Option<String>,
}

const URL_PROBLEM: &str = "results.dicomweb.url must be http://host:port/path or https://host:port/path (without a query)";
const CA_REQUIRED: &str = "results.dicomweb.ca_certificate (the CA bundle that signs the endpoint's certificate) is required for an https url";
const TLS_WITHOUT_HTTPS: &str =
    "results.dicomweb.ca_certificate, certificate, key and server_name apply to an https url only";
const CLIENT_PAIR: &str =
    "results.dicomweb.certificate and results.dicomweb.key are given together or not at all";
const SERVER_NAME: &str =
    "results.dicomweb.server_name (or the url's host) is not a valid DNS name or IP address";

impl DicomWebDestination {
    pub fn validate(&self) -> Result<(), &'static str> {
        let uri = self.studies_uri()?;
        let https = uri.scheme_str() == Some("https");
        let tls_given = self.ca_certificate.is_some()
            || self.certificate.is_some()
            || self.key.is_some()
            || self.server_name.is_some();
        if !https && tls_given {
            return Err(TLS_WITHOUT_HTTPS);
        }
        if https {
            if self.ca_certificate.is_none() {
                return Err(CA_REQUIRED);
            }
            if self.certificate.is_some() != self.key.is_some() {
                return Err(CLIENT_PAIR);
            }
            self.server_name(&uri)?;
        }
        Ok(())
    }

    /// The Store Instances resource: the service root with `/studies` appended.
    fn studies_uri(&self) -> Result<Uri, &'static str> {
        let uri: Uri = format!("{}/studies", self.url.trim_end_matches('/'))
            .parse()
            .map_err(|_| URL_PROBLEM)?;
        if !matches!(uri.scheme_str(), Some("http" | "https"))
            || uri.host().is_none()
            || uri.query().is_some()
        {
            return Err(URL_PROBLEM);
        }
        Ok(uri)
    }

    fn server_name(&self, uri: &Uri) -> Result<ServerName<'static>, &'static str> {
        let host = match &self.server_name {
            Some(name) => name.as_str(),
            // An IPv6 host comes bracketed in a URL.
            None => uri
                .host()
                .unwrap_or_default()
                .trim_start_matches('[')
                .trim_end_matches(']'),
        };
        ServerName::try_from(host.to_owned()).map_err(|_| SERVER_NAME)
    }

    /// The TLS client configuration for an `https` endpoint: only the configured CA bundle is
    /// trusted; the client certificate is presented when configured.
    pub fn tls_client_config(&self) -> Result<Arc<rustls::ClientConfig>, DeliveryError> {
        let unusable = |what: &str, path: &Path, error: &dyn std::fmt::Display| {
            DeliveryError::Associate(format!(
                "results.dicomweb.{what} ({}) cannot be used: {error}",
                path.display()
            ))
        };
        let ca_path = self
            .ca_certificate
            .as_deref()
            .ok_or_else(|| DeliveryError::Associate(CA_REQUIRED.to_owned()))?;
        let ca =
            std::fs::read(ca_path).map_err(|error| unusable("ca_certificate", ca_path, &error))?;
        let mut roots = rustls::RootCertStore::empty();
        for certificate in CertificateDer::pem_slice_iter(&ca) {
            let certificate =
                certificate.map_err(|error| unusable("ca_certificate", ca_path, &error))?;
            roots
                .add(certificate)
                .map_err(|error| unusable("ca_certificate", ca_path, &error))?;
        }
        if roots.is_empty() {
            return Err(unusable(
                "ca_certificate",
                ca_path,
                &"no certificate in the file",
            ));
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)
        .map_err(|error| DeliveryError::Associate(error.to_string()))?
        .with_root_certificates(roots);
        let mut config = match (&self.certificate, &self.key) {
            (Some(certificate_path), Some(key_path)) => {
                let chain = CertificateDer::pem_file_iter(certificate_path)
                    .and_then(|chain| chain.collect::<Result<Vec<_>, _>>())
                    .map_err(|error| unusable("certificate", certificate_path, &error))?;
                let key = PrivateKeyDer::from_pem_file(key_path)
                    .map_err(|error| unusable("key", key_path, &error))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|error| unusable("key", key_path, &error))?
            }
            _ => builder.with_no_client_auth(),
        };
        // The bridge speaks HTTP/1.1 to the endpoint.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
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

/// Sends one report by STOW-RS; `tls` is the client configuration for an `https` endpoint
/// (see [`DicomWebDestination::tls_client_config`]).
pub async fn send_report(
    destination: &DicomWebDestination,
    tls: Option<&Arc<rustls::ClientConfig>>,
    sop_instance_uid: &str,
    dataset: &InMemDicomObject,
) -> Result<(), DeliveryError> {
    let uri = destination
        .studies_uri()
        .map_err(|problem| DeliveryError::Associate(problem.to_owned()))?;
    let https = uri.scheme_str() == Some("https");
    let boundary = format!("medai-{}", uuid::Uuid::new_v4().simple());
    let body = stow_body(sop_instance_uid, dataset, &boundary)?;
    let host = uri
        .host()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let stream = tokio::time::timeout(
        TIMEOUT,
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .map_err(|_| DeliveryError::Associate("connect timed out".to_owned()))?
    .map_err(|error| DeliveryError::Associate(error.to_string()))?;
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
    let (status, answer) = if https {
        let config = match tls {
            Some(config) => config.clone(),
            None => destination.tls_client_config()?,
        };
        let server_name = destination
            .server_name(&uri)
            .map_err(|problem| DeliveryError::Associate(problem.to_owned()))?;
        // An endpoint whose certificate the CA bundle does not vouch for fails here, before
        // anything (the token, the report) is sent.
        let stream = tokio::time::timeout(
            TIMEOUT,
            tokio_rustls::TlsConnector::from(config).connect(server_name, stream),
        )
        .await
        .map_err(|_| DeliveryError::Associate("the TLS handshake timed out".to_owned()))?
        .map_err(|error| {
            DeliveryError::Associate(format!(
                "the TLS handshake with the endpoint failed: {error}"
            ))
        })?;
        exchange(stream, request).await?
    } else {
        exchange(stream, request).await?
    };
    judge_answer(status, &answer, sop_instance_uid)
}

/// One HTTP/1.1 request and its answer on a connected stream (plain or TLS).
async fn exchange<S>(
    stream: S,
    request: Request<Full<Bytes>>,
) -> Result<(StatusCode, Bytes), DeliveryError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|error| DeliveryError::Transport(error.to_string()))?;
    let driver = tokio::spawn(connection);
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
    outcome?
}

impl ReportDelivery {
    /// Sends the due reports, then the due amended reports, by STOW-RS; an unreachable (or
    /// untrusted) endpoint defers the whole batch with back-off.
    pub(crate) async fn deliver_over_dicomweb(
        &self,
        due: &[StoredInstance],
        amendments: &[StoredInstance],
        destination: &DicomWebDestination,
    ) -> Result<DeliverySummary, sea_orm::DbErr> {
        let mut summary = DeliverySummary::default();
        // Read once per round (a rotated CA bundle or client certificate is picked up at the
        // next); unusable material defers the round like an unreachable endpoint.
        let tls = if destination.url.starts_with("https") {
            match destination.tls_client_config() {
                Ok(config) => Some(config),
                Err(error) => {
                    tracing::warn!(error = %error, "the DICOMweb TLS material cannot be used; reports retried with back-off");
                    for row in due {
                        self.failed(row).await?;
                        summary.failed += 1;
                    }
                    for row in amendments {
                        self.amendment_failed(row).await?;
                        summary.failed += 1;
                    }
                    return Ok(summary);
                }
            }
        } else {
            None
        };
        if self
            .send_by_stow_rs(
                ReportKind::Preliminary,
                due,
                destination,
                tls.as_ref(),
                &mut summary,
            )
            .await?
        {
            return Ok(summary);
        }
        // Amended reports of results signed since: the same attempts and back-off.
        self.send_by_stow_rs(
            ReportKind::Amended,
            amendments,
            destination,
            tls.as_ref(),
            &mut summary,
        )
        .await?;
        Ok(summary)
    }
}

/// Which report of a source instance a row stands for.
#[derive(Clone, Copy)]
enum ReportKind {
    Preliminary,
    Amended,
}

impl ReportDelivery {
    /// Sends each row's report of `kind` in turn; a failure defers that row with back-off, and an
    /// unreachable endpoint defers the rest too. Returns whether the endpoint was unreachable.
    async fn send_by_stow_rs(
        &self,
        kind: ReportKind,
        rows: &[StoredInstance],
        destination: &DicomWebDestination,
        tls: Option<&Arc<rustls::ClientConfig>>,
        summary: &mut DeliverySummary,
    ) -> Result<bool, sea_orm::DbErr> {
        for (index, row) in rows.iter().enumerate() {
            let report = match kind {
                ReportKind::Preliminary => self.report_of(row),
                ReportKind::Amended => self.amended_report_of(row),
            };
            let sent = match report {
                Ok(report) => {
                    send_report(destination, tls, &report.sop_instance_uid, &report.dataset)
                        .await
                        .map(|()| report.sop_instance_uid)
                }
                Err(error) => Err(error),
            };
            match sent {
                Ok(report_uid) => {
                    match kind {
                        ReportKind::Preliminary => {
                            self.outbox.record_reported(&row.tag, &report_uid).await?;
                            metrics::counter!("medai_bridge_reports_delivered_total").increment(1);
                        }
                        ReportKind::Amended => {
                            self.outbox.record_amended(&row.tag, &report_uid).await?;
                            metrics::counter!("medai_bridge_amended_reports_delivered_total")
                                .increment(1);
                        }
                    }
                    summary.delivered += 1;
                }
                Err(error) => {
                    tracing::warn!(error = %error, attempts = row.report_attempts + 1, "report not delivered by STOW-RS; retried with back-off");
                    let unreachable = is_unreachable(&error);
                    let deferred = if unreachable {
                        &rows[index..]
                    } else {
                        &rows[index..=index]
                    };
                    for row in deferred {
                        match kind {
                            ReportKind::Preliminary => self.failed(row).await?,
                            ReportKind::Amended => self.amendment_failed(row).await?,
                        }
                        summary.failed += 1;
                    }
                    if unreachable {
                        return Ok(true);
                    }
                }
            }
        }
        Ok(false)
    }
}

/// The endpoint could not be reached (or proved not to be the configured one): the rest of the
/// round would fail the same way.
fn is_unreachable(error: &DeliveryError) -> bool {
    matches!(
        error,
        DeliveryError::Associate(_) | DeliveryError::Transport(_)
    )
}
