//! The inference service on port 0 with real mTLS, running the real brain-MRI model through
//! ONNX Runtime.

use std::path::Path;

use medai_inference::InferenceConfig;
use medai_inference::config::RuntimeSettings;
use medai_inference::model::ModelError;
use medai_inference::repository::RepositoryError;
use medai_proto::common::v1::CanonicalImage;
use medai_proto::inference::v1::PredictRequest;
use medai_proto::inference::v1::inference_service_client::InferenceServiceClient;
use medai_runtime::errors::reason_of;
use medai_testkit::{Assets, TestPki, TestServer, test_process_config, wait_until_serving};
use tonic::Code;

fn config(pki: &TestPki, model_repository: &Path) -> InferenceConfig {
    let assets = Assets::locate();
    InferenceConfig {
        process: test_process_config(),
        tls: pki.files("inference"),
        model_repository: model_repository.to_owned(),
        onnxruntime_library: assets.onnxruntime_library,
        runtime: RuntimeSettings::default(),
    }
}

fn grey_image(side: u32) -> CanonicalImage {
    CanonicalImage {
        width: side,
        height: side,
        channels: 1,
        bit_depth: 8,
        photometric_interpretation: "MONOCHROME2".to_owned(),
        pixels: (0..side * side)
            .map(|index| ((index * 7) % 256) as u8)
            .collect(),
        metadata: None,
    }
}

fn predict(image: CanonicalImage) -> PredictRequest {
    PredictRequest {
        model_name: "brain-mri-tumor".to_owned(),
        model_version: String::new(),
        image: Some(image),
    }
}

#[tokio::test]
async fn the_brain_mri_model_returns_labelled_probabilities() {
    let pki = TestPki::new();
    let assets = Assets::locate();
    let config = config(&pki, &assets.model_repository);
    let server =
        TestServer::start(|listener, shutdown| medai_inference::serve(config, listener, shutdown))
            .await;
    wait_until_serving(&pki, server.address, "inference").await;
    let mut gateway =
        InferenceServiceClient::new(pki.channel_as("gateway", server.address, "inference"));

    let response = gateway
        .predict(predict(grey_image(128)))
        .await
        .expect("prediction")
        .into_inner();
    assert_eq!(
        (
            response.model_name.as_str(),
            response.model_version.as_str()
        ),
        ("brain-mri-tumor", "1")
    );
    let labels: Vec<&str> = response
        .probabilities
        .iter()
        .map(|entry| entry.label.as_str())
        .collect();
    assert_eq!(labels, ["glioma", "meningioma", "notumor", "pituitary"]);
    let total: f32 = response
        .probabilities
        .iter()
        .map(|entry| entry.probability)
        .sum();
    assert!(
        (total - 1.0).abs() < 1e-3,
        "softmax output sums to 1, got {total}"
    );
    let top = response
        .probabilities
        .iter()
        .max_by(|a, b| a.probability.total_cmp(&b.probability))
        .expect("top");
    assert_eq!(response.top_label, top.label);
    assert!(response.intended_use.contains("RESEARCH USE ONLY"));
    assert_eq!(
        response.model_sha256,
        "3be917fb4375d2d57d65f43eb28ab669387c00306bbe407c5aaf78fb5de3ab49"
    );

    // The same image gives the same answer; a different one a different answer.
    let again = gateway
        .predict(predict(grey_image(128)))
        .await
        .expect("prediction")
        .into_inner();
    assert_eq!(again.probabilities, response.probabilities);
    let mut other = grey_image(128);
    other
        .pixels
        .iter_mut()
        .for_each(|value| *value = 255 - *value);
    let different = gateway
        .predict(predict(other))
        .await
        .expect("prediction")
        .into_inner();
    assert_ne!(different.probabilities, response.probabilities);

    // Refusals with stable codes.
    let mut unknown = predict(grey_image(64));
    unknown.model_name = "no-such-model".to_owned();
    let status = gateway.predict(unknown).await.expect_err("unknown model");
    assert_eq!(
        (status.code(), reason_of(&status).as_deref()),
        (Code::NotFound, Some("MODEL_NOT_FOUND"))
    );
    let mut version = predict(grey_image(64));
    version.model_version = "99".to_owned();
    let status = gateway.predict(version).await.expect_err("unknown version");
    assert_eq!(
        reason_of(&status).as_deref(),
        Some("MODEL_VERSION_NOT_SERVED")
    );
    let mut short = grey_image(64);
    short.pixels.truncate(10);
    let status = gateway
        .predict(predict(short))
        .await
        .expect_err("inconsistent buffer");
    assert_eq!(
        (status.code(), reason_of(&status).as_deref()),
        (Code::InvalidArgument, Some("IMAGE_INCONSISTENT"))
    );
    let status = gateway
        .predict(PredictRequest {
            model_name: "brain-mri-tumor".to_owned(),
            model_version: String::new(),
            image: None,
        })
        .await
        .expect_err("no image");
    assert_eq!(reason_of(&status).as_deref(), Some("IMAGE_MISSING"));

    // Only the gateway may run models.
    for identity in ["validation", "audit", "stranger"] {
        let mut client =
            InferenceServiceClient::new(pki.channel_as(identity, server.address, "inference"));
        let status = client
            .predict(predict(grey_image(64)))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::PermissionDenied, "{identity}");
    }
}

#[test]
fn a_tampered_model_file_is_refused_at_load() {
    let pki = TestPki::new();
    let assets = Assets::locate();
    let repository = tempfile::tempdir().expect("tempdir");
    let version = repository.path().join("brain-mri-tumor/1");
    std::fs::create_dir_all(&version).expect("folders");
    std::fs::copy(
        assets
            .model_repository
            .join("brain-mri-tumor/1/manifest.toml"),
        version.join("manifest.toml"),
    )
    .expect("manifest");
    // The real model with one byte changed.
    let mut model =
        std::fs::read(assets.model_repository.join("brain-mri-tumor/1/model.onnx")).expect("model");
    let middle = model.len() / 2;
    model[middle] ^= 0x01;
    std::fs::write(version.join("model.onnx"), model).expect("tampered model");

    match medai_inference::load_predictor(&config(&pki, repository.path())) {
        Err(medai_inference::ServeError::Repository(RepositoryError::Model(
            ModelError::IntegrityMismatch { name, expected, .. },
        ))) => {
            assert_eq!(name, "brain-mri-tumor");
            assert_eq!(
                expected,
                "3be917fb4375d2d57d65f43eb28ab669387c00306bbe407c5aaf78fb5de3ab49"
            );
        }
        Err(other) => panic!("expected an integrity mismatch, got {other}"),
        Ok(_) => panic!("a tampered model must not load"),
    }
}
