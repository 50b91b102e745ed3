//! The bridge's typed configuration, loaded by `medai_runtime::config::load_config` with the
//! prefix `MEDAI_BRIDGE_` (for example `MEDAI_BRIDGE_GATEWAY__PASSWORD`).

use std::net::SocketAddr;
use std::path::PathBuf;

use medai_runtime::config::{Secret, from_str_or_native};
use serde::{Deserialize, Deserializer, Serialize};

pub const ENV_PREFIX: &str = "MEDAI_BRIDGE_";

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    /// Where the DICOM Storage SCP listens (DIMSE over the DICOM upper layer).
    pub dicom_listen_addr: SocketAddr,
    #[serde(default = "default_log_filter")]
    pub log_filter: String,
    /// Traces (OTLP) and the admin (metrics) port; see `crate::telemetry`.
    #[serde(default)]
    pub telemetry: crate::telemetry::TelemetrySettings,
    /// If set, the bound addresses are written here as JSON (`{"dicom": …, "admin": …}`).
    #[serde(default)]
    pub address_file: Option<PathBuf>,
    /// The outbox and UID mappings: `sqlite://…?mode=rwc` (default) or `postgres://…`.
    pub database_url: String,
    pub scp: ScpSettings,
    pub gateway: GatewaySettings,
    pub results: ResultDestination,
    /// DICOMweb STOW-RS in (`POST /studies`); absent means the bridge takes DIMSE only.
    #[serde(default)]
    pub stow: Option<crate::stow::StowSettings>,
    /// The root under which the bridge makes new UIDs for its Structured Reports.
    pub uid_root: String,
    /// How long a study must receive nothing before it is judged complete and sent.
    #[serde(
        default = "default_quiet_period_ms",
        deserialize_with = "from_str_or_native"
    )]
    pub study_quiet_period_ms: u64,
    /// How often the outbox is looked at for complete studies and results to deliver.
    #[serde(
        default = "default_poll_interval_ms",
        deserialize_with = "from_str_or_native"
    )]
    pub poll_interval_ms: u64,
    /// How often the gateway's results are looked at for signatures of reported results (each
    /// look is one recorded ListResults read; only made while some reported result is unsigned).
    #[serde(
        default = "default_signature_poll_interval_ms",
        deserialize_with = "from_str_or_native"
    )]
    pub signature_poll_interval_ms: u64,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScpSettings {
    /// The bridge's own AE title; associations calling another title are rejected.
    pub ae_title: String,
    /// Calling AE titles allowed to associate (a list, or comma-separated in the environment).
    #[serde(deserialize_with = "list_or_comma_separated")]
    pub allowed_calling_ae_titles: Vec<String>,
    /// Largest PDU the bridge accepts (bytes); also what it announces.
    #[serde(
        default = "default_max_pdu_length",
        deserialize_with = "from_str_or_native"
    )]
    pub max_pdu_length: u32,
    /// Largest instance (data set bytes) accepted; a larger one aborts the association.
    #[serde(
        default = "default_max_instance_bytes",
        deserialize_with = "from_str_or_native"
    )]
    pub max_instance_bytes: usize,
    /// Associations served at once; more are closed at connect.
    #[serde(
        default = "default_max_associations",
        deserialize_with = "from_str_or_native"
    )]
    pub max_associations: usize,
    /// An association silent for this long is dropped.
    #[serde(
        default = "default_idle_seconds",
        deserialize_with = "from_str_or_native"
    )]
    pub idle_timeout_seconds: u64,
    /// DICOM TLS on the listener (absent: plain TCP).
    #[serde(default)]
    pub tls: Option<crate::dicom_tls::ScpTls>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySettings {
    /// `https://host:port` of the gateway.
    pub endpoint: String,
    /// The CA that signed the gateway's certificate (the mesh CA).
    pub ca_certificate: PathBuf,
    /// The name the gateway's certificate carries.
    #[serde(default = "default_gateway_domain")]
    pub domain_name: String,
    /// The bridge's own user on the gateway (role clinician or admin).
    pub username: String,
    pub password: Secret,
    pub model_name: String,
    /// Empty asks for the active version; the idempotency key names what is configured.
    #[serde(default)]
    pub model_version: String,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ResultDestination {
    /// `host:port` of the AE that receives the Structured Reports (usually the PACS); not
    /// needed when the reports go by STOW-RS (`dicomweb`).
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub ae_title: String,
    /// Send the reports by DICOMweb STOW-RS to this endpoint instead of by C-STORE, with the
    /// same attempts and back-off.
    #[serde(default)]
    pub dicomweb: Option<crate::dicomweb::DicomWebDestination>,
    #[serde(
        default = "default_max_attempts",
        deserialize_with = "from_str_or_native"
    )]
    pub max_attempts: u32,
    #[serde(
        default = "default_initial_backoff_ms",
        deserialize_with = "from_str_or_native"
    )]
    pub initial_backoff_ms: u64,
    #[serde(
        default = "default_max_backoff_ms",
        deserialize_with = "from_str_or_native"
    )]
    pub max_backoff_ms: u64,
    /// DICOM TLS to the destination (absent: plain TCP).
    #[serde(default)]
    pub tls: Option<crate::dicom_tls::DestinationTls>,
}

fn default_log_filter() -> String {
    "info".to_owned()
}
fn default_quiet_period_ms() -> u64 {
    10_000
}
fn default_poll_interval_ms() -> u64 {
    500
}
fn default_signature_poll_interval_ms() -> u64 {
    60_000
}
fn default_max_pdu_length() -> u32 {
    65_536
}
fn default_max_instance_bytes() -> usize {
    64 * 1024 * 1024
}
fn default_max_associations() -> usize {
    16
}
fn default_idle_seconds() -> u64 {
    60
}
fn default_gateway_domain() -> String {
    "medai-gateway".to_owned()
}
fn default_max_attempts() -> u32 {
    10
}
fn default_initial_backoff_ms() -> u64 {
    500
}
fn default_max_backoff_ms() -> u64 {
    60_000
}

fn list_or_comma_separated<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Text(String),
        List(Vec<String>),
    }
    Ok(match Either::deserialize(deserializer)? {
        Either::Text(text) => text
            .split(',')
            .map(str::trim)
            .filter(|title| !title.is_empty())
            .map(str::to_owned)
            .collect(),
        Either::List(list) => list,
    })
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigProblem {
    #[error("uid_root must be digits and dots, without leading zeros, at most 40 characters")]
    UidRoot,
    #[error("an AE title must be 1 to 16 characters without backslash or control characters")]
    AeTitle,
    #[error("max_pdu_length must be between 4096 and 131072")]
    MaxPduLength,
    #[error("{0}")]
    DicomWeb(&'static str),
}

impl BridgeConfig {
    /// Checks what serde cannot: UID root syntax, AE titles, PDU size bounds.
    pub fn validate(&self) -> Result<(), ConfigProblem> {
        if !crate::uids::is_valid_root(&self.uid_root) {
            return Err(ConfigProblem::UidRoot);
        }
        // A C-STORE destination needs its title; STOW-RS (issue 15) needs a URL instead.
        let destination_title = match &self.results.dicomweb {
            Some(destination) => {
                destination.validate().map_err(ConfigProblem::DicomWeb)?;
                None
            }
            None => Some(&self.results.ae_title),
        };
        if let Some(stow) = &self.stow {
            stow.validate().map_err(ConfigProblem::DicomWeb)?;
        }
        let titles = std::iter::once(&self.scp.ae_title)
            .chain(&self.scp.allowed_calling_ae_titles)
            .chain(destination_title);
        for title in titles {
            if !is_valid_ae_title(title) {
                return Err(ConfigProblem::AeTitle);
            }
        }
        if !(4096..=131_072).contains(&self.scp.max_pdu_length) {
            return Err(ConfigProblem::MaxPduLength);
        }
        Ok(())
    }
}

pub fn is_valid_ae_title(title: &str) -> bool {
    let trimmed = title.trim();
    !trimmed.is_empty()
        && trimmed.len() <= 16
        && trimmed.chars().all(|character| {
            character.is_ascii() && !character.is_ascii_control() && character != '\\'
        })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    const FILE: &str = r#"
dicom_listen_addr = "127.0.0.1:0"
database_url = "sqlite::memory:"
uid_root = "1.2.826.0.1.3680043.10.1234"
[scp]
ae_title = "MEDAI_BRIDGE"
allowed_calling_ae_titles = ["ORTHANC"]
[gateway]
endpoint = "https://127.0.0.1:1"
ca_certificate = "/ca.pem"
username = "bridge"
password = "a password"
model_name = "synthetic-light"
[results]
address = "127.0.0.1:104"
ae_title = "ORTHANC"
"#;

    fn load(env: &[(&str, &str)]) -> Result<BridgeConfig, medai_runtime::config::ConfigError> {
        let env: BTreeMap<String, String> = env
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect();
        medai_runtime::config::load_config(ENV_PREFIX, Some(FILE), &env)
    }

    #[test]
    fn environment_sets_an_allow_list_as_comma_separated_titles_and_redacts_the_password() {
        let config = load(&[
            (
                "MEDAI_BRIDGE_SCP__ALLOWED_CALLING_AE_TITLES",
                "ORTHANC, STORESCU",
            ),
            ("MEDAI_BRIDGE_STUDY_QUIET_PERIOD_MS", "250"),
        ])
        .expect("valid config");
        assert_eq!(
            config.scp.allowed_calling_ae_titles,
            ["ORTHANC", "STORESCU"]
        );
        assert_eq!(config.study_quiet_period_ms, 250);
        assert_eq!(config.scp.max_pdu_length, 65_536);
        config.validate().expect("valid");
        assert!(!format!("{config:?}").contains("a password"));
    }

    #[test]
    fn unknown_fields_bad_uid_roots_and_bad_ae_titles_are_refused() {
        let unknown = load(&[("MEDAI_BRIDGE_SCP__COLOUR", "red")]).expect_err("unknown field");
        assert!(unknown.to_string().contains("colour"), "{unknown}");

        let mut config = load(&[]).expect("valid");
        config.uid_root = "1.2.03".to_owned();
        assert_eq!(config.validate(), Err(ConfigProblem::UidRoot));
        config.uid_root = "1.2.826.0.1.3680043.10.1234".to_owned();
        config.scp.allowed_calling_ae_titles = vec!["A_TITLE_LONGER_THAN_16".to_owned()];
        assert_eq!(config.validate(), Err(ConfigProblem::AeTitle));
        config.scp.allowed_calling_ae_titles = vec!["ORTHANC".to_owned()];
        config.scp.max_pdu_length = 1 << 30;
        assert_eq!(config.validate(), Err(ConfigProblem::MaxPduLength));
    }
}
