//! A real OTLP/gRPC trace collector on a port-0 listener: the services export to it exactly as
//! to an OpenTelemetry Collector, and tests read back what arrived.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use tokio::net::TcpListener;

/// One span as the collector received it, ids in lowercase hex.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CollectedSpan {
    /// The exporting process's `service.name`.
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    /// `SERVER`, `CLIENT`, `INTERNAL`, … (OTLP's `SPAN_KIND_*` without the prefix).
    pub kind: String,
    /// `OK`, `ERROR` or `UNSET` (OTLP's `STATUS_CODE_*` without the prefix).
    pub status_code: String,
    /// The status description (empty unless the status is `ERROR`).
    pub status_message: String,
    /// Every attribute, as `key=value` text.
    pub attributes: Vec<String>,
    /// Every event (a log line inside the span), as its name and `key=value` attributes.
    pub events: Vec<String>,
}

pub struct OtlpCollector {
    /// `http://127.0.0.1:<port>`, for a service's `process.otlp_endpoint`.
    pub endpoint: String,
    spans: Arc<Mutex<Vec<CollectedSpan>>>,
    task: tokio::task::JoinHandle<()>,
}

struct Receiver {
    spans: Arc<Mutex<Vec<CollectedSpan>>>,
}

fn text(value: Option<&Value>) -> String {
    match value {
        Some(Value::StringValue(text)) => text.clone(),
        Some(Value::IntValue(number)) => number.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|resource| &resource.attributes)
                .find(|attribute| attribute.key == "service.name")
                .map(|attribute| text(attribute.value.as_ref().and_then(|v| v.value.as_ref())))
                .unwrap_or_default();
            for span in resource_spans
                .scope_spans
                .into_iter()
                .flat_map(|scope| scope.spans)
            {
                received.push(CollectedSpan {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    kind: SpanKind::try_from(span.kind)
                        .map_or("UNKNOWN", |kind| kind.as_str_name())
                        .trim_start_matches("SPAN_KIND_")
                        .to_owned(),
                    status_code: span
                        .status
                        .as_ref()
                        .and_then(|status| StatusCode::try_from(status.code).ok())
                        .unwrap_or(StatusCode::Unset)
                        .as_str_name()
                        .trim_start_matches("STATUS_CODE_")
                        .to_owned(),
                    status_message: span
                        .status
                        .as_ref()
                        .map(|status| status.message.clone())
                        .unwrap_or_default(),
                    attributes: key_values(&span.attributes),
                    events: span
                        .events
                        .iter()
                        .map(|event| {
                            format!("{} {}", event.name, key_values(&event.attributes).join(" "))
                        })
                        .collect(),
                });
            }
        }
        self.spans.lock().expect("spans").extend(received);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn key_values(attributes: &[KeyValue]) -> Vec<String> {
    attributes
        .iter()
        .map(|attribute| {
            format!(
                "{}={}",
                attribute.key,
                text(attribute.value.as_ref().and_then(|v| v.value.as_ref()))
            )
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

impl OtlpCollector {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let spans = Arc::new(Mutex::new(Vec::new()));
        let receiver = Receiver {
            spans: Arc::clone(&spans),
        };
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(receiver))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
        Self {
            endpoint: format!("http://{address}"),
            spans,
            task,
        }
    }

    /// Everything received so far.
    pub fn spans(&self) -> Vec<CollectedSpan> {
        self.spans.lock().expect("spans").clone()
    }

    /// Waits (up to `patience`) until `ready` holds for what was received, and returns it.
    pub async fn wait_until(
        &self,
        patience: Duration,
        ready: impl Fn(&[CollectedSpan]) -> bool,
    ) -> Vec<CollectedSpan> {
        let started = Instant::now();
        loop {
            let spans = self.spans();
            if ready(&spans) || started.elapsed() > patience {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for OtlpCollector {
    fn drop(&mut self) {
        self.task.abort();
    }
}
