//! Request counts and latency histograms per gRPC method and status code, as a tower layer so
//! no handler repeats it, under the names and labels the ecosystem's dashboards and alerts
//! expect (go-grpc-prometheus / grpc-ecosystem): `grpc_server_started_total`,
//! `grpc_server_handled_total` and `grpc_server_handling_seconds`, labelled `grpc_service`,
//! `grpc_method` (and `grpc_code`). No `service` label: Prometheus' own target labels use it.
//! Labels hold method paths and codes only, never request content.
//! A call is handled when its final status is known: the headers of an answer refused before
//! any message, else the trailers after the last one, so a stream (StudyStream, UploadImage…)
//! that ends in an error is counted under that error's code, read by the same
//! [`crate::call_status::StatusBody`] the call's span reads it with.
//! A path the server does not hold is labelled [`UNKNOWN_METHOD`]: anyone who can open a
//! connection can make up paths, and each would otherwise be a new series for good.
//! Every method the server holds is registered at zero for every code when the layer is made,
//! so rates and ratios exist before the first call.
//!
//! The same layer settles each call's correlation id (the caller's, if well formed, else a new
//! one, written back into the request so handlers see the same); the span the call runs in,
//! which carries it, comes from the outer [`crate::rpc_trace`] layer.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::{BoxFuture, FutureExt};
use tower::{Layer, Service};

use crate::call_status::{CallEnd, EndOnce, StatusBody, with_status_body};
use crate::correlation::settle_correlation_header;

/// The one label value every method path the server does not hold is counted under.
pub const UNKNOWN_METHOD: &str = "unknown";

/// The handles of one method's series, taken from the recorder once (when the layer is made,
/// or for the [`UNKNOWN_METHOD`] label on its first call) instead of building the label
/// strings and looking the series up in the registry on every call. A handle stays bound to
/// the recorder installed when it was taken: services install theirs before they build the
/// server (see `process::run_service`).
struct MethodSeries {
    grpc_service: String,
    grpc_method: String,
    started: OnceLock<metrics::Counter>,
    /// By code, in [`GRPC_CODES`] order (the codes' numeric values).
    handled: [OnceLock<metrics::Counter>; GRPC_CODES.len()],
    /// Taken on the first call that ends: a histogram is not shown at zero.
    handling_seconds: OnceLock<metrics::Histogram>,
}

impl MethodSeries {
    fn new(path: &str) -> Self {
        let (grpc_service, grpc_method) = split_method(path);
        Self {
            grpc_service: grpc_service.to_owned(),
            grpc_method: grpc_method.to_owned(),
            started: OnceLock::new(),
            handled: std::array::from_fn(|_| OnceLock::new()),
            handling_seconds: OnceLock::new(),
        }
    }

    fn started(&self) -> &metrics::Counter {
        self.started.get_or_init(|| {
            metrics::counter!(SERVER_STARTED, "grpc_service" => self.grpc_service.clone(), "grpc_method" => self.grpc_method.clone())
        })
    }

    fn handled(&self, code: tonic::Code) -> &metrics::Counter {
        let index = GRPC_CODES
            .iter()
            .position(|known| *known == code)
            .unwrap_or(tonic::Code::Unknown as usize);
        self.handled[index].get_or_init(|| {
            metrics::counter!(SERVER_HANDLED, "grpc_service" => self.grpc_service.clone(), "grpc_method" => self.grpc_method.clone(), "grpc_code" => GRPC_CODES[index].description_name())
        })
    }

    fn handling_seconds(&self) -> &metrics::Histogram {
        self.handling_seconds.get_or_init(|| {
            metrics::histogram!(SERVER_HANDLING_SECONDS, "grpc_service" => self.grpc_service.clone(), "grpc_method" => self.grpc_method.clone())
        })
    }
}

struct Series {
    held: BTreeMap<String, Arc<MethodSeries>>,
    unknown: Arc<MethodSeries>,
}

impl std::fmt::Debug for Series {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Series")
            .field("held", &self.held.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Debug)]
pub struct GrpcMetricsLayer {
    series: Arc<Series>,
}

impl GrpcMetricsLayer {
    /// `methods` are the full paths the server holds (see `PeerPolicy::methods`).
    pub fn new(methods: BTreeSet<String>) -> Self {
        let held = methods
            .into_iter()
            .map(|path| {
                let series = Arc::new(MethodSeries::new(&path));
                register_at_zero(&series);
                (path, series)
            })
            .collect();
        Self {
            series: Arc::new(Series {
                held,
                unknown: Arc::new(MethodSeries::new(UNKNOWN_METHOD)),
            }),
        }
    }
}

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            series: self.series.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct GrpcMetricsService<S> {
    inner: S,
    series: Arc<Series>,
}

impl<S, B, ResBody> Service<http::Request<B>> for GrpcMetricsService<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<StatusBody<ResBody, HandledCount>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let series = self
            .series
            .held
            .get(request.uri().path())
            .unwrap_or(&self.series.unknown)
            .clone();
        let started = Instant::now();
        series.started().increment(1);
        settle_correlation_header(request.headers_mut());
        let response = self.inner.call(request);
        // Told once, when the call's final status is known; dropped before that, CANCELLED.
        let mut handled = EndOnce::new(HandledCount { series, started });
        async move {
            match response.await {
                Ok(response) => Ok(with_status_body(response, handled)),
                Err(error) => {
                    // The transport failed under the call: no code was sent.
                    handled.record(tonic::Code::Unknown, None);
                    Err(error)
                }
            }
        }
        .boxed()
    }
}

/// Counts a call as handled, with the code it ended with, and times it, when its final status
/// is known: in the headers of a trailers-only answer, else in the trailers after the last
/// message (for a stream, when the stream ends).
pub struct HandledCount {
    series: Arc<MethodSeries>,
    started: Instant,
}

impl CallEnd for HandledCount {
    fn ended(&mut self, code: tonic::Code, _reason: Option<String>) {
        let elapsed = self.started.elapsed().as_secs_f64();
        self.series.handled(code).increment(1);
        self.series.handling_seconds().record(elapsed);
    }
}

pub const SERVER_STARTED: &str = "grpc_server_started_total";
pub const SERVER_HANDLED: &str = "grpc_server_handled_total";
pub const SERVER_HANDLING_SECONDS: &str = "grpc_server_handling_seconds";

/// Every code a call can end with, as the `grpc_code` label spells it.
pub const GRPC_CODES: [tonic::Code; 17] = [
    tonic::Code::Ok,
    tonic::Code::Cancelled,
    tonic::Code::Unknown,
    tonic::Code::InvalidArgument,
    tonic::Code::DeadlineExceeded,
    tonic::Code::NotFound,
    tonic::Code::AlreadyExists,
    tonic::Code::PermissionDenied,
    tonic::Code::ResourceExhausted,
    tonic::Code::FailedPrecondition,
    tonic::Code::Aborted,
    tonic::Code::OutOfRange,
    tonic::Code::Unimplemented,
    tonic::Code::Internal,
    tonic::Code::Unavailable,
    tonic::Code::DataLoss,
    tonic::Code::Unauthenticated,
];

/// `/medai.gateway.v1.GatewayService/Infer` as (`medai.gateway.v1.GatewayService`, `Infer`);
/// anything else (the [`UNKNOWN_METHOD`] label) as itself twice.
pub fn split_method(path: &str) -> (&str, &str) {
    path.strip_prefix('/')
        .and_then(|path| path.rsplit_once('/'))
        .unwrap_or((path, path))
}

/// The label value of a status code (`OK`, `PermissionDenied`, …).
pub fn code_label(code: tonic::Code) -> &'static str {
    code.description_name()
}

pub(crate) fn describe() {
    metrics::describe_counter!(
        SERVER_STARTED,
        "Total number of RPCs started on the server."
    );
    metrics::describe_counter!(
        SERVER_HANDLED,
        "Total number of RPCs completed on the server, regardless of success or failure."
    );
    metrics::describe_histogram!(
        SERVER_HANDLING_SECONDS,
        metrics::Unit::Seconds,
        "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server."
    );
}

/// A held method started and handled at zero (handled for every code), as
/// go-grpc-prometheus' `InitializeMetrics` does.
fn register_at_zero(series: &MethodSeries) {
    series.started().increment(0);
    for code in GRPC_CODES {
        series.handled(code).increment(0);
    }
}

trait CodeName {
    fn description_name(self) -> &'static str;
}

/// gRPC's code names as go-grpc-prometheus (and so most dashboards and alerts) spell them.
impl CodeName for tonic::Code {
    fn description_name(self) -> &'static str {
        use tonic::Code;
        match self {
            Code::Ok => "OK",
            Code::Cancelled => "Canceled",
            Code::Unknown => "Unknown",
            Code::InvalidArgument => "InvalidArgument",
            Code::DeadlineExceeded => "DeadlineExceeded",
            Code::NotFound => "NotFound",
            Code::AlreadyExists => "AlreadyExists",
            Code::PermissionDenied => "PermissionDenied",
            Code::ResourceExhausted => "ResourceExhausted",
            Code::FailedPrecondition => "FailedPrecondition",
            Code::Aborted => "Aborted",
            Code::OutOfRange => "OutOfRange",
            Code::Unimplemented => "Unimplemented",
            Code::Internal => "Internal",
            Code::Unavailable => "Unavailable",
            Code::DataLoss => "DataLoss",
            Code::Unauthenticated => "Unauthenticated",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_method_path_splits_into_the_service_and_the_method() {
        assert_eq!(
            split_method("/medai.gateway.v1.GatewayService/Infer"),
            ("medai.gateway.v1.GatewayService", "Infer")
        );
        assert_eq!(
            split_method(UNKNOWN_METHOD),
            (UNKNOWN_METHOD, UNKNOWN_METHOD)
        );
    }
}
