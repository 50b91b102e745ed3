//! Where the gateway learns whether a verified token was revoked: Redis, shared with auth and
//! every other gateway, or, in the embedded mesh that runs without Redis, auth's own store.
//!
//! Either way a "not revoked" answer is reused for the same token for
//! `revocation.not_revoked_cache_ms` (250 ms by default), so a caller sending many requests
//! with one token costs one check per window, not one per request. A revoking action relayed
//! by this gateway drops every cached answer at once; one made elsewhere (another gateway,
//! auth itself) takes effect here within the window.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use medai_proto::auth::v1::CheckRevocationRequest;
use medai_proto::auth::v1::auth_service_client::AuthServiceClient;
use medai_revocation::{RevocationStore, TokenFacts};
use medai_runtime::rpc_trace::MeshChannel;

pub enum RevocationSource {
    Shared(Arc<RevocationStore>),
    ThroughAuth {
        auth: AuthServiceClient<MeshChannel>,
        recently_valid: Box<NotRevokedCache>,
    },
}

/// The check could not be made; the token is not trusted.
#[derive(Debug)]
pub struct RevocationUnavailable;

/// Most tokens remembered at once; past it the cache starts over (a check more, never a
/// wrong answer).
const MAX_REMEMBERED_TOKENS: usize = 100_000;

/// "Not revoked" answers by token id, each reused for `window` after its check began.
///
/// An answer is kept only if nothing was forgotten while its check ran: a check that began
/// before a revocation this gateway relayed may answer "not revoked" after it, and that
/// answer must not be reused.
pub struct NotRevokedCache {
    window: Duration,
    state: Mutex<CacheState>,
}

#[derive(Default)]
struct CacheState {
    /// token id → when the check that found it valid began
    checked_at: HashMap<String, Instant>,
    /// Bumped by every [`NotRevokedCache::forget_all`].
    forgotten: u64,
}

/// A check under way: when it began and what had been forgotten by then.
#[derive(Clone, Copy, Debug)]
pub struct CheckStarted {
    at: Instant,
    forgotten: u64,
}

impl NotRevokedCache {
    /// A zero `window` caches nothing: every request is checked.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            state: Mutex::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, CacheState> {
        // A panic while holding the lock cannot leave the map inconsistent; keep serving.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `token_id` was found valid by a check that began less than the window ago.
    pub fn is_fresh(&self, token_id: &str, now: Instant) -> bool {
        self.state()
            .checked_at
            .get(token_id)
            .is_some_and(|at| now.saturating_duration_since(*at) < self.window)
    }

    /// Call before asking the store; hand the result to [`NotRevokedCache::remember`].
    pub fn start_check(&self, now: Instant) -> CheckStarted {
        CheckStarted {
            at: now,
            forgotten: self.state().forgotten,
        }
    }

    /// Keeps a "not revoked" answer, unless the cache was emptied while it was being asked.
    pub fn remember(&self, token_id: &str, check: CheckStarted) {
        if self.window.is_zero() {
            return;
        }
        let mut state = self.state();
        if state.forgotten != check.forgotten {
            return;
        }
        if state.checked_at.len() >= MAX_REMEMBERED_TOKENS {
            let now = Instant::now();
            let window = self.window;
            state
                .checked_at
                .retain(|_, at| now.saturating_duration_since(*at) < window);
            if state.checked_at.len() >= MAX_REMEMBERED_TOKENS {
                state.checked_at.clear();
            }
        }
        state.checked_at.insert(token_id.to_owned(), check.at);
    }

    /// Drops every cached answer, and any answer whose check is still under way.
    pub fn forget_all(&self) {
        let mut state = self.state();
        state.checked_at.clear();
        state.forgotten = state.forgotten.wrapping_add(1);
    }

    pub fn len(&self) -> usize {
        self.state().checked_at.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl RevocationSource {
    /// Auth's own store, asked over the mesh, with "not revoked" answers kept for `window`.
    pub fn through_auth(auth: AuthServiceClient<MeshChannel>, window: Duration) -> Self {
        Self::ThroughAuth {
            auth,
            recently_valid: Box::new(NotRevokedCache::new(window)),
        }
    }

    /// After a revoking action: no cached "not revoked" answer may outlive it here.
    pub fn forget_recent_checks(&self) {
        match self {
            Self::Shared(store) => store.forget_recent_checks(),
            Self::ThroughAuth { recently_valid, .. } => recently_valid.forget_all(),
        }
    }

    pub async fn is_revoked(&self, token: TokenFacts<'_>) -> Result<bool, RevocationUnavailable> {
        match self {
            Self::Shared(store) => store
                .is_revoked(token)
                .await
                .map_err(|_| RevocationUnavailable),
            Self::ThroughAuth {
                auth,
                recently_valid,
            } => {
                let now = Instant::now();
                if recently_valid.is_fresh(token.jti, now) {
                    return Ok(false);
                }
                let check = recently_valid.start_check(now);
                let request = CheckRevocationRequest {
                    token_id: token.jti.to_owned(),
                    subject: token.subject.to_owned(),
                    generation: token.generation,
                };
                let revoked = auth
                    .clone()
                    .check_revocation(request)
                    .await
                    .map(|response| response.into_inner().revoked)
                    .map_err(|_| RevocationUnavailable)?;
                if !revoked {
                    recently_valid.remember(token.jti, check);
                }
                Ok(revoked)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_millis(250);

    #[test]
    fn an_answer_is_reused_within_the_window_and_not_after_it() {
        let cache = NotRevokedCache::new(WINDOW);
        let began = Instant::now();
        assert!(!cache.is_fresh("a", began));
        cache.remember("a", cache.start_check(began));
        assert!(cache.is_fresh("a", began + Duration::from_millis(249)));
        assert!(!cache.is_fresh("a", began + WINDOW));
        assert!(
            !cache.is_fresh("b", began),
            "another token is not vouched for"
        );
    }

    #[test]
    fn forgetting_drops_kept_answers_and_answers_still_being_asked() {
        let cache = NotRevokedCache::new(WINDOW);
        let now = Instant::now();
        cache.remember("kept", cache.start_check(now));
        let under_way = cache.start_check(now);
        cache.forget_all();
        // The check began before the revocation and answered after it: not kept.
        cache.remember("late", under_way);
        assert!(!cache.is_fresh("kept", now));
        assert!(!cache.is_fresh("late", now));
        cache.remember("after", cache.start_check(now));
        assert!(cache.is_fresh("after", now));
    }

    #[test]
    fn a_zero_window_keeps_nothing_and_the_cache_stays_bounded() {
        let uncached = NotRevokedCache::new(Duration::ZERO);
        let now = Instant::now();
        uncached.remember("a", uncached.start_check(now));
        assert!(uncached.is_empty());

        let cache = NotRevokedCache::new(WINDOW);
        for index in 0..=MAX_REMEMBERED_TOKENS {
            cache.remember(&index.to_string(), cache.start_check(now));
        }
        assert!(cache.len() <= MAX_REMEMBERED_TOKENS);
    }
}
