//! Typed configuration loaded by a pure function of (file text, environment map), so tests
//! build configs without touching the process environment.
//!
//! Environment variables override the file: `MEDAI_AUDIT_DATABASE_URL` sets `database_url`
//! and `MEDAI_AUDIT_TLS__CA_CERT` sets `tls.ca_cert` for the prefix `MEDAI_AUDIT_`.
//! Environment values are strings; numeric fields accept them through [`from_str_or_native`].
//! Unknown fields are refused by each config struct's `deny_unknown_fields`.
//!
//! Kubernetes gives every pod service-link variables for every Service in its namespace
//! (`MEDAI_AUDIT_SERVICE_HOST`, `MEDAI_AUDIT_PORT=tcp://…` for the Service `medai-audit`),
//! and they fall inside the service's own prefix; [`is_service_link_variable`] recognises their
//! shapes so the loader skips them instead of refusing them as unknown fields.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::str::FromStr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file is not valid TOML: {0}")]
    FileSyntax(String),
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error("environment variable {variable} conflicts with another setting")]
    Conflict { variable: String },
}

/// The environment variable that names an optional config file for a service.
pub fn config_file_variable(prefix: &str) -> String {
    format!("{prefix}CONFIG")
}

/// Loads a config of type `T` from an optional TOML document and the environment variables
/// that start with `prefix` (the variable `<prefix>CONFIG` itself is ignored here).
pub fn load_config<T: DeserializeOwned>(
    prefix: &str,
    file_text: Option<&str>,
    env: &BTreeMap<String, String>,
) -> Result<T, ConfigError> {
    let mut root = match file_text {
        Some(text) => toml::from_str::<toml::Table>(text)
            .map_err(|error| ConfigError::FileSyntax(error.message().to_owned()))?,
        None => toml::Table::new(),
    };
    let file_variable = config_file_variable(prefix);
    for (variable, value) in env {
        if variable == &file_variable {
            continue;
        }
        let Some(path) = variable.strip_prefix(prefix) else {
            continue;
        };
        if is_service_link_variable(path) {
            continue;
        }
        let keys: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
        insert_path(&mut root, &keys, value.clone()).map_err(|()| ConfigError::Conflict {
            variable: variable.clone(),
        })?;
    }
    T::deserialize(toml::Value::Table(root))
        .map_err(|error| ConfigError::Invalid(error.to_string()))
}

/// Whether `path` (a variable name after the service's prefix) has one of the shapes of the
/// variables Kubernetes injects for a Service named `<X>` (upper-cased, `-` → `_`):
/// `<X>_SERVICE_HOST`, `<X>_SERVICE_PORT`, `<X>_SERVICE_PORT_<NAME>`, `<X>_PORT`,
/// `<X>_PORT_<n>_<PROTO>` and `<X>_PORT_<n>_<PROTO>_{PROTO,PORT,ADDR}`, where `<X>` may be
/// empty after the prefix (the Service `medai-audit` seen from audit's `MEDAI_AUDIT_`). No
/// config field has these names, and nested keys (`__`) never take these shapes.
pub fn is_service_link_variable(path: &str) -> bool {
    if path.contains("__") {
        return false;
    }
    let words: Vec<&str> = path.split('_').collect();
    let ends_with = |tail: &[&str]| words.len() >= tail.len() && words.ends_with(tail);
    if ends_with(&["SERVICE", "HOST"]) || ends_with(&["SERVICE", "PORT"]) || ends_with(&["PORT"]) {
        return true;
    }
    // `<X>_SERVICE_PORT_<NAME>`: a named port of the Service (names are lower-case DNS labels,
    // upper-cased, `-` → `_`, so the name may itself hold underscores).
    if let Some(position) = words
        .windows(2)
        .position(|pair| pair == ["SERVICE", "PORT"])
        && position + 2 < words.len()
        && words[position + 2..]
            .iter()
            .all(|word| !word.is_empty() && word.chars().all(|c| c.is_ascii_alphanumeric()))
    {
        return true;
    }
    // `<X>_PORT_<n>_<PROTO>` and its `_PROTO`, `_PORT`, `_ADDR` companions.
    let is_protocol = |word: &str| matches!(word, "TCP" | "UDP" | "SCTP");
    let is_number = |word: &str| !word.is_empty() && word.chars().all(|c| c.is_ascii_digit());
    let shape = |tail: &[&str]| {
        tail.len() >= 3 && tail[0] == "PORT" && is_number(tail[1]) && is_protocol(tail[2])
    };
    let length = words.len();
    (length >= 3 && shape(&words[length - 3..]))
        || (length >= 4
            && matches!(words[length - 1], "PROTO" | "PORT" | "ADDR")
            && shape(&words[length - 4..length - 1]))
}

fn insert_path(table: &mut toml::Table, keys: &[String], value: String) -> Result<(), ()> {
    let (last, parents) = keys.split_last().ok_or(())?;
    let mut current = table;
    for key in parents {
        let entry = current
            .entry(key.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = entry.as_table_mut().ok_or(())?;
    }
    current.insert(last.clone(), toml::Value::String(value));
    Ok(())
}

/// Reads the process environment once, in `main`, and hands it to [`load_config`].
pub fn process_environment() -> BTreeMap<String, String> {
    std::env::vars().collect()
}

/// Loads a service config in `main`: the file named by `<prefix>CONFIG`, if any, overlaid
/// with the environment.
pub fn load_from_process<T: DeserializeOwned>(prefix: &str) -> Result<T, ConfigError> {
    let env = process_environment();
    let file_text = match env.get(&config_file_variable(prefix)) {
        Some(path) => Some(std::fs::read_to_string(path).map_err(|error| {
            ConfigError::Invalid(format!("cannot read config file {path}: {error}"))
        })?),
        None => None,
    };
    load_config(prefix, file_text.as_deref(), &env)
}

/// Accepts either a native TOML value or a string that parses into one (environment values
/// are always strings).
pub fn from_str_or_native<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr + Deserialize<'de>,
    T::Err: Display,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either<T> {
        Text(String),
        Native(T),
    }
    match Either::<T>::deserialize(deserializer)? {
        Either::Text(text) => text.trim().parse().map_err(serde::de::Error::custom),
        Either::Native(value) => Ok(value),
    }
}

/// A secret read from config: never printed by `Debug`, never serialised in clear.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("Secret(<redacted>)")
    }
}

impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("<redacted>")
    }
}

/// What stands in for a credential wherever a config is shown.
pub const REDACTED: &str = "<redacted>";

/// A config as it may be shown (`--print-config`, `Debug`): every credential replaced by
/// [`REDACTED`]. Credentials are the password in a URL's user information
/// (`postgres://user:PASS@…`, `redis://:PASS@…`), `password=` query parameters, and any field
/// whose name says it holds one (`password`, `secret`, `token`), whatever its type.
pub fn redacted_view<T: serde::Serialize + ?Sized>(config: &T) -> Result<toml::Value, String> {
    let mut value = toml::Value::try_from(config).map_err(|error| error.to_string())?;
    redact_value(&mut value);
    Ok(value)
}

/// `Debug` for a config type, through [`redacted_view`], so a field added later is redacted
/// by the same rules without anyone remembering to.
pub fn fmt_redacted<T: serde::Serialize + ?Sized>(
    name: &str,
    config: &T,
    formatter: &mut std::fmt::Formatter<'_>,
) -> std::fmt::Result {
    match redacted_view(config) {
        Ok(value) => write!(formatter, "{name} {value}"),
        Err(_) => write!(formatter, "{name} {{ {REDACTED} }}"),
    }
}

fn is_credential_name(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["password", "secret", "token", "credential"]
        .iter()
        .any(|word| key == *word || key.ends_with(&format!("_{word}")))
}

fn redact_value(value: &mut toml::Value) {
    match value {
        toml::Value::String(text) => {
            if let Some(redacted) = redact_url(text) {
                *text = redacted;
            }
        }
        toml::Value::Array(items) => items.iter_mut().for_each(redact_value),
        toml::Value::Table(table) => {
            for (key, item) in table.iter_mut() {
                if is_credential_name(key) && !item.is_table() {
                    *item = toml::Value::String(REDACTED.to_owned());
                } else {
                    redact_value(item);
                }
            }
        }
        _ => {}
    }
}

/// The URL with its password (user information after the first `:`) and any `password=`
/// query value replaced, or `None` when it carries neither.
pub fn redact_url(text: &str) -> Option<String> {
    let (scheme, rest) = text.split_once("://")?;
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let mut changed = false;
    let authority = match authority.rsplit_once('@') {
        Some((user_info, host)) => match user_info.split_once(':') {
            Some((user, _password)) => {
                changed = true;
                format!("{user}:{REDACTED}@{host}")
            }
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let parameters: Vec<String> = query
                .split('&')
                .map(|parameter| match parameter.split_once('=') {
                    Some((name, _)) if is_credential_name(name) => {
                        changed = true;
                        format!("{name}={REDACTED}")
                    }
                    _ => parameter.to_owned(),
                })
                .collect();
            format!("{path}?{}", parameters.join("&"))
        }
        None => tail.to_owned(),
    };
    changed.then(|| format!("{scheme}://{authority}{tail}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Example {
        name: String,
        #[serde(deserialize_with = "from_str_or_native")]
        limit: u64,
        nested: Nested,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Nested {
        path: String,
        #[serde(default)]
        secret: Option<Secret>,
    }

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn environment_overrides_file_and_parses_numbers() {
        let file = "name = \"from-file\"\nlimit = 5\n[nested]\npath = \"a\"\n";
        let loaded: Example = load_config(
            "MEDAI_X_",
            Some(file),
            &env(&[
                ("MEDAI_X_LIMIT", "42"),
                ("MEDAI_X_NESTED__PATH", "b"),
                ("OTHER", "1"),
            ]),
        )
        .expect("valid config");
        assert_eq!(loaded.name, "from-file");
        assert_eq!(loaded.limit, 42);
        assert_eq!(loaded.nested.path, "b");
    }

    #[test]
    fn unknown_field_is_refused_with_its_name() {
        let error = load_config::<Example>(
            "MEDAI_X_",
            Some("name = \"n\"\nlimit = 1\ncolour = \"red\"\n[nested]\npath = \"a\"\n"),
            &BTreeMap::new(),
        )
        .expect_err("unknown field must be refused");
        assert!(error.to_string().contains("colour"), "{error}");
    }

    #[test]
    fn missing_field_and_bad_number_are_refused() {
        let missing = load_config::<Example>("MEDAI_X_", Some("limit = 1\n"), &BTreeMap::new());
        assert!(missing.expect_err("missing").to_string().contains("name"));
        let bad = load_config::<Example>(
            "MEDAI_X_",
            Some("name = \"n\"\n[nested]\npath = \"a\"\n"),
            &env(&[("MEDAI_X_LIMIT", "lots")]),
        );
        assert!(matches!(bad, Err(ConfigError::Invalid(_))));
    }

    /// Every variable Kubernetes injects for the Services `medai-gateway` and `medai-audit`
    /// (named ports `grpc` and `admin`), as audit's pod sees them.
    fn kubernetes_service_links() -> Vec<(String, &'static str)> {
        let mut links = Vec::new();
        for service in ["MEDAI_GATEWAY", "MEDAI_AUDIT", "MEDAI_AUDIT_HEADLESS"] {
            for (suffix, value) in [
                ("SERVICE_HOST", "10.96.0.12"),
                ("SERVICE_PORT", "50051"),
                ("SERVICE_PORT_GRPC", "50051"),
                ("SERVICE_PORT_ADMIN", "9090"),
                ("SERVICE_PORT_HTTP_METRICS", "9090"),
                ("PORT", "tcp://10.96.0.12:50051"),
                ("PORT_50051_TCP", "tcp://10.96.0.12:50051"),
                ("PORT_50051_TCP_PROTO", "tcp"),
                ("PORT_50051_TCP_PORT", "50051"),
                ("PORT_50051_TCP_ADDR", "10.96.0.12"),
                ("PORT_9090_UDP", "udp://10.96.0.12:9090"),
                ("PORT_9090_SCTP_ADDR", "10.96.0.12"),
            ] {
                links.push((format!("{service}_{suffix}"), value));
            }
        }
        links
    }

    #[test]
    fn kubernetes_service_link_variables_are_ignored_not_refused() {
        let mut variables = env(&[
            ("MEDAI_AUDIT_NAME", "n"),
            ("MEDAI_AUDIT_LIMIT", "3"),
            ("MEDAI_AUDIT_NESTED__PATH", "p"),
        ]);
        for (name, value) in kubernetes_service_links() {
            variables.insert(name, value.to_owned());
        }
        let loaded: Example = load_config("MEDAI_AUDIT_", None, &variables)
            .expect("service-link variables must not be refused as unknown fields");
        assert_eq!(
            loaded,
            Example {
                name: "n".to_owned(),
                limit: 3,
                nested: Nested {
                    path: "p".to_owned(),
                    secret: None
                }
            }
        );
    }

    #[test]
    fn only_service_link_shapes_are_skipped() {
        for (variable, _) in kubernetes_service_links() {
            let path = variable.strip_prefix("MEDAI_AUDIT_").unwrap_or(&variable);
            assert!(is_service_link_variable(path), "{variable}");
        }
        for path in [
            "DATABASE_URL",
            "PROCESS__LISTEN_ADDR",
            "PROCESS__ADMIN_ADDR",
            "TLS__CA_CERT",
            "CHECKPOINT_KEY_FILE",
            "PORT_NUMBER",
            "PORT_50051",
            "PORT_X_TCP",
            "PORT_50051_TCP_HOST",
            "REDIS__PORT",
            "UPSTREAM__SERVICE_HOST",
            "SERVICE_PORT_",
        ] {
            assert!(!is_service_link_variable(path), "{path}");
        }
        // A misspelt real setting is still refused.
        let refused = load_config::<Example>(
            "MEDAI_AUDIT_",
            Some("name = \"n\"\nlimit = 1\n[nested]\npath = \"a\"\n"),
            &env(&[("MEDAI_AUDIT_LIMT", "2"), ("MEDAI_AUDIT_PORT", "tcp://x:1")]),
        );
        assert!(refused.expect_err("unknown").to_string().contains("limt"));
    }

    #[test]
    fn secrets_are_redacted_in_debug_output() {
        let loaded: Example = load_config(
            "MEDAI_X_",
            Some("name = \"n\"\nlimit = 1\n[nested]\npath = \"a\"\n"),
            &env(&[("MEDAI_X_NESTED__SECRET", "hunter2-very-secret")]),
        )
        .expect("valid");
        let printed = format!("{loaded:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert_eq!(
            loaded.nested.secret.expect("set").expose(),
            "hunter2-very-secret"
        );
    }

    #[test]
    fn url_passwords_and_credential_fields_are_redacted() {
        assert_eq!(
            redact_url("postgres://medai:pg-pass-1@db:5432/audit?sslmode=require").as_deref(),
            Some("postgres://medai:<redacted>@db:5432/audit?sslmode=require")
        );
        assert_eq!(
            redact_url("redis://:redis-pass-2@cache:6379/0").as_deref(),
            Some("redis://:<redacted>@cache:6379/0")
        );
        assert_eq!(
            redact_url("postgres://db/audit?user=medai&password=query-pass-3").as_deref(),
            Some("postgres://db/audit?user=medai&password=<redacted>")
        );
        assert_eq!(redact_url("https://127.0.0.1:50051"), None);
        assert_eq!(redact_url("sqlite:///state/audit.sqlite?mode=rwc"), None);

        #[derive(serde::Serialize)]
        struct Shown {
            database_url: String,
            admin_password: String,
            listen_addr: String,
            nested: ShownNested,
        }
        #[derive(serde::Serialize)]
        struct ShownNested {
            redis_url: Option<String>,
            secret: Secret,
        }
        let shown = Shown {
            database_url: "postgres://u:pg-pass-1@db/x".to_owned(),
            admin_password: "field-pass-4".to_owned(),
            listen_addr: "127.0.0.1:1".to_owned(),
            nested: ShownNested {
                redis_url: Some("redis://:redis-pass-2@cache".to_owned()),
                secret: Secret::new("secret-5"),
            },
        };
        let printed = redacted_view(&shown).expect("view").to_string();
        struct Debugged<'a>(&'a Shown);
        impl std::fmt::Debug for Debugged<'_> {
            fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                fmt_redacted("Shown", self.0, formatter)
            }
        }
        let debugged = format!("{:?}", Debugged(&shown));
        for text in [&printed, &debugged] {
            for password in ["pg-pass-1", "redis-pass-2", "field-pass-4", "secret-5"] {
                assert!(!text.contains(password), "{password} shown in {text}");
            }
            assert!(text.contains("127.0.0.1:1"), "{text}");
            assert!(text.contains("postgres://u:<redacted>@db/x"), "{text}");
        }
    }
}
