//! Outgoing calls counted and timed as the ecosystem expects of a gRPC client
//! (go-grpc-prometheus): `grpc_client_started_total`, `grpc_client_handled_total` and
//! `grpc_client_handling_seconds`, labelled `grpc_service`, `grpc_method` (and `grpc_code`).
//! A tower layer over the channel, so every client a service builds on
//! [`crate::tls::TlsMaterial::metered_channel`] is counted without any handler repeating it.
//! Paths are the callee's methods, chosen by this code, never by a request.
//! A call is handled when its final status is known (for a stream, the trailers at its end),
//! read by the shared [`crate::call_status::StatusBody`].

use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::{BoxFuture, FutureExt};
use tonic::transport::Channel;
use tower::Service;

use crate::call_status::{CallEnd, EndOnce, StatusBody, with_status_body};
use crate::grpc_metrics::{code_label, split_method};

pub const CLIENT_STARTED: &str = "grpc_client_started_total";
pub const CLIENT_HANDLED: &str = "grpc_client_handled_total";
pub const CLIENT_HANDLING_SECONDS: &str = "grpc_client_handling_seconds";

/// A channel whose calls are counted and timed.
pub type MeteredChannel = GrpcClientMetrics<Channel>;

pub(crate) fn describe() {
    metrics::describe_counter!(
        CLIENT_STARTED,
        "Total number of RPCs started on the client."
    );
    metrics::describe_counter!(
        CLIENT_HANDLED,
        "Total number of RPCs completed by the client, regardless of success or failure."
    );
    metrics::describe_histogram!(
        CLIENT_HANDLING_SECONDS,
        metrics::Unit::Seconds,
        "Histogram of response latency (seconds) of the gRPC until it is finished by the application."
    );
}

#[derive(Clone, Debug)]
pub struct GrpcClientMetrics<S> {
    inner: S,
}

impl<S> GrpcClientMetrics<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S, B, ResBody> Service<http::Request<B>> for GrpcClientMetrics<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<StatusBody<ResBody, ClientHandledCount>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let (grpc_service, grpc_method) = {
            let (service, method) = split_method(request.uri().path());
            (service.to_owned(), method.to_owned())
        };
        metrics::counter!(CLIENT_STARTED, "grpc_service" => grpc_service.clone(), "grpc_method" => grpc_method.clone())
            .increment(1);
        let started = Instant::now();
        let response = self.inner.call(request);
        let mut handled = EndOnce::new(ClientHandledCount {
            grpc_service,
            grpc_method,
            started,
        });
        async move {
            match response.await {
                Ok(response) => Ok(with_status_body(response, handled)),
                Err(error) => {
                    // No answer at all: the channel could not reach the server.
                    handled.record(tonic::Code::Unavailable, None);
                    Err(error)
                }
            }
        }
        .boxed()
    }
}

/// Counts an outgoing call as handled, with the code it ended with (for a stream, the one its
/// trailers carry when it ends), and times it.
pub struct ClientHandledCount {
    grpc_service: String,
    grpc_method: String,
    started: Instant,
}

impl CallEnd for ClientHandledCount {
    fn ended(&mut self, code: tonic::Code, _reason: Option<String>) {
        metrics::counter!(CLIENT_HANDLED, "grpc_service" => self.grpc_service.clone(), "grpc_method" => self.grpc_method.clone(), "grpc_code" => code_label(code))
            .increment(1);
        metrics::histogram!(CLIENT_HANDLING_SECONDS, "grpc_service" => self.grpc_service.clone(), "grpc_method" => self.grpc_method.clone())
            .record(self.started.elapsed().as_secs_f64());
    }
}
