//! The saved session: the access token (`<state>/token`) and the refresh token
//! (`<state>/refresh-token`), each owner-readable only (mode 0600). An access token that has
//! expired (or is about to) is exchanged through Refresh before a call, transparently; the
//! refresh token rotates on every use, so the new pair replaces the old one at once.

use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::exit::CliError;

/// Refresh when the access token has less than this left.
const EXPIRY_MARGIN_SECONDS: u64 = 15;

#[derive(Clone, Debug)]
pub struct SessionFiles {
    pub access: PathBuf,
    pub refresh: PathBuf,
}

impl SessionFiles {
    pub fn in_state_dir(state_dir: &Path) -> Self {
        Self {
            access: state_dir.join("token"),
            refresh: state_dir.join("refresh-token"),
        }
    }

    /// Keeps both tokens, each written owner-readable from the start.
    pub fn save(&self, access_token: &str, refresh_token: &str) -> Result<(), CliError> {
        write_private(&self.access, access_token)?;
        if refresh_token.is_empty() {
            let _absent = std::fs::remove_file(&self.refresh);
        } else {
            write_private(&self.refresh, refresh_token)?;
        }
        Ok(())
    }

    pub fn access_token(&self) -> Result<String, CliError> {
        match std::fs::read_to_string(&self.access) {
            Ok(token) if !token.trim().is_empty() => Ok(token.trim().to_owned()),
            _ => Err(CliError::Authentication(
                "no saved session: run `medai login` first".to_owned(),
            )),
        }
    }

    pub fn refresh_token(&self) -> Option<String> {
        std::fs::read_to_string(&self.refresh)
            .ok()
            .map(|token| token.trim().to_owned())
            .filter(|token| !token.is_empty())
    }

    /// Deletes both files; true if there was anything to delete.
    pub fn remove(&self) -> bool {
        let access = std::fs::remove_file(&self.access).is_ok();
        let refresh = std::fs::remove_file(&self.refresh).is_ok();
        access || refresh
    }
}

/// Creates (or truncates) `path` with mode 0600 before writing, so the secret is never
/// readable by others, not even for a moment.
pub fn write_private(path: &Path, contents: &str) -> Result<(), CliError> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot restrict {}", path.display()))?;
    }
    file.write_all(contents.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// True when the token's `exp` claim is past or within the margin. The claim is read without
/// checking the signature: it only decides when to refresh; the gateway still verifies.
/// A token whose claims cannot be read is left to the gateway to judge.
pub fn expires_soon(token: &str, now_unix_seconds: u64) -> bool {
    use base64::Engine;
    let Some(payload) = token.split('.').nth(1) else {
        return false;
    };
    let Ok(bytes) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload) else {
        return false;
    };
    let Ok(claims) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return false;
    };
    claims
        .get("exp")
        .and_then(serde_json::Value::as_u64)
        .is_some_and(|exp| exp <= now_unix_seconds + EXPIRY_MARGIN_SECONDS)
}

pub fn now_unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// Where a password comes from.
#[derive(Clone, Debug)]
pub enum PasswordSource {
    /// The first line of standard input (`--password-stdin`).
    Stdin,
    /// A file's content, trimmed (`--password-file`).
    File(PathBuf),
    /// A prompt on the terminal, without echo.
    Prompt,
}

impl PasswordSource {
    pub fn read(&self, prompt: &str) -> Result<String, CliError> {
        let password = match self {
            Self::Stdin => {
                let mut line = String::new();
                std::io::stdin()
                    .lock()
                    .read_line(&mut line)
                    .context("cannot read the password from standard input")?;
                line.trim_end_matches(['\r', '\n']).to_owned()
            }
            Self::File(path) => std::fs::read_to_string(path)
                .map_err(|error| {
                    CliError::Usage(format!(
                        "cannot read the password file {}: {error}",
                        path.display()
                    ))
                })?
                .trim()
                .to_owned(),
            Self::Prompt => {
                if !std::io::stdin().is_terminal() {
                    return Err(CliError::Usage(
                        "no terminal to ask for the password: use --password-stdin or --password-file"
                            .to_owned(),
                    ));
                }
                rpassword::prompt_password(prompt).context("cannot read the password")?
            }
        };
        if password.is_empty() {
            return Err(CliError::Usage("the password is empty".to_owned()));
        }
        Ok(password)
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine;

    use super::*;

    fn token_with_exp(exp: u64) -> String {
        let encode = |text: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text);
        format!(
            "{}.{}.signature",
            encode(r#"{"alg":"EdDSA"}"#),
            encode(&format!(r#"{{"sub":"u","exp":{exp}}}"#))
        )
    }

    #[test]
    fn a_token_is_refreshed_only_when_its_expiry_is_near() {
        assert!(expires_soon(&token_with_exp(1_000), 2_000));
        assert!(expires_soon(&token_with_exp(2_010), 2_000));
        assert!(!expires_soon(&token_with_exp(3_000), 2_000));
        assert!(!expires_soon("not a jwt", 2_000));
    }

    #[test]
    fn saved_tokens_are_owner_readable_only() {
        let folder = tempfile::tempdir().expect("tempdir");
        let files = SessionFiles::in_state_dir(folder.path());
        files.save("access", "refresh").expect("save");
        #[cfg(unix)]
        for path in [&files.access, &files.refresh] {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path)
                .expect("metadata")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{}", path.display());
        }
        assert_eq!(files.access_token().expect("access"), "access");
        assert_eq!(files.refresh_token().as_deref(), Some("refresh"));
        assert!(files.remove());
        assert!(matches!(
            files.access_token(),
            Err(CliError::Authentication(_))
        ));
    }
}
