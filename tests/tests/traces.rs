//! One prediction is one trace: the W3C trace context a PACS integration sends crosses every
//! gRPC hop between the services (separate processes over mTLS), and each service exports its
//! spans over OTLP to a real collector. The spans follow the OpenTelemetry semantic conventions
//! for RPC (names, kinds, `rpc.*` and `server.*` attributes, status with the stable reason
//! code), the work that matters has child spans, and log lines name the trace and span they
//! were written in.

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
const INFER: &str = "medai.gateway.v1.GatewayService/Infer";
const VALIDATE: &str = "medai.validation.v1.ValidationService/ValidateImage";
const PREDICT: &str = "medai.inference.v1.InferenceService/PredictThenStore";
const APPEND: &str = "medai.audit.v1.AuditService/Append";

fn in_trace<'a>(spans: &'a [CollectedSpan], trace_id: &str) -> Vec<&'a CollectedSpan> {
    spans
        .iter()
        .filter(|span| span.trace_id == trace_id)
        .collect()
}

fn has(span: &CollectedSpan, attribute: &str) -> bool {
    span.attributes.iter().any(|a| a == attribute)
}

/// The one span of `service` named `name` of `kind` in `spans`.
fn the<'a>(
    spans: &[&'a CollectedSpan],
    service: &str,
    kind: &str,
    name: &str,
) -> &'a CollectedSpan {
    let found: Vec<&CollectedSpan> = spans
        .iter()
        .copied()
        .filter(|span| span.service == service && span.kind == kind && span.name == name)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one {kind} span {name} of {service}; the trace holds: {:#?}",
        spans
            .iter()
            .map(|span| format!("{} {} {}", span.service, span.kind, span.name))
            .collect::<Vec<_>>()
    );
    found[0]
}

/// The spans of `service` whose parent is `parent`.
fn children_of<'a>(
    spans: &[&'a CollectedSpan],
    parent: &CollectedSpan,
    name: &str,
) -> Vec<&'a CollectedSpan> {
    spans
        .iter()
        .copied()
        .filter(|span| {
            span.parent_span_id == parent.span_id
                && span.service == parent.service
                && span.name == name
        })
        .collect()
}

/// The RPC attributes both ends of a call carry, the server's address being `port`'s.
fn assert_rpc_attributes(span: &CollectedSpan, service: &str, method: &str, port: u16) {
    for attribute in [
        "rpc.system=grpc".to_owned(),
        format!("rpc.service={service}"),
        format!("rpc.method={method}"),
        format!("server.port={port}"),
    ] {
        assert!(has(span, &attribute), "{attribute} on {span:#?}");
    }
    assert!(
        span.attributes
            .iter()
            .any(|a| a.starts_with("server.address=") && a.len() > "server.address=".len()),
        "server.address on {span:#?}"
    );
}

/// The JSON log lines `service` wrote inside the trace.
fn log_lines_in_trace(
    mesh: &MeshUnderTest,
    service: &str,
    trace_id: &str,
) -> Vec<serde_json::Value> {
    let path = mesh.mesh.log_file(service).expect("log file");
    std::fs::read_to_string(path)
        .expect("log")
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["trace_id"] == trace_id)
        .collect()
}

fn infer_request(
    image: Vec<u8>,
    format: ImageFormat,
    token: &str,
    trace_id: &str,
) -> tonic::Request<InferRequest> {
    let mut request = authorised(
        InferRequest {
            image: image.into(),
            format: format.into(),
            model_name: String::new(),
            model_version: String::new(),
            idempotency_key: String::new(),
        },
        token,
    );
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{CALLER_SPAN}-01")
            .parse()
            .expect("metadata"),
    );
    request
}

#[tokio::test]
async fn one_prediction_is_one_trace_across_every_hop() {
    let collector = OtlpCollector::start().await;
    let mesh =
        MeshUnderTest::start_with(Storage::Sqlite, traced_environment(&collector.endpoint)).await;
    let port = |service: &str| mesh.mesh.address(service).expect("address").port();
    let token = mesh.admin_token().await;
    let mut gateway = mesh.gateway().await;
    gateway
        .infer(infer_request(
            Assets::locate().dicom("MR_small.dcm"),
            ImageFormat::Dicom,
            &token,
            TRACE_ID,
        ))
        .await
        .expect("prediction");

    // Every span of the prediction, the ledger's group commit included, has been exported.
    // Each server's own span too: it ends after its children (PredictThenStore's once the
    // result is stored, after the answer), so it may come in a later batch than theirs.
    let expected = [
        ("medai-gateway", INFER),
        ("medai-validation", VALIDATE),
        ("medai-inference", PREDICT),
        ("medai-audit", APPEND),
        ("medai-gateway", "gateway.ledger_append_wait"),
        ("medai-validation", "validation.decode"),
        ("medai-validation", "validation.quality"),
        ("medai-inference", "inference.queue_wait"),
        ("medai-inference", "inference.onnxruntime_run"),
        ("medai-audit", "audit.group_commit"),
    ];
    let spans = collector
        .wait_until(Duration::from_secs(30), |spans| {
            let traced = in_trace(spans, TRACE_ID);
            let named = |service: &str, name: &str| {
                traced
                    .iter()
                    .any(|span| span.service == service && span.name == name)
            };
            // Each process exports in its own batches: wait for every append's commit too.
            let appends_committed = traced
                .iter()
                .filter(|span| span.service == "medai-audit" && span.kind == "SERVER")
                .all(|append| {
                    traced.iter().any(|span| {
                        span.name == "audit.group_commit" && span.parent_span_id == append.span_id
                    })
                });
            let gateway_append_served = traced
                .iter()
                .filter(|span| span.service == "medai-gateway" && span.name == APPEND)
                .any(|call| {
                    traced.iter().any(|span| {
                        span.service == "medai-audit" && span.parent_span_id == call.span_id
                    })
                });
            expected.iter().all(|(service, name)| named(service, name))
                && gateway_append_served
                && appends_committed
        })
        .await;
    let traced = in_trace(&spans, TRACE_ID);
    let services: BTreeSet<&str> = traced.iter().map(|span| span.service.as_str()).collect();
    for hop in HOPS {
        assert!(services.contains(hop), "{hop} in the trace: {services:?}");
    }

    // The gateway serves the PACS caller's call: a SERVER span, the caller's child.
    let infer = the(&traced, "medai-gateway", "SERVER", INFER);
    assert_eq!(infer.parent_span_id, CALLER_SPAN);
    assert_eq!(infer.status_code, "OK");
    assert!(has(infer, "rpc.grpc.status_code=0"), "{infer:#?}");
    assert_rpc_attributes(
        infer,
        "medai.gateway.v1.GatewayService",
        "Infer",
        port("gateway"),
    );

    // Each hop is a CLIENT span in the caller and a SERVER span in the callee, its child.
    let gateway_span_ids: BTreeSet<&str> = traced
        .iter()
        .filter(|span| span.service == "medai-gateway")
        .map(|span| span.span_id.as_str())
        .collect();
    let mut server_spans = Vec::new();
    for (callee, name, service, method) in [
        (
            "validation",
            VALIDATE,
            "medai.validation.v1.ValidationService",
            "ValidateImage",
        ),
        (
            "inference",
            PREDICT,
            "medai.inference.v1.InferenceService",
            "PredictThenStore",
        ),
    ] {
        let client = the(&traced, "medai-gateway", "CLIENT", name);
        let server = the(&traced, &format!("medai-{callee}"), "SERVER", name);
        assert!(
            gateway_span_ids.contains(client.parent_span_id.as_str()),
            "the gateway's call to {callee} hangs under a gateway span: {client:#?}"
        );
        assert_eq!(server.parent_span_id, client.span_id, "{server:#?}");
        for span in [client, server] {
            assert_rpc_attributes(span, service, method, port(callee));
            assert_eq!(span.status_code, "OK", "{span:#?}");
            assert!(has(span, "rpc.grpc.status_code=0"), "{span:#?}");
        }
        server_spans.push(server);
    }
    // The gateway's wait for the ledger is a span of its own, and the append call under it.
    let append_wait = the(
        &traced,
        "medai-gateway",
        "INTERNAL",
        "gateway.ledger_append_wait",
    );
    assert!(gateway_span_ids.contains(append_wait.parent_span_id.as_str()));
    let gateway_appends = children_of(&traced, append_wait, APPEND);
    assert_eq!(gateway_appends.len(), 1, "{append_wait:#?}");
    assert_eq!(gateway_appends[0].kind, "CLIENT");
    let audit_append = traced
        .iter()
        .find(|span| {
            span.service == "medai-audit" && span.parent_span_id == gateway_appends[0].span_id
        })
        .unwrap_or_else(|| panic!("audit's SERVER span under the gateway's append"));
    assert_eq!(audit_append.kind, "SERVER");
    assert_eq!(audit_append.name, APPEND);
    assert_rpc_attributes(
        audit_append,
        "medai.audit.v1.AuditService",
        "Append",
        port("audit"),
    );
    // Every other ledger append of the prediction (inference records its own) follows the same
    // pattern: a SERVER span in audit under a CLIENT span of its caller.
    for append in traced
        .iter()
        .filter(|span| span.service == "medai-audit" && span.kind == "SERVER")
    {
        let caller = traced
            .iter()
            .find(|span| span.span_id == append.parent_span_id)
            .unwrap_or_else(|| panic!("the caller of {append:#?} is in the trace"));
        assert_eq!(caller.kind, "CLIENT", "{caller:#?}");
        assert_eq!(caller.name, append.name);
    }

    // The work that matters, as children of the call that did it.
    let (validate, predict) = (server_spans[0], server_spans[1]);
    for (parent, child) in [
        (validate, "validation.decode"),
        (validate, "validation.quality"),
        (predict, "inference.queue_wait"),
        (predict, "inference.onnxruntime_run"),
        (audit_append, "audit.group_commit"),
    ] {
        assert_eq!(
            children_of(&traced, parent, child).len(),
            1,
            "{child} under {}: {traced:#?}",
            parent.name
        );
    }

    // A log line of the call names the trace and the span the collector received.
    let delivered: Vec<serde_json::Value> = log_lines_in_trace(&mesh, "gateway", TRACE_ID)
        .into_iter()
        .filter(|line| line["fields"]["message"] == "prediction delivered")
        .collect();
    assert_eq!(
        delivered.len(),
        1,
        "the gateway's delivery line names the trace"
    );
    let span_id = delivered[0]["span_id"].as_str().expect("span_id");
    assert!(
        gateway_span_ids.contains(span_id),
        "{span_id} is a gateway span of the trace"
    );
    mesh.stop().await;
}

#[tokio::test]
async fn a_refused_prediction_is_an_error_span_with_its_reason_code() {
    const REFUSED_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
    let collector = OtlpCollector::start().await;
    let mesh =
        MeshUnderTest::start_with(Storage::Sqlite, traced_environment(&collector.endpoint)).await;
    let token = mesh.admin_token().await;
    let mut gateway = mesh.gateway().await;
    let refused = gateway
        .infer(infer_request(
            b"not a PNG at all".to_vec(),
            ImageFormat::Png,
            &token,
            REFUSED_TRACE,
        ))
        .await
        .expect_err("refused");
    let reason = medai_runtime::errors::reason_of(&refused).expect("a stable reason");
    assert_eq!(reason, "IMAGE_UNDECODABLE");

    let spans = collector
        .wait_until(Duration::from_secs(30), |spans| {
            let traced = in_trace(spans, REFUSED_TRACE);
            [("medai-gateway", INFER), ("medai-validation", VALIDATE)]
                .iter()
                .all(|(service, name)| {
                    traced.iter().any(|span| {
                        span.service == *service && span.name == *name && span.kind == "SERVER"
                    })
                })
        })
        .await;
    let traced = in_trace(&spans, REFUSED_TRACE);
    // Both ends of the failing hop and the gateway's own call carry the reason code as
    // `error.type` and the gRPC code as `rpc.grpc.status_code` (3, INVALID_ARGUMENT). The
    // gateway's call to validation failed (ERROR, described by the reason); the two servers
    // refused bad input, which is no fault of theirs, so their status stays unset (the
    // OpenTelemetry RPC conventions) and error-rate dashboards do not count it.
    let infer = the(&traced, "medai-gateway", "SERVER", INFER);
    let client = the(&traced, "medai-gateway", "CLIENT", VALIDATE);
    let validate = the(&traced, "medai-validation", "SERVER", VALIDATE);
    assert_eq!(validate.parent_span_id, client.span_id);
    for span in [infer, client, validate] {
        assert!(has(span, &format!("error.type={reason}")), "{span:#?}");
        assert!(has(span, "rpc.grpc.status_code=3"), "{span:#?}");
    }
    assert_eq!(client.status_code, "ERROR", "{client:#?}");
    assert_eq!(client.status_message, reason, "{client:#?}");
    for server in [infer, validate] {
        assert_eq!(server.status_code, "UNSET", "{server:#?}");
    }
    // No prediction was attempted.
    assert!(
        !traced
            .iter()
            .any(|span| span.name == PREDICT || span.name == "inference.onnxruntime_run"),
        "{traced:#?}"
    );
    // Validation's refusal line is in the trace, in the span of its call.
    let refusal_lines: Vec<serde_json::Value> =
        log_lines_in_trace(&mesh, "validation", REFUSED_TRACE)
            .into_iter()
            .filter(|line| line["fields"]["message"] == "image refused")
            .collect();
    assert_eq!(
        refusal_lines.len(),
        1,
        "validation's refusal line names the trace"
    );
    assert_eq!(refusal_lines[0]["span_id"], validate.span_id);
    assert_eq!(refusal_lines[0]["fields"]["reason"], reason);
    mesh.stop().await;
}

/// The text of `tag` in the DICOM file at `path`.
fn dicom_text(path: &std::path::Path, tag: dicom_core::Tag) -> String {
    dicom_object::open_file(path)
        .expect("DICOM file")
        .element(tag)
        .expect("element")
        .to_str()
        .expect("text")
        .trim_end_matches('\0')
        .trim()
        .to_owned()
}

#[tokio::test]
async fn a_study_the_bridge_forwards_is_a_bridge_client_span_under_which_the_gateway_serves_it() {
    use dicom_dictionary_std::tags;
    use medai_e2e::bridge::BridgeProcess;

    const STUDY_STREAM: &str = "medai.gateway.v1.GatewayService/StudyStream";
    const LOGIN: &str = "medai.gateway.v1.GatewayService/Login";
    let collector = OtlpCollector::start().await;
    let mesh =
        MeshUnderTest::start_with(Storage::Sqlite, traced_environment(&collector.endpoint)).await;
    let admin = mesh.admin_token().await;
    mesh.user_token(&admin, "pacs-bridge", "clinician").await;
    let bridge = BridgeProcess::start(
        &mesh,
        "pacs-bridge",
        "pacs-bridge password 123",
        &[
            (
                "MEDAI_BRIDGE_TELEMETRY__OTLP_ENDPOINT".to_owned(),
                collector.endpoint.clone(),
            ),
            ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "100".to_owned()),
        ],
    )
    .await;
    let image = Assets::locate().dicom_dir.join("CT_small.dcm");
    bridge.store(&image).await;

    // The bridge's stream and the gateway's service of it, both exported.
    let served_under = |spans: &[CollectedSpan], client: &CollectedSpan| {
        spans.iter().any(|span| {
            span.service == "medai-gateway"
                && span.kind == "SERVER"
                && span.parent_span_id == client.span_id
        })
    };
    let spans = collector
        .wait_until(Duration::from_secs(60), |spans| {
            spans
                .iter()
                .filter(|span| span.service == "medai-bridge" && span.kind == "CLIENT")
                .filter(|span| span.name == STUDY_STREAM || span.name == LOGIN)
                .filter(|client| served_under(spans, client))
                .count()
                >= 2
        })
        .await;
    let stream = spans
        .iter()
        .find(|span| {
            span.service == "medai-bridge" && span.kind == "CLIENT" && span.name == STUDY_STREAM
        })
        .expect("the bridge's StudyStream span");
    let traced = in_trace(&spans, &stream.trace_id);

    // Under the bridge's span for the study: its login and its stream, CLIENT spans that name
    // the gateway as the server, each the parent of the gateway's SERVER span.
    let study = the(&traced, "medai-bridge", "INTERNAL", "bridge.forward_study");
    let gateway_port = mesh.mesh.address("gateway").expect("gateway").port();
    for (name, method) in [(STUDY_STREAM, "StudyStream"), (LOGIN, "Login")] {
        let client = the(&traced, "medai-bridge", "CLIENT", name);
        assert_eq!(client.parent_span_id, study.span_id, "{client:#?}");
        assert_rpc_attributes(
            client,
            "medai.gateway.v1.GatewayService",
            method,
            gateway_port,
        );
        assert_eq!(client.status_code, "OK", "{client:#?}");
        assert!(has(client, "rpc.grpc.status_code=0"), "{client:#?}");
        let server = the(&traced, "medai-gateway", "SERVER", name);
        assert_eq!(server.parent_span_id, client.span_id, "{server:#?}");
    }
    // The gateway's work for the image is in the same trace.
    assert!(
        traced
            .iter()
            .any(|span| span.service == "medai-inference" && span.kind == "SERVER"),
        "inference in the bridge's trace: {traced:#?}"
    );

    // The bridge's log line for the study names the trace; no identifier of the study is in
    // its logs or its spans.
    let log = bridge.log();
    let forwarded: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["fields"]["message"] == "study forwarded")
        .collect();
    assert_eq!(forwarded.len(), 1, "{log}");
    assert_eq!(forwarded[0]["trace_id"], stream.trace_id.as_str(), "{log}");
    assert_eq!(forwarded[0]["span_id"], study.span_id.as_str(), "{log}");
    for tag in [
        tags::STUDY_INSTANCE_UID,
        tags::SOP_INSTANCE_UID,
        tags::PATIENT_ID,
    ] {
        let identifier = dicom_text(&image, tag);
        assert!(!identifier.is_empty());
        assert!(!log.contains(&identifier), "{tag} in the bridge's log");
        let bridge_spans = format!(
            "{:?}",
            spans
                .iter()
                .filter(|span| span.service == "medai-bridge")
                .collect::<Vec<_>>()
        );
        assert!(
            !bridge_spans.contains(&identifier),
            "{tag} in the bridge's spans"
        );
    }
    bridge.stop().await;
    mesh.stop().await;
}
