//! Structured JSON logs through `tracing`, one line per event, and, when a collector is
//! configured, OpenTelemetry traces exported over OTLP/gRPC. W3C trace context (`traceparent`,
//! `tracestate`) is taken from every incoming call (see [`crate::grpc_metrics`]) and put on
//! every outgoing one ([`inject_trace_context`]), so one prediction is one trace across the
//! gateway, validation, inference and audit. Fields, never interpolated strings, carry values;
//! none of them may hold PHI, in logs or in span attributes.

use std::sync::Arc;

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Installs the JSON log subscriber once for the process. `filter` uses `RUST_LOG` syntax.
/// A second call (tests that start several services in one process) keeps the first.
pub fn init_json_logging(filter: &str) {
    let _already_installed = tracing_subscriber::registry()
        .with(env_filter(filter))
        .with(json_logs())
        .try_init();
}

fn env_filter(filter: &str) -> EnvFilter {
    EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"))
}

fn json_logs<S>() -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    tracing_subscriber::fmt::layer()
        .json()
        .with_current_span(true)
        .with_span_list(false)
        .with_span_events(FmtSpan::NONE)
        .with_writer(std::io::stderr)
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
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let tracer = provider.tracer("medai");
    let _already_installed = tracing_subscriber::registry()
        .with(env_filter(log_filter))
        .with(json_logs())
        .with(tracing_opentelemetry::layer().with_tracer(tracer))
        .try_init();
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
    use super::*;

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
