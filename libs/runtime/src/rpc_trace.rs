//! One span per gRPC call, named and attributed by the OpenTelemetry semantic conventions for
//! RPC, so Jaeger, Tempo and their service graphs read the mesh's traces without translation:
//! - the name is `package.Service/Method` (for example `medai.gateway.v1.Gateway/Infer`);
//! - the kind is SERVER for a call this process serves ([`RpcServerTraceLayer`]) and CLIENT for
//!   one it makes ([`RpcClientTraceLayer`], on every mesh channel: see [`MeshChannel`]);
//! - attributes `rpc.system=grpc`, `rpc.service`, `rpc.method`, `rpc.grpc.status_code`,
//!   `server.address` and `server.port`;
//! - a failed call's `error.type` is the stable reason code the status carries (its
//!   `google.rpc.ErrorInfo` reason, see [`crate::errors`]), or the code's name when it carries
//!   none; nothing else of the status (its message) goes on the span;
//! - status OK for success; ERROR, described by that reason, on a CLIENT span for any failure
//!   and on a SERVER span only for a server fault (UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED,
//!   INTERNAL, UNAVAILABLE, DATA_LOSS); a refusal of the caller's input leaves a SERVER span's
//!   status unset.
//!
//! A server span adopts the caller's W3C trace context; a client span is a child of the span
//! the call is made in and puts its own context on the request, so the callee's server span
//! hangs under it. Both spans last until the response body ends (for streams, the whole
//! stream), and the status is read where gRPC puts it: the headers of a trailers-only answer,
//! else the trailers. The server span also carries the call's correlation id, settled here
//! (the caller's if well formed, else a new one written back into the request), so every log
//! line of the call names it.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{BoxFuture, FutureExt};
use opentelemetry::trace::Status;
use tonic::Code;
use tower::{Layer, Service};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::call_status::{CallEnd, EndOnce, StatusBody, with_status_body};
use crate::correlation::{settle_correlation_header, settled_correlation};
use crate::unprocessed::RetryNeverProcessed;

/// The span name of a call to a path the server does not hold: made-up paths must not become
/// new span names.
pub const UNKNOWN_METHOD_SPAN: &str = "grpc unknown method";

/// A mesh channel with a CLIENT span around every call (see [`crate::tls::TlsMaterial::mesh_channel`]).
pub type MeshChannel = RpcClientTraceService<
    crate::grpc_client_metrics::GrpcClientMetrics<
        RetryNeverProcessed<crate::balance::BalancedChannel>,
    >,
>;

/// `channel` (made for `endpoint`) with the layers every outgoing call passes through: a CLIENT
/// span, over the `grpc_client_*` metrics, over the sending again of a call the server provably
/// never processed (a draining replica's; see [`crate::unprocessed`]), so one call is one span
/// and one count however many times it was sent.
pub fn traced_channel<C>(
    channel: C,
    endpoint: &str,
) -> RpcClientTraceService<crate::grpc_client_metrics::GrpcClientMetrics<RetryNeverProcessed<C>>> {
    RpcClientTraceLayer::new(endpoint).layer(crate::grpc_client_metrics::GrpcClientMetrics::new(
        RetryNeverProcessed::new(channel),
    ))
}

/// A channel to one address outside the mesh (the bridge's gateway endpoint) with the same
/// layers as [`MeshChannel`].
pub type TracedChannel = RpcClientTraceService<
    crate::grpc_client_metrics::GrpcClientMetrics<RetryNeverProcessed<tonic::transport::Channel>>,
>;

/// `package.Service` and `Method` of a gRPC path `/package.Service/Method`.
fn service_and_method(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    if service.is_empty() || method.is_empty() || method.contains('/') {
        return None;
    }
    Some((service, method))
}

/// The canonical name of a gRPC code, as the spec and every other implementation spell it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Whether a gRPC code says the server failed rather than that it refused the caller: the
/// codes OpenTelemetry's RPC conventions mark ERROR on a SERVER span.
fn is_server_fault(code: Code) -> bool {
    matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    )
}

/// Which end of a call a span stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Server,
    Client,
}

/// Records a call's outcome on its span: `rpc.grpc.status_code`; for a failed call
/// `error.type`, the stable reason (else the code's name); and the status as OpenTelemetry's RPC
/// conventions set it: OK for success, ERROR (described by the reason) on a CLIENT span for any
/// failure and on a SERVER span only for a server fault. A server that refused bad input did its
/// job, so its span stays unset and error dashboards count only what the server got wrong.
///
/// Set on the OpenTelemetry span directly, not recorded as `tracing` fields: a recorded field
/// makes the JSON log layer parse and re-serialise every field the span holds (the largest
/// per-call cost a profile of the mesh stack showed), and no log line follows the outcome.
fn record_outcome(span: &tracing::Span, end: End, code: Code, reason: Option<String>) {
    span.set_attribute("rpc.grpc.status_code", i64::from(code as i32));
    if code == Code::Ok {
        span.set_status(Status::Ok);
        return;
    }
    let description = reason.unwrap_or_else(|| code_name(code).to_owned());
    if end == End::Client || is_server_fault(code) {
        span.set_status(Status::error(description.clone()));
    }
    span.set_attribute("error.type", description);
}

/// The call's span as the [`CallEnd`] of its response: the outcome is recorded on it, and it
/// is entered while the body is polled (log lines of a streamed answer belong to the call).
pub struct SpanEnd(tracing::Span, End);

impl CallEnd for SpanEnd {
    fn ended(&mut self, code: Code, reason: Option<String>) {
        record_outcome(&self.0, self.1, code, reason);
    }

    fn polling_scope(&self) -> Option<tracing::span::Entered<'_>> {
        Some(self.0.enter())
    }
}

/// A response body that keeps the call's span open until it ends and records on it the status
/// the call ended with (the shared [`StatusBody`]).
pub type TracedBody<B> = StatusBody<B, SpanEnd>;

/// The span's outcome, recorded once (CANCELLED if dropped before the call said).
type Outcome = EndOnce<SpanEnd>;

fn traced_response<B>(
    response: http::Response<B>,
    outcome: Outcome,
) -> http::Response<TracedBody<B>> {
    with_status_body(response, outcome)
}

/// `host` and `port` of an authority, the port defaulting to HTTPS's.
fn host_and_port(authority: Option<&http::uri::Authority>) -> Option<(String, u16)> {
    let authority = authority?;
    Some((
        authority.host().to_owned(),
        authority.port_u16().unwrap_or(443),
    ))
}

/// SERVER spans for every call a mesh server answers; outermost, so refusals by the other
/// layers (peer policy, deadline, load control) are spans too.
#[derive(Clone, Debug)]
pub struct RpcServerTraceLayer {
    methods: Arc<BTreeSet<String>>,
}

impl RpcServerTraceLayer {
    /// `methods` are the full paths the server holds (see `PeerPolicy::methods`); others are
    /// named [`UNKNOWN_METHOD_SPAN`].
    pub fn new(methods: BTreeSet<String>) -> Self {
        Self {
            methods: Arc::new(methods),
        }
    }
}

impl<S> Layer<S> for RpcServerTraceLayer {
    type Service = RpcServerTraceService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcServerTraceService {
            inner,
            methods: self.methods.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct RpcServerTraceService<S> {
    inner: S,
    methods: Arc<BTreeSet<String>>,
}

/// The SERVER span of a call to `path`, before its outcome is known. Every field is given
/// here, none recorded later (see [`record_outcome`]).
fn server_span(
    path: &str,
    known: bool,
    server: Option<(String, u16)>,
    correlation_id: &str,
) -> tracing::Span {
    let named = service_and_method(path).filter(|_| known);
    let name = named.map_or_else(
        || UNKNOWN_METHOD_SPAN.to_owned(),
        |(service, method)| format!("{service}/{method}"),
    );
    tracing::info_span!(
        "rpc",
        otel.name = %name,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = named.map(|(service, _)| service),
        rpc.method = named.map(|(_, method)| method),
        server.address = server.as_ref().map(|(address, _)| address.as_str()),
        server.port = server.as_ref().map(|(_, port)| i64::from(*port)),
        correlation_id = %correlation_id,
    )
}

/// Where the call was addressed: its `:authority`, else the local address it arrived on.
fn server_of<B>(request: &http::Request<B>) -> Option<(String, u16)> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    host_and_port(request.uri().authority()).or_else(|| {
        let local = request
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|info| info.get_ref().local_addr())
            .or_else(|| {
                request
                    .extensions()
                    .get::<TcpConnectInfo>()
                    .and_then(TcpConnectInfo::local_addr)
            })?;
        Some((local.ip().to_string(), local.port()))
    })
}

impl<S, B, ResBody> Service<http::Request<B>> for RpcServerTraceService<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<TracedBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        settle_correlation_header(request.headers_mut());
        let path = request.uri().path();
        let span = server_span(
            path,
            self.methods.contains(path),
            server_of(&request),
            settled_correlation(request.headers()).unwrap_or_default(),
        );
        crate::telemetry::adopt_remote_parent(&span, request.headers());
        let response = self.inner.call(request).instrument(span.clone());
        // Dropped before an answer (the caller went away): CANCELLED.
        let mut outcome = Outcome::new(SpanEnd(span, End::Server));
        async move {
            match response.await {
                Ok(response) => Ok(traced_response(response, outcome)),
                Err(error) => {
                    outcome.record(Code::Unavailable, None);
                    Err(error)
                }
            }
        }
        .boxed()
    }
}

/// CLIENT spans for every call made on a channel to `endpoint`.
#[derive(Clone, Debug)]
pub struct RpcClientTraceLayer {
    server: Option<(String, u16)>,
}

impl RpcClientTraceLayer {
    /// `endpoint` as the channel was made for, for example `https://medai-audit:50055`.
    pub fn new(endpoint: &str) -> Self {
        let server = endpoint
            .parse::<http::Uri>()
            .ok()
            .and_then(|uri| host_and_port(uri.authority()));
        Self { server }
    }
}

impl<S> Layer<S> for RpcClientTraceLayer {
    type Service = RpcClientTraceService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcClientTraceService {
            inner,
            server: self.server.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct RpcClientTraceService<S> {
    inner: S,
    server: Option<(String, u16)>,
}

/// The CLIENT span of a call to `path`, a child of the span the call is made in. Every field
/// is given here, none recorded later (see [`record_outcome`]).
fn client_span(path: &str, server: Option<&(String, u16)>) -> tracing::Span {
    let named = service_and_method(path);
    let name = named.map_or_else(
        || path.to_owned(),
        |(service, method)| format!("{service}/{method}"),
    );
    tracing::info_span!(
        "rpc.client",
        otel.name = %name,
        otel.kind = "client",
        rpc.system = "grpc",
        rpc.service = named.map(|(service, _)| service),
        rpc.method = named.map(|(_, method)| method),
        server.address = server.map(|(address, _)| address.as_str()),
        server.port = server.map(|(_, port)| i64::from(*port)),
    )
}

impl<S, B, ResBody> Service<http::Request<B>> for RpcClientTraceService<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<TracedBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let span = client_span(request.uri().path(), self.server.as_ref());
        crate::telemetry::inject_span_context(&span, request.headers_mut());
        let response = self.inner.call(request).instrument(span.clone());
        // Dropped before an answer (the caller gave up): CANCELLED.
        let mut outcome = Outcome::new(SpanEnd(span, End::Client));
        async move {
            match response.await {
                Ok(response) => Ok(traced_response(response, outcome)),
                Err(error) => {
                    // The channel could not deliver the call: what tonic answers as UNAVAILABLE.
                    outcome.record(Code::Unavailable, None);
                    Err(error)
                }
            }
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests;
