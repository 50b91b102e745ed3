//! Revocations: access tokens (by `jti`) and whole subjects (every token below a generation)
//! that must no longer be honoured. The auth service writes them; every verifier reads them.
//!
//! Redis holds them (through fred), each key expiring when the last token it could refuse
//! expires. In production a check that cannot reach Redis fails closed; in development it
//! falls back to this process's own store, with a warning and a metric. Without a Redis URL
//! (the embedded `medai up`), the in-process store is the store.
//!
//! Keys: `medai:revoked:jti:<jti>` → "1"; `medai:revoked:sub:<subject>` → the lowest token
//! generation still valid for that subject; `medai:revocations:seeded` → set (without expiry)
//! by auth once every revocation in its database is in Redis.
//!
//! Redis is a cache of auth's database, which is the record of revocations. A Redis that lost
//! its data (a restart without persistence, a flush) has also lost the seeded marker, so its
//! silence is not taken for "not revoked": a check without the marker is treated like an
//! unreachable Redis (production: UNAVAILABLE) until auth has written the revocations back
//! ([`RevocationStore::seed`]).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fred::prelude::{
    Builder, Client, ClientLike, Config, Expiration, KeysInterface, ReconnectPolicy,
};
use medai_runtime::config::from_str_or_native;
use serde::{Deserialize, Serialize};

/// How long a subject revocation is kept: longer than any access token can live.
pub const SUBJECT_REVOCATION_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Unreachable Redis means tokens are not trusted (UNAVAILABLE).
    Production,
    /// Unreachable Redis falls back to the in-process store, with a warning and a metric.
    #[default]
    Development,
}

#[derive(Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RevocationSettings {
    #[serde(default)]
    pub mode: Mode,
    /// `redis://host:port`; absent means the in-process store only (development only).
    #[serde(default)]
    pub redis_url: Option<String>,
    /// How long a "not revoked" answer may be reused for the same token. 0 checks every time.
    #[serde(default = "default_cache_ms", deserialize_with = "from_str_or_native")]
    pub not_revoked_cache_ms: u64,
}

/// Shown with every credential (URL passwords, secrets) redacted.
impl std::fmt::Debug for RevocationSettings {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        medai_runtime::config::fmt_redacted("RevocationSettings", self, formatter)
    }
}

fn default_cache_ms() -> u64 {
    250
}

/// The settings of a service configured without a `revocation` section: the documented cache
/// window too (a derived default made it 0, so every request asked auth: issue 14).
impl Default for RevocationSettings {
    fn default() -> Self {
        Self {
            mode: Mode::default(),
            redis_url: None,
            not_revoked_cache_ms: default_cache_ms(),
        }
    }
}

impl RevocationSettings {
    pub fn validate(&self) -> Result<(), String> {
        if self.mode == Mode::Production && self.redis_url.is_none() {
            return Err("revocation.redis_url is required in production mode".to_owned());
        }
        if self.not_revoked_cache_ms > 5_000 {
            return Err("revocation.not_revoked_cache_ms must be at most 5000".to_owned());
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RevocationError {
    #[error("the revocation store is unreachable")]
    Unavailable,
    #[error("invalid revocation settings: {0}")]
    Settings(String),
}

/// What a verifier knows about a token when it asks.
#[derive(Clone, Copy, Debug)]
pub struct TokenFacts<'a> {
    pub jti: &'a str,
    pub subject: &'a str,
    pub generation: u64,
}

#[derive(Default)]
struct LocalStore {
    revoked_tokens: HashMap<String, Instant>,
    /// subject → (lowest valid generation, kept until)
    subject_floors: HashMap<String, (u64, Instant)>,
    recently_valid: HashMap<String, Instant>,
}

pub struct RevocationStore {
    redis: Option<Client>,
    mode: Mode,
    cache_for: Duration,
    local: Mutex<LocalStore>,
    /// A revocation did not reach Redis: it must be seeded again even if the marker is there.
    missed_writes: AtomicBool,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

fn jti_key(jti: &str) -> String {
    format!("medai:revoked:jti:{jti}")
}

fn subject_key(subject: &str) -> String {
    format!("medai:revoked:sub:{subject}")
}

/// Present while Redis holds every revocation auth's database holds.
pub const SEEDED_MARKER_KEY: &str = "medai:revocations:seeded";

/// A revoked access token: its `jti` and when it expires anyway (unix seconds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevokedToken {
    pub jti: String,
    pub expires_at: u64,
}

/// Every token of `subject` below `lowest_valid_generation` is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubjectFloor {
    pub subject: String,
    pub lowest_valid_generation: u64,
}

impl RevocationStore {
    /// Connects in the background: a Redis that is down at start is retried, and checks made
    /// meanwhile follow the mode's rule.
    pub fn connect(settings: &RevocationSettings) -> Result<Self, RevocationError> {
        settings.validate().map_err(RevocationError::Settings)?;
        let redis = match &settings.redis_url {
            None => None,
            Some(url) => {
                let config = Config::from_url(url)
                    .map_err(|error| RevocationError::Settings(error.to_string()))?;
                let client = Builder::from_config(config)
                    .with_performance_config(|performance| {
                        performance.default_command_timeout = Duration::from_millis(300);
                    })
                    .with_connection_config(|connection| {
                        connection.connection_timeout = Duration::from_millis(500);
                        connection.max_command_attempts = 1;
                    })
                    .set_policy(ReconnectPolicy::new_constant(0, 250))
                    .build()
                    .map_err(|error| RevocationError::Settings(error.to_string()))?;
                let _connection_task = client.connect();
                Some(client)
            }
        };
        Ok(Self {
            redis,
            mode: settings.mode,
            cache_for: Duration::from_millis(settings.not_revoked_cache_ms),
            local: Mutex::new(LocalStore::default()),
            missed_writes: AtomicBool::new(false),
        })
    }

    fn local(&self) -> std::sync::MutexGuard<'_, LocalStore> {
        // A panic while holding this lock cannot leave the maps inconsistent; keep serving.
        self.local
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn fall_back(
        &self,
        operation: &'static str,
        error: &dyn std::fmt::Display,
    ) -> Result<(), RevocationError> {
        metrics::counter!("medai_revocation_store_fallbacks_total", "operation" => operation)
            .increment(1);
        match self.mode {
            Mode::Production => {
                tracing::error!(operation, error = %error, "revocation store unreachable; failing closed");
                Err(RevocationError::Unavailable)
            }
            Mode::Development => {
                tracing::warn!(operation, error = %error, "revocation store unreachable; using this process's store (development mode)");
                Ok(())
            }
        }
    }

    /// Revokes one access token until it would have expired anyway (`expires_at`, unix seconds).
    pub async fn revoke_token(&self, jti: &str, expires_at: u64) -> Result<(), RevocationError> {
        let seconds_left = expires_at.saturating_sub(unix_now()).max(1);
        {
            let mut local = self.local();
            let now = Instant::now();
            local.revoked_tokens.retain(|_, until| *until > now);
            local
                .revoked_tokens
                .insert(jti.to_owned(), now + Duration::from_secs(seconds_left));
            local.recently_valid.remove(jti);
        }
        if let Some(redis) = &self.redis {
            let written: Result<(), _> = redis
                .set(
                    jti_key(jti),
                    "1",
                    Some(Expiration::EX(seconds_left as i64)),
                    None,
                    false,
                )
                .await;
            if let Err(error) = written {
                self.missed_writes.store(true, Ordering::SeqCst);
                self.fall_back("revoke_token", &error)?;
            }
        }
        Ok(())
    }

    /// Refuses every token of `subject` whose generation is below `lowest_valid_generation`.
    pub async fn revoke_subject_below(
        &self,
        subject: &str,
        lowest_valid_generation: u64,
    ) -> Result<(), RevocationError> {
        {
            let mut local = self.local();
            let keep_until = Instant::now() + SUBJECT_REVOCATION_TTL;
            let floor = local
                .subject_floors
                .entry(subject.to_owned())
                .or_insert((0, keep_until));
            *floor = (floor.0.max(lowest_valid_generation), keep_until);
            local.recently_valid.clear();
        }
        if let Some(redis) = &self.redis {
            let written: Result<(), _> = redis
                .set(
                    subject_key(subject),
                    lowest_valid_generation.to_string(),
                    Some(Expiration::EX(SUBJECT_REVOCATION_TTL.as_secs() as i64)),
                    None,
                    false,
                )
                .await;
            if let Err(error) = written {
                self.missed_writes.store(true, Ordering::SeqCst);
                self.fall_back("revoke_subject", &error)?;
            }
        }
        Ok(())
    }

    /// Whether Redis holds the seeded marker and every revocation this process wrote since
    /// the last seed (always true without Redis).
    pub async fn is_seeded(&self) -> Result<bool, RevocationError> {
        let Some(redis) = &self.redis else {
            return Ok(true);
        };
        let marker: Option<String> = redis.get(SEEDED_MARKER_KEY).await.map_err(|error| {
            tracing::warn!(error = %error, "the revocation store could not be asked for its marker");
            RevocationError::Unavailable
        })?;
        Ok(marker.is_some() && !self.missed_writes.load(Ordering::SeqCst))
    }

    /// Called before the record of revocations is read for a [`RevocationStore::seed`]: writes
    /// that miss Redis from now on are caught by the next seed.
    pub fn start_seed(&self) {
        self.missed_writes.store(false, Ordering::SeqCst);
    }

    /// Writes every revocation the record of revocations (auth's database) holds into this
    /// process's store and Redis, then sets the seeded marker. Called by auth at start and
    /// whenever Redis comes back without the marker. Unlike single revocations this fails on an
    /// unreachable Redis in every mode: the caller retries.
    pub async fn seed(
        &self,
        tokens: &[RevokedToken],
        floors: &[SubjectFloor],
    ) -> Result<(), RevocationError> {
        let now = unix_now();
        {
            let mut local = self.local();
            let instant_now = Instant::now();
            local.revoked_tokens.retain(|_, until| *until > instant_now);
            for token in tokens.iter().filter(|token| token.expires_at > now) {
                let until = instant_now + Duration::from_secs(token.expires_at - now);
                local.revoked_tokens.insert(token.jti.clone(), until);
            }
            let keep_until = instant_now + SUBJECT_REVOCATION_TTL;
            for floor in floors {
                let entry = local
                    .subject_floors
                    .entry(floor.subject.clone())
                    .or_insert((0, keep_until));
                *entry = (entry.0.max(floor.lowest_valid_generation), keep_until);
            }
            local.recently_valid.clear();
        }
        let Some(redis) = &self.redis else {
            return Ok(());
        };
        let unavailable = |error: fred::error::Error| {
            tracing::warn!(error = %error, "revocations could not be seeded into Redis");
            self.missed_writes.store(true, Ordering::SeqCst);
            RevocationError::Unavailable
        };
        for token in tokens.iter().filter(|token| token.expires_at > now) {
            let seconds_left = (token.expires_at - now).max(1);
            let () = redis
                .set(
                    jti_key(&token.jti),
                    "1",
                    Some(Expiration::EX(seconds_left as i64)),
                    None,
                    false,
                )
                .await
                .map_err(unavailable)?;
        }
        for floor in floors {
            // Never lower a floor another auth replica raised meanwhile.
            let current: Option<String> = redis
                .get(subject_key(&floor.subject))
                .await
                .map_err(unavailable)?;
            let current = current
                .and_then(|value| value.parse::<u64>().ok())
                .unwrap_or(0);
            let () = redis
                .set(
                    subject_key(&floor.subject),
                    current.max(floor.lowest_valid_generation).to_string(),
                    Some(Expiration::EX(SUBJECT_REVOCATION_TTL.as_secs() as i64)),
                    None,
                    false,
                )
                .await
                .map_err(unavailable)?;
        }
        let () = redis
            .set(SEEDED_MARKER_KEY, "1", None, None, false)
            .await
            .map_err(unavailable)?;
        metrics::counter!("medai_revocation_store_seeds_total").increment(1);
        tracing::info!(
            tokens = tokens.len(),
            subjects = floors.len(),
            "revocations seeded into Redis"
        );
        Ok(())
    }

    /// Drops every cached "not revoked" answer, so the next check of each token asks the
    /// store. A verifier calls it when it relayed an action that revokes tokens.
    pub fn forget_recent_checks(&self) {
        self.local().recently_valid.clear();
    }

    /// Whether a verified token has been revoked.
    pub async fn is_revoked(&self, token: TokenFacts<'_>) -> Result<bool, RevocationError> {
        let now = Instant::now();
        {
            let local = self.local();
            // Expiry is judged on lookup; expired entries are pruned when revocations are written,
            // so a check never walks the whole map.
            if local
                .revoked_tokens
                .get(token.jti)
                .is_some_and(|until| *until > now)
            {
                return Ok(true);
            }
            if let Some((floor, until)) = local.subject_floors.get(token.subject)
                && *until > now
                && token.generation < *floor
            {
                return Ok(true);
            }
            if local
                .recently_valid
                .get(token.jti)
                .is_some_and(|checked| now.duration_since(*checked) < self.cache_for)
            {
                return Ok(false);
            }
        }
        let Some(redis) = &self.redis else {
            return Ok(false);
        };
        let answer: Result<(Option<String>, Option<String>, Option<String>), _> = redis
            .mget(vec![
                jti_key(token.jti),
                subject_key(token.subject),
                SEEDED_MARKER_KEY.to_owned(),
            ])
            .await;
        let revoked = match answer {
            Ok((jti_entry, _, _)) if jti_entry.is_some() => true,
            Ok((_, subject_floor, Some(_seeded))) => subject_floor
                .and_then(|floor| floor.parse::<u64>().ok())
                .is_some_and(|floor| token.generation < floor),
            Ok((_, _, None)) => {
                // Redis lost its data (or auth has not seeded it yet): its silence proves nothing.
                metrics::counter!("medai_revocation_store_unseeded_total").increment(1);
                self.fall_back("check", &"the revocation store holds no seeded marker")?;
                return Ok(false);
            }
            Err(error) => {
                self.fall_back("check", &error)?;
                // Development fallback: this process's store already answered "not revoked".
                false
            }
        };
        if !revoked && !self.cache_for.is_zero() {
            let mut local = self.local();
            if local.recently_valid.len() > 100_000 {
                local.recently_valid.clear();
            }
            local.recently_valid.insert(token.jti.to_owned(), now);
        }
        Ok(revoked)
    }
}

/// HELP text for the revocation store's families, and its fallback counter at zero (a
/// verifier that silently stopped reaching Redis is what an alert must see).
pub fn describe_metrics() {
    metrics::describe_counter!(
        "medai_revocation_store_fallbacks_total",
        "Revocation-store operations that could not reach Redis (failed closed in production, this process's store in development), by operation."
    );
    metrics::describe_counter!(
        "medai_revocation_store_seeds_total",
        "Times the auth service seeded Redis with every revocation from its database."
    );
    metrics::describe_counter!(
        "medai_revocation_store_unseeded_total",
        "Revocation checks that found Redis without its seeded marker (its data lost or not yet seeded)."
    );
    metrics::counter!("medai_revocation_store_fallbacks_total", "operation" => "check")
        .increment(0);
    metrics::counter!("medai_revocation_store_unseeded_total").increment(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts<'a>(jti: &'a str, subject: &'a str, generation: u64) -> TokenFacts<'a> {
        TokenFacts {
            jti,
            subject,
            generation,
        }
    }

    #[tokio::test]
    async fn the_in_process_store_refuses_revoked_tokens_and_old_generations() {
        let store = RevocationStore::connect(&RevocationSettings::default()).expect("store");
        assert!(
            !store
                .is_revoked(facts("a", "alice", 1))
                .await
                .expect("check")
        );
        store
            .revoke_token("a", unix_now() + 600)
            .await
            .expect("revoke");
        assert!(
            store
                .is_revoked(facts("a", "alice", 1))
                .await
                .expect("check")
        );
        assert!(
            !store
                .is_revoked(facts("b", "alice", 1))
                .await
                .expect("check")
        );
        store
            .revoke_subject_below("alice", 2)
            .await
            .expect("revoke subject");
        assert!(
            store
                .is_revoked(facts("b", "alice", 1))
                .await
                .expect("check")
        );
        assert!(
            !store
                .is_revoked(facts("c", "alice", 2))
                .await
                .expect("a new generation is valid")
        );
        assert!(
            !store
                .is_revoked(facts("d", "bob", 0))
                .await
                .expect("others are untouched")
        );
    }

    #[test]
    fn production_without_redis_is_refused() {
        let settings = RevocationSettings {
            mode: Mode::Production,
            redis_url: None,
            not_revoked_cache_ms: 0,
        };
        assert!(matches!(
            RevocationStore::connect(&settings),
            Err(RevocationError::Settings(_))
        ));
    }

    #[test]
    fn settings_left_out_keep_not_revoked_answers_for_the_documented_window() {
        let settings = RevocationSettings::default();
        assert_eq!(settings.not_revoked_cache_ms, 250);
        assert_eq!(settings.mode, Mode::Development);
        assert!(settings.validate().is_ok());
    }
}
