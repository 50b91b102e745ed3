//! Structured JSON logs through `tracing`, one line per event, and OpenTelemetry spans,
//! exported over OTLP/gRPC when a collector is configured. W3C trace context (`traceparent`,
//! `tracestate`) is taken from every incoming call and put on every outgoing one (see
//! [`crate::rpc_trace`]), so one prediction is one trace across the gateway, validation,
//! inference and audit. Every log line written inside a span names that span's `trace_id` and
//! `span_id`, so a log line leads to its trace and back; spans are kept (and ids made) even
//! without a collector, for that and for propagation. Fields, never interpolated strings,
//! carry values; none of them may hold PHI, in logs or in span attributes.

use std::sync::Arc;

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{FmtSpan, Format, Json, JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

/// Installs the JSON log subscriber once for the process, with spans that are kept in the
/// process only (their ids name log lines and travel to callees). `filter` uses `RUST_LOG`
/// syntax. A second call (tests that start several services in one process) keeps the first.
pub fn init_json_logging(filter: &str) {
    install(filter, SdkTracerProvider::builder().build());
}

fn install(filter: &str, provider: SdkTracerProvider) {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let _already_installed = tracing_subscriber::registry()
        .with(env_filter(filter))
        .with(json_logs(std::io::stderr))
        .with(span_layer(&provider))
        .try_init();
}

fn env_filter(filter: &str) -> EnvFilter {
    EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"))
}

/// `tracing` spans as OpenTelemetry spans. Their status is what [`crate::rpc_trace`] records
/// (the stable reason code), not the text of the last error-level log line.
pub(crate) fn span_layer<S>(provider: &SdkTracerProvider) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'span> LookupSpan<'span>,
{
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("medai"))
        .with_error_events_to_status(false)
}

fn json_logs<S, W>(writer: W) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'span> LookupSpan<'span>,
    W: for<'writer> MakeWriter<'writer> + 'static,
{
    tracing_subscriber::fmt::layer()
        .with_span_events(FmtSpan::NONE)
        .fmt_fields(JsonFields::new())
        .event_format(WithTraceIds(
            tracing_subscriber::fmt::format()
                .json()
                .with_current_span(true)
                .with_span_list(false),
        ))
        .with_writer(writer)
}

/// The JSON line of an event, opened by `"trace_id"` and `"span_id"` (lowercase hex, as
/// W3C and the collectors write them) of the span it is written in, if any.
struct WithTraceIds(Format<Json>);

impl<S, N> FormatEvent<S, N> for WithTraceIds
where
    S: tracing::Subscriber + for<'span> LookupSpan<'span>,
    N: for<'writer> FormatFields<'writer> + 'static,
{
    fn format_event(
        &self,
        context: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut line = String::new();
        self.0
            .format_event(context, Writer::new(&mut line), event)?;
        // The OpenTelemetry layer makes an entered span's context the thread's current one
        // (the dispatcher cannot be asked from inside an event it is dispatching).
        let ids = context
            .event_scope()
            .map(|_| {
                opentelemetry::Context::current()
                    .span()
                    .span_context()
                    .clone()
            })
            .filter(opentelemetry::trace::SpanContext::is_valid);
        match (ids, line.strip_prefix('{')) {
            (Some(ids), Some(rest)) => write!(
                writer,
                "{{\"trace_id\":\"{}\",\"span_id\":\"{}\",{rest}",
                ids.trace_id(),
                ids.span_id()
            ),
            _ => writer.write_str(&line),
        }
    }
}

/// The process's trace pipeline; [`Telemetry::shutdown`] sends the spans still queued.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot build the OTLP exporter: {0}")]
pub struct TelemetryError(String);

/// Installs JSON logs and, with an `otlp_endpoint`, the OTLP trace exporter for `service`
/// (as `service.name` "medai-<service>"). Must be called within the Tokio runtime: the
/// exporter's gRPC calls run on it. The batch interval and queue follow the standard
/// `OTEL_BSP_*` variables.
pub fn init(
    service: &'static str,
    log_filter: &str,
    otlp_endpoint: Option<&str>,
) -> Result<Telemetry, TelemetryError> {
    let Some(endpoint) = otlp_endpoint else {
        init_json_logging(log_filter);
        return Ok(Telemetry { provider: None });
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|error| TelemetryError(error.to_string()))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(OnTokio {
            exporter: Arc::new(exporter),
            runtime: tokio::runtime::Handle::current(),
        })
        .with_resource(
            Resource::builder()
                .with_service_name(format!("medai-{service}"))
                .build(),
        )
        .build();
    install(log_filter, provider.clone());
    Ok(Telemetry {
        provider: Some(provider),
    })
}

impl Telemetry {
    /// Exports what is still queued. The SDK blocks while it does, so off the async workers.
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        }
    }
}

/// The OTLP exporter run on the service's Tokio runtime. The SDK's batch processor exports
/// from its own thread with a plain executor, where tonic's transport (which needs a Tokio
/// reactor) would fail; each batch is therefore handed to the runtime and awaited.
#[derive(Debug)]
struct OnTokio {
    exporter: Arc<opentelemetry_otlp::SpanExporter>,
    runtime: tokio::runtime::Handle,
}

impl SpanExporter for OnTokio {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let exporter = Arc::clone(&self.exporter);
        self.runtime
            .spawn(async move { exporter.export(batch).await })
            .await
            .map_err(|error| OTelSdkError::InternalFailure(error.to_string()))?
    }

    fn shutdown_with_timeout(&self, timeout: std::time::Duration) -> OTelSdkResult {
        self.exporter.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        // Called while the provider is built, before the exporter is shared.
        if let Some(exporter) = Arc::get_mut(&mut self.exporter) {
            exporter.set_resource(resource);
        }
    }
}

/// Puts the current span's W3C trace context on an outgoing call, so the callee's spans join
/// the caller's trace. Nothing is added when no trace pipeline is installed.
pub fn inject_trace_context(metadata: &mut MetadataMap) {
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut MetadataInjector(metadata));
    });
}

/// Puts `span`'s W3C trace context on an outgoing request's headers.
pub fn inject_span_context(span: &tracing::Span, headers: &mut http::HeaderMap) {
    let context = span.context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut HeaderInjector(headers));
    });
}

/// Makes `span` a child of the trace context an incoming call carries, if any.
pub fn adopt_remote_parent(span: &tracing::Span, headers: &http::HeaderMap) {
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(headers))
    });
    // Without an OpenTelemetry layer there is nothing to attach to; that is not an error.
    let _ = span.set_parent(parent);
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::try_from(value),
        ) {
            self.0.insert(key, value);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use opentelemetry_sdk::trace::SpanData;

    use super::*;

    #[derive(Clone, Debug, Default)]
    struct Exported(Arc<Mutex<Vec<SpanData>>>);

    impl SpanExporter for Exported {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            self.0.lock().expect("spans").extend(batch);
            Ok(())
        }
    }

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lines").extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'writer> MakeWriter<'writer> for Lines {
        type Writer = Self;
        fn make_writer(&'writer self) -> Self {
            self.clone()
        }
    }

    #[test]
    fn log_lines_inside_a_span_name_the_trace_and_span_the_collector_receives() {
        let exported = Exported::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exported.clone())
            .build();
        let lines = Lines::default();
        let subscriber = tracing_subscriber::registry()
            .with(json_logs(lines.clone()))
            .with(span_layer(&provider));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("outside any span");
            let call = tracing::info_span!("rpc", correlation_id = "pacs-7");
            call.in_scope(|| {
                tracing::info!(seq = 3, "inside the call");
                tracing::info_span!("validation.decode")
                    .in_scope(|| tracing::info!("inside a child span"));
            });
        });

        let spans = exported.0.lock().expect("spans").clone();
        let span_named = |name: &str| {
            spans
                .iter()
                .find(|span| span.name == name)
                .unwrap_or_else(|| panic!("{name} exported: {spans:?}"))
                .span_context
                .clone()
        };
        let (call, child) = (span_named("rpc"), span_named("validation.decode"));
        let text = String::from_utf8(lines.0.lock().expect("lines").clone()).expect("utf-8");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).expect("each line is one JSON object"))
            .collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].get("trace_id").is_none(), "{}", lines[0]);
        assert!(lines[0].get("span_id").is_none(), "{}", lines[0]);
        assert_eq!(lines[1]["trace_id"], call.trace_id().to_string());
        assert_eq!(lines[1]["span_id"], call.span_id().to_string());
        // The rest of the line is as before: fields and the current span's fields.
        assert_eq!(lines[1]["fields"]["seq"], 3);
        assert_eq!(lines[1]["span"]["correlation_id"], "pacs-7");
        assert_eq!(lines[2]["trace_id"], call.trace_id().to_string());
        assert_eq!(lines[2]["span_id"], child.span_id().to_string());
    }

    #[test]
    fn w3c_context_round_trips_through_grpc_metadata() {
        let propagator = TraceContextPropagator::new();
        let mut headers = http::HeaderMap::new();
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        headers.insert("traceparent", http::HeaderValue::from_static(traceparent));
        let context = opentelemetry::propagation::TextMapPropagator::extract(
            &propagator,
            &HeaderExtractor(&headers),
        );
        let mut metadata = MetadataMap::new();
        opentelemetry::propagation::TextMapPropagator::inject_context(
            &propagator,
            &context,
            &mut MetadataInjector(&mut metadata),
        );
        assert_eq!(
            metadata
                .get("traceparent")
                .and_then(|value| value.to_str().ok()),
            Some(traceparent)
        );
    }
}
