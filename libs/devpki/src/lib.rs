//! A development certificate authority, generated on first run into a state folder, that
//! issues one certificate per mesh service. Each certificate names its service three ways:
//! the URI SAN `spiffe://medai/<service>` (what peer policies check), the DNS name
//! `medai-<service>` (what clients insist on when they connect), and `localhost`/127.0.0.1.
//! Production replaces it with the cluster's own issuer; the file layout stays the same.

use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot write or read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A CA able to issue service certificates.
pub struct DevCertificateAuthority {
    certificate_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its private key, PEM encoded.
pub struct IssuedCertificate {
    pub certificate_pem: String,
    pub private_key_pem: String,
}

impl DevCertificateAuthority {
    /// Generates a fresh CA named `common_name`, valid for ten years.
    pub fn generate(common_name: &str) -> Result<(Self, String), PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = distinguished_name(common_name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        set_validity(&mut params, 3650);
        let certificate = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        let issuer = Issuer::new(params, key);
        Ok((
            Self {
                certificate_pem: certificate.pem(),
                issuer,
            },
            key_pem,
        ))
    }

    /// Loads a CA from its PEM certificate and key.
    pub fn from_pem(certificate_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(certificate_pem, key)?;
        Ok(Self {
            certificate_pem: certificate_pem.to_owned(),
            issuer,
        })
    }

    pub fn certificate_pem(&self) -> &str {
        &self.certificate_pem
    }

    /// Issues a certificate for the mesh service (or tool) `service`, usable as both TLS
    /// server and client, valid for one year.
    pub fn issue(&self, service: &str) -> Result<IssuedCertificate, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = distinguished_name(&format!("medai-{service}"));
        params.subject_alt_names = vec![
            SanType::URI(format!("spiffe://medai/{service}").try_into()?),
            SanType::DnsName(format!("medai-{service}").try_into()?),
            SanType::DnsName("localhost".try_into()?),
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        ];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        set_validity(&mut params, 365);
        let certificate = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCertificate {
            certificate_pem: certificate.pem(),
            private_key_pem: key.serialize_pem(),
        })
    }
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "MedAI Flow development");
    name.push(DnType::CommonName, common_name);
    name
}

fn set_validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days);
}

/// Where the files of a development PKI live inside a state folder.
#[derive(Clone, Debug)]
pub struct PkiLayout {
    pub directory: PathBuf,
}

impl PkiLayout {
    pub fn new(directory: impl Into<PathBuf>) -> Self {
        Self {
            directory: directory.into(),
        }
    }

    pub fn ca_certificate(&self) -> PathBuf {
        self.directory.join("ca.pem")
    }

    fn ca_key(&self) -> PathBuf {
        self.directory.join("ca-key.pem")
    }

    pub fn certificate(&self, service: &str) -> PathBuf {
        self.directory.join(format!("{service}.pem"))
    }

    pub fn key(&self, service: &str) -> PathBuf {
        self.directory.join(format!("{service}-key.pem"))
    }

    /// Creates the CA on first use and a certificate for each of `services` that lacks one.
    /// Files that exist are kept, so restarts keep their identities.
    pub fn ensure(&self, services: &[&str]) -> Result<(), PkiError> {
        fs::create_dir_all(&self.directory).map_err(|source| io_error(&self.directory, source))?;
        let authority = if self.ca_certificate().exists() && self.ca_key().exists() {
            let certificate = read(&self.ca_certificate())?;
            let key = read(&self.ca_key())?;
            DevCertificateAuthority::from_pem(&certificate, &key)?
        } else {
            let (authority, key_pem) =
                DevCertificateAuthority::generate("MedAI Flow development CA")?;
            write_private(&self.ca_key(), &key_pem)?;
            write(&self.ca_certificate(), authority.certificate_pem())?;
            authority
        };
        for service in services {
            if self.certificate(service).exists() && self.key(service).exists() {
                continue;
            }
            let issued = authority.issue(service)?;
            write_private(&self.key(service), &issued.private_key_pem)?;
            write(&self.certificate(service), &issued.certificate_pem)?;
        }
        Ok(())
    }
}

fn io_error(path: &Path, source: std::io::Error) -> PkiError {
    PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

fn read(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| io_error(path, source))
}

fn write(path: &Path, contents: &str) -> Result<(), PkiError> {
    fs::write(path, contents).map_err(|source| io_error(path, source))
}

/// Private keys are readable by their owner only.
fn write_private(path: &Path, contents: &str) -> Result<(), PkiError> {
    write(path, contents)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))
            .map_err(|source| io_error(path, source))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use medai_runtime::ServiceIdentity;

    #[test]
    fn issued_certificates_name_their_service_and_survive_a_reload() {
        let directory = tempfile::tempdir().expect("tempdir");
        let layout = PkiLayout::new(directory.path());
        layout.ensure(&["audit", "gateway"]).expect("pki");
        let first = fs::read(layout.certificate("audit")).expect("cert");
        layout
            .ensure(&["audit", "gateway", "auth"])
            .expect("pki again");
        assert_eq!(
            first,
            fs::read(layout.certificate("audit")).expect("cert"),
            "existing identities are kept"
        );

        let pem = fs::read_to_string(layout.certificate("auth")).expect("auth cert");
        let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("pem");
        let der = parsed.contents;
        assert_eq!(
            ServiceIdentity::from_certificate_der(&der),
            Some(ServiceIdentity::new("auth"))
        );
    }
}
