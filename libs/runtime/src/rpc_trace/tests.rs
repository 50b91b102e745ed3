//! The layers against a real OpenTelemetry pipeline (the SDK with an in-process exporter), so
//! what is asserted is what a collector would receive.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use http_body::{Body, Frame};
use opentelemetry::trace::{SpanKind, Status};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_subscriber::layer::SubscriberExt;

use super::*;
use crate::errors::{ErrorKind, refusal_response, status_with_reason};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";
const VALIDATE: &str = "/medai.validation.v1.ValidationService/ValidateImage";

#[derive(Clone, Debug, Default)]
struct Exported(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Exported {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0.lock().expect("spans").extend(batch);
        Ok(())
    }
}

impl Exported {
    fn named(&self, name: &str) -> Vec<SpanData> {
        self.0
            .lock()
            .expect("spans")
            .iter()
            .filter(|span| span.name == name)
            .cloned()
            .collect()
    }
}

/// Spans of this thread go to the returned exporter, as the services' do to OTLP.
fn traced() -> (Exported, tracing::subscriber::DefaultGuard) {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let exported = Exported::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exported.clone())
        .build();
    let subscriber = tracing_subscriber::registry().with(crate::telemetry::span_layer(&provider));
    (exported, tracing::subscriber::set_default(subscriber))
}

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|attribute| attribute.key.as_str() == key)
        .map(|attribute| attribute.value.to_string())
}

fn refusing(
    status: tonic::Status,
) -> impl Service<
    http::Request<()>,
    Response = http::Response<tonic::body::Body>,
    Error = Infallible,
    Future = impl Send + 'static,
> + Clone {
    tower::service_fn(move |_request: http::Request<()>| {
        let status = status.clone();
        async move { Ok::<_, Infallible>(refusal_response(status)) }
    })
}

/// A body of one trailers frame, as tonic ends every answer that sent messages.
struct Trailers(Option<http::HeaderMap>);

impl Body for Trailers {
    type Data = tonic::codegen::Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Poll::Ready(self.0.take().map(|trailers| Ok(Frame::trailers(trailers))))
    }
}

async fn read_to_end<B: Body + Unpin>(body: &mut B) {
    while futures::future::poll_fn(|context| Pin::new(&mut *body).poll_frame(context))
        .await
        .is_some()
    {}
}

#[tokio::test]
async fn a_refused_call_is_a_server_span_named_for_its_method_with_its_reason_as_the_error() {
    let (exported, _guard) = traced();
    let mut service = RpcServerTraceLayer::new(BTreeSet::from([VALIDATE.to_owned()])).layer(
        refusing(status_with_reason(
            ErrorKind::InvalidArgument,
            "medai.validation",
            "IMAGE_TOO_LARGE",
            "image is too large",
        )),
    );
    let request = http::Request::builder()
        .uri(format!("https://medai-validation:50053{VALIDATE}"))
        .header("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN}-01"))
        .body(())
        .expect("request");
    drop(service.call(request).await.expect("answer"));

    let spans = exported.named("medai.validation.v1.ValidationService/ValidateImage");
    assert_eq!(spans.len(), 1, "{:?}", exported.0.lock().expect("spans"));
    let span = &spans[0];
    assert_eq!(span.span_kind, SpanKind::Server);
    // The caller's input was refused: the server did its job, so its status stays unset and
    // the reason is the span's error.type.
    assert_eq!(span.status, Status::Unset);
    assert_eq!(
        attribute(span, "error.type").as_deref(),
        Some("IMAGE_TOO_LARGE")
    );
    assert_eq!(span.span_context.trace_id().to_string(), TRACE_ID);
    assert_eq!(span.parent_span_id.to_string(), CALLER_SPAN);
    for (key, value) in [
        ("rpc.system", "grpc"),
        ("rpc.service", "medai.validation.v1.ValidationService"),
        ("rpc.method", "ValidateImage"),
        ("rpc.grpc.status_code", "3"),
        ("server.address", "medai-validation"),
        ("server.port", "50053"),
    ] {
        assert_eq!(attribute(span, key).as_deref(), Some(value), "{key}");
    }
    // The status message is the caller's to read, not the trace's.
    assert!(
        span.attributes
            .iter()
            .all(|attribute| !attribute.value.to_string().contains("too large"))
    );
}

#[tokio::test]
async fn a_server_fault_is_an_error_server_span_described_by_its_reason() {
    let (exported, _guard) = traced();
    for (kind, reason, code) in [
        (ErrorKind::Internal, "LEDGER_UNAVAILABLE", "13"),
        (ErrorKind::Unavailable, "MODEL_NOT_READY", "14"),
    ] {
        let mut service =
            RpcServerTraceLayer::new(BTreeSet::from([VALIDATE.to_owned()])).layer(refusing(
                status_with_reason(kind, "medai.validation", reason, "the server failed"),
            ));
        let request = http::Request::builder()
            .uri(VALIDATE)
            .body(())
            .expect("request");
        drop(service.call(request).await.expect("answer"));
        let spans = exported.named("medai.validation.v1.ValidationService/ValidateImage");
        let span = spans.last().expect("a span");
        assert_eq!(span.status, Status::error(reason));
        assert_eq!(attribute(span, "error.type").as_deref(), Some(reason));
        assert_eq!(
            attribute(span, "rpc.grpc.status_code").as_deref(),
            Some(code)
        );
    }
}

#[tokio::test]
async fn an_answer_is_ok_from_its_trailers_and_its_span_lasts_until_they_are_sent() {
    let (exported, _guard) = traced();
    let inner = tower::service_fn(|_request: http::Request<()>| async {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        Ok::<_, Infallible>(http::Response::new(Trailers(Some(trailers))))
    });
    let mut service = RpcServerTraceLayer::new(BTreeSet::from([VALIDATE.to_owned()])).layer(inner);
    let request = http::Request::builder()
        .uri(VALIDATE)
        .body(())
        .expect("request");
    let mut response = service.call(request).await.expect("answer");
    assert!(
        exported.0.lock().expect("spans").is_empty(),
        "the call is not over before its answer's body is"
    );
    read_to_end(response.body_mut()).await;
    drop(response);

    let spans = exported.named("medai.validation.v1.ValidationService/ValidateImage");
    assert_eq!(spans.len(), 1);
    assert_eq!(spans[0].status, Status::Ok);
    assert_eq!(
        attribute(&spans[0], "rpc.grpc.status_code").as_deref(),
        Some("0")
    );
}

#[tokio::test]
async fn a_path_the_server_does_not_hold_does_not_name_a_span() {
    let (exported, _guard) = traced();
    let mut service = RpcServerTraceLayer::new(BTreeSet::from([VALIDATE.to_owned()]))
        .layer(refusing(tonic::Status::unimplemented("")));
    let request = http::Request::builder()
        .uri("/made.up.Service/PatientJohnDoe")
        .body(())
        .expect("request");
    drop(service.call(request).await.expect("answer"));

    let spans = exported.named(UNKNOWN_METHOD_SPAN);
    assert_eq!(spans.len(), 1, "{:?}", exported.0.lock().expect("spans"));
    assert_eq!(attribute(&spans[0], "rpc.method"), None);
    assert_eq!(spans[0].status, Status::error("UNIMPLEMENTED"));
}

#[tokio::test]
async fn an_outgoing_call_is_a_client_span_under_its_caller_whose_context_the_callee_receives() {
    let (exported, _guard) = traced();
    let received = Arc::new(Mutex::new(None::<String>));
    let inner = {
        let received = received.clone();
        tower::service_fn(move |request: http::Request<()>| {
            *received.lock().expect("received") = request
                .headers()
                .get("traceparent")
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned);
            async {
                Ok::<_, Infallible>(refusal_response::<tonic::body::Body>(status_with_reason(
                    ErrorKind::NotFound,
                    "medai.inference",
                    "RESULT_NOT_FOUND",
                    "no such result",
                )))
            }
        })
    };
    let mut channel = RpcClientTraceLayer::new("https://medai-inference:50054").layer(inner);
    let caller = tracing::info_span!("handler");
    let request = http::Request::builder()
        .uri("/medai.inference.v1.InferenceService/GetResult")
        .body(())
        .expect("request");
    // As tonic's generated clients do: the call is made inside the caller's future.
    drop(
        async { channel.call(request).await }
            .instrument(caller.clone())
            .await
            .expect("answer"),
    );
    drop(caller);

    let calls = exported.named("medai.inference.v1.InferenceService/GetResult");
    assert_eq!(calls.len(), 1, "{:?}", exported.0.lock().expect("spans"));
    let call = &calls[0];
    let handler = &exported.named("handler")[0];
    assert_eq!(call.span_kind, SpanKind::Client);
    assert_eq!(call.parent_span_id, handler.span_context.span_id());
    // Whatever the callee's reason, the call failed for its caller.
    assert_eq!(call.status, Status::error("RESULT_NOT_FOUND"));
    assert_eq!(
        attribute(call, "error.type").as_deref(),
        Some("RESULT_NOT_FOUND")
    );
    for (key, value) in [
        ("rpc.system", "grpc"),
        ("rpc.service", "medai.inference.v1.InferenceService"),
        ("rpc.method", "GetResult"),
        ("rpc.grpc.status_code", "5"),
        ("server.address", "medai-inference"),
        ("server.port", "50054"),
    ] {
        assert_eq!(attribute(call, key).as_deref(), Some(value), "{key}");
    }
    assert_eq!(
        received.lock().expect("received").as_deref(),
        Some(
            format!(
                "00-{}-{}-01",
                call.span_context.trace_id(),
                call.span_context.span_id()
            )
            .as_str()
        ),
        "the callee's server span hangs under the client span"
    );
}

#[tokio::test]
async fn a_call_abandoned_before_its_answer_is_cancelled() {
    let (exported, _guard) = traced();
    let never = tower::service_fn(|_request: http::Request<()>| {
        futures::future::pending::<Result<http::Response<tonic::body::Body>, Infallible>>()
    });
    let mut service = RpcServerTraceLayer::new(BTreeSet::from([VALIDATE.to_owned()])).layer(never);
    let request = http::Request::builder()
        .uri(VALIDATE)
        .body(())
        .expect("request");
    let call = service.call(request);
    assert!(futures::FutureExt::now_or_never(call).is_none());

    let spans = exported.named("medai.validation.v1.ValidationService/ValidateImage");
    assert_eq!(spans.len(), 1, "{:?}", exported.0.lock().expect("spans"));
    // The caller went away: not the server's fault.
    assert_eq!(spans[0].status, Status::Unset);
    assert_eq!(
        attribute(&spans[0], "error.type").as_deref(),
        Some("CANCELLED")
    );
    assert_eq!(
        attribute(&spans[0], "rpc.grpc.status_code").as_deref(),
        Some("1")
    );
}
