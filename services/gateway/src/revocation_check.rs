//! Where the gateway learns whether a verified token was revoked: Redis, shared with auth and
//! every other gateway, or, in the embedded mesh that runs without Redis, auth's own store.
//!
//! Either way a "not revoked" answer is reused for the same token for
//! `revocation.not_revoked_cache_ms` (250 ms by default), so a caller sending many requests
//! with one token costs one check per window, not one per request. Requests for a token whose
//! check is under way wait for that check rather than each asking auth (issue 14: at
//! concurrency 64 every request arriving while the window's check ran asked again). A revoking
//! action relayed by this gateway drops every cached answer at once, and no request waits on
//! a check that began before it; one made elsewhere (another gateway, auth itself) takes
//! effect here within the window.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use medai_proto::auth::v1::CheckRevocationRequest;
use medai_proto::auth::v1::auth_service_client::AuthServiceClient;
use medai_revocation::{RevocationStore, TokenFacts};
use medai_runtime::rpc_trace::MeshChannel;
use tokio::sync::watch;

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
    /// token id → the check under way for it, which later requests for the token wait for
    under_way: HashMap<String, UnderWay>,
}

/// A check under way and where its answer (`Some(revoked)`) will be published.
struct UnderWay {
    check: CheckStarted,
    answer: watch::Receiver<Option<bool>>,
}

/// What a request for a token does: use a fresh answer, wait for the check under way, or ask.
pub enum Lookup<'a> {
    Fresh,
    Wait(Waiting<'a>),
    Ask(Asking<'a>),
}

/// A request waiting for the check another request began.
pub struct Waiting<'a> {
    cache: &'a NotRevokedCache,
    check: CheckStarted,
    answer: watch::Receiver<Option<bool>>,
}

/// The request that asks for a token: its answer goes to the requests waiting for it; dropped
/// without an answer (the check failed or was cancelled), they ask themselves.
pub struct Asking<'a> {
    cache: &'a NotRevokedCache,
    token_id: String,
    check: CheckStarted,
    answer: watch::Sender<Option<bool>>,
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

    /// How a request for `token_id` arriving at `now` learns whether it is revoked. A request
    /// waits only for a check that began less than the window ago and after the last
    /// [`NotRevokedCache::forget_all`]; with a zero window every request asks.
    pub fn look_up(&self, token_id: &str, now: Instant) -> Lookup<'_> {
        let mut state = self.state();
        if state
            .checked_at
            .get(token_id)
            .is_some_and(|at| now.saturating_duration_since(*at) < self.window)
        {
            return Lookup::Fresh;
        }
        let check = CheckStarted {
            at: now,
            forgotten: state.forgotten,
        };
        if self.window.is_zero() {
            let (answer, _) = watch::channel(None);
            return Lookup::Ask(Asking {
                cache: self,
                token_id: token_id.to_owned(),
                check,
                answer,
            });
        }
        if let Some(under_way) = state.under_way.get(token_id)
            && under_way.check.forgotten == state.forgotten
            && now.saturating_duration_since(under_way.check.at) < self.window
        {
            return Lookup::Wait(Waiting {
                cache: self,
                check: under_way.check,
                answer: under_way.answer.clone(),
            });
        }
        let (answer, receiver) = watch::channel(None);
        state.under_way.insert(
            token_id.to_owned(),
            UnderWay {
                check,
                answer: receiver,
            },
        );
        Lookup::Ask(Asking {
            cache: self,
            token_id: token_id.to_owned(),
            check,
            answer,
        })
    }

    pub fn len(&self) -> usize {
        self.state().checked_at.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Waiting<'_> {
    /// The answer of the check waited for: `Some(revoked)`, or `None` when that check ended
    /// without an answer or a revocation was relayed while it ran (then the request asks
    /// itself).
    pub async fn answer(mut self) -> Option<bool> {
        let revoked = match self.answer.wait_for(Option::is_some).await {
            Ok(answer) => (*answer)?,
            Err(_) => return None,
        };
        if revoked {
            return Some(true);
        }
        (self.cache.state().forgotten == self.check.forgotten).then_some(false)
    }
}

impl Asking<'_> {
    /// Publishes the answer to the requests waiting for it, and keeps a "not revoked" one.
    pub fn answered(self, revoked: bool) {
        if !revoked {
            self.cache.remember(&self.token_id, self.check);
        }
        self.answer.send_replace(Some(revoked));
    }
}

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        let mut state = self.cache.state();
        if state
            .under_way
            .get(&self.token_id)
            .is_some_and(|under_way| under_way.answer.same_channel(&self.answer.subscribe()))
        {
            state.under_way.remove(&self.token_id);
        }
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
                let asking = match recently_valid.look_up(token.jti, Instant::now()) {
                    Lookup::Fresh => return Ok(false),
                    Lookup::Ask(asking) => Some(asking),
                    Lookup::Wait(waiting) => match waiting.answer().await {
                        Some(revoked) => return Ok(revoked),
                        // That check gave no usable answer: this request asks itself, alone.
                        None => None,
                    },
                };
                // Kept for a request that asks alone (its answer is remembered as before).
                let check = recently_valid.start_check(Instant::now());
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
                match asking {
                    Some(asking) => asking.answered(revoked),
                    None if !revoked => recently_valid.remember(token.jti, check),
                    None => {}
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

    fn asking(lookup: Lookup<'_>) -> Asking<'_> {
        match lookup {
            Lookup::Ask(asking) => asking,
            _ => panic!("expected to ask"),
        }
    }

    fn waiting(lookup: Lookup<'_>) -> Waiting<'_> {
        match lookup {
            Lookup::Wait(waiting) => waiting,
            _ => panic!("expected to wait"),
        }
    }

    #[tokio::test]
    async fn requests_for_a_token_being_checked_wait_for_that_check() {
        let cache = NotRevokedCache::new(WINDOW);
        let now = Instant::now();
        let first = asking(cache.look_up("a", now));
        let second = waiting(cache.look_up("a", now + Duration::from_millis(1)));
        // Another token is checked on its own.
        let other = asking(cache.look_up("b", now));
        first.answered(false);
        assert_eq!(second.answer().await, Some(false));
        assert!(matches!(cache.look_up("a", now), Lookup::Fresh));
        drop(other);

        // A revoked answer is shared and not kept.
        let later = now + WINDOW;
        let first = asking(cache.look_up("a", later));
        let second = waiting(cache.look_up("a", later));
        first.answered(true);
        assert_eq!(second.answer().await, Some(true));
        assert!(matches!(cache.look_up("a", later), Lookup::Ask(_)));
    }

    #[tokio::test]
    async fn no_request_waits_on_a_check_begun_before_a_revocation_or_one_that_failed() {
        let cache = NotRevokedCache::new(WINDOW);
        let now = Instant::now();
        let first = asking(cache.look_up("a", now));
        let before = waiting(cache.look_up("a", now));
        cache.forget_all();
        // A request after the revocation asks itself, and the one waiting before it does not
        // take the old check's "not revoked".
        let after = asking(cache.look_up("a", now));
        first.answered(false);
        assert_eq!(before.answer().await, None);
        assert!(!cache.is_fresh("a", now));
        let waiter = waiting(cache.look_up("a", now));
        drop(after);
        assert_eq!(
            waiter.answer().await,
            None,
            "a check that failed answers no one"
        );
        // Nor does a request wait for a check older than the window.
        let slow = asking(cache.look_up("a", now));
        assert!(matches!(cache.look_up("a", now + WINDOW), Lookup::Ask(_)));
        drop(slow);

        let uncached = NotRevokedCache::new(Duration::ZERO);
        let _first = asking(uncached.look_up("a", now));
        assert!(matches!(uncached.look_up("a", now), Lookup::Ask(_)));
    }
}
