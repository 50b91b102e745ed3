//! Prometheus conventions on every service's admin `/metrics`, scraped from the real binaries:
//! `promtool check metrics` clean, HELP on every family, `medai_build_info` and the
//! `process_*` families, the counters alerts watch registered at zero before any traffic,
//! gRPC server metrics under the ecosystem's names moving with a call; and every metric the
//! chart's PrometheusRule or Grafana dashboard names is one the mesh exports.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use medai_e2e::cluster::render_chart;
use medai_e2e::{MeshUnderTest, Storage, authorised, http_get};
use serde_json::Value;

/// promtool, installed pinned by scripts/promtool.sh (scripts/test.sh runs it).
fn promtool() -> PathBuf {
    let path = medai_testkit::workspace_root().join(".cache/tools/promtool-2.42.0/promtool");
    assert!(
        path.exists(),
        "{} is missing: run `bash scripts/promtool.sh` (scripts/test.sh does)",
        path.display()
    );
    path
}

/// The body of a `/metrics` answer.
async fn scrape(mesh: &MeshUnderTest, service: &str) -> String {
    let address = mesh
        .mesh
        .admin_address(service)
        .unwrap_or_else(|| panic!("{service} has no admin port"));
    let response = http_get(address, "/metrics").await;
    assert!(
        response.starts_with("HTTP/1.1 200"),
        "{service}: {response}"
    );
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .expect("a body")
}

/// A series alerts watch: (service, family, labels).
type WatchedSeries = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
);

/// The families' `# TYPE` and `# HELP` lines, by name.
struct Exposition {
    types: BTreeMap<String, String>,
    helps: BTreeSet<String>,
    /// Every sample name (histograms' `_bucket`, `_sum` and `_count` included).
    samples: BTreeSet<String>,
    text: String,
}

impl Exposition {
    fn parse(text: &str) -> Self {
        let mut types = BTreeMap::new();
        let mut helps = BTreeSet::new();
        let mut samples = BTreeSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
                types.insert(name.to_owned(), kind.to_owned());
            } else if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
                if !help.trim().is_empty() {
                    helps.insert(name.to_owned());
                }
            } else if !line.is_empty() && !line.starts_with('#') {
                let end = line.find(['{', ' ']).unwrap_or(line.len());
                samples.insert(line[..end].to_owned());
            }
        }
        Self {
            types,
            helps,
            samples,
            text: text.to_owned(),
        }
    }

    /// The value of the one sample of `name` whose labels include every `label="value"`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.text.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?;
            if !(rest.starts_with('{') || rest.starts_with(' ')) {
                return None;
            }
            let (series, value) = rest.rsplit_once(' ')?;
            labels
                .iter()
                .all(|(label, wanted)| series.contains(&format!("{label}=\"{wanted}\"")))
                .then(|| value.parse().ok())?
        })
    }
}

/// Runs `promtool check metrics` on `text`; returns its findings (empty when clean).
fn promtool_findings(text: &str) -> Vec<String> {
    use std::io::Write;
    let mut child = std::process::Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let output = child.wait_with_output().expect("promtool finished");
    let findings: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&output.stderr).lines())
        .filter(|line| !line.trim().is_empty())
        .map(str::to_owned)
        .collect();
    assert_eq!(
        output.status.success(),
        findings.is_empty(),
        "promtool's exit status and its findings disagree: {findings:#?}"
    );
    findings
}

/// The metric names a PromQL expression reads: identifiers of the families this project
/// exports (label names inside `{…}` and in `by (…)` / `without (…)` / `on (…)` /
/// `ignoring (…)` groupings are not metric names and are skipped).
fn metric_names_in(expression: &str) -> BTreeSet<String> {
    const PREFIXES: [&str; 5] = ["medai_", "grpc_server_", "grpc_client_", "nv_", "process_"];
    let mut names = BTreeSet::new();
    let characters: Vec<char> = expression.chars().collect();
    let mut index = 0;
    let mut previous_word = String::new();
    while index < characters.len() {
        let character = characters[index];
        if character == '{' || character == '"' {
            // A selector's labels or a string: skip to its end.
            let close = if character == '{' { '}' } else { '"' };
            index += 1;
            while index < characters.len() && characters[index] != close {
                index += 1;
            }
            index += 1;
            continue;
        }
        if character == '('
            && [
                "by",
                "without",
                "on",
                "ignoring",
                "group_left",
                "group_right",
            ]
            .contains(&previous_word.as_str())
        {
            while index < characters.len() && characters[index] != ')' {
                index += 1;
            }
            index += 1;
            previous_word.clear();
            continue;
        }
        if character.is_ascii_alphabetic() || character == '_' {
            let start = index;
            while index < characters.len()
                && (characters[index].is_ascii_alphanumeric()
                    || characters[index] == '_'
                    || characters[index] == ':')
            {
                index += 1;
            }
            let word: String = characters[start..index].iter().collect();
            if PREFIXES.iter().any(|prefix| word.starts_with(prefix)) {
                names.insert(word.clone());
            }
            previous_word = word;
            continue;
        }
        if !character.is_whitespace() {
            previous_word.clear();
        }
        index += 1;
    }
    names
}

#[test]
fn metric_names_are_read_from_promql_without_label_names() {
    let names = metric_names_in(
        r#"sum by (grpc_service, grpc_method, le) (rate(grpc_server_handling_seconds_bucket{grpc_code="OK",x="medai_fake"}[5m])) / on (grpc_service) medai_build_info - process_start_time_seconds"#,
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        [
            "grpc_server_handling_seconds_bucket",
            "medai_build_info",
            "process_start_time_seconds"
        ]
    );
}

/// Every PromQL expression the chart's PrometheusRule and Grafana dashboard hold, with where.
fn chart_expressions() -> Vec<(String, String)> {
    let values = tempfile::NamedTempFile::new().expect("values file");
    std::fs::write(
        values.path(),
        "monitoring:\n  serviceMonitor: { enabled: true }\n  prometheusRule: { enabled: true }\n  grafanaDashboard: { enabled: true }\n",
    )
    .expect("write values");
    let objects = render_chart("medai", "medai", values.path());
    let mut expressions = Vec::new();
    let rule = objects
        .iter()
        .find(|object| object["kind"] == "PrometheusRule")
        .expect("the chart renders a PrometheusRule");
    for group in rule["spec"]["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            expressions.push((
                format!("alert {}", rule["alert"].as_str().expect("alert name")),
                rule["expr"].as_str().expect("expr").to_owned(),
            ));
        }
    }
    let dashboard = objects
        .iter()
        .find(|object| {
            object["kind"] == "ConfigMap"
                && object["metadata"]["labels"]["grafana_dashboard"] == "1"
        })
        .expect("the chart renders the dashboard ConfigMap labelled grafana_dashboard: \"1\"");
    assert!(
        objects
            .iter()
            .any(|object| object["kind"] == "ServiceMonitor"),
        "the chart renders a ServiceMonitor"
    );
    for text in dashboard["data"].as_object().expect("data").values() {
        let dashboard: Value =
            serde_json::from_str(text.as_str().expect("text")).expect("dashboard JSON");
        for panel in dashboard["panels"].as_array().expect("panels") {
            for target in panel["targets"].as_array().into_iter().flatten() {
                expressions.push((
                    format!("panel {}", panel["title"].as_str().expect("title")),
                    target["expr"].as_str().expect("expr").to_owned(),
                ));
            }
        }
    }
    expressions
}

#[tokio::test]
async fn every_service_exports_prometheus_conventional_metrics_that_the_chart_alerts_and_dashboard_read()
 {
    let mesh = MeshUnderTest::start(Storage::Sqlite).await;
    let services = medai_cli::launcher::SERVICES;

    // Before any call through the gateway.
    let mut before: BTreeMap<&str, Exposition> = BTreeMap::new();
    for service in services {
        before.insert(service, Exposition::parse(&scrape(&mesh, service).await));
    }
    let zero_registered: [WatchedSeries; 13] = [
        ("gateway", "medai_gateway_unrecorded_predictions_total", &[]),
        (
            "gateway",
            "medai_connections_refused_total",
            &[("listener", "grpc")],
        ),
        ("gateway", "medai_gateway_rate_limit_fallback_total", &[]),
        (
            "gateway",
            "medai_gateway_token_checks_total",
            &[("outcome", "role_denied")],
        ),
        (
            "gateway",
            "medai_revocation_store_fallbacks_total",
            &[("operation", "check")],
        ),
        (
            "auth",
            "medai_auth_logins_total",
            &[("outcome", "invalid_credentials")],
        ),
        ("auth", "medai_auth_refresh_total", &[("outcome", "reuse")]),
        ("audit", "medai_ledger_append_failures_total", &[]),
        (
            "audit",
            "medai_ledger_chain_verification_failures_total",
            &[("check", "verify")],
        ),
        ("audit", "medai_audit_chain_anchor_violation_total", &[]),
        (
            "inference",
            "nv_inference_request_failure",
            &[("model", "brain-mri-tumor"), ("version", "1")],
        ),
        (
            "gateway",
            "grpc_server_handled_total",
            &[
                ("grpc_service", "medai.gateway.v1.GatewayService"),
                ("grpc_method", "Infer"),
                ("grpc_code", "Internal"),
            ],
        ),
        ("gateway", "medai_grpc_deadline_exceeded_total", &[]),
    ];
    for (service, name, labels) in zero_registered {
        assert_eq!(
            before[service].value(name, labels),
            Some(0.0),
            "{service} does not show {name}{labels:?} at zero before any traffic:\n{}",
            before[service].text
        );
    }
    let login = |exposition: &Exposition| {
        exposition.value(
            "grpc_server_handled_total",
            &[
                ("grpc_service", "medai.gateway.v1.GatewayService"),
                ("grpc_method", "Login"),
                ("grpc_code", "OK"),
            ],
        )
    };
    assert_eq!(login(&before["gateway"]), Some(0.0));

    // One login: gateway → auth → audit.
    let _token = mesh.admin_token().await;

    let mut exported = BTreeSet::new();
    for service in services {
        let text = scrape(&mesh, service).await;
        let exposition = Exposition::parse(&text);
        eprintln!(
            "{service}: {} families, {} sample names",
            exposition.types.len(),
            exposition.samples.len()
        );

        // promtool: clean, but for Triton's own names (no `_total`, `_us`), kept as Triton
        // spells them so its dashboards work.
        let findings = promtool_findings(&text);
        let unexpected: Vec<&String> = findings
            .iter()
            .filter(|finding| {
                !medai_inference::metric_catalog::TRITON_FAMILIES
                    .iter()
                    .any(|family| finding.starts_with(&format!("{family} ")))
            })
            .collect();
        assert!(
            unexpected.is_empty(),
            "{service}: promtool check metrics: {unexpected:#?}"
        );

        for name in exposition.types.keys() {
            assert!(
                exposition.helps.contains(name),
                "{service}: {name} has no HELP text"
            );
        }
        assert!(
            exposition.value(
                "medai_build_info",
                &[("version", env!("CARGO_PKG_VERSION"))]
            ) == Some(1.0),
            "{service}: medai_build_info{{version,commit}} missing"
        );
        assert!(
            !exposition.text.contains("commit=\"\""),
            "{service}: an empty commit label"
        );
        // Issue 14: services sharing one host split its cores instead of each taking them all.
        let workers =
            medai_cli::launcher::service_worker_threads(std::env::var("TOKIO_WORKER_THREADS").ok());
        assert_eq!(
            exposition.value("medai_runtime_worker_threads", &[]),
            Some(workers.parse::<f64>().expect("a worker count")),
            "{service}: the runtime's workers are the launcher's split of the cores"
        );
        for family in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_max_fds",
            "process_start_time_seconds",
        ] {
            let value = exposition
                .value(family, &[])
                .unwrap_or_else(|| panic!("{service}: {family} missing"));
            assert!(value > 0.0, "{service}: {family} is {value}");
        }
        assert!(
            exposition
                .value(
                    "medai_tls_certificate_expiry_timestamp_seconds",
                    &[("certificate", "service")]
                )
                .is_some_and(|expiry| expiry > 1.7e9),
            "{service}: no certificate expiry"
        );
        for (family, kind) in [
            ("grpc_server_started_total", "counter"),
            ("grpc_server_handled_total", "counter"),
            ("grpc_server_handling_seconds", "histogram"),
        ] {
            assert_eq!(
                exposition.types.get(family).map(String::as_str),
                Some(kind),
                "{service}: {family}"
            );
        }
        assert!(
            !exposition.text.lines().any(|line| !line.starts_with('#')
                && (line.contains("{service=\"") || line.contains(",service=\""))),
            "{service}: a `service` label collides with Prometheus' target label"
        );
        if service == "gateway" {
            assert_eq!(login(&exposition), Some(1.0), "the gateway's Login");
            assert_eq!(
                exposition.value(
                    "grpc_server_started_total",
                    &[
                        ("grpc_service", "medai.gateway.v1.GatewayService"),
                        ("grpc_method", "Login")
                    ]
                ),
                Some(1.0)
            );
            assert!(
                exposition
                    .value(
                        "grpc_client_handled_total",
                        &[
                            ("grpc_service", "medai.auth.v1.AuthService"),
                            ("grpc_method", "Login"),
                            ("grpc_code", "OK"),
                        ],
                    )
                    .is_some_and(|count| count >= 1.0),
                "the gateway's call to auth is counted as a client call"
            );
        }
        exported.extend(exposition.samples);
    }

    let mut missing = Vec::new();
    let expressions = chart_expressions();
    assert!(expressions.len() >= 20, "{expressions:#?}");
    for (place, expression) in &expressions {
        let names = metric_names_in(expression);
        assert!(!names.is_empty(), "{place} names no metric: {expression}");
        for name in names {
            if !exported.contains(&name) {
                missing.push(format!("{place}: {name}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "metrics named by the chart but exported by no service: {missing:#?}"
    );
    mesh.stop().await;
}

#[tokio::test]
async fn a_study_stream_that_ends_in_an_error_status_after_its_answers_is_counted_under_that_code()
{
    use medai_proto::gateway::v1 as gw;
    use medai_proto::gateway::v1::study_stream_response::Outcome;

    let mesh = MeshUnderTest::start(Storage::Sqlite).await;
    let admin = mesh.admin_token().await;
    let clinician = mesh.user_token(&admin, "dr.metrics", "clinician").await;
    let mut gateway = mesh.gateway().await;
    let handled = |exposition: &Exposition, code: &str| {
        exposition.value(
            "grpc_server_handled_total",
            &[
                ("grpc_service", "medai.gateway.v1.GatewayService"),
                ("grpc_method", "StudyStream"),
                ("grpc_code", code),
            ],
        )
    };

    // An image without a tag is answered on the stream (a refusal message, no model run); the
    // user is then disabled, so the next image ends the stream with UNAUTHENTICATED in the
    // trailers, after the answers.
    let (sender, outgoing) = tokio::sync::mpsc::channel::<gw::StudyStreamRequest>(2);
    let untagged = || gw::StudyStreamRequest {
        image: b"never decoded".to_vec().into(),
        ..Default::default()
    };
    let mut answers = gateway
        .study_stream(authorised(
            tokio_stream::wrappers::ReceiverStream::new(outgoing),
            &clinician,
        ))
        .await
        .expect("the stream opens")
        .into_inner();
    sender.send(untagged()).await.expect("send");
    let answer = answers.message().await.expect("answer").expect("one");
    match answer.outcome {
        Some(Outcome::Error(error)) => assert_eq!(error.reason, "TAG_MISSING"),
        other => panic!("an untagged image was answered with {other:?}"),
    }
    gateway
        .disable_user(authorised(
            gw::DisableUserRequest {
                username: "dr.metrics".to_owned(),
            },
            &admin,
        ))
        .await
        .expect("disable the user");
    sender.send(untagged()).await.expect("send");
    let status = loop {
        match answers.message().await {
            Ok(Some(_refusal)) => {}
            Ok(None) => panic!("the stream ended OK"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    drop(sender);

    let exposition = Exposition::parse(&scrape(&mesh, "gateway").await);
    assert_eq!(
        (
            handled(&exposition, "Unauthenticated"),
            handled(&exposition, "OK")
        ),
        (Some(1.0), Some(0.0)),
        "the stream's final status (in its trailers) is the counted code:\n{}",
        exposition.text
    );
    mesh.stop().await;
}

#[tokio::test]
async fn the_bridge_exports_prometheus_conventional_metrics_and_counts_a_forwarded_study() {
    use medai_e2e::bridge::BridgeProcess;

    let mesh = MeshUnderTest::start(Storage::Sqlite).await;
    let admin = mesh.admin_token().await;
    mesh.user_token(&admin, "pacs-bridge", "clinician").await;
    let bridge = BridgeProcess::start(&mesh, "pacs-bridge", "pacs-bridge password 123", &[]).await;
    let scrape_bridge = || async {
        let response = http_get(bridge.admin, "/metrics").await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .expect("a body");
        Exposition::parse(&body)
    };

    // Before any image: the bridge's own families at zero.
    let before = scrape_bridge().await;
    for (name, labels) in [
        ("medai_bridge_instances_received_total", &[][..]),
        ("medai_bridge_instances_stored_total", &[][..]),
        (
            "medai_bridge_instances_forwarded_total",
            &[("outcome", "result")][..],
        ),
        ("medai_bridge_reports_delivered_total", &[][..]),
        ("medai_bridge_retries_total", &[("stage", "study")][..]),
        (
            "medai_bridge_outbox_instances",
            &[("state", "RECEIVED")][..],
        ),
    ] {
        assert_eq!(
            before.value(name, labels),
            Some(0.0),
            "{name}{labels:?} at zero before any image:\n{}",
            before.text
        );
    }

    // One image by C-STORE: received, stored, forwarded with a result.
    bridge
        .store(
            &medai_testkit::Assets::locate()
                .dicom_dir
                .join("CT_small.dcm"),
        )
        .await;
    let started = std::time::Instant::now();
    let after = loop {
        let exposition = scrape_bridge().await;
        // The outbox gauge is set after each forwarding round, so a scrape can fall between
        // the forwarded count and the gauge: wait for both.
        if exposition.value(
            "medai_bridge_instances_forwarded_total",
            &[("outcome", "result")],
        ) == Some(1.0)
            && exposition.value("medai_bridge_outbox_instances", &[("state", "RECEIVED")])
                == Some(0.0)
        {
            break exposition;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "the study was not forwarded: {}\n{}",
            exposition.text,
            bridge.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    for (name, labels) in [
        ("medai_bridge_instances_received_total", &[][..]),
        ("medai_bridge_instances_stored_total", &[][..]),
        (
            "grpc_client_handled_total",
            &[
                ("grpc_service", "medai.gateway.v1.GatewayService"),
                ("grpc_method", "StudyStream"),
                ("grpc_code", "OK"),
            ][..],
        ),
    ] {
        assert_eq!(
            after.value(name, labels),
            Some(1.0),
            "{name}:\n{}",
            after.text
        );
    }
    // The instance is no longer waiting for the gateway: it waits for (or has had) its report.
    assert_eq!(
        after.value("medai_bridge_outbox_instances", &[("state", "RECEIVED")]),
        Some(0.0),
        "{}",
        after.text
    );

    // The conventions every service keeps.
    let findings = promtool_findings(&after.text);
    eprintln!(
        "bridge: {} families, {} sample names, promtool findings {findings:?}",
        after.types.len(),
        after.samples.len()
    );
    assert!(
        findings.is_empty(),
        "bridge: promtool check metrics: {findings:#?}"
    );
    for name in after.types.keys() {
        assert!(
            after.helps.contains(name),
            "bridge: {name} has no HELP text"
        );
    }
    assert_eq!(
        after.value(
            "medai_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0),
        "bridge: medai_build_info{{version,commit}} missing"
    );
    for family in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
    ] {
        let value = after
            .value(family, &[])
            .unwrap_or_else(|| panic!("bridge: {family} missing"));
        assert!(value > 0.0, "bridge: {family} is {value}");
    }
    // No identifier of the instance in any series.
    let image = medai_testkit::Assets::locate()
        .dicom_dir
        .join("CT_small.dcm");
    let object = dicom_object::open_file(&image).expect("DICOM file");
    for tag in [
        dicom_dictionary_std::tags::STUDY_INSTANCE_UID,
        dicom_dictionary_std::tags::SOP_INSTANCE_UID,
        dicom_dictionary_std::tags::PATIENT_ID,
    ] {
        let identifier = object
            .element(tag)
            .expect("element")
            .to_str()
            .expect("text")
            .trim_end_matches('\0')
            .trim()
            .to_owned();
        assert!(
            !after.text.contains(&identifier),
            "{tag} in the bridge's metrics"
        );
    }
    bridge.stop().await;
    mesh.stop().await;
}
