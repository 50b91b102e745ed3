//! One prediction is one trace: the W3C trace context a PACS integration sends crosses every
//! gRPC hop between the services (separate processes over mTLS), and each service exports its
//! spans over OTLP to a real collector.

use std::collections::BTreeSet;
use std::time::Duration;

use medai_e2e::{MeshUnderTest, Storage, authorised, traced_environment};
use medai_proto::common::v1::ImageFormat;
use medai_proto::gateway::v1::InferRequest;
use medai_testkit::Assets;
use medai_testkit::otlp::{CollectedSpan, OtlpCollector};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";
const HOPS: [&str; 4] = [
    "medai-gateway",
    "medai-validation",
    "medai-inference",
    "medai-audit",
];

fn in_trace(spans: &[CollectedSpan]) -> Vec<&CollectedSpan> {
    spans
        .iter()
        .filter(|span| span.trace_id == TRACE_ID)
        .collect()
}

#[tokio::test]
async fn one_prediction_is_one_trace_across_every_hop() {
    let collector = OtlpCollector::start().await;
    let mesh =
        MeshUnderTest::start_with(Storage::Sqlite, traced_environment(&collector.endpoint)).await;
    let token = mesh.admin_token().await;
    let mut gateway = mesh.gateway().await;
    let mut request = authorised(
        InferRequest {
            image: Assets::locate().dicom("MR_small.dcm"),
            format: ImageFormat::Dicom.into(),
            model_name: String::new(),
            model_version: String::new(),
            idempotency_key: String::new(),
        },
        &token,
    );
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{CALLER_SPAN}-01")
            .parse()
            .expect("metadata"),
    );
    gateway.infer(request).await.expect("prediction");

    let spans = collector
        .wait_until(Duration::from_secs(20), |spans| {
            let services: BTreeSet<&str> = in_trace(spans)
                .iter()
                .map(|span| span.service.as_str())
                .collect();
            HOPS.iter().all(|hop| services.contains(hop))
        })
        .await;
    let traced = in_trace(&spans);
    let rpc_of = |service: &str| -> Vec<&CollectedSpan> {
        traced
            .iter()
            .copied()
            .filter(|span| span.service == service && span.name == "rpc")
            .collect()
    };
    for hop in HOPS {
        assert!(
            !rpc_of(hop).is_empty(),
            "{hop} has a call in the caller's trace; services seen: {:?}",
            traced
                .iter()
                .map(|span| &span.service)
                .collect::<BTreeSet<_>>()
        );
    }
    // The gateway's call is the PACS caller's child.
    let gateway_calls = rpc_of("medai-gateway");
    assert!(
        gateway_calls
            .iter()
            .any(|span| span.parent_span_id == CALLER_SPAN
                && span.attributes.iter().any(|a| a.ends_with("/Infer"))),
        "{gateway_calls:?}"
    );
    // Every other service's call is the child of a span of the service that made it.
    let span_ids_of = |services: &[&str]| -> BTreeSet<&str> {
        traced
            .iter()
            .filter(|span| services.contains(&span.service.as_str()))
            .map(|span| span.span_id.as_str())
            .collect()
    };
    let gateway_spans = span_ids_of(&["medai-gateway"]);
    for callee in ["medai-validation", "medai-inference"] {
        for call in rpc_of(callee) {
            assert!(
                gateway_spans.contains(call.parent_span_id.as_str()),
                "{callee}'s call hangs under a gateway span: {call:?}"
            );
        }
    }
    let callers = span_ids_of(&["medai-gateway", "medai-inference", "medai-auth"]);
    for call in rpc_of("medai-audit") {
        assert!(
            callers.contains(call.parent_span_id.as_str()),
            "each ledger append hangs under its caller's span: {call:?}"
        );
    }
    mesh.stop().await;
}
