//! Streams each complete study to the gateway's `StudyStream` under the bridge's own login,
//! and keeps each answer in the outbox. Only the tag and the image cross into the mesh; the
//! UIDs stay here. The idempotency key is SHA-256(SOP Instance UID, model, version), so a
//! study sent again after a crash or a cut stream gets the stored results back and the ledger
//! gets no second record.

use std::time::Duration;

use medai_proto::common::v1::ImageFormat;
use medai_proto::gateway::v1::gateway_service_client::GatewayServiceClient;
use medai_proto::gateway::v1::study_stream_response::Outcome;
use medai_proto::gateway::v1::{ListResultsRequest, LoginRequest, StudyStreamRequest};
use medai_runtime::rpc_trace::TracedChannel;
use sha2::{Digest, Sha256};
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use crate::amendment::SignatureOutcome;
use crate::config::GatewaySettings;
use crate::outbox::{Outbox, PendingStudy};
use crate::outcome::InferenceOutcome;

/// Images up to the gateway's default limit, plus framing.
const MAX_MESSAGE: usize = 51 * 1024 * 1024;
const CALL_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("cannot read the gateway CA certificate: {0}")]
    CaCertificate(String),
    #[error("cannot connect to the gateway: {0}")]
    Connect(String),
    #[error("the gateway refused the bridge's login: {0}")]
    Login(String),
    #[error("the study stream failed: {code:?}")]
    Stream { code: tonic::Code },
    #[error("the outbox failed: {0}")]
    Outbox(#[from] sea_orm::DbErr),
}

/// Counts of one study's answers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ForwardSummary {
    pub results: usize,
    pub refused: usize,
    pub retry_later: usize,
}

pub fn idempotency_key(sop_instance_uid: &str, model_name: &str, model_version: &str) -> String {
    let mut hasher = Sha256::new();
    for part in [sop_instance_uid, model_name, model_version] {
        hasher.update(part.as_bytes());
        hasher.update([0u8]);
    }
    hex::encode(hasher.finalize())
}

pub struct StudyForwarder {
    settings: GatewaySettings,
    outbox: Outbox,
    client: Option<GatewayServiceClient<TracedChannel>>,
    token: Option<String>,
}

impl StudyForwarder {
    pub fn new(settings: GatewaySettings, outbox: Outbox) -> Self {
        Self {
            settings,
            outbox,
            client: None,
            token: None,
        }
    }

    async fn client(&mut self) -> Result<GatewayServiceClient<TracedChannel>, ForwardError> {
        if let Some(client) = &self.client {
            return Ok(client.clone());
        }
        let ca = std::fs::read(&self.settings.ca_certificate)
            .map_err(|error| ForwardError::CaCertificate(error.to_string()))?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .domain_name(self.settings.domain_name.clone());
        let channel = Endpoint::from_shared(self.settings.endpoint.clone())
            .map_err(|error| ForwardError::Connect(error.to_string()))?
            .tls_config(tls)
            .map_err(|error| ForwardError::Connect(error.to_string()))?
            .connect_timeout(Duration::from_secs(10))
            .connect()
            .await
            .map_err(|error| ForwardError::Connect(error.to_string()))?;
        let channel = crate::telemetry::traced_gateway_channel(channel, &self.settings.endpoint);
        let client = GatewayServiceClient::new(channel)
            .max_encoding_message_size(MAX_MESSAGE)
            .max_decoding_message_size(MAX_MESSAGE);
        self.client = Some(client.clone());
        Ok(client)
    }

    async fn token(&mut self) -> Result<String, ForwardError> {
        if let Some(token) = &self.token {
            return Ok(token.clone());
        }
        let mut client = self.client().await?;
        let grant = client
            .login(LoginRequest {
                username: self.settings.username.clone(),
                password: self.settings.password.expose().to_owned(),
            })
            .await
            .map_err(|status| ForwardError::Login(format!("{:?}", status.code())))?
            .into_inner()
            .grant
            .ok_or_else(|| ForwardError::Login("no tokens in the answer".to_owned()))?;
        self.token = Some(grant.access_token.clone());
        Ok(grant.access_token)
    }

    /// Sends every unanswered instance of `study` on one stream and stores each answer.
    pub async fn forward(&mut self, study: &PendingStudy) -> Result<ForwardSummary, ForwardError> {
        let token = self.token().await?;
        let mut client = self.client().await?;
        let (sender, receiver) = tokio::sync::mpsc::channel::<StudyStreamRequest>(2);
        let outbox = self.outbox.clone();
        let settings = self.settings.clone();
        let instances = study.instances.clone();
        // Reads one instance at a time from the outbox, so a large study is never all in memory.
        let producer = tokio::spawn(async move {
            for (tag, sop_instance_uid) in instances {
                let Some(image) = outbox.dicom_of(&tag).await? else {
                    continue;
                };
                let request = StudyStreamRequest {
                    idempotency_key: idempotency_key(
                        &sop_instance_uid,
                        &settings.model_name,
                        &settings.model_version,
                    ),
                    tag,
                    image: image.into(),
                    format: ImageFormat::Dicom.into(),
                    model_name: settings.model_name.clone(),
                    model_version: settings.model_version.clone(),
                };
                if sender.send(request).await.is_err() {
                    break;
                }
            }
            Ok::<(), sea_orm::DbErr>(())
        });
        let mut request =
            tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(receiver));
        request.set_timeout(CALL_TIMEOUT);
        if let Ok(value) = MetadataValue::try_from(format!("Bearer {token}")) {
            request.metadata_mut().insert("authorization", value);
        }
        let answers = client.study_stream(request).await;
        let mut answers = match answers {
            Ok(answers) => answers.into_inner(),
            Err(status) => {
                producer.abort();
                return Err(self.stream_failed(status.code()));
            }
        };
        let mut summary = ForwardSummary::default();
        loop {
            let answer = match answers.message().await {
                Ok(Some(answer)) => answer,
                Ok(None) => break,
                Err(status) => {
                    producer.abort();
                    return Err(self.stream_failed(status.code()));
                }
            };
            match answer.outcome {
                Some(Outcome::Result(response)) => match InferenceOutcome::try_from(response) {
                    Ok(outcome) => {
                        let json =
                            serde_json::to_string(&outcome).unwrap_or_else(|_| String::from("{}"));
                        self.outbox.record_result(&answer.tag, json).await?;
                        summary.results += 1;
                    }
                    Err(error) => {
                        tracing::warn!(error = %error, "an answer without its result; retried later");
                        summary.retry_later += 1;
                    }
                },
                Some(Outcome::Error(error)) if is_permanent(error.code) => {
                    tracing::warn!(reason = %error.reason, code = error.code, "the gateway refused an image");
                    self.outbox
                        .record_refusal(&answer.tag, &error.reason)
                        .await?;
                    summary.refused += 1;
                }
                Some(Outcome::Error(error)) => {
                    tracing::warn!(reason = %error.reason, code = error.code, "an image failed for now; retried later");
                    summary.retry_later += 1;
                }
                None => summary.retry_later += 1,
            }
        }
        match producer.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Err(ForwardError::Outbox(error)),
            Err(_) => {}
        }
        Ok(summary)
    }

    /// Signed results of the configured model created since `created_from` (RFC 3339), with
    /// their signatures: how the bridge learns that a reported result was signed. One
    /// ListResults call per page (each is a recorded read in the ledger).
    pub async fn signed_results(
        &mut self,
        created_from: &str,
    ) -> Result<Vec<(String, SignatureOutcome)>, ForwardError> {
        let token = self.token().await?;
        let mut client = self.client().await?;
        let mut signed = Vec::new();
        let mut page_token = String::new();
        // Bounded: at most this many pages per look.
        for _ in 0..20 {
            let mut request = tonic::Request::new(ListResultsRequest {
                filter: Some(medai_proto::inference::v1::ListResultsRequest {
                    model_name: self.settings.model_name.clone(),
                    status: "SIGNED".to_owned(),
                    created_from: created_from.to_owned(),
                    page_size: 500,
                    page_token: page_token.clone(),
                    ..Default::default()
                }),
            });
            request.set_timeout(Duration::from_secs(30));
            if let Ok(value) = MetadataValue::try_from(format!("Bearer {token}")) {
                request.metadata_mut().insert("authorization", value);
            }
            let page = match client.list_results(request).await {
                Ok(page) => page.into_inner(),
                Err(status) => return Err(self.stream_failed(status.code())),
            };
            for result in page.results {
                if let Some(signature) = result.signature {
                    signed.push((
                        result.result_id,
                        SignatureOutcome {
                            signer_name: signature.signer_name,
                            meaning: signature.meaning,
                            reason: signature.reason,
                            signed_at: signature.signed_at,
                            ledger_seq: signature.ledger_seq,
                        },
                    ));
                }
            }
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        Ok(signed)
    }

    fn stream_failed(&mut self, code: tonic::Code) -> ForwardError {
        match code {
            tonic::Code::Unauthenticated => self.token = None,
            tonic::Code::Unavailable => self.client = None,
            _ => {}
        }
        ForwardError::Stream { code }
    }
}

/// Refusals about the image itself; anything else (capacity, outages) is tried again.
fn is_permanent(code: i32) -> bool {
    matches!(
        tonic::Code::from_i32(code),
        tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition | tonic::Code::OutOfRange
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_idempotency_key_names_instance_model_and_version_and_nothing_else() {
        let key = idempotency_key("1.2.3", "synthetic-light", "1");
        assert_eq!(key.len(), 64);
        assert_eq!(key, idempotency_key("1.2.3", "synthetic-light", "1"));
        assert_ne!(key, idempotency_key("1.2.3", "synthetic-light", "2"));
        assert_ne!(key, idempotency_key("1.2.3", "brain-mri-tumor", "1"));
        assert_ne!(key, idempotency_key("1.2.4", "synthetic-light", "1"));
        // Field boundaries count: ("1.2.3", "4x") differs from ("1.2.34", "x").
        assert_ne!(
            idempotency_key("1.2.3", "4x", ""),
            idempotency_key("1.2.34", "x", "")
        );
        assert!(!key.contains("1.2.3"));
    }
}
