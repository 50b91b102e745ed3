//! Load control as tower layers around the gateway's API:
//!
//! - rate limits per user (the token's subject) and per client (its certificate identity, or
//!   its address), by GCRA in Redis so every gateway replica shares one budget, falling back
//!   to the same algorithm in this process (with a metric) when Redis cannot answer. This
//!   process charges its own copy of each budget for every call before asking Redis, refunds
//!   the calls Redis refuses, and a call must pass both: so a client that spent its burst
//!   while Redis answered does not get it again when Redis stops answering, nor again when it
//!   comes back empty, nor while some of its calls still wait for Redis's answer. A call is
//!   charged to all of its budgets or to none, and Redis decides them all in one script (one
//!   round trip per call; the keys of one call must live on one Redis, not a cluster's slots);
//! - a bound on calls in flight: beyond it calls are shed at once with RESOURCE_EXHAUSTED and
//!   a RetryInfo detail, instead of queueing until everything is slow.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use fred::prelude::{Builder, Client, ClientLike, Config, LuaInterface, ReconnectPolicy};
use futures::future::{BoxFuture, FutureExt};
use medai_runtime::config::from_str_or_native;
use medai_runtime::identity::ServiceIdentity;
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::TcpConnectInfo;
use tower::{Layer, Service};

use crate::error::GatewayError;
use crate::token_auth::Caller;

#[derive(Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoadControlSettings {
    /// Shared budgets live here; without it each gateway keeps its own.
    #[serde(default)]
    pub redis_url: Option<String>,
    /// Calls per second per user; 0 turns the per-user limit off.
    #[serde(default = "default_user_rate", deserialize_with = "from_str_or_native")]
    pub per_user_per_second: f64,
    #[serde(
        default = "default_user_burst",
        deserialize_with = "from_str_or_native"
    )]
    pub per_user_burst: u32,
    /// Calls per second per client (certificate identity or address); 0 turns it off.
    #[serde(
        default = "default_client_rate",
        deserialize_with = "from_str_or_native"
    )]
    pub per_client_per_second: f64,
    #[serde(
        default = "default_client_burst",
        deserialize_with = "from_str_or_native"
    )]
    pub per_client_burst: u32,
    /// Calls in flight at once before new ones are shed.
    #[serde(default = "default_in_flight", deserialize_with = "from_str_or_native")]
    pub max_in_flight: usize,
}

/// Shown with every credential (URL passwords, secrets) redacted.
impl std::fmt::Debug for LoadControlSettings {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        medai_runtime::config::fmt_redacted("LoadControlSettings", self, formatter)
    }
}

fn default_user_rate() -> f64 {
    200.0
}
fn default_user_burst() -> u32 {
    400
}
fn default_client_rate() -> f64 {
    2000.0
}
fn default_client_burst() -> u32 {
    4000
}
fn default_in_flight() -> usize {
    512
}

impl Default for LoadControlSettings {
    fn default() -> Self {
        Self {
            redis_url: None,
            per_user_per_second: default_user_rate(),
            per_user_burst: default_user_burst(),
            per_client_per_second: default_client_rate(),
            per_client_burst: default_client_burst(),
            max_in_flight: default_in_flight(),
        }
    }
}

/// GCRA over every budget of one call at once: each key's "theoretical arrival time" moves one
/// emission interval per call; a call is allowed while, for every key, that time is within the
/// burst tolerance of now, and then all of them move; a call refused by one key moves none.
/// Answers `{0, 0}` when allowed, else `{the first refusing key's position (from 1), how many
/// ms until it would allow}`. One round trip for all of a call's budgets, and Redis's own clock
/// is the one clock all replicas share.
const GCRA_LUA: &str = r#"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + tonumber(time[2]) / 1000
local moved = {}
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[2 * i - 1])
  local tolerance = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local new_tat = tat + interval
  local allow_at = new_tat - tolerance
  if allow_at > now then
    return {i, math.ceil(allow_at - now)}
  end
  moved[i] = {new_tat, math.ceil(tolerance) + 1}
end
for i, key in ipairs(KEYS) do
  redis.call('SET', key, tostring(moved[i][1]), 'PX', moved[i][2])
end
return {0, 0}
"#;

/// One budget: a rate and the burst it may spend at once.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    pub per_second: f64,
    pub burst: u32,
}

impl Budget {
    fn interval_ms(self) -> f64 {
        1000.0 / self.per_second
    }

    /// How far ahead of now a key's arrival time may run: `burst` calls at once.
    fn tolerance_ms(self) -> f64 {
        self.interval_ms() * f64::from(self.burst.max(1))
    }

    fn interval(self) -> Duration {
        Duration::from_secs_f64(self.interval_ms() / 1000.0)
    }

    fn tolerance(self) -> Duration {
        Duration::from_secs_f64(self.tolerance_ms() / 1000.0)
    }
}

pub struct RateLimiter {
    redis: Option<Client>,
    /// Theoretical arrival times of the calls this process let through: the whole budget when
    /// Redis is absent or unreachable, this replica's share of it otherwise.
    local: Mutex<HashMap<String, Instant>>,
    /// After Redis fails to answer, calls skip it until then instead of each waiting for its
    /// timeout.
    redis_resting_until: Mutex<Option<Instant>>,
}

/// How long a call waits for Redis's decision before this process decides it.
const REDIS_ANSWER_TIMEOUT: Duration = Duration::from_millis(100);

/// How long Redis is left alone after it failed to answer.
const REDIS_REST: Duration = Duration::from_secs(1);

impl RateLimiter {
    pub fn connect(redis_url: Option<&str>) -> Result<Self, String> {
        let redis = match redis_url {
            None => None,
            Some(url) => {
                let config = Config::from_url(url).map_err(|error| error.to_string())?;
                let client = Builder::from_config(config)
                    .with_performance_config(|performance| {
                        performance.default_command_timeout = REDIS_ANSWER_TIMEOUT;
                    })
                    .with_connection_config(|connection| {
                        connection.connection_timeout = Duration::from_millis(500);
                        connection.max_command_attempts = 1;
                    })
                    .set_policy(ReconnectPolicy::new_constant(0, 250))
                    .build()
                    .map_err(|error| error.to_string())?;
                let _connection_task = client.connect();
                Some(client)
            }
        };
        Ok(Self {
            redis,
            local: Mutex::new(HashMap::new()),
            redis_resting_until: Mutex::new(None),
        })
    }

    /// `Ok` if `key` may make one more call now (and the call is charged); otherwise how long
    /// until it may.
    #[cfg(test)]
    pub async fn check(&self, key: &str, budget: Budget) -> Result<(), Duration> {
        self.check_all(&[("", key.to_owned(), budget)])
            .await
            .map_err(|(_, wait)| wait)
    }

    /// `Ok` if a call may be charged to every one of `budgets` now (and it is charged to all of
    /// them); otherwise the scope of the first that refuses and how long until it would allow.
    /// A call is charged to all of its budgets or to none.
    ///
    /// This process's own account is charged first: the calls it let through are a part of all
    /// the calls Redis counted, so when it refuses Redis would too, and the call costs no round
    /// trip. Charged before Redis is asked, the calls still waiting for Redis's answer count
    /// here too, so calls that fall back to this account while others wait cannot spend the
    /// burst those others are being given. A call Redis refuses is refunded. Redis decides all
    /// of the call's budgets in one script: one round trip per call, however many budgets.
    pub async fn check_all(&self, budgets: &[Charge]) -> Result<(), (&'static str, Duration)> {
        self.check_all_locally(budgets)?;
        if budgets.is_empty() {
            return Ok(());
        }
        if let Some(redis) = self.redis.as_ref().filter(|_| !self.redis_resting()) {
            let keys: Vec<String> = budgets
                .iter()
                .map(|(_, key, _)| format!("medai:ratelimit:{key}"))
                .collect();
            let arguments: Vec<f64> = budgets
                .iter()
                .flat_map(|(_, _, budget)| [budget.interval_ms(), budget.tolerance_ms()])
                .collect();
            // Redis caches the compiled script by its hash; EVAL needs no SHA-1 here.
            let answer: Result<Vec<i64>, _> = redis.eval(GCRA_LUA, keys, arguments).await;
            match answer.as_deref() {
                Ok([0, 0]) => return Ok(()),
                Ok(&[position, wait_ms]) => {
                    self.refund_all_locally(budgets);
                    let scope = usize::try_from(position)
                        .ok()
                        .and_then(|position| position.checked_sub(1))
                        .and_then(|index| budgets.get(index))
                        .map_or("", |(scope, _, _)| *scope);
                    return Err((scope, Duration::from_millis(wait_ms.unsigned_abs())));
                }
                Ok(unexpected) => {
                    tracing::warn!(answer = ?unexpected, "rate limits fall back to this process: Redis answered out of form");
                    self.rest_redis();
                }
                Err(error) => {
                    tracing::warn!(error = %error, "rate limits fall back to this process: Redis did not answer");
                    self.rest_redis();
                }
            }
        }
        // Decided by this process's account alone, which has charged the call already.
        if self.redis.is_some() {
            metrics::counter!("medai_gateway_rate_limit_fallback_total").increment(1);
        }
        Ok(())
    }

    fn redis_resting(&self) -> bool {
        let until = *self
            .redis_resting_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        until.is_some_and(|until| Instant::now() < until)
    }

    fn rest_redis(&self) {
        *self
            .redis_resting_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now() + REDIS_REST);
    }

    /// Charges a call to every budget in this process's account, or to none when one refuses.
    fn check_all_locally(&self, budgets: &[Charge]) -> Result<(), (&'static str, Duration)> {
        let mut local = self.local_accounts();
        let mut moved = Vec::with_capacity(budgets.len());
        for (scope, key, budget) in budgets {
            let new_tat =
                Self::allowed_arrival(&local, key, *budget).map_err(|wait| (*scope, wait))?;
            moved.push(new_tat);
        }
        for ((_, key, _), new_tat) in budgets.iter().zip(moved) {
            local.insert(key.clone(), new_tat);
        }
        Ok(())
    }

    /// Decides a call by this process's account alone, and charges it when allowed.
    #[cfg(test)]
    fn check_locally(&self, key: &str, budget: Budget) -> Result<(), Duration> {
        self.check_all_locally(&[("", key.to_owned(), budget)])
            .map_err(|(_, wait)| wait)
    }

    /// Gives back the charges of a call that was refused after all (by Redis).
    fn refund_all_locally(&self, budgets: &[Charge]) {
        let mut local = self.local_accounts();
        for (_, key, budget) in budgets {
            if let Some(tat) = local.get_mut(key) {
                match tat.checked_sub(budget.interval()) {
                    Some(earlier) => *tat = earlier,
                    None => {
                        local.remove(key);
                    }
                }
            }
        }
    }

    fn local_accounts(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        let mut local = self
            .local
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if local.len() > 100_000 {
            // Keys whose arrival time has passed hold no debt; drop them.
            let now = Instant::now();
            local.retain(|_, tat| *tat > now);
        }
        local
    }

    /// GCRA: the key's next theoretical arrival time if a call now is allowed, otherwise how
    /// long until one is.
    fn allowed_arrival(
        local: &HashMap<String, Instant>,
        key: &str,
        budget: Budget,
    ) -> Result<Instant, Duration> {
        let now = Instant::now();
        let tat = local.get(key).copied().unwrap_or(now).max(now);
        let new_tat = tat + budget.interval();
        let allow_at = new_tat.checked_sub(budget.tolerance()).unwrap_or(now);
        if allow_at > now {
            return Err(allow_at - now);
        }
        Ok(new_tat)
    }
}

/// Everything the layer needs, shared by every clone of the service.
pub struct LoadControl {
    pub limiter: RateLimiter,
    pub settings: LoadControlSettings,
    pub in_flight: Arc<Semaphore>,
}

impl LoadControl {
    pub fn new(settings: LoadControlSettings) -> Result<Self, String> {
        // An empty URL (an override that removes Redis) means none.
        let redis_url = settings.redis_url.as_deref().filter(|url| !url.is_empty());
        let limiter = RateLimiter::connect(redis_url)?;
        Ok(Self {
            limiter,
            in_flight: Arc::new(Semaphore::new(settings.max_in_flight.max(1))),
            settings,
        })
    }
}

/// One budget a call is charged to: (scope, key, budget).
pub type Charge = (&'static str, String, Budget);

/// The budgets one call is charged against.
type Budgets = Vec<Charge>;

/// Charges one call (or one message of a stream) against every budget, or refuses it.
async fn charge(limiter: &RateLimiter, budgets: &Budgets) -> Result<(), GatewayError> {
    limiter.check_all(budgets).await.map_err(|(scope, wait)| {
        metrics::counter!("medai_gateway_rate_limited_total", "scope" => scope).increment(1);
        GatewayError::RateLimited {
            retry_after_ms: millis(wait),
        }
    })
}

/// Handed to every call's handler, so a stream that carries many requests (a study stream's
/// images) counts each of them as a call: each is charged against the caller's rate limits
/// and holds a place in the in-flight bound while it runs.
#[derive(Clone)]
pub struct MessageAdmission {
    control: Arc<LoadControl>,
    budgets: Arc<Budgets>,
}

impl MessageAdmission {
    /// Admits one more message now, or refuses it as a call would be; the permit is its place
    /// in the in-flight bound until dropped.
    pub async fn admit(&self) -> Result<OwnedSemaphorePermit, GatewayError> {
        let Ok(permit) = self.control.in_flight.clone().try_acquire_owned() else {
            metrics::counter!("medai_gateway_shed_total").increment(1);
            return Err(GatewayError::Overloaded {
                retry_after_ms: 100,
            });
        };
        charge(&self.control.limiter, &self.budgets).await?;
        Ok(permit)
    }
}

#[derive(Clone)]
pub struct LoadControlLayer {
    control: Arc<LoadControl>,
}

impl LoadControlLayer {
    pub fn new(control: LoadControl) -> Self {
        Self {
            control: Arc::new(control),
        }
    }
}

impl<S> Layer<S> for LoadControlLayer {
    type Service = LoadControlService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        LoadControlService {
            inner,
            control: self.control.clone(),
        }
    }
}

#[derive(Clone)]
pub struct LoadControlService<S> {
    inner: S,
    control: Arc<LoadControl>,
}

/// The client a call comes from: its certificate's identity, else its address.
fn client_key<B>(request: &http::Request<B>) -> String {
    if let Some(identity) = ServiceIdentity::of_peer(request) {
        return format!("client:{}", identity.name());
    }
    let address = request
        .extensions()
        .get::<tonic::transport::server::TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|info| info.get_ref().remote_addr())
        .or_else(|| {
            request
                .extensions()
                .get::<TcpConnectInfo>()
                .and_then(TcpConnectInfo::remote_addr)
        });
    address.map_or_else(
        || "client:unknown".to_owned(),
        |address: SocketAddr| format!("client:{}", address.ip()),
    )
}

fn refusal<ResBody: Default>(error: GatewayError) -> http::Response<ResBody> {
    medai_runtime::errors::refusal_response(error.into())
}

fn millis(wait: Duration) -> u64 {
    u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl<S, B, ResBody> Service<http::Request<B>> for LoadControlService<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let control = self.control.clone();
        async move {
            if request.uri().path().starts_with("/grpc.health.v1.Health/") {
                return inner.call(request).await;
            }
            let Ok(permit) = control.in_flight.clone().try_acquire_owned() else {
                metrics::counter!("medai_gateway_shed_total").increment(1);
                return Ok(refusal(GatewayError::Overloaded {
                    retry_after_ms: 100,
                }));
            };
            let settings = &control.settings;
            let mut budgets = Vec::with_capacity(2);
            if settings.per_client_per_second > 0.0 {
                budgets.push((
                    "client",
                    client_key(&request),
                    Budget {
                        per_second: settings.per_client_per_second,
                        burst: settings.per_client_burst,
                    },
                ));
            }
            if settings.per_user_per_second > 0.0
                && let Some(caller) = request.extensions().get::<Caller>()
            {
                budgets.push((
                    "user",
                    format!("user:{}", caller.subject),
                    Budget {
                        per_second: settings.per_user_per_second,
                        burst: settings.per_user_burst,
                    },
                ));
            }
            if let Err(error) = charge(&control.limiter, &budgets).await {
                return Ok(refusal(error));
            }
            // A streaming call's messages are charged one by one by its handler.
            let mut request = request;
            request.extensions_mut().insert(MessageAdmission {
                control: control.clone(),
                budgets: Arc::new(budgets),
            });
            let response = inner.call(request).await;
            drop(permit);
            response
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(max_in_flight: usize, burst: u32) -> MessageAdmission {
        let settings = LoadControlSettings {
            max_in_flight,
            ..LoadControlSettings::default()
        };
        MessageAdmission {
            control: Arc::new(LoadControl::new(settings).expect("load control")),
            budgets: Arc::new(vec![(
                "user",
                "user:stream".to_owned(),
                Budget {
                    per_second: 0.001,
                    burst,
                },
            )]),
        }
    }

    #[tokio::test]
    async fn each_message_of_a_stream_is_charged_like_a_call() {
        let admission = admission(16, 3);
        for message in 0..3 {
            drop(admission.admit().await.unwrap_or_else(|error| {
                panic!("message {message} refused: {error}");
            }));
        }
        let refused = admission.admit().await.expect_err("fourth message");
        assert!(
            matches!(refused, GatewayError::RateLimited { .. }),
            "{refused:?}"
        );
    }

    #[tokio::test]
    async fn each_message_in_flight_holds_a_place_in_the_bound() {
        let admission = admission(2, 100);
        let first = admission.admit().await.expect("first");
        let _second = admission.admit().await.expect("second");
        let refused = admission.admit().await.expect_err("third at once");
        assert!(
            matches!(refused, GatewayError::Overloaded { .. }),
            "{refused:?}"
        );
        drop(first);
        assert!(admission.admit().await.is_ok(), "a place was freed");
    }

    #[test]
    fn the_local_gcra_allows_the_burst_then_the_rate() {
        let limiter = RateLimiter::connect(None).expect("limiter");
        let budget = Budget {
            per_second: 10.0,
            burst: 5,
        };
        for call in 0..5 {
            assert!(limiter.check_locally("k", budget).is_ok(), "call {call}");
        }
        let wait = limiter.check_locally("k", budget).expect_err("sixth call");
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        assert!(limiter.check_locally("other", budget).is_ok());
        std::thread::sleep(Duration::from_millis(110));
        assert!(limiter.check_locally("k", budget).is_ok());
        assert!(limiter.check_locally("k", budget).is_err());
    }

    /// A Redis that takes connections and never answers: one too starved to answer in time.
    async fn silent_redis() -> (String, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("redis://{}", listener.local_addr().expect("address"));
        let holder = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((connection, _)) = listener.accept().await {
                held.push(connection);
            }
        });
        (url, holder)
    }

    #[tokio::test]
    async fn calls_waiting_for_redis_are_charged_here_so_a_fallback_cannot_spend_their_burst() {
        let (url, holder) = silent_redis().await;
        let limiter = Arc::new(RateLimiter::connect(Some(&url)).expect("limiter"));
        let budget = Budget {
            per_second: 0.001,
            burst: 5,
        };
        let waiting: Vec<_> = (0..5)
            .map(|_| {
                let limiter = limiter.clone();
                tokio::spawn(async move { limiter.check("k", budget).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        // The burst is given to the five calls waiting for Redis; a sixth is refused here at
        // once, not after Redis's timeout, and not allowed by the fallback while they wait.
        let asked = Instant::now();
        assert!(limiter.check("k", budget).await.is_err(), "sixth call");
        assert!(
            asked.elapsed() < REDIS_ANSWER_TIMEOUT,
            "the sixth call waited {:?} for Redis",
            asked.elapsed()
        );
        for (call, waiting) in waiting.into_iter().enumerate() {
            let decided = waiting.await.expect("join");
            assert!(decided.is_ok(), "call {call} decided here: {decided:?}");
        }
        assert!(limiter.check("k", budget).await.is_err(), "after the burst");
        holder.abort();
    }

    #[tokio::test]
    async fn a_call_redis_refuses_is_refunded_here() {
        let budget = Budget {
            per_second: 1.0,
            burst: 2,
        };
        let key = unique_key("refund-test");
        // Two gateway replicas sharing Redis: the first spends the whole burst ...
        let first = suite_redis_replica().await;
        let second = suite_redis_replica().await;
        for call in 0..2 {
            assert!(first.check(&key, budget).await.is_ok(), "call {call}");
        }
        // ... so Redis refuses the second's call, which its own account had allowed and charged.
        assert!(second.check(&key, budget).await.is_err(), "Redis refuses");
        assert!(!second.redis_resting(), "Redis answered; nothing fell back");
        // Refunded: the second replica's own account still holds its whole burst.
        for call in 0..2 {
            assert!(
                second.check_locally(&key, budget).is_ok(),
                "local call {call} after the refund"
            );
        }
        assert!(second.check_locally(&key, budget).is_err());
    }

    /// A gateway replica's limiter on the suite's Redis, connected.
    async fn suite_redis_replica() -> RateLimiter {
        let url = std::env::var("MEDAI_TEST_REDIS_URL").unwrap_or_else(|_| {
            panic!("MEDAI_TEST_REDIS_URL is not set: run the suite with scripts/test.sh")
        });
        let limiter = RateLimiter::connect(Some(&url)).expect("limiter");
        limiter
            .redis
            .as_ref()
            .expect("redis")
            .wait_for_connect()
            .await
            .expect("connect");
        limiter
    }

    /// A key no other run of the suite uses (they share one Redis).
    fn unique_key(prefix: &str) -> String {
        format!(
            "{prefix}:{}:{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        )
    }

    /// A budget of one call a second with `burst` at once, under `scope`.
    fn charge_of(scope: &'static str, tag: &str, burst: u32) -> Charge {
        (
            scope,
            format!("{scope}:{tag}"),
            Budget {
                per_second: 1.0,
                burst,
            },
        )
    }

    #[tokio::test]
    async fn a_call_is_charged_to_all_its_budgets_or_to_none_in_one_redis_script() {
        let tag = unique_key("all-or-none");
        let client = charge_of("client", &tag, 5);
        let user = charge_of("user", &tag, 2);
        let limiter = suite_redis_replica().await;
        let both = [client.clone(), user.clone()];
        for call in 0..2 {
            assert!(limiter.check_all(&both).await.is_ok(), "call {call}");
        }
        // The user's burst is spent: the call is refused under the user's scope ...
        let (scope, wait) = limiter.check_all(&both).await.expect_err("third call");
        assert_eq!(scope, "user");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert!(!limiter.redis_resting(), "Redis decided");
        // ... and charged to neither budget, here or in Redis: the client's burst of 5 still
        // holds 3 calls, in a fresh replica (Redis alone) and in this one.
        let other_replica = suite_redis_replica().await;
        let client_alone = [client.clone()];
        for call in 0..3 {
            assert!(
                other_replica.check_all(&client_alone).await.is_ok(),
                "client call {call} in Redis"
            );
        }
        let (scope, _) = other_replica
            .check_all(&client_alone)
            .await
            .expect_err("the client's burst is spent");
        assert_eq!(scope, "client");
        for call in 0..3 {
            assert!(
                limiter.check_locally(&client.1, client.2).is_ok(),
                "client call {call} here"
            );
        }
        assert!(limiter.check_locally(&client.1, client.2).is_err());
    }
}
