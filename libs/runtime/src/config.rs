//! Typed configuration loaded by a pure function of (file text, environment map), so tests
//! build configs without touching the process environment.
//!
//! Environment variables override the file: `MEDAI_AUDIT_DATABASE_URL` sets `database_url`
//! and `MEDAI_AUDIT_TLS__CA_CERT` sets `tls.ca_cert` for the prefix `MEDAI_AUDIT_`.
//! Environment values are strings; numeric fields accept them through [`from_str_or_native`].
//! Unknown fields are refused by each config struct's `deny_unknown_fields`.

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
        let keys: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
        insert_path(&mut root, &keys, value.clone()).map_err(|()| ConfigError::Conflict {
            variable: variable.clone(),
        })?;
    }
    T::deserialize(toml::Value::Table(root))
        .map_err(|error| ConfigError::Invalid(error.to_string()))
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
