//! A client of the gateway as an external caller sees it: server-authenticated TLS against
//! the mesh CA, and a bearer token on every call but Login.

use std::path::Path;

use medai_proto::gateway::v1::gateway_service_client::GatewayServiceClient;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// Images up to the gateway's default limit, plus framing.
const MAX_MESSAGE: usize = 51 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read the CA certificate {path}: {reason}")]
    CaCertificate { path: String, reason: String },
    #[error("cannot connect to the gateway at {endpoint}: {reason}")]
    Connect { endpoint: String, reason: String },
}

pub type GatewayClient = GatewayServiceClient<Channel>;

/// Connects to the gateway at `endpoint` (`https://127.0.0.1:50051`), trusting `ca_certificate`.
pub async fn connect_gateway(
    endpoint: &str,
    ca_certificate: &Path,
) -> Result<GatewayClient, ClientError> {
    let ca = std::fs::read(ca_certificate).map_err(|error| ClientError::CaCertificate {
        path: ca_certificate.display().to_string(),
        reason: error.to_string(),
    })?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("medai-gateway");
    let connect_error = |reason: String| ClientError::Connect {
        endpoint: endpoint.to_owned(),
        reason,
    };
    let channel = Endpoint::from_shared(endpoint.to_owned())
        .map_err(|error| connect_error(error.to_string()))?
        .tls_config(tls)
        .map_err(|error| connect_error(error.to_string()))?
        .connect()
        .await
        .map_err(|error| connect_error(error.to_string()))?;
    Ok(GatewayServiceClient::new(channel)
        .max_encoding_message_size(MAX_MESSAGE)
        .max_decoding_message_size(MAX_MESSAGE))
}

/// Wraps `message` with `authorization: Bearer <token>`.
pub fn authorised<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(value) = MetadataValue::try_from(format!("Bearer {token}")) {
        request.metadata_mut().insert("authorization", value);
    }
    request
}
