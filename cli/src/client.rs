//! A client of the gateway as an external caller sees it: server-authenticated TLS against
//! the mesh CA (optionally with a client certificate, like grpcurl's `-cacert`, `-cert`,
//! `-key` and `-servername`), and a bearer token on every call but Login. Failures to connect
//! are classified (no scheme, unreachable, certificate refused) so the command can say which.

use std::path::{Path, PathBuf};
use std::time::Duration;

use medai_proto::gateway::v1::gateway_service_client::GatewayServiceClient;
use medai_proto::inference::v1::inference_service_client::InferenceServiceClient;
use medai_runtime::unprocessed::RetryNeverProcessed;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Images up to the gateway's default limit, plus framing.
const MAX_MESSAGE: usize = 51 * 1024 * 1024;

/// How long a connection attempt may take before the server counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read the CA certificate {path}: {reason}")]
    CaCertificate { path: String, reason: String },
    #[error("cannot read the client certificate or key {path}: {reason}")]
    ClientIdentity { path: String, reason: String },
    #[error("--cert and --key go together: give both or neither")]
    IncompleteIdentity,
    #[error("the URL {endpoint} has no scheme: write https://{endpoint}")]
    NoScheme { endpoint: String },
    #[error("the URL {endpoint} is not valid: {reason}")]
    InvalidUrl { endpoint: String, reason: String },
    #[error("cannot reach {endpoint}: {reason} (is the service running there?)")]
    Unreachable { endpoint: String, reason: String },
    #[error(
        "the certificate of {endpoint} is not accepted: {reason} (check --cacert and --servername)"
    )]
    Certificate { endpoint: String, reason: String },
    #[error("TLS with {endpoint} failed: {reason}")]
    Tls { endpoint: String, reason: String },
    #[error("cannot connect to {endpoint}: {reason}")]
    Connect { endpoint: String, reason: String },
}

/// Every call to the gateway is sent again when the gateway provably never processed it (a
/// draining replica's GOAWAY; see `medai_runtime::unprocessed`), whatever it changes.
pub type GatewayClient = GatewayServiceClient<RetryNeverProcessed<Channel>>;
/// The same for every call straight to the inference service (`medai models`): a lifecycle
/// change a draining replica never processed is sent again, one it may have run never is.
pub type InferenceClient = InferenceServiceClient<RetryNeverProcessed<Channel>>;

/// How to reach a server: its URL, the CA to trust, the name its certificate must carry, and
/// an optional client certificate.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    pub endpoint: String,
    pub ca_certificate: PathBuf,
    /// The DNS name the server's certificate must carry (`medai-gateway`).
    pub server_name: String,
    /// A client certificate and its key (PEM), for mTLS.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// Connects to the gateway at `endpoint` (`https://127.0.0.1:50051`), trusting `ca_certificate`.
pub async fn connect_gateway(
    endpoint: &str,
    ca_certificate: &Path,
) -> Result<GatewayClient, ClientError> {
    connect_gateway_with(&ConnectOptions {
        endpoint: endpoint.to_owned(),
        ca_certificate: ca_certificate.to_owned(),
        server_name: "medai-gateway".to_owned(),
        identity: None,
    })
    .await
}

pub async fn connect_gateway_with(options: &ConnectOptions) -> Result<GatewayClient, ClientError> {
    let channel = connect(options).await?;
    Ok(GatewayServiceClient::new(RetryNeverProcessed::new(channel))
        .max_encoding_message_size(MAX_MESSAGE)
        .max_decoding_message_size(MAX_MESSAGE))
}

/// The inference service directly (model lifecycle), with the operator's certificate; calls
/// go through the same resend layer as the gateway's ([`GatewayClient`]).
pub async fn connect_inference(options: &ConnectOptions) -> Result<InferenceClient, ClientError> {
    Ok(InferenceServiceClient::new(RetryNeverProcessed::new(
        connect(options).await?,
    )))
}

/// Opens a TLS channel and classifies what went wrong if it cannot.
pub async fn connect(options: &ConnectOptions) -> Result<Channel, ClientError> {
    let endpoint = options.endpoint.as_str();
    check_scheme(endpoint)?;
    let ca =
        std::fs::read(&options.ca_certificate).map_err(|error| ClientError::CaCertificate {
            path: options.ca_certificate.display().to_string(),
            reason: error.to_string(),
        })?;
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name(options.server_name.clone());
    if let Some((certificate, key)) = &options.identity {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|error| ClientError::ClientIdentity {
                path: path.display().to_string(),
                reason: error.to_string(),
            })
        };
        tls = tls.identity(Identity::from_pem(read(certificate)?, read(key)?));
    }
    let invalid = |reason: String| ClientError::InvalidUrl {
        endpoint: endpoint.to_owned(),
        reason,
    };
    Endpoint::from_shared(endpoint.to_owned())
        .map_err(|error| invalid(error.to_string()))?
        .tls_config(tls)
        .map_err(|error| invalid(error.to_string()))?
        .connect_timeout(CONNECT_TIMEOUT)
        .connect()
        .await
        .map_err(|error| classify_connect_error(endpoint, &error))
}

fn check_scheme(endpoint: &str) -> Result<(), ClientError> {
    if endpoint.starts_with("https://") {
        return Ok(());
    }
    if let Some(rest) = endpoint.strip_prefix("http://") {
        return Err(ClientError::InvalidUrl {
            endpoint: endpoint.to_owned(),
            reason: format!("the mesh speaks TLS only: write https://{rest}"),
        });
    }
    if endpoint.contains("://") {
        return Err(ClientError::InvalidUrl {
            endpoint: endpoint.to_owned(),
            reason: "the scheme must be https".to_owned(),
        });
    }
    Err(ClientError::NoScheme {
        endpoint: endpoint.to_owned(),
    })
}

/// Every message in an error's source chain, outermost first.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> Vec<String> {
    let mut messages = Vec::new();
    let mut current = Some(error);
    while let Some(error) = current {
        messages.push(error.to_string());
        current = error.source();
    }
    messages
}

fn classify_connect_error(
    endpoint: &str,
    error: &(dyn std::error::Error + 'static),
) -> ClientError {
    let chain = error_chain(error);
    let innermost = chain.last().cloned().unwrap_or_default();
    let endpoint = endpoint.to_owned();
    let mentions = |needle: &str| {
        chain
            .iter()
            .any(|message| message.to_ascii_lowercase().contains(needle))
    };
    if mentions("certificate") || mentions("notvalidforname") || mentions("unknownissuer") {
        return ClientError::Certificate {
            endpoint,
            reason: innermost,
        };
    }
    if mentions("connection refused")
        || mentions("dns error")
        || mentions("timed out")
        || mentions("no route to host")
        || mentions("network is unreachable")
        || mentions("failed to lookup address")
    {
        return ClientError::Unreachable {
            endpoint,
            reason: innermost,
        };
    }
    if mentions("tls") || mentions("handshake") || mentions("alert") {
        return ClientError::Tls {
            endpoint,
            reason: innermost,
        };
    }
    ClientError::Connect {
        endpoint,
        reason: chain.join(": "),
    }
}

/// Wraps `message` with `authorization: Bearer <token>`.
pub fn authorised<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(value) = MetadataValue::try_from(format!("Bearer {token}")) {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_without_scheme_is_named_with_the_fix() {
        let error = check_scheme("127.0.0.1:50051").expect_err("no scheme");
        assert_eq!(
            error.to_string(),
            "the URL 127.0.0.1:50051 has no scheme: write https://127.0.0.1:50051"
        );
        assert!(matches!(
            check_scheme("http://localhost:1"),
            Err(ClientError::InvalidUrl { .. })
        ));
        assert!(check_scheme("https://localhost:1").is_ok());
    }
}
