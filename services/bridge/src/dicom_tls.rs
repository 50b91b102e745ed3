//! DICOM TLS (PS3.15 Annex B, the BCP 195 secure transport connection profile) for the
//! Storage SCP and for the SCU that sends reports: rustls over certificates read from PEM
//! files as the mesh's are (`medai_runtime::tls`), so the same cert-manager Secret layout works.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use medai_runtime::tls::{ClientCertificates, TlsError, TlsFiles, TlsMaterial};
use serde::{Deserialize, Serialize};

/// TLS on the SCP listener: every association on it is TLS, a plain one is refused.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ScpTls {
    /// The CA that signs the certificates of the modalities allowed to present one.
    pub ca_certificate: PathBuf,
    pub certificate: PathBuf,
    pub key: PathBuf,
    /// Refuse a peer that presents no certificate signed by `ca_certificate`.
    #[serde(default)]
    pub require_client_certificate: bool,
}

/// TLS to the report destination: its certificate is checked against `ca_certificate` for
/// `server_name`, and the bridge presents its own.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DestinationTls {
    pub ca_certificate: PathBuf,
    pub certificate: PathBuf,
    pub key: PathBuf,
    /// The name the destination's certificate carries (a DNS name or an IP address).
    pub server_name: String,
}

fn material(
    ca_certificate: &Path,
    certificate: &Path,
    key: &Path,
) -> Result<TlsMaterial, TlsError> {
    TlsMaterial::load(&TlsFiles {
        ca_cert: ca_certificate.to_owned(),
        cert: certificate.to_owned(),
        key: key.to_owned(),
    })
}

impl ScpTls {
    /// The server configuration; material that does not hold together is refused at start.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let material = material(&self.ca_certificate, &self.certificate, &self.key)?;
        Ok(material.server_config(if self.require_client_certificate {
            ClientCertificates::Required
        } else {
            ClientCertificates::Optional
        }))
    }
}

impl DestinationTls {
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        Ok(material(&self.ca_certificate, &self.certificate, &self.key)?.client_config())
    }
}
