//! Which peer may call which method. Each server holds one [`PeerPolicy`] and wraps its routes
//! in a [`PeerPolicyLayer`]; a call from a peer the policy does not name for that method is
//! refused with PERMISSION_DENIED before it reaches a handler.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{BoxFuture, FutureExt};
use tower::{Layer, Service};

use crate::errors::{ErrorKind, status_with_reason};
use crate::identity::ServiceIdentity;

/// Every verified peer may ask for health; the Kubernetes probes and `medai up` rely on it.
const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

#[derive(Clone, Debug, Default)]
pub struct PeerPolicy {
    /// Full method path (`/medai.audit.v1.AuditService/Append`) → allowed peers.
    allowed: BTreeMap<String, BTreeSet<String>>,
    /// Methods open to any caller on a connection the server accepted (the gateway's
    /// external API, where users authenticate with tokens instead of certificates).
    open: BTreeSet<String>,
}

impl PeerPolicy {
    pub fn new() -> Self {
        Self::default()
    }

    /// Allows `peers` to call `method` (a full gRPC path).
    pub fn allow(mut self, method: &str, peers: &[&str]) -> Self {
        let entry = self.allowed.entry(method.to_owned()).or_default();
        entry.extend(peers.iter().map(|peer| (*peer).to_owned()));
        self
    }

    /// Lets any caller reach `method`; authentication happens further in.
    pub fn open(mut self, method: &str) -> Self {
        self.open.insert(method.to_owned());
        self
    }

    /// Every method the server holds: a method the policy does not name is refused to every
    /// caller, so this is the served set (health included).
    pub fn methods(&self) -> BTreeSet<String> {
        self.allowed
            .keys()
            .chain(self.open.iter())
            .cloned()
            .chain(
                crate::health::HEALTH_METHODS
                    .iter()
                    .map(|method| (*method).to_owned()),
            )
            .collect()
    }

    /// The gRPC services the server holds (`medai.audit.v1.AuditService`), health excluded.
    pub fn services(&self) -> BTreeSet<String> {
        self.allowed
            .keys()
            .chain(self.open.iter())
            .filter(|method| !method.starts_with(HEALTH_PREFIX))
            .filter_map(|method| {
                let (service, _) = method.trim_start_matches('/').split_once('/')?;
                Some(service.to_owned())
            })
            .collect()
    }

    /// Whether `method` is one of [`PeerPolicy::methods`].
    pub fn holds(&self, method: &str) -> bool {
        self.allowed.contains_key(method)
            || self.open.contains(method)
            || crate::health::HEALTH_METHODS.contains(&method)
    }

    pub fn permits(&self, method: &str, peer: Option<&ServiceIdentity>) -> bool {
        if self.open.contains(method) {
            return true;
        }
        let Some(peer) = peer else {
            return false;
        };
        if method.starts_with(HEALTH_PREFIX) {
            return true;
        }
        self.allowed
            .get(method)
            .is_some_and(|peers| peers.contains(peer.name()))
    }
}

#[derive(Clone)]
pub struct PeerPolicyLayer {
    policy: Arc<PeerPolicy>,
}

impl PeerPolicyLayer {
    pub fn new(policy: PeerPolicy) -> Self {
        Self {
            policy: Arc::new(policy),
        }
    }
}

impl<S> Layer<S> for PeerPolicyLayer {
    type Service = PeerPolicyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PeerPolicyService {
            inner,
            policy: self.policy.clone(),
        }
    }
}

#[derive(Clone)]
pub struct PeerPolicyService<S> {
    inner: S,
    policy: Arc<PeerPolicy>,
}

impl<S, B, ResBody> Service<http::Request<B>> for PeerPolicyService<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
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
        let peer = ServiceIdentity::of_peer(&request);
        if self.policy.permits(request.uri().path(), peer.as_ref()) {
            return self.inner.call(request).boxed();
        }
        let method = request.uri().path().to_owned();
        let peer_name = peer
            .as_ref()
            .map_or("<no certificate>", ServiceIdentity::name)
            .to_owned();
        tracing::warn!(method = %method, peer = %peer_name, "peer refused by policy");
        // A made-up path is one label value, so callers cannot mint series.
        let label = if self.policy.holds(&method) {
            method.clone()
        } else {
            crate::grpc_metrics::UNKNOWN_METHOD.to_owned()
        };
        metrics::counter!("medai_peer_policy_denials_total", "method" => label).increment(1);
        let status = status_with_reason(
            ErrorKind::PermissionDenied,
            "medai.mesh",
            "PEER_NOT_ALLOWED",
            format!("peer {peer_name} may not call {method}"),
        );
        let response = crate::errors::refusal_response(status);
        async move { Ok(response) }.boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const APPEND: &str = "/medai.audit.v1.AuditService/Append";

    #[test]
    fn only_named_peers_may_call_a_method() {
        let policy = PeerPolicy::new().allow(APPEND, &["gateway", "auth"]);
        assert!(policy.permits(APPEND, Some(&ServiceIdentity::new("gateway"))));
        assert!(!policy.permits(APPEND, Some(&ServiceIdentity::new("validation"))));
        assert!(!policy.permits(APPEND, None));
        assert!(!policy.permits(
            "/medai.audit.v1.AuditService/Unknown",
            Some(&ServiceIdentity::new("gateway"))
        ));
    }

    #[test]
    fn health_is_open_to_verified_peers_and_open_methods_to_anyone() {
        let policy = PeerPolicy::new().open("/medai.gateway.v1.GatewayService/Login");
        assert!(policy.permits(
            "/grpc.health.v1.Health/Check",
            Some(&ServiceIdentity::new("cli"))
        ));
        assert!(!policy.permits("/grpc.health.v1.Health/Check", None));
        assert!(policy.permits("/medai.gateway.v1.GatewayService/Login", None));
    }
}
