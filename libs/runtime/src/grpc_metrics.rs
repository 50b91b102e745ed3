//! Request counts and latency histograms per gRPC method and status code, as a tower layer so
//! no handler repeats it. Labels hold method paths and codes only, never request content.
//! A path the server does not hold is labelled [`UNKNOWN_METHOD`]: anyone who can open a
//! connection can make up paths, and each would otherwise be a new series for good.
//!
//! The same layer settles each call's correlation id (the caller's, if well formed, else a new
//! one, written back into the request so handlers see the same) and runs the call inside a
//! span carrying it, so every log line of the call names it.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::{BoxFuture, FutureExt};
use tower::{Layer, Service};

use crate::correlation::{CORRELATION_HEADER, accepted_or_new};

/// The one label value every method path the server does not hold is counted under.
pub const UNKNOWN_METHOD: &str = "unknown";

#[derive(Clone, Debug)]
pub struct GrpcMetricsLayer {
    service: &'static str,
    methods: Arc<BTreeSet<String>>,
}

impl GrpcMetricsLayer {
    /// `methods` are the full paths the server holds (see `PeerPolicy::methods`).
    pub fn new(service: &'static str, methods: BTreeSet<String>) -> Self {
        Self {
            service,
            methods: Arc::new(methods),
        }
    }
}

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            service: self.service,
            methods: self.methods.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct GrpcMetricsService<S> {
    inner: S,
    service: &'static str,
    methods: Arc<BTreeSet<String>>,
}

impl<S, B, ResBody> Service<http::Request<B>> for GrpcMetricsService<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let method = request.uri().path();
        let method = if self.methods.contains(method) {
            method.to_owned()
        } else {
            UNKNOWN_METHOD.to_owned()
        };
        let service = self.service;
        let started = Instant::now();
        let correlation = accepted_or_new(
            request
                .headers()
                .get(CORRELATION_HEADER)
                .and_then(|value| value.to_str().ok()),
        );
        if let Ok(value) = http::HeaderValue::from_str(&correlation) {
            request.headers_mut().insert(CORRELATION_HEADER, value);
        }
        let response = self.inner.call(request);
        async move {
            let result = response.await;
            // Errors answered before any message are "trailers-only": the code is a header.
            // Streamed errors report in trailers and count as OK here.
            let code = match &result {
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .and_then(|value| value.to_str().ok())
                    .and_then(|value| value.parse::<i32>().ok())
                    .map_or("OK", |code| tonic::Code::from_i32(code).description_name()),
                Err(_) => "TRANSPORT_ERROR",
            };
            let elapsed = started.elapsed().as_secs_f64();
            metrics::counter!("medai_grpc_requests_total", "service" => service, "method" => method.clone(), "code" => code)
                .increment(1);
            metrics::histogram!("medai_grpc_request_duration_seconds", "service" => service, "method" => method)
                .record(elapsed);
            result
        }
        .boxed()
    }
}

trait CodeName {
    fn description_name(self) -> &'static str;
}

impl CodeName for tonic::Code {
    fn description_name(self) -> &'static str {
        use tonic::Code;
        match self {
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
}
