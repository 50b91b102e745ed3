//! mTLS for every hop: server configs that demand (or, at the gateway, accept) client
//! certificates from the mesh CA, and client channels that present the service's own
//! certificate and check that the server is the service they meant to reach.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig,
};

use crate::identity::ServiceIdentity;

/// PEM files of one service: the CA that signs every mesh certificate, and the service's own
/// certificate and key.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid endpoint {endpoint}: {reason}")]
    Endpoint { endpoint: String, reason: String },
}

/// Whether a server demands a client certificate (every internal service) or only accepts
/// one (the gateway, where PACS clients may use mTLS and people use tokens).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientCertificates {
    Required,
    Optional,
}

/// The PEM material of one service, read once at start.
#[derive(Clone)]
pub struct TlsMaterial {
    ca: Certificate,
    identity: Identity,
}

impl TlsMaterial {
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                path: path.clone(),
                source,
            })
        };
        Ok(Self::from_pem(
            read(&files.ca_cert)?,
            read(&files.cert)?,
            read(&files.key)?,
        ))
    }

    pub fn from_pem(ca_pem: Vec<u8>, cert_pem: Vec<u8>, key_pem: Vec<u8>) -> Self {
        crate::certificate_expiry::record(&cert_pem, &ca_pem);
        Self {
            ca: Certificate::from_pem(ca_pem),
            identity: Identity::from_pem(cert_pem, key_pem),
        }
    }

    pub fn server_config(&self, client_certificates: ClientCertificates) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity.clone())
            .client_ca_root(self.ca.clone())
            .client_auth_optional(client_certificates == ClientCertificates::Optional)
    }

    /// A lazily connecting channel to `endpoint` (for example `https://127.0.0.1:50051`)
    /// that only accepts a server certificate naming `expected_server`.
    pub fn channel(
        &self,
        endpoint: &str,
        expected_server: &ServiceIdentity,
    ) -> Result<Channel, TlsError> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .identity(self.identity.clone())
            .domain_name(server_dns_name(expected_server));
        let invalid = |reason: String| TlsError::Endpoint {
            endpoint: endpoint.to_owned(),
            reason,
        };
        let endpoint = Endpoint::from_shared(endpoint.to_owned())
            .map_err(|error| invalid(error.to_string()))?
            .tls_config(tls)
            .map_err(|error| invalid(error.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        Ok(endpoint.connect_lazy())
    }

    /// [`Self::channel`] with every call counted and timed (`grpc_client_*`): what a service
    /// uses for its calls to another service.
    pub fn metered_channel(
        &self,
        endpoint: &str,
        expected_server: &ServiceIdentity,
    ) -> Result<crate::grpc_client_metrics::MeteredChannel, TlsError> {
        self.channel(endpoint, expected_server)
            .map(crate::grpc_client_metrics::GrpcClientMetrics::new)
    }
}

/// The DNS name every certificate of a mesh service carries, so a client can insist that the
/// server it reached is the service it meant (`medai-audit` for the audit service).
pub fn server_dns_name(service: &ServiceIdentity) -> String {
    format!("medai-{}", service.name())
}
