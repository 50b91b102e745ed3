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
use medai_testkit::{Assets, TestPki};
use sea_orm::{ConnectionTrait, Database, DatabaseBackend, Statement};
use sha2::{Digest, Sha256};
use tonic::Code;

fn infer_request(image: Vec<u8>) -> InferRequest {
    InferRequest {
        image,
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
    let predictor = medai_inference::predict::Predictor { repository };
    let input = medai_inference::preprocess::ImageInput {
        width: canonical.width,
        height: canonical.height,
        channels: canonical.channels,
        bit_depth: canonical.bit_depth,
        pixels: canonical.pixels,
    };
    let direct = predictor
        .predict("brain-mri-tumor", "", input, None)
        .await
        .expect("in-process prediction");
    let through_mesh: Vec<(String, f32)> = prediction
        .probabilities
        .iter()
        .map(|entry| (entry.label.clone(), entry.probability))
        .collect();
    assert_eq!(through_mesh, direct.probabilities);

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
    assert!(metrics.contains("medai_grpc_requests_total"), "{metrics}");
    assert!(metrics.contains("/medai.gateway.v1.GatewayService/Infer"));
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
    let ca = std::fs::read(mesh.mesh.pki_layout().ca_certificate()).expect("ca");
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
        .domain_name("medai-validation");
    let anonymous = tonic::transport::Endpoint::from_shared(format!("https://{validation}"))
        .expect("endpoint")
        .tls_config(tls)
        .expect("tls");
    let anonymous_refused = match anonymous.connect().await {
        Err(_) => true,
        Ok(channel) => ValidationServiceClient::new(channel)
            .validate_image(ValidateImageRequest {
                image: image.clone(),
                format: 0,
                model_name: String::new(),
            })
            .await
            .is_err(),
    };
    assert!(
        anonymous_refused,
        "validation served a client without a certificate"
    );

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
            image: image.clone(),
            format: 0,
            model_name: String::new(),
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
        image: image.clone(),
        format: 0,
        model_name: String::new(),
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
