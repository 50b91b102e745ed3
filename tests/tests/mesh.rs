//! The whole mesh: five services as separate processes, mTLS on every hop, the ledger and the
//! users in the suite's PostgreSQL, the real brain-MRI model in ONNX Runtime.

use medai_e2e::{ADMIN_PASSWORD, MeshUnderTest, Storage, authorised, http_get};
use medai_proto::audit::v1::AppendRequest;
use medai_proto::audit::v1::audit_service_client::AuditServiceClient;
use medai_proto::common::v1::ImageFormat;
use medai_proto::gateway::v1::{InferRequest, LoginRequest, VerifyLedgerRequest};
use medai_proto::validation::v1::ValidateImageRequest;
use medai_proto::validation::v1::validation_service_client::ValidationServiceClient;
use medai_runtime::ServiceIdentity;
use medai_runtime::errors::reason_of;
use medai_testkit::rustls;
use medai_testkit::{Assets, TestPki};
use sea_orm::{ConnectionTrait, Database, DatabaseBackend, Statement};
use sha2::{Digest, Sha256};
use tonic::Code;

fn infer_request(image: Vec<u8>) -> InferRequest {
    InferRequest {
        image: image.into(),
        format: ImageFormat::Unspecified.into(),
        model_name: String::new(),
        model_version: String::new(),
        idempotency_key: String::new(),
    }
}

struct LedgerRow {
    actor: String,
    action: String,
    resource: String,
    outcome: String,
    context: serde_json::Value,
    hash: String,
}

async fn ledger_rows(database_url: &str) -> Vec<LedgerRow> {
    let database = Database::connect(database_url)
        .await
        .expect("connect to the ledger database");
    let rows = database
        .query_all_raw(Statement::from_string(
            DatabaseBackend::Postgres,
            "SELECT actor, action, resource, outcome, context, hash FROM ledger_entries ORDER BY seq",
        ))
        .await
        .expect("query the ledger");
    rows.into_iter()
        .map(|row| LedgerRow {
            actor: row.try_get("", "actor").expect("actor"),
            action: row.try_get("", "action").expect("action"),
            resource: row.try_get("", "resource").expect("resource"),
            outcome: row.try_get("", "outcome").expect("outcome"),
            context: serde_json::from_str(&row.try_get::<String>("", "context").expect("context"))
                .expect("json"),
            hash: row.try_get("", "hash").expect("hash"),
        })
        .collect()
}

#[tokio::test]
async fn a_real_dicom_prediction_travels_the_mesh_and_is_recorded_in_the_ledger() {
    let mesh = MeshUnderTest::start(Storage::Postgres).await;
    let assets = Assets::locate();
    let image = assets.dicom("MR_small.dcm");
    let token = mesh.admin_token().await;
    let mut gateway = mesh.gateway().await;

    let mut request = authorised(infer_request(image.clone()), &token);
    request
        .metadata_mut()
        .insert("x-correlation-id", "pacs-e2e-1".parse().expect("metadata"));
    let response = gateway.infer(request).await.expect("prediction");
    assert_eq!(
        response
            .metadata()
            .get("x-correlation-id")
            .and_then(|v| v.to_str().ok()),
        Some("pacs-e2e-1")
    );
    let response = response.into_inner();
    let prediction = response.prediction.clone().expect("prediction");
    assert_eq!(
        (
            prediction.model_name.as_str(),
            prediction.model_version.as_str()
        ),
        ("brain-mri-tumor", "1")
    );
    assert!(prediction.intended_use.contains("RESEARCH USE ONLY"));
    assert_eq!(response.image_sha256, hex::encode(Sha256::digest(&image)));
    let quality = response
        .quality
        .as_ref()
        .expect("the image's quality travels with the prediction");
    assert_eq!(quality.checks.len(), 6);

    // The mesh answers exactly what the model answers when called in-process on the same image.
    let canonical = medai_validation::decode::decode_image(
        &image,
        None,
        &medai_validation::ImageLimits::default(),
    )
    .expect("decode");
    let repository = medai_inference::load_repository(
        &assets.model_repository,
        &assets.onnxruntime_library,
        &Default::default(),
    )
    .expect("in-process model");
    let predictor = medai_inference::predict::Predictor {
        repository,
        figures: std::sync::Arc::default(),
    };
    let input = medai_inference::preprocess::ImageInput {
        width: canonical.width,
        height: canonical.height,
        channels: canonical.channels,
        bit_depth: canonical.bit_depth,
        pixels: canonical.pixels,
        resized_for_model_input: false,
    };
    let direct = predictor
        .predict("brain-mri-tumor", "", b"", input, &Default::default(), None)
        .await
        .expect("in-process prediction");
    let through_mesh: Vec<(String, f32)> = prediction
        .probabilities
        .iter()
        .map(|entry| (entry.label.clone(), entry.probability))
        .collect();
    assert_eq!(through_mesh, direct.probabilities);
    // Issue 14: validation returned the image at the model's input size (the gateway named it),
    // and the light model too answers exactly what it answers on the full image resized by
    // inference (the old path, in-process).
    let noise = image::GrayImage::from_fn(256, 256, |x, y| {
        image::Luma([((x * 7919 + y * 104_729) % 251) as u8])
    });
    let mut png = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageLuma8(noise)
        .write_to(&mut png, image::ImageFormat::Png)
        .expect("encode png");
    let png = png.into_inner();
    let light = gateway
        .infer(authorised(
            InferRequest {
                model_name: "synthetic-light".to_owned(),
                ..infer_request(png.clone())
            },
            &token,
        ))
        .await
        .expect("light prediction")
        .into_inner()
        .prediction
        .expect("prediction");
    let canonical = medai_validation::decode::decode_image(
        &png,
        None,
        &medai_validation::ImageLimits::default(),
    )
    .expect("decode");
    let direct = predictor
        .predict(
            "synthetic-light",
            "",
            b"",
            medai_inference::preprocess::ImageInput {
                width: canonical.width,
                height: canonical.height,
                channels: canonical.channels,
                bit_depth: canonical.bit_depth,
                pixels: canonical.pixels,
                resized_for_model_input: false,
            },
            &Default::default(),
            None,
        )
        .await
        .expect("in-process prediction");
    let through_mesh: Vec<(String, f32)> = light
        .probabilities
        .iter()
        .map(|entry| (entry.label.clone(), entry.probability))
        .collect();
    assert_eq!(through_mesh, direct.probabilities);
    let validation_metrics = http_get(
        mesh.mesh.admin_address("validation").expect("admin port"),
        "/metrics",
    )
    .await;
    let resized: f64 = validation_metrics
        .lines()
        .find_map(|line| line.strip_prefix("medai_validation_resized_to_model_input_total "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no resize counter:\n{validation_metrics}"));
    assert_eq!(
        resized, 2.0,
        "both predictions crossed the mesh at the model's size"
    );

    // The ledger holds the login and the prediction, bound to the image and the answer.
    let rows = ledger_rows(&mesh.settings.audit_database_url).await;
    let entry = &rows[usize::try_from(response.ledger_seq).expect("seq") - 1];
    assert_eq!(entry.action, "INFERENCE");
    assert_eq!(entry.outcome, "SUCCESS");
    assert_eq!(entry.resource, format!("result/{}", response.result_id));
    assert_eq!(entry.hash, response.ledger_hash);
    assert_eq!(entry.context["image_sha256"], response.image_sha256);
    assert_eq!(entry.context["correlation_id"], "pacs-e2e-1");
    assert_eq!(
        entry.context["prediction_sha256"],
        medai_gateway_prediction_hash(&prediction)
    );
    assert!(entry.actor.starts_with("user:"));
    assert!(
        rows.iter()
            .any(|row| row.action == "LOGIN" && row.outcome == "SUCCESS")
    );

    let verification = gateway
        .verify_ledger(authorised(VerifyLedgerRequest {}, &token))
        .await
        .expect("verify")
        .into_inner()
        .verification
        .expect("report");
    assert!(verification.intact, "{verification:?}");
    assert_eq!(verification.entries_checked, rows.len() as u64);
    assert!(
        ledger_rows(&mesh.settings.audit_database_url)
            .await
            .iter()
            .any(|row| row.action == "LEDGER_VERIFY")
    );

    // No patient identity from the DICOM file reached any log or the ledger.
    let patient_name = "CompressedSamples^MR1";
    let patient_id = "4MR1";
    let logs = mesh.all_logs();
    assert!(!logs.is_empty());
    let ledger_text: String = ledger_rows(&mesh.settings.audit_database_url)
        .await
        .iter()
        .map(|row| {
            format!(
                "{} {} {} {}",
                row.actor, row.resource, row.context, row.outcome
            )
        })
        .collect();
    for identifier in [patient_name, "CompressedSamples", patient_id] {
        assert!(!logs.contains(identifier), "{identifier} leaked into a log");
        assert!(
            !ledger_text.contains(identifier),
            "{identifier} leaked into the ledger"
        );
    }
    assert!(
        !logs.contains(ADMIN_PASSWORD),
        "the admin password leaked into a log"
    );

    // Prometheus metrics on the admin port.
    let metrics = http_get(
        mesh.mesh.admin_address("gateway").expect("admin port"),
        "/metrics",
    )
    .await;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(metrics.contains("grpc_server_handled_total"), "{metrics}");
    assert!(metrics.contains(
        r#"grpc_server_handled_total{grpc_service="medai.gateway.v1.GatewayService",grpc_method="Infer",grpc_code="OK"}"#
    ));
    // The inference service's figures are histograms (buckets, not quantiles) per model and
    // version, so dashboards can aggregate replicas.
    let metrics = http_get(
        mesh.mesh.admin_address("inference").expect("admin port"),
        "/metrics",
    )
    .await;
    let labels = r#"model="brain-mri-tumor",version="1""#;
    for series in [
        "medai_inference_request_seconds_bucket",
        "medai_inference_queue_seconds_bucket",
        "medai_inference_compute_seconds_bucket",
    ] {
        assert!(
            metrics.contains(&format!("{series}{{{labels},le=\"0.25\"}}")),
            "{series} missing:\n{metrics}"
        );
    }
    assert!(
        metrics.contains(&format!(
            "medai_inference_batch_size_bucket{{{labels},le=\"1\"}}"
        )),
        "{metrics}"
    );
    assert!(metrics.contains(&format!(
        "medai_inference_requests_total{{{labels},code=\"OK\"}}"
    )));
    assert!(metrics.contains("medai_inference_queue_depth"));
    // Triton's families, as Triton names and labels them, moved by the prediction.
    for family in [
        "nv_inference_request_success",
        "nv_inference_count",
        "nv_inference_exec_count",
        "nv_inference_request_duration_us",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_infer_duration_us",
    ] {
        let value: f64 = metrics
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{family}{{{labels}}} ")))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or_else(|| panic!("{family} missing:\n{metrics}"));
        let moved = if family == "nv_inference_queue_duration_us" {
            value >= 0.0
        } else {
            value >= 1.0
        };
        assert!(moved, "{family} is {value}");
    }
    assert!(
        !metrics.contains("quantile="),
        "summaries instead of histograms"
    );
    mesh.stop().await;
}

fn medai_gateway_prediction_hash(
    prediction: &medai_proto::inference::v1::PredictResponse,
) -> String {
    // Restated here from the gateway's rule so the test checks the rule, not just itself.
    let mut hasher = Sha256::new();
    for part in [
        &prediction.model_name,
        &prediction.model_version,
        &prediction.model_sha256,
    ] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    for entry in &prediction.probabilities {
        hasher.update((entry.label.len() as u64).to_be_bytes());
        hasher.update(entry.label.as_bytes());
        hasher.update(entry.probability.to_be_bytes());
    }
    hex::encode(hasher.finalize())
}

/// A token with the right shape and claims, signed with a key auth never published.
fn forged_token(kid: &str, subject: &str) -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let claims = medai_tokens::AccessClaims {
        iss: "medai-auth".to_owned(),
        aud: "medai".to_owned(),
        sub: subject.to_owned(),
        exp: now + 600,
        iat: now,
        nbf: now,
        jti: uuid::Uuid::new_v4().to_string(),
        role: medai_tokens::Role::Admin,
        generation: 0,
    };
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_ed_der(&key.serialize_der()),
    )
    .expect("sign")
}

#[tokio::test]
async fn the_mesh_refuses_every_caller_it_should() {
    let mesh = MeshUnderTest::start(Storage::Postgres).await;
    let assets = Assets::locate();
    let image = assets.dicom("MR_small.dcm");
    let mut gateway = mesh.gateway().await;

    // Wrong password: refused and recorded.
    let status = gateway
        .login(LoginRequest {
            username: "admin".to_owned(),
            password: "wrong password".to_owned(),
        })
        .await
        .expect_err("refused");
    assert_eq!(
        (status.code(), reason_of(&status).as_deref()),
        (Code::Unauthenticated, Some("INVALID_CREDENTIALS"))
    );

    // No token.
    let status = gateway
        .infer(infer_request(image.clone()))
        .await
        .expect_err("no token");
    assert_eq!(
        (status.code(), reason_of(&status).as_deref()),
        (Code::Unauthenticated, Some("TOKEN_MISSING"))
    );

    // A token signed by another key: borrowing the real kid, and with a kid of its own.
    let token = mesh.admin_token().await;
    let real_kid = jsonwebtoken::decode_header(&token)
        .expect("header")
        .kid
        .expect("kid");
    let status = gateway
        .infer(authorised(
            infer_request(image.clone()),
            &forged_token(&real_kid, "mallory"),
        ))
        .await
        .expect_err("forged");
    assert_eq!(
        (status.code(), reason_of(&status).as_deref()),
        (Code::Unauthenticated, Some("TOKEN_BAD_SIGNATURE"))
    );
    let status = gateway
        .infer(authorised(
            infer_request(image.clone()),
            &forged_token("made-up-kid", "mallory"),
        ))
        .await
        .expect_err("forged");
    assert_eq!(
        (status.code(), reason_of(&status).as_deref()),
        (Code::Unauthenticated, Some("TOKEN_UNKNOWN_KEY"))
    );

    // Garbage image bytes.
    let status = gateway
        .infer(authorised(
            infer_request(b"garbage, not an image".to_vec()),
            &token,
        ))
        .await
        .expect_err("garbage");
    assert_eq!(
        (status.code(), reason_of(&status).as_deref()),
        (Code::InvalidArgument, Some("IMAGE_UNDECODABLE"))
    );

    // Internal services: no client certificate, a certificate from another CA, a peer outside
    // the policy.
    let validation = mesh.mesh.address("validation").expect("validation address");
    // No client certificate: refused by the TLS handshake itself, with the certificate-required
    // alert (TLS 1.3), not by some later failure. (tonic reports only "connection closed" for
    // the call it was making, so the handshake is made directly.)
    let ca_certificate = mesh.mesh.pki_layout().ca_certificate();
    let refusal = tokio::task::spawn_blocking(move || {
        medai_testkit::tls_refusal_without_client_certificate(
            validation,
            &ca_certificate,
            "medai-validation",
        )
    })
    .await
    .expect("handshake");
    assert_eq!(
        refusal,
        rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired),
        "validation must refuse a client without a certificate in the handshake"
    );
    let ca = std::fs::read(mesh.mesh.pki_layout().ca_certificate()).expect("ca");
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
        .domain_name("medai-validation");
    let anonymous = tonic::transport::Endpoint::from_shared(format!("https://{validation}"))
        .expect("endpoint")
        .tls_config(tls)
        .expect("tls");
    if let Ok(channel) = anonymous.connect().await {
        ValidationServiceClient::new(channel)
            .validate_image(ValidateImageRequest {
                image: image.clone().into(),
                format: 0,
                model_name: String::new(),
                model_input_size: None,
            })
            .await
            .expect_err("validation served a client without a certificate");
    }

    let foreign = TestPki::new();
    let foreign_channel = foreign
        .material("gateway")
        .channel(
            &format!("https://{validation}"),
            &ServiceIdentity::new("validation"),
        )
        .expect("channel");
    let status = ValidationServiceClient::new(foreign_channel)
        .validate_image(ValidateImageRequest {
            image: image.clone().into(),
            format: 0,
            model_name: String::new(),
            model_input_size: None,
        })
        .await
        .expect_err("foreign CA");
    assert_eq!(
        status.code(),
        Code::Unavailable,
        "the TLS handshake fails: {status:?}"
    );

    let operator = medai_runtime::tls::TlsMaterial::load(&medai_runtime::TlsFiles {
        ca_cert: mesh.mesh.pki_layout().ca_certificate(),
        cert: mesh.mesh.pki_layout().certificate("operator"),
        key: mesh.mesh.pki_layout().key("operator"),
    })
    .expect("operator identity");
    let status = ValidationServiceClient::new(
        operator
            .channel(
                &format!("https://{validation}"),
                &ServiceIdentity::new("validation"),
            )
            .expect("channel"),
    )
    .validate_image(ValidateImageRequest {
        image: image.clone().into(),
        format: 0,
        model_name: String::new(),
        model_input_size: None,
    })
    .await
    .expect_err("outside the policy");
    assert_eq!(
        (status.code(), reason_of(&status).as_deref()),
        (Code::PermissionDenied, Some("PEER_NOT_ALLOWED"))
    );
    let audit = mesh.mesh.address("audit").expect("audit address");
    let status = AuditServiceClient::new(
        operator
            .channel(&format!("https://{audit}"), &ServiceIdentity::new("audit"))
            .expect("channel"),
    )
    .append(AppendRequest {
        actor: "operator".to_owned(),
        action: "FORGED".to_owned(),
        resource: "ledger".to_owned(),
        outcome: "SUCCESS".to_owned(),
        context_json: String::new(),
    })
    .await
    .expect_err("only the services that must may append");
    assert_eq!(status.code(), Code::PermissionDenied);

    // What was refused left its trace, and nothing forged got in.
    let rows = ledger_rows(&mesh.settings.audit_database_url).await;
    assert!(
        rows.iter()
            .any(|row| row.action == "LOGIN" && row.outcome == "FAILURE")
    );
    assert!(rows.iter().any(|row| row.action == "INFERENCE"
        && row.outcome == "REFUSED"
        && row.context["reason"] == "IMAGE_UNDECODABLE"));
    assert!(
        !rows
            .iter()
            .any(|row| row.action == "INFERENCE" && row.outcome == "SUCCESS")
    );
    assert!(
        !rows
            .iter()
            .any(|row| row.action == "FORGED" || row.actor.contains("mallory"))
    );
    mesh.stop().await;
}

#[tokio::test]
async fn no_prediction_leaves_without_its_ledger_record() {
    let mut mesh = MeshUnderTest::start(Storage::Sqlite).await;
    let image = Assets::locate().dicom("MR_small.dcm");
    let token = mesh.admin_token().await;
    let mut gateway = mesh.gateway().await;
    gateway
        .infer(authorised(infer_request(image.clone()), &token))
        .await
        .expect("a prediction while the ledger is up");

    mesh.mesh.kill("audit").await;
    let status = gateway
        .infer(authorised(infer_request(image), &token))
        .await
        .expect_err("no unaudited prediction");
    assert_eq!(
        (status.code(), reason_of(&status).as_deref()),
        (Code::Unavailable, Some("LEDGER_UNAVAILABLE"))
    );
    assert!(status.message().contains("no result is returned"));
    mesh.stop().await;
}

// --- runtime hardening (issue 12) ---

/// A channel that sends every call to `path`, whatever method the client meant: the way to
/// reach made-up methods with a generated client.
#[derive(Clone)]
struct ToPath {
    channel: tonic::transport::Channel,
    path: tonic::codegen::http::uri::PathAndQuery,
}

impl tonic::codegen::Service<tonic::codegen::http::Request<tonic::body::Body>> for ToPath {
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        tonic::codegen::Service::poll_ready(&mut self.channel, context)
    }

    fn call(
        &mut self,
        mut request: tonic::codegen::http::Request<tonic::body::Body>,
    ) -> Self::Future {
        let mut parts = request.uri().clone().into_parts();
        parts.path_and_query = Some(self.path.clone());
        *request.uri_mut() = tonic::codegen::http::Uri::from_parts(parts).expect("uri");
        Box::pin(tonic::codegen::Service::call(&mut self.channel, request))
    }
}

fn operator_tls(mesh: &MeshUnderTest) -> medai_runtime::tls::TlsMaterial {
    medai_runtime::tls::TlsMaterial::load(&medai_runtime::TlsFiles {
        ca_cert: mesh.mesh.pki_layout().ca_certificate(),
        cert: mesh.mesh.pki_layout().certificate("operator"),
        key: mesh.mesh.pki_layout().key("operator"),
    })
    .expect("operator identity")
}

/// The label sets (series) of `metric` in a Prometheus text exposition.
fn series<'a>(exposition: &'a str, metric: &str) -> std::collections::BTreeSet<&'a str> {
    exposition
        .lines()
        .filter(|line| line.starts_with(&format!("{metric}{{")))
        .filter_map(|line| line.rsplit_once(' ').map(|(labels, _value)| labels))
        .collect()
}

#[tokio::test]
async fn made_up_method_paths_cannot_mint_metric_series() {
    let mesh = MeshUnderTest::start(Storage::Sqlite).await;
    let validation = mesh.mesh.address("validation").expect("validation address");
    let admin = mesh
        .mesh
        .admin_address("validation")
        .expect("admin address");
    // The gateway's certificate: a peer validation serves, calling methods it does not hold.
    let gateway_tls = medai_runtime::tls::TlsMaterial::load(&medai_runtime::TlsFiles {
        ca_cert: mesh.mesh.pki_layout().ca_certificate(),
        cert: mesh.mesh.pki_layout().certificate("gateway"),
        key: mesh.mesh.pki_layout().key("gateway"),
    })
    .expect("gateway identity");
    let channel = gateway_tls
        .channel(
            &format!("https://{validation}"),
            &ServiceIdentity::new("validation"),
        )
        .expect("channel");
    // One real call first, so the served method has its series too.
    let status = ValidationServiceClient::new(channel.clone())
        .validate_image(ValidateImageRequest {
            image: b"not an image".to_vec().into(),
            format: 0,
            model_name: String::new(),
            model_input_size: None,
        })
        .await
        .expect_err("garbage");
    assert_eq!(status.code(), Code::InvalidArgument);

    const PATHS: usize = 1_000;
    for _ in 0..PATHS {
        let path = format!(
            "/made.up.v{}.Service/{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let mut client = tonic_health::pb::health_client::HealthClient::new(ToPath {
            channel: channel.clone(),
            path: path.parse().expect("path"),
        });
        let status = client
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .expect_err("a method validation does not hold");
        assert_eq!(status.code(), Code::PermissionDenied, "{path}: {status:?}");
    }

    let exposition = http_get(admin, "/metrics").await;
    let requests = series(&exposition, "grpc_server_handled_total");
    let started = series(&exposition, "grpc_server_started_total");
    let durations = series(&exposition, "grpc_server_handling_seconds_count");
    let denials = series(&exposition, "medai_peer_policy_denials_total");
    eprintln!(
        "after {PATHS} made-up paths: {} handled series, {} started series, {} duration series, {} denial series",
        requests.len(),
        started.len(),
        durations.len(),
        denials.len()
    );
    // Held methods are registered at zero (handled: for every code); the made-up paths add
    // one value, "unknown", and no more.
    let held = started
        .iter()
        .filter(|labels| !labels.contains("grpc_method=\"unknown\""))
        .count();
    assert!(held >= 2, "{started:#?}");
    assert_eq!(started.len(), held + 1, "started: {started:#?}");
    assert!(
        requests.len() <= held * 17 + 2,
        "handled: {} series for {held} methods",
        requests.len()
    );
    // Health checks, the one real call and the made-up paths under one value.
    assert!(durations.len() <= 6, "durations: {durations:#?}");
    assert!(denials.len() <= 6, "denials: {denials:#?}");
    assert!(
        !exposition.contains("made.up"),
        "a made-up path became a label"
    );
    let unknown = exposition
        .lines()
        .find(|line| {
            line.starts_with("grpc_server_handled_total{")
                && line.contains("grpc_method=\"unknown\"")
                && line.contains("grpc_code=\"PermissionDenied\"")
        })
        .expect("the made-up paths are counted under grpc_method=\"unknown\"");
    let counted: f64 = unknown
        .rsplit_once(' ')
        .and_then(|(_, value)| value.parse().ok())
        .expect("value");
    assert_eq!(counted, PATHS as f64, "{unknown}");
    assert!(
        requests.iter().any(|labels| labels.contains(
            "grpc_service=\"medai.validation.v1.ValidationService\",grpc_method=\"ValidateImage\""
        )),
        "served methods keep their own label: {requests:#?}"
    );
    mesh.stop().await;
}

async fn health_of(
    tls: &medai_runtime::tls::TlsMaterial,
    address: std::net::SocketAddr,
    service: &str,
) -> Result<tonic_health::pb::health_check_response::ServingStatus, tonic::Status> {
    let channel = tls
        .channel(
            &format!("https://{address}"),
            &ServiceIdentity::new(service),
        )
        .map_err(|error| tonic::Status::unavailable(error.to_string()))?;
    let response = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await?;
    Ok(response.into_inner().status())
}

/// Polls `service`'s health until it is `wanted`; panics after `within`.
async fn wait_for_health(
    tls: &medai_runtime::tls::TlsMaterial,
    address: std::net::SocketAddr,
    service: &str,
    wanted: tonic_health::pb::health_check_response::ServingStatus,
    within: std::time::Duration,
) -> std::time::Duration {
    let started = std::time::Instant::now();
    loop {
        if health_of(tls, address, service).await.ok() == Some(wanted) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "{service} did not report {wanted:?} within {within:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_terminated_service_reports_not_serving_while_it_drains_before_its_port_closes() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let mesh = MeshUnderTest::start(Storage::Sqlite).await;
    let tls = operator_tls(&mesh);
    let state = tempfile::tempdir().expect("temp dir");
    let address_file = state.path().join("validation-drained.address.json");
    // A second validation process with exactly the mesh's configuration, on its own port,
    // with a 3 s drain.
    let mut command = tokio::process::Command::from(
        mesh.mesh
            .service_command("validation", &[])
            .expect("validation command"),
    );
    command
        .env("MEDAI_VALIDATION_PROCESS__LISTEN_ADDR", "127.0.0.1:0")
        .env("MEDAI_VALIDATION_PROCESS__ADMIN_ADDR", "127.0.0.1:0")
        .env(
            "MEDAI_VALIDATION_PROCESS__ADDRESS_FILE",
            address_file.display().to_string(),
        )
        .env("MEDAI_VALIDATION_PROCESS__DRAIN_SECONDS", "3")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let mut process = command.spawn().expect("start validation");
    let address = loop {
        if let Ok(text) = std::fs::read_to_string(&address_file)
            && let Ok(bound) = serde_json::from_str::<medai_runtime::process::BoundAddresses>(&text)
        {
            break bound.grpc;
        }
        assert!(
            process.try_wait().expect("wait").is_none(),
            "validation exited"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    wait_for_health(
        &tls,
        address,
        "validation",
        ServingStatus::Serving,
        std::time::Duration::from_secs(60),
    )
    .await;
    let probe = |expect_serving: bool| {
        let mut probe = mesh
            .mesh
            .service_command("validation", &["--probe"])
            .expect("probe command");
        probe.env("MEDAI_VALIDATION_PROCESS__LISTEN_ADDR", address.to_string());
        let status = probe.status().expect("run --probe");
        assert_eq!(status.success(), expect_serving, "--probe: {status}");
    };
    probe(true);

    // A watcher on a connection opened before the signal.
    let channel = tls
        .channel(
            &format!("https://{address}"),
            &ServiceIdentity::new("validation"),
        )
        .expect("channel");
    let mut watch = tonic_health::pb::health_client::HealthClient::new(channel)
        .watch(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("watch")
        .into_inner();
    let first = watch.message().await.expect("watch").expect("a status");
    assert_eq!(first.status(), ServingStatus::Serving);

    let pid = process.id().expect("pid");
    let signalled = std::time::Instant::now();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let next = watch.message().await.expect("watch").expect("a status");
    assert_eq!(next.status(), ServingStatus::NotServing);
    let not_serving_after = signalled.elapsed();
    drop(watch);
    // The port is still open and answers, on a new connection too: NOT_SERVING.
    assert_eq!(
        health_of(&tls, address, "validation")
            .await
            .expect("still answering"),
        ServingStatus::NotServing
    );
    probe(false);
    // Then the listener closes.
    let closed_after = loop {
        if tokio::net::TcpStream::connect(address).await.is_err() {
            break signalled.elapsed();
        }
        assert!(
            signalled.elapsed() < std::time::Duration::from_secs(30),
            "the port never closed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    eprintln!(
        "NOT_SERVING {} ms after SIGTERM, port closed after {} ms",
        not_serving_after.as_millis(),
        closed_after.as_millis()
    );
    assert!(not_serving_after < closed_after);
    assert!(
        closed_after >= std::time::Duration::from_secs(2),
        "the listener stayed open for the drain: {closed_after:?}"
    );
    let status = process.wait().await.expect("exit");
    assert!(
        status.success(),
        "a drained service exits cleanly: {status}"
    );
    mesh.stop().await;
}

#[tokio::test]
async fn the_ledger_s_callers_report_not_serving_while_it_is_gone_and_serving_when_it_returns() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let mut mesh = MeshUnderTest::start(Storage::Sqlite).await;
    let tls = operator_tls(&mesh);
    let dependents = ["auth", "inference", "gateway"];
    for service in dependents.iter().chain(["validation"].iter()) {
        let address = mesh.mesh.address(service).expect("address");
        assert_eq!(
            health_of(&tls, address, service).await.expect("health"),
            ServingStatus::Serving,
            "{service}"
        );
    }
    let probe = |mesh: &MeshUnderTest, service: &str| {
        mesh.mesh
            .service_command(service, &["--probe"])
            .expect("probe command")
            .status()
            .expect("run --probe")
            .success()
    };
    assert!(probe(&mesh, "inference"));

    mesh.mesh.kill("audit").await;
    for service in dependents {
        let address = mesh.mesh.address(service).expect("address");
        let waited = wait_for_health(
            &tls,
            address,
            service,
            ServingStatus::NotServing,
            std::time::Duration::from_secs(30),
        )
        .await;
        eprintln!(
            "{service}: NOT_SERVING {} ms after the ledger went",
            waited.as_millis()
        );
        assert!(
            !probe(&mesh, service),
            "{service} --probe while the ledger is gone"
        );
    }
    // Validation needs no ledger and stays ready.
    assert_eq!(
        health_of(
            &tls,
            mesh.mesh.address("validation").expect("address"),
            "validation"
        )
        .await
        .expect("health"),
        ServingStatus::Serving
    );

    let settings = mesh.settings.clone();
    mesh.mesh
        .restart("audit", &settings)
        .await
        .expect("audit back on its port");
    for service in dependents {
        let address = mesh.mesh.address(service).expect("address");
        wait_for_health(
            &tls,
            address,
            service,
            ServingStatus::Serving,
            std::time::Duration::from_secs(30),
        )
        .await;
        assert!(
            probe(&mesh, service),
            "{service} --probe once the ledger is back"
        );
    }
    mesh.stop().await;
}

#[tokio::test]
async fn a_killed_service_is_restarted_on_its_port_and_predictions_resume() {
    let mesh = MeshUnderTest::start(Storage::Sqlite).await;
    let image = Assets::locate().dicom("MR_small.dcm");
    let token = mesh.admin_token().await;
    let mut gateway = mesh.gateway().await;
    gateway
        .infer(authorised(infer_request(image.clone()), &token))
        .await
        .expect("a prediction before the crash");

    let address = mesh.mesh.address("validation").expect("address");
    let pid = mesh.mesh.pid("validation").expect("pid");
    let killed_at = std::time::Instant::now();
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("kill -9");
    assert!(killed.success());

    // Predictions fail while validation is gone, and succeed again once it is back.
    const BOUND: std::time::Duration = std::time::Duration::from_secs(60);
    let mut failures = 0;
    loop {
        match gateway
            .infer(authorised(infer_request(image.clone()), &token))
            .await
        {
            Ok(response) => {
                assert!(response.into_inner().prediction.is_some());
                break;
            }
            Err(_) => failures += 1,
        }
        assert!(
            killed_at.elapsed() < BOUND,
            "no prediction within {BOUND:?} of the crash"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let resumed = killed_at.elapsed();
    eprintln!(
        "prediction succeeded again {} ms after kill -9 ({failures} failed attempts)",
        resumed.as_millis()
    );
    assert!(mesh.mesh.restarts("validation") >= 1);
    let new_pid = mesh.mesh.pid("validation").expect("running again");
    assert_ne!(new_pid, pid);
    assert_eq!(
        mesh.mesh.address("validation"),
        Some(address),
        "same port, so clients reconnect"
    );
    let launcher_log =
        std::fs::read_to_string(mesh.settings.state_dir.join("logs").join("launcher.log"))
            .expect("launcher log");
    let events: Vec<serde_json::Value> = launcher_log
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect();
    assert!(
        events.iter().any(|event| event["event"] == "exited"
            && event["service"] == "validation"
            && event["exit"]
                .as_str()
                .is_some_and(|exit| exit.contains("9"))),
        "{launcher_log}"
    );
    assert!(
        events.iter().any(|event| event["event"] == "restarted"
            && event["service"] == "validation"
            && event["pid"] == new_pid),
        "{launcher_log}"
    );
    mesh.stop().await;
}

#[tokio::test]
async fn inference_reports_not_serving_once_no_model_version_is_active() {
    use medai_proto::inference::v1::inference_service_client::InferenceServiceClient;
    use medai_proto::inference::v1::{ModelChange, RetireModelVersionRequest};
    use tonic_health::pb::health_check_response::ServingStatus;

    // A repository of its own holding one model, so retiring it touches nothing shared.
    let state = tempfile::tempdir().expect("state dir");
    let assets = Assets::locate();
    let repository = state.path().join("models");
    let version = repository.join("synthetic-light").join("1");
    std::fs::create_dir_all(&version).expect("repository");
    for file in ["manifest.toml", "model.onnx"] {
        std::fs::copy(
            assets
                .model_repository
                .join("synthetic-light")
                .join("1")
                .join(file),
            version.join(file),
        )
        .expect("copy the light model");
    }
    let mut settings = medai_cli::launcher::MeshSettings::embedded(
        &state.path().join("mesh"),
        &medai_testkit::binaries_dir(),
        &repository,
        &assets.onnxruntime_library,
    );
    settings.admin_password = ADMIN_PASSWORD.to_owned();
    let mesh = medai_cli::launcher::RunningMesh::start(&settings)
        .await
        .expect("the mesh starts");
    let tls = medai_runtime::tls::TlsMaterial::load(&medai_runtime::TlsFiles {
        ca_cert: mesh.pki_layout().ca_certificate(),
        cert: mesh.pki_layout().certificate("operator"),
        key: mesh.pki_layout().key("operator"),
    })
    .expect("operator identity");
    let inference = mesh.address("inference").expect("inference address");
    assert_eq!(
        health_of(&tls, inference, "inference")
            .await
            .expect("health"),
        ServingStatus::Serving
    );

    let channel = tls
        .channel(
            &format!("https://{inference}"),
            &ServiceIdentity::new("inference"),
        )
        .expect("channel");
    InferenceServiceClient::new(channel)
        .retire_model_version(RetireModelVersionRequest {
            change: Some(ModelChange {
                model_name: "synthetic-light".to_owned(),
                model_version: "1".to_owned(),
                reason: "CHG-1 retire the only model".to_owned(),
            }),
        })
        .await
        .expect("retired");
    wait_for_health(
        &tls,
        inference,
        "inference",
        ServingStatus::NotServing,
        std::time::Duration::from_secs(30),
    )
    .await;
    let probe = mesh
        .service_command("inference", &["--probe"])
        .expect("probe command")
        .status()
        .expect("run --probe");
    assert!(!probe.success(), "--probe with no active model: {probe}");
    mesh.stop(std::time::Duration::from_secs(10)).await;
}

// --- inference memory (issue 14) ---

/// VmRSS of a process, in MiB.
fn resident_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("process status");
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib / 1024.0
}

/// AnonHugePages of a process (transparent huge pages it holds), in KiB.
fn anon_huge_pages_kib(pid: u32) -> u64 {
    let rollup =
        std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).expect("process smaps");
    rollup
        .lines()
        .find_map(|line| line.strip_prefix("AnonHugePages:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("AnonHugePages")
}

/// Issue 14: the inference process `medai up` starts holds little more than its model idle,
/// and predictions grow it once, by what their runs use, and never again. It is given glibc's
/// tunables in its environment (a fixed mmap threshold, so ONNX Runtime's freed load copies go
/// back to the system). The brain-MRI model's manifest keeps ONNX Runtime's CPU arena: without
/// it each run mapped its ~60 MiB of activations afresh and faulted them in, 90.2 against
/// 82.2–84.2 ms a prediction (release); with it the first run's blocks serve every later one.
/// Measured with these debug binaries and the 62 MiB brain-MRI model: idle 123 MiB, after four
/// predictions about 184, after four more the same; with the arena off 123 and 124, at the
/// price of the faults; with no tunables 211 and 271. (Release binaries: 106 idle, 167 after
/// four, 288 after eight at once, which the batcher runs four to a batch;
/// scripts/inference-rss.sh.) RSS does not depend on the machine's load.
#[tokio::test]
async fn the_inference_process_holds_its_model_idle_and_its_runs_blocks_once_after_predictions() {
    let mesh = MeshUnderTest::start(Storage::Sqlite).await;
    let assets = Assets::locate();
    let model_mib = std::fs::metadata(assets.model_repository.join("brain-mri-tumor/1/model.onnx"))
        .expect("the brain-MRI model")
        .len() as f64
        / f64::from(1 << 20);
    let pid = mesh.mesh.pid("inference").expect("inference runs");
    // glibc consumes the tunables it applied from the string it shows in /proc (2.36 keeps the
    // first), so the threshold is what can be read back.
    let environment = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
    assert!(
        environment
            .split(|byte| *byte == 0)
            .any(|entry| entry.starts_with(b"GLIBC_TUNABLES=glibc.malloc.mmap_threshold=131072")),
        "the launcher gives inference glibc's tunables"
    );
    // The binary's own share in a debug build (ONNX Runtime's library, tokio, rustls, the
    // unoptimised code) is about 60 MiB; 85 MiB leaves 25 MiB of margin.
    let bound = model_mib + 85.0;
    let idle = resident_mib(pid);
    assert!(
        idle <= bound,
        "idle inference holds {idle:.1} MiB; at most {bound:.1} (model {model_mib:.1})"
    );

    let image = assets.dicom("MR_small.dcm");
    let token = mesh.admin_token().await;
    let mut gateway = mesh.gateway().await;
    let mut resident_after_predictions = Vec::new();
    for _ in 0..2 {
        for _ in 0..4 {
            let response = gateway
                .infer(authorised(infer_request(image.clone()), &token))
                .await
                .expect("a prediction")
                .into_inner();
            assert!(response.prediction.is_some());
        }
        resident_after_predictions.push(resident_mib(pid));
    }
    let (first, second) = (resident_after_predictions[0], resident_after_predictions[1]);
    eprintln!(
        "inference RSS: idle {idle:.1} MiB, after 4 predictions {first:.1} MiB, after 4 more \
         {second:.1} MiB"
    );
    // The arena holds one single-image run's blocks (about 60 MiB of activations).
    assert!(
        first - idle <= 90.0,
        "four predictions grew inference from {idle:.1} to {first:.1} MiB"
    );
    // Later runs reuse them: nothing grows run after run.
    assert!(
        second - first <= 8.0,
        "four more predictions grew inference from {first:.1} to {second:.1} MiB"
    );
    mesh.stop().await;
}

// --- gateway path speed (issue 14) ---

/// Issue 14: the gateway allocates with mimalloc (glibc's malloc and free were 16 % of its CPU
/// per prediction under load). An allocator that keeps what it freed would trade that CPU for
/// memory: 128 predictions of the 256×256 PNG the benchmarks send, 16 at a time, leave the
/// gateway's resident memory within a few MiB of where they found it once it is warm.
#[tokio::test]
async fn the_gateway_returns_to_its_resident_memory_after_concurrent_predictions() {
    let mesh = MeshUnderTest::start(Storage::Sqlite).await;
    let pid = mesh.mesh.pid("gateway").expect("gateway runs");
    let token = mesh.admin_token().await;
    let gateway = mesh.gateway().await;
    let image = medai_e2e::bench_images::textured_png();
    let round = |count: usize| {
        let clients: Vec<_> = (0..16)
            .map(|_| {
                let mut gateway = gateway.clone();
                let (token, image) = (token.clone(), image.clone());
                tokio::spawn(async move {
                    for _ in 0..count {
                        let answer = gateway
                            .infer(authorised(
                                InferRequest {
                                    model_name: "synthetic-light".to_owned(),
                                    ..infer_request(image.clone())
                                },
                                &token,
                            ))
                            .await
                            .expect("a prediction")
                            .into_inner();
                        assert!(answer.prediction.is_some(), "a prediction is answered");
                    }
                })
            })
            .collect();
        futures::future::join_all(clients)
    };
    // Warm: connections, caches, the allocator's first pages.
    for client in round(2).await {
        client.expect("client");
    }
    let warm = resident_mib(pid);
    for client in round(8).await {
        client.expect("client");
    }
    let after = resident_mib(pid);
    eprintln!("gateway RSS: warm {warm:.1} MiB, after 128 more predictions {after:.1} MiB");
    assert!(
        after - warm <= 8.0,
        "128 predictions grew the gateway from {warm:.1} to {after:.1} MiB"
    );
    // mimalloc asks for transparent huge pages on its arenas unless built without them; where
    // THP is `madvise` (this machine, most distributions) each touched 2 MiB then became
    // resident: the idle release gateway held 31 MiB, 16 of them huge pages (14 without).
    // Where THP is `always` the kernel may back any large mapping, so nothing is asserted there.
    let thp_mode =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if thp_mode.contains("[madvise]") {
        let huge = anon_huge_pages_kib(pid);
        assert_eq!(
            huge, 0,
            "the gateway holds {huge} KiB of transparent huge pages"
        );
    }
    mesh.stop().await;
}

/// Calls of `methods` of `service` that `process` answered so far, from its metrics.
async fn calls_answered(
    mesh: &MeshUnderTest,
    process: &str,
    service: &str,
    methods: &[&str],
) -> u64 {
    let exposition = http_get(
        mesh.mesh.admin_address(process).expect("admin port"),
        "/metrics",
    )
    .await;
    let prefixes: Vec<String> = methods
        .iter()
        .map(|method| {
            format!(
                r#"grpc_server_handled_total{{grpc_service="{service}",grpc_method="{method}","#
            )
        })
        .collect();
    exposition
        .lines()
        .filter(|line| {
            prefixes
                .iter()
                .any(|prefix| line.starts_with(prefix.as_str()))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

async fn ledger_append_calls(mesh: &MeshUnderTest) -> u64 {
    calls_answered(
        mesh,
        "audit",
        "medai.audit.v1.AuditService",
        &["Append", "AppendBatch"],
    )
    .await
}

async fn signal(pid: u32, signal: &str) {
    let status = tokio::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .await
        .expect("kill");
    assert!(status.success(), "kill {signal} {pid}");
}

#[tokio::test]
async fn concurrent_predictions_share_ledger_calls_and_each_gets_its_own_seq_in_one_chain() {
    const PREDICTIONS: usize = 64;
    let mesh = MeshUnderTest::start(Storage::Postgres).await;
    let token = mesh.admin_token().await;
    let gateway = mesh.gateway().await;
    let image = medai_e2e::bench_images::textured_png();
    let predict = |gateway: &medai_cli::client::GatewayClient| {
        let mut gateway = gateway.clone();
        let (token, image) = (token.clone(), image.clone());
        async move {
            gateway
                .infer(authorised(
                    InferRequest {
                        model_name: "synthetic-light".to_owned(),
                        ..infer_request(image)
                    },
                    &token,
                ))
                .await
                .expect("a prediction")
                .into_inner()
        }
    };
    // Warm: connections and the model's input size.
    predict(&gateway).await;
    let calls_before = ledger_append_calls(&mesh).await;
    let predicted = || {
        calls_answered(
            &mesh,
            "inference",
            "medai.inference.v1.InferenceService",
            &["Predict", "PredictThenStore"],
        )
    };
    let predicted_before = predicted().await;
    // The ledger is held still until every prediction is computed and waits for its record, so
    // the records are certain to meet in the gateway's client (not left to timing).
    let audit = mesh.mesh.pid("audit").expect("audit runs");
    signal(audit, "-STOP").await;
    let running: Vec<_> = (0..PREDICTIONS)
        .map(|_| tokio::spawn(predict(&gateway)))
        .collect();
    let held = std::time::Instant::now();
    while predicted().await < predicted_before + PREDICTIONS as u64
        && held.elapsed() < std::time::Duration::from_secs(20)
    {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    signal(audit, "-CONT").await;
    let answers: Vec<_> = futures::future::join_all(running)
        .await
        .into_iter()
        .map(|answer| answer.expect("client"))
        .collect();
    let calls = ledger_append_calls(&mesh).await - calls_before;
    eprintln!("{PREDICTIONS} concurrent predictions: {calls} Append/AppendBatch calls");
    // One call per record would be 64; four calls wait on the held ledger, and the rest of the
    // records share a few AppendBatch calls.
    assert!(
        calls <= PREDICTIONS as u64 / 4,
        "{PREDICTIONS} concurrent predictions made {calls} ledger calls: their records were not batched"
    );

    // Each answer names its own entry: a distinct seq whose row is its delivery record.
    let database = Database::connect(mesh.settings.audit_database_url.as_str())
        .await
        .expect("connect to the ledger database");
    let rows: std::collections::HashMap<i64, (String, String, String)> = database
        .query_all_raw(Statement::from_string(
            DatabaseBackend::Postgres,
            "SELECT seq, action, resource, hash FROM ledger_entries",
        ))
        .await
        .expect("query the ledger")
        .into_iter()
        .map(|row| {
            (
                row.try_get("", "seq").expect("seq"),
                (
                    row.try_get("", "action").expect("action"),
                    row.try_get("", "resource").expect("resource"),
                    row.try_get("", "hash").expect("hash"),
                ),
            )
        })
        .collect();
    let mut seqs = std::collections::BTreeSet::new();
    for answer in &answers {
        let prediction = answer.prediction.as_ref().expect("a prediction");
        assert!(
            seqs.insert(answer.ledger_seq),
            "seq {} answered twice",
            answer.ledger_seq
        );
        let (action, resource, hash) = rows
            .get(&i64::try_from(answer.ledger_seq).expect("seq"))
            .unwrap_or_else(|| panic!("seq {} is not in the ledger", answer.ledger_seq));
        assert_eq!(action, "INFERENCE");
        assert_eq!(resource, &format!("result/{}", prediction.result_id));
        assert_eq!(hash, &answer.ledger_hash);
    }
    let verification = mesh
        .gateway()
        .await
        .verify_ledger(authorised(VerifyLedgerRequest {}, &token))
        .await
        .expect("verify")
        .into_inner()
        .verification
        .expect("report");
    assert!(verification.intact, "{verification:?}");
    assert_eq!(verification.entries_checked, rows.len() as u64);
    mesh.stop().await;
}
