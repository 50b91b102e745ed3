//! `medai_tls_certificate_expiry_timestamp_seconds{certificate}`: when the service's own
//! certificate (`certificate="service"`) and the mesh CA (`certificate="ca"`) stop being valid,
//! set whenever the PEM material is loaded (at start and on every reload), so an alert can fire
//! days before a certificate that cert-manager failed to renew expires.

use x509_parser::pem::Pem;

pub const EXPIRY_GAUGE: &str = "medai_tls_certificate_expiry_timestamp_seconds";

pub(crate) fn describe() {
    metrics::describe_gauge!(
        EXPIRY_GAUGE,
        metrics::Unit::Seconds,
        "When a certificate the service presents or trusts stops being valid (notAfter), in seconds since the unix epoch; certificate is \"service\" or \"ca\"."
    );
}

/// The earliest notAfter among the certificates of a PEM bundle, in seconds since the epoch.
pub fn earliest_expiry(pem: &[u8]) -> Option<i64> {
    Pem::iter_from_buffer(pem)
        .filter_map(Result::ok)
        .filter(|block| block.label == "CERTIFICATE")
        .filter_map(|block| {
            block
                .parse_x509()
                .ok()
                .map(|certificate| certificate.validity().not_after.timestamp())
        })
        .min()
}

/// Sets the gauge for the service's certificate chain and its CA bundle.
pub fn record(cert_pem: &[u8], ca_pem: &[u8]) {
    for (certificate, pem) in [("service", cert_pem), ("ca", ca_pem)] {
        if let Some(expiry) = earliest_expiry(pem) {
            metrics::gauge!(EXPIRY_GAUGE, "certificate" => certificate).set(expiry as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_expiry_of_a_pem_certificate_is_its_not_after() {
        let mut params =
            rcgen::CertificateParams::new(vec!["medai-test".to_owned()]).expect("params");
        params.not_after = rcgen::date_time_ymd(2031, 5, 17);
        let key = rcgen::KeyPair::generate().expect("key");
        let certificate = params.self_signed(&key).expect("certificate");
        // 2031-05-17T00:00:00Z
        assert_eq!(
            earliest_expiry(certificate.pem().as_bytes()),
            Some(1_936_742_400)
        );
        assert_eq!(earliest_expiry(b"not a certificate"), None);
    }
}
