//! Service identities carried in certificates as SPIFFE-style URI SANs
//! (`spiffe://medai/<name>`), and how a server reads its peer's identity.

use std::fmt;

use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

pub const SPIFFE_PREFIX: &str = "spiffe://medai/";

/// The name of a mesh service (or a tool) as its certificate states it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceIdentity(String);

impl ServiceIdentity {
    pub fn new(name: impl Into<String>) -> Self {
        Self(name.into())
    }

    pub fn name(&self) -> &str {
        &self.0
    }

    pub fn spiffe_uri(&self) -> String {
        format!("{SPIFFE_PREFIX}{}", self.0)
    }

    /// Reads the identity from a DER certificate's URI SANs.
    pub fn from_certificate_der(der: &[u8]) -> Option<Self> {
        let (_, certificate) = X509Certificate::from_der(der).ok()?;
        let san = certificate.subject_alternative_name().ok()??;
        san.value.general_names.iter().find_map(|name| match name {
            GeneralName::URI(uri) => uri.strip_prefix(SPIFFE_PREFIX).map(Self::new),
            _ => None,
        })
    }

    /// The identity of the peer on a request's TLS connection, if it presented a client
    /// certificate that the server's CA verified.
    pub fn of_peer<B>(request: &http::Request<B>) -> Option<Self> {
        let info = request
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()?;
        let certificates = info.peer_certs()?;
        let leaf = certificates.first()?;
        Self::from_certificate_der(leaf.as_ref())
    }

    /// The same, for a request a tonic handler holds.
    pub fn of_grpc_peer<T>(request: &tonic::Request<T>) -> Option<Self> {
        let certificates = request.peer_certs()?;
        let leaf = certificates.first()?;
        Self::from_certificate_der(leaf.as_ref())
    }
}

impl fmt::Display for ServiceIdentity {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}
