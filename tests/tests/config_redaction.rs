//! `--print-config` and `Debug` never show a credential: every URL-bearing field of every
//! service's config holds a password here, and none of them may appear in what is shown.

use std::collections::BTreeMap;

use medai_runtime::config::{load_config, redacted_view};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Process and TLS settings every service needs, plus an OTLP endpoint with a password.
fn common(prefix: &str) -> Vec<(String, String)> {
    [
        ("PROCESS__LISTEN_ADDR", "127.0.0.1:0"),
        (
            "PROCESS__OTLP_ENDPOINT",
            "http://otlp-user:otlp-pass-0@collector:4317",
        ),
        ("TLS__CA_CERT", "/pki/ca.pem"),
        ("TLS__CERT", "/pki/service.pem"),
        ("TLS__KEY", "/pki/service-key.pem"),
    ]
    .iter()
    .map(|(key, value)| (format!("{prefix}{key}"), (*value).to_owned()))
    .collect()
}

/// Loads `T` from `settings` (without the prefix) and checks that neither its `Debug` nor
/// its printed form (what `--print-config` prints) contains any of `passwords`.
fn assert_shown_without<T: DeserializeOwned + Serialize + std::fmt::Debug>(
    prefix: &str,
    settings: &[(&str, &str)],
    passwords: &[&str],
) {
    let mut environment: BTreeMap<String, String> = common(prefix).into_iter().collect();
    environment.extend(
        settings
            .iter()
            .map(|(key, value)| (format!("{prefix}{key}"), (*value).to_owned())),
    );
    let config: T = load_config(prefix, None, &environment).expect("a valid config");
    let debugged = format!("{config:?}");
    let printed =
        toml::to_string_pretty(&redacted_view(&config).expect("printable")).expect("toml");
    for shown in [&debugged, &printed] {
        for password in passwords.iter().chain(["otlp-pass-0"].iter()) {
            assert!(!shown.contains(password), "{password} shown in:\n{shown}");
        }
        assert!(shown.contains("<redacted>"), "{shown}");
        assert!(shown.contains("/pki/ca.pem"), "the rest is shown: {shown}");
    }
}

#[test]
fn audit_config_shows_no_database_password() {
    assert_shown_without::<medai_audit::AuditConfig>(
        medai_audit::config::ENV_PREFIX,
        &[
            (
                "DATABASE_URL",
                "postgres://medai_ledger_writer:audit-pass-1@db:5432/audit",
            ),
            (
                "MIGRATION_DATABASE_URL",
                "postgres://medai_owner:owner-pass-2@db:5432/audit?sslmode=require",
            ),
            ("CHECKPOINT_KEY_FILE", "/keys/checkpoint.key"),
        ],
        &["audit-pass-1", "owner-pass-2"],
    );
}

#[test]
fn auth_config_shows_no_database_redis_or_admin_password() {
    assert_shown_without::<medai_auth::AuthConfig>(
        medai_auth::config::ENV_PREFIX,
        &[
            ("DATABASE_URL", "postgres://auth:auth-pass-3@db/auth"),
            (
                "AUDIT_ENDPOINT",
                "https://svc:endpoint-pass-4@medai-audit:50051",
            ),
            (
                "REVOCATION__REDIS_URL",
                "redis://:redis-pass-5@redis:6379/0",
            ),
            ("BOOTSTRAP_ADMIN__USERNAME", "admin"),
            ("BOOTSTRAP_ADMIN__PASSWORD", "admin-pass-6"),
        ],
        &[
            "auth-pass-3",
            "endpoint-pass-4",
            "redis-pass-5",
            "admin-pass-6",
        ],
    );
}

#[test]
fn gateway_config_shows_no_redis_password() {
    assert_shown_without::<medai_gateway::GatewayConfig>(
        medai_gateway::config::ENV_PREFIX,
        &[
            (
                "AUTH_ENDPOINT",
                "https://a:auth-endpoint-pass-7@medai-auth:1",
            ),
            (
                "VALIDATION_ENDPOINT",
                "https://v:validation-pass-8@medai-validation:1",
            ),
            (
                "INFERENCE_ENDPOINT",
                "https://i:inference-pass-9@medai-inference:1",
            ),
            (
                "AUDIT_ENDPOINT",
                "https://l:audit-endpoint-pass-10@medai-audit:1",
            ),
            (
                "REVOCATION__REDIS_URL",
                "redis://:revocation-pass-11@redis:6379",
            ),
            (
                "LOAD_CONTROL__REDIS_URL",
                "redis://limits:load-control-pass-12@redis:6379/1",
            ),
        ],
        &[
            "auth-endpoint-pass-7",
            "validation-pass-8",
            "inference-pass-9",
            "audit-endpoint-pass-10",
            "revocation-pass-11",
            "load-control-pass-12",
        ],
    );
}

#[test]
fn inference_config_shows_no_database_password() {
    assert_shown_without::<medai_inference::InferenceConfig>(
        medai_inference::config::ENV_PREFIX,
        &[
            ("MODEL_REPOSITORY", "/models"),
            ("ONNXRUNTIME_LIBRARY", "/lib/libonnxruntime.so"),
            (
                "DATABASE_URL",
                "postgres://results:results-pass-13@db/results",
            ),
            (
                "AUDIT_ENDPOINT",
                "https://l:audit-endpoint-pass-14@medai-audit:1",
            ),
        ],
        &["results-pass-13", "audit-endpoint-pass-14"],
    );
}

#[test]
fn validation_config_shows_no_patient_key_secret() {
    assert_shown_without::<medai_validation::ValidationConfig>(
        medai_validation::config::ENV_PREFIX,
        &[("PATIENT_KEY_SECRET", "patient-key-secret-15")],
        &["patient-key-secret-15"],
    );
}

#[test]
fn revocation_and_load_control_settings_alone_show_no_redis_password() {
    let revocation = medai_revocation::RevocationSettings {
        redis_url: Some("redis://:alone-pass-16@redis:6379".to_owned()),
        ..Default::default()
    };
    let load_control = medai_gateway::load_control::LoadControlSettings {
        redis_url: Some("redis://u:alone-pass-17@redis:6379".to_owned()),
        ..Default::default()
    };
    let shown = format!("{revocation:?} {load_control:?}");
    assert!(!shown.contains("alone-pass-16"), "{shown}");
    assert!(!shown.contains("alone-pass-17"), "{shown}");
    assert!(shown.contains("redis://:<redacted>@redis:6379"), "{shown}");
}

/// The real binary, configured through its environment as a pod would be.
#[test]
fn medai_auth_print_config_prints_no_password() {
    let binary = medai_testkit::binaries_dir().join("medai-auth");
    assert!(
        binary.is_file(),
        "build the binaries first (cargo build --workspace --bins)"
    );
    let prefix = medai_auth::config::ENV_PREFIX;
    let mut command = std::process::Command::new(&binary);
    command
        .arg("--print-config")
        .env_clear()
        .envs(common(prefix));
    for (key, value) in [
        ("DATABASE_URL", "postgres://auth:binary-pass-18@db/auth"),
        ("AUDIT_ENDPOINT", "https://medai-audit:50051"),
        (
            "REVOCATION__REDIS_URL",
            "redis://:binary-pass-19@redis:6379",
        ),
        ("BOOTSTRAP_ADMIN__USERNAME", "admin"),
        ("BOOTSTRAP_ADMIN__PASSWORD", "binary-pass-20"),
    ] {
        command.env(format!("{prefix}{key}"), value);
    }
    let output = command.output().expect("run medai-auth --print-config");
    assert!(output.status.success(), "{output:?}");
    let printed = String::from_utf8(output.stdout).expect("utf-8");
    for password in [
        "binary-pass-18",
        "binary-pass-19",
        "binary-pass-20",
        "otlp-pass-0",
    ] {
        assert!(
            !printed.contains(password),
            "{password} printed:\n{printed}"
        );
    }
    assert!(
        printed.contains("postgres://auth:<redacted>@db/auth"),
        "{printed}"
    );
    assert!(
        printed.contains("redis://:<redacted>@redis:6379"),
        "{printed}"
    );
}
