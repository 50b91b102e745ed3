//! The inference service on port 0 with real mTLS, running the real brain-MRI model through
//! ONNX Runtime, keeping its results in PostgreSQL.

mod support;

use medai_inference::config::RuntimeSettings;
use medai_inference::model::ModelError;
use medai_inference::repository::RepositoryError;
use medai_proto::common::v1::CanonicalImage;
use medai_proto::inference::v1::{
    GetResultRequest, ListResultsRequest, PredictRequest, RecordDeliveryRequest, ResultSignature,
    SignResultRequest,
};
use medai_runtime::errors::reason_of;
use medai_testkit::Assets;
use support::{Harness, grey_image as pattern};
use tonic::Code;

fn grey_image(side: u32) -> CanonicalImage {
    pattern(side, 0)
}

fn predict(image: CanonicalImage) -> PredictRequest {
    support::predict("brain-mri-tumor", image)
}

#[tokio::test]
async fn the_brain_mri_model_returns_labelled_probabilities() {
    let assets = Assets::locate();
    let harness = Harness::start(&assets.model_repository, RuntimeSettings::default()).await;
    let mut gateway = harness.client_as("gateway");

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
    other.pixels = other.pixels.iter().map(|value| 255 - value).collect();
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
            image: None,
            ..predict(grey_image(8))
        })
        .await
        .expect_err("no image");
    assert_eq!(reason_of(&status).as_deref(), Some("IMAGE_MISSING"));

    // Only the gateway may run models.
    for identity in ["validation", "audit", "stranger"] {
        let mut client = harness.client_as(identity);
        let status = client
            .predict(predict(grey_image(64)))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::PermissionDenied, "{identity}");
    }
}

/// Issue 14: an image validation resized to the model's input (the shared resize, marked as
/// resized) gets exactly the probabilities the full image gets when inference resizes it, on the
/// light model and on the brain-MRI model; one resized for another model's input is refused
/// with IMAGE_INCONSISTENT rather than resized a second time.
#[tokio::test]
async fn an_image_resized_by_validation_predicts_exactly_what_the_full_image_predicts() {
    use medai_imaging::model_input::{ModelInputSize, resize_canonical};
    let assets = Assets::locate();
    let harness = Harness::start(&assets.model_repository, RuntimeSettings::default()).await;
    let mut gateway = harness.client_as("gateway");
    let resized = |image: &CanonicalImage, side: u32| CanonicalImage {
        width: side,
        height: side,
        pixels: resize_canonical(
            &image.pixels,
            (image.width, image.height),
            (image.channels, image.bit_depth),
            ModelInputSize {
                width: side,
                height: side,
            },
        )
        .expect("resized")
        .into(),
        resized_for_model_input: true,
        ..image.clone()
    };
    let mr = medai_validation::decode::decode_image(
        &assets.dicom("MR_small.dcm"),
        None,
        &medai_validation::ImageLimits::default(),
    )
    .expect("decode");
    let mr = CanonicalImage {
        width: mr.width,
        height: mr.height,
        channels: mr.channels,
        bit_depth: mr.bit_depth,
        photometric_interpretation: mr.photometric_interpretation.to_owned(),
        pixels: mr.pixels.into(),
        metadata: None,
        resized_for_model_input: false,
    };
    for (model, side) in [(support::LIGHT, 64), ("brain-mri-tumor", 240)] {
        for full in [pattern(256, 3), pattern(97, 5), mr.clone()] {
            let described = format!("{model}: {}×{}", full.width, full.height);
            let old_path = gateway
                .predict(support::predict(model, full.clone()))
                .await
                .expect("full image")
                .into_inner();
            let new_path = gateway
                .predict(support::predict(model, resized(&full, side)))
                .await
                .expect("model-sized image")
                .into_inner();
            assert_eq!(
                new_path.probabilities, old_path.probabilities,
                "{described}"
            );
            assert_eq!(new_path.uncertainty, old_path.uncertainty, "{described}");
        }
        let other_side = if side == 64 { 240 } else { 64 };
        let status = gateway
            .predict(support::predict(
                model,
                resized(&pattern(256, 3), other_side),
            ))
            .await
            .expect_err("resized for another model");
        assert_eq!(
            (status.code(), reason_of(&status).as_deref()),
            (Code::InvalidArgument, Some("IMAGE_INCONSISTENT")),
            "{model}"
        );
    }
}

#[test]
fn a_tampered_model_file_is_refused_at_load() {
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

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let _entered = runtime.enter();
    match medai_inference::load_repository(
        repository.path(),
        &assets.onnxruntime_library,
        &RuntimeSettings::default(),
    ) {
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

#[tokio::test]
async fn every_prediction_is_kept_and_can_be_found_again() {
    let repository = support::light_repository(&[("1", "active")]);
    let harness = Harness::start(repository.path(), RuntimeSettings::default()).await;
    let mut gateway = harness.client_as("gateway");
    let patient_a = "0123456789abcdef0123456789abcdef";
    let patient_b = "fedcba9876543210fedcba9876543210";
    let mut ids = Vec::new();
    for index in 0..5u32 {
        let result_id = uuid::Uuid::new_v4().to_string();
        let answer = gateway
            .predict(PredictRequest {
                result_id: result_id.clone(),
                image_sha256: format!("{index:064x}"),
                patient_key: if index < 3 { patient_a } else { patient_b }.to_owned(),
                ..support::predict(support::LIGHT, pattern(64, index))
            })
            .await
            .expect("prediction")
            .into_inner();
        assert_eq!(answer.result_id, result_id);
        assert_eq!(answer.decision_threshold, 0.5);
        let expected = if answer.top_probability >= 0.5 {
            "ABOVE_THRESHOLD"
        } else {
            "BELOW_THRESHOLD"
        };
        assert_eq!(answer.decision, expected);
        assert!(answer.latency_ms > 0.0);
        ids.push((result_id, answer));
    }

    // Get by id returns exactly what was answered.
    let (first_id, first_answer) = &ids[0];
    let stored = gateway
        .get_result(GetResultRequest {
            result_id: first_id.clone(),
            ..Default::default()
        })
        .await
        .expect("get")
        .into_inner()
        .result
        .expect("result");
    assert_eq!(stored.result_id, *first_id);
    assert_eq!(stored.model_name, support::LIGHT);
    assert_eq!(stored.model_version, "1");
    assert_eq!(stored.image_sha256, format!("{:064x}", 0));
    assert_eq!(stored.patient_key, patient_a);
    assert_eq!(stored.probabilities, first_answer.probabilities);
    assert_eq!(stored.top_label, first_answer.top_label);
    assert_eq!(stored.confidence, first_answer.top_probability);
    assert_eq!(stored.decision, first_answer.decision);
    assert_eq!(stored.status, "PRELIMINARY");
    assert!(stored.created_at.ends_with('Z'), "{}", stored.created_at);

    // Listing: newest first, filtered, two per page.
    let mut seen = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = gateway
            .list_results(ListResultsRequest {
                model_name: support::LIGHT.to_owned(),
                page_size: 2,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner();
        assert!(page.results.len() <= 2);
        seen.extend(page.results.into_iter().map(|result| result.result_id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let newest_first: Vec<String> = ids.iter().rev().map(|(id, _)| id.clone()).collect();
    assert_eq!(seen, newest_first);
    let of_patient_b = gateway
        .list_results(ListResultsRequest {
            patient_key: patient_b.to_owned(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(of_patient_b.results.len(), 2);
    for (filter, expected) in [
        (
            ListResultsRequest {
                status: "SIGNED".to_owned(),
                ..Default::default()
            },
            0,
        ),
        (
            ListResultsRequest {
                status: "PRELIMINARY".to_owned(),
                created_from: "2000-01-01T00:00:00Z".to_owned(),
                ..Default::default()
            },
            5,
        ),
        (
            ListResultsRequest {
                created_until: "2000-01-01T00:00:00Z".to_owned(),
                ..Default::default()
            },
            0,
        ),
        (
            ListResultsRequest {
                model_name: "brain-mri-tumor".to_owned(),
                ..Default::default()
            },
            0,
        ),
    ] {
        let listed = gateway
            .list_results(filter.clone())
            .await
            .expect("list")
            .into_inner();
        assert_eq!(listed.results.len(), expected, "{filter:?}");
    }

    // Refusals, each with its stable code.
    let status = gateway
        .get_result(GetResultRequest {
            result_id: uuid::Uuid::new_v4().to_string(),
            ..Default::default()
        })
        .await
        .expect_err("unknown id");
    assert_eq!(
        (status.code(), reason_of(&status).as_deref()),
        (Code::NotFound, Some("RESULT_NOT_FOUND"))
    );
    for bad in [
        ListResultsRequest {
            status: "FINAL".to_owned(),
            ..Default::default()
        },
        ListResultsRequest {
            created_from: "yesterday".to_owned(),
            ..Default::default()
        },
        ListResultsRequest {
            page_token: "not-a-token".to_owned(),
            ..Default::default()
        },
        ListResultsRequest {
            page_size: 501,
            ..Default::default()
        },
    ] {
        let status = gateway
            .list_results(bad.clone())
            .await
            .expect_err("refused");
        assert_eq!(
            (status.code(), reason_of(&status).as_deref()),
            (Code::InvalidArgument, Some("QUERY_INVALID")),
            "{bad:?}"
        );
    }
    for (patient_key, image_sha256, result_id) in
        [("Doe^John", "", ""), ("", "abc", ""), ("", "", "result-1")]
    {
        let status = gateway
            .predict(PredictRequest {
                patient_key: patient_key.to_owned(),
                image_sha256: image_sha256.to_owned(),
                result_id: result_id.to_owned(),
                ..support::predict(support::LIGHT, pattern(64, 9))
            })
            .await
            .expect_err("refused");
        assert_eq!(reason_of(&status).as_deref(), Some("QUERY_INVALID"));
        assert!(!status.message().contains("Doe"), "{}", status.message());
    }
    // The same result id cannot be stored twice.
    let status = gateway
        .predict(PredictRequest {
            result_id: first_id.clone(),
            ..support::predict(support::LIGHT, pattern(64, 1))
        })
        .await
        .expect_err("duplicate id");
    assert_eq!(reason_of(&status).as_deref(), Some("RESULTS_STORE_FAILED"));
    // Only the gateway reads results.
    let status = harness
        .client_as("operator")
        .get_result(GetResultRequest {
            result_id: first_id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("operator");
    assert_eq!(status.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn a_repeated_key_returns_the_stored_result_and_a_signed_result_is_final() {
    let repository = support::light_repository(&[("1", "active")]);
    let harness = Harness::start(repository.path(), RuntimeSettings::default()).await;
    repeated_key_and_final_signature(&harness).await;
}

#[tokio::test]
async fn the_embedded_sqlite_results_store_keeps_signed_results_final_too() {
    let repository = support::light_repository(&[("1", "active")]);
    let folder = tempfile::tempdir().expect("tempdir");
    let url = medai_testkit::sqlite_url(folder.path(), "results.sqlite");
    let harness =
        Harness::start_with_results(repository.path(), RuntimeSettings::default(), url).await;
    repeated_key_and_final_signature(&harness).await;
}

async fn repeated_key_and_final_signature(harness: &Harness) {
    let mut gateway = harness.client_as("gateway");
    let key = format!("{:064x}", 42);
    // The gateway names each image by the SHA-256 of its bytes; a stand-in per image here.
    let keyed = |seed: u32| PredictRequest {
        idempotency_key: key.clone(),
        image_sha256: format!("{seed:064x}"),
        ..support::predict(support::LIGHT, pattern(64, seed))
    };

    // The second request with the key is answered from the store: same result, no new run.
    let first = gateway.predict(keyed(1)).await.expect("first").into_inner();
    assert!(!first.replayed);
    let again = gateway.predict(keyed(1)).await.expect("again").into_inner();
    assert!(again.replayed);
    assert_eq!(again.result_id, first.result_id);
    assert_eq!(again.probabilities, first.probabilities);
    assert_eq!(again.model_sha256, first.model_sha256);
    // The key reused for another image, or for another version, is refused: never another
    // image's prediction.
    let status = gateway
        .predict(keyed(2))
        .await
        .expect_err("another image under the key");
    assert_eq!(
        (status.code(), reason_of(&status).as_deref()),
        (Code::FailedPrecondition, Some("IDEMPOTENCY_KEY_REUSED"))
    );
    let status = gateway
        .predict(PredictRequest {
            model_version: "2".to_owned(),
            ..keyed(1)
        })
        .await
        .expect_err("another version under the key");
    assert_eq!(
        reason_of(&status).as_deref(),
        Some("IDEMPOTENCY_KEY_REUSED")
    );
    // A keyed request without its image's hash could not be matched on retry.
    let status = gateway
        .predict(PredictRequest {
            image_sha256: String::new(),
            ..keyed(1)
        })
        .await
        .expect_err("key without image hash");
    assert_eq!(reason_of(&status).as_deref(), Some("QUERY_INVALID"));
    let by_key = gateway
        .get_result(GetResultRequest {
            idempotency_key: key.clone(),
            ..Default::default()
        })
        .await
        .expect("by key")
        .into_inner()
        .result
        .expect("result");
    assert_eq!(by_key.result_id, first.result_id);
    assert_eq!(by_key.ledger_seq, 0);

    // Signing needs a noted delivery, the content the signer saw, and happens once.
    let signature = ResultSignature {
        signer_subject: "user-7".to_owned(),
        signer_name: "dr.house".to_owned(),
        meaning: "APPROVED".to_owned(),
        ledger_seq: 12,
        ..Default::default()
    };
    let sign = |content: &str| SignResultRequest {
        result_id: first.result_id.clone(),
        expected_content_sha256: content.to_owned(),
        signature: Some(signature.clone()),
    };
    let status = gateway
        .sign_result(sign(&by_key.content_sha256))
        .await
        .expect_err("not delivered");
    assert_eq!(reason_of(&status).as_deref(), Some("RESULT_NOT_FOUND"));
    for seq in [9, 10] {
        let noted = gateway
            .record_delivery(RecordDeliveryRequest {
                result_id: first.result_id.clone(),
                ledger_seq: seq,
            })
            .await
            .expect("delivery")
            .into_inner();
        assert_eq!(noted.ledger_seq, 9, "the first delivery record stands");
    }
    let status = gateway
        .sign_result(sign(&format!("{:064x}", 0)))
        .await
        .expect_err("other content");
    assert_eq!(
        (status.code(), reason_of(&status).as_deref()),
        (Code::FailedPrecondition, Some("RESULT_CONTENT_CHANGED"))
    );
    let signed = gateway
        .sign_result(sign(&by_key.content_sha256))
        .await
        .expect("sign")
        .into_inner()
        .result
        .expect("result");
    assert_eq!(signed.status, "SIGNED");
    let stored_signature = signed.signature.expect("signature");
    assert_eq!(
        (
            stored_signature.signer_name.as_str(),
            stored_signature.meaning.as_str(),
            stored_signature.ledger_seq
        ),
        ("dr.house", "APPROVED", 12)
    );
    assert!(stored_signature.signed_at.ends_with('Z'));
    assert_eq!(signed.content_sha256, by_key.content_sha256);
    let status = gateway
        .sign_result(sign(&by_key.content_sha256))
        .await
        .expect_err("signed twice");
    assert_eq!(reason_of(&status).as_deref(), Some("RESULT_ALREADY_SIGNED"));

    // The database itself refuses to change or delete a signed result.
    let database = sea_orm::Database::connect(harness.config.database_url.as_str())
        .await
        .expect("results database");
    use sea_orm::ConnectionTrait;
    for statement in [
        format!(
            "UPDATE inference_results SET top_label = 'other' WHERE result_id = '{}'",
            first.result_id
        ),
        format!(
            "DELETE FROM inference_results WHERE result_id = '{}'",
            first.result_id
        ),
    ] {
        let refused = database.execute_unprepared(&statement).await;
        assert!(refused.is_err(), "{statement} must be refused");
    }
    let unchanged = gateway
        .get_result(GetResultRequest {
            result_id: first.result_id.clone(),
            ..Default::default()
        })
        .await
        .expect("get")
        .into_inner()
        .result
        .expect("result");
    assert_eq!(unchanged.top_label, first.top_label);
    assert_eq!(
        medai_inference::results::content_sha256_of_message(&unchanged),
        unchanged.content_sha256
    );
}

/// The file is read once: the bytes whose hash matched are the bytes ONNX Runtime loads. A file
/// replaced between the check and the load (here by a different, valid model) is not served.
#[test]
fn a_model_file_swapped_after_its_check_is_never_served() {
    use medai_inference::manifest::ModelManifest;
    use medai_inference::model::{VerifiedModel, onnx_environment, run_rows};

    let assets = Assets::locate();
    let environment = onnx_environment(&assets.onnxruntime_library).expect("onnx runtime");
    let repository = support::light_repository(&[("1", "active")]);
    let folder = repository.path().join(support::LIGHT).join("1");
    let manifest = ModelManifest::load(&folder.join("manifest.toml")).expect("manifest");
    let verified = VerifiedModel::read(&manifest, &folder).expect("the light model verifies");

    // Swap the file atomically for the brain-MRI model after the check.
    let brain = std::fs::canonicalize(assets.model_repository.join("brain-mri-tumor/1/model.onnx"))
        .expect("brain model");
    let staged = folder.join("swap.onnx");
    std::os::unix::fs::symlink(brain, &staged).expect("link");
    std::fs::rename(&staged, folder.join("model.onnx")).expect("swap");

    let mut sessions = verified
        .open_sessions(&environment, &manifest, &RuntimeSettings::default())
        .expect("sessions from the verified bytes");
    // What runs is the light model that was checked: a 64×64 grey row gives its two scores
    // (the swapped-in VGG16 takes 240×240 RGB and would refuse this row).
    let row = ndarray::Array4::from_elem((1, 64, 64, 1), 0.5f32);
    let scores = run_rows(&mut sessions[0], &manifest, row).expect("the checked model runs");
    assert_eq!(scores.len(), 1);
    assert_eq!(scores[0].len(), 2);
    // Reading the file now finds the swap and refuses it.
    assert!(matches!(
        VerifiedModel::read(&manifest, &folder),
        Err(ModelError::IntegrityMismatch { .. })
    ));
}

/// A stored, undelivered result for the store-level tests.
fn undelivered_result(index: u32) -> medai_inference::results::StoredResult {
    medai_inference::results::StoredResult {
        result_id: uuid::Uuid::new_v4().to_string(),
        model_name: support::LIGHT.to_owned(),
        model_version: "1".to_owned(),
        model_sha256: format!("{:064x}", 1),
        image_sha256: format!("{index:064x}"),
        patient_key: String::new(),
        probabilities_json: r#"[["bright",0.75],["dark",0.25]]"#.to_owned(),
        top_label: "bright".to_owned(),
        confidence: 0.75,
        decision_threshold: 0.5,
        decision: "ABOVE_THRESHOLD".to_owned(),
        latency_ms: 1.0,
        created_at: medai_inference::results::now_micros(),
        status: "PRELIMINARY".to_owned(),
        idempotency_key: None,
        intended_use: "synthetic".to_owned(),
        content_sha256: String::new(),
        ledger_seq: 0,
        signer_subject: String::new(),
        signer_name: String::new(),
        signature_meaning: String::new(),
        signature_reason: String::new(),
        signed_at: 0,
        signature_ledger_seq: 0,
        content_hash_version: medai_inference::results::CONTENT_HASH_VERSION,
        normalized_entropy: 0.8,
        top2_margin: 0.5,
        temperature: 1.0,
        ood_score: 0.0,
        ood_threshold: 1.0,
        confidence_band_lower: None,
        confidence_band_upper: None,
        unusual_case: false,
        unusual_case_reasons_json: "[]".to_owned(),
        route: "ACTIVE".to_owned(),
        shadow_of_result_id: String::new(),
        shadow_agreement: String::new(),
    }
}

/// Issue 14: delivery notes made at the same time share one durable commit (PostgreSQL), each
/// answered only once its commit is done, and the first note of a result still stands.
#[tokio::test]
async fn delivery_notes_made_together_share_a_commit_and_each_is_kept() {
    const NOTES: u32 = 64;
    let store = medai_inference::results::ResultsStore::connect(
        &medai_testkit::fresh_postgres_database().await,
    )
    .await
    .expect("results store");
    let mut ids = Vec::new();
    for index in 0..NOTES {
        let (stored, replayed) = store
            .insert(undelivered_result(index))
            .await
            .expect("insert");
        assert!(!replayed);
        ids.push(stored.result_id);
    }
    let commits_before = store.delivery_note_commits();
    let notes = ids.iter().enumerate().map(|(index, id)| {
        let store = store.clone();
        let id = id.clone();
        tokio::spawn(async move { store.record_delivery(&id, 100 + index as i64).await })
    });
    let answers = futures::future::join_all(notes).await;
    let commits = store.delivery_note_commits() - commits_before;
    eprintln!("{NOTES} concurrent delivery notes in {commits} commits");
    for (index, answer) in answers.into_iter().enumerate() {
        let seq = answer.expect("task").expect("noted");
        assert_eq!(seq, 100 + index as i64);
        assert_eq!(
            store.get(&ids[index]).await.expect("stored").ledger_seq,
            seq,
            "an answered note is in the store"
        );
    }
    assert!(
        commits < u64::from(NOTES) / 2,
        "{NOTES} notes took {commits} commits: not grouped"
    );
    // A second note for a delivered result changes nothing; an unknown result is refused.
    assert_eq!(
        store.record_delivery(&ids[0], 999).await.expect("noted"),
        100
    );
    assert!(store.record_delivery("no-such-result", 5).await.is_err());
}

/// Issue 14: a delivery note's commit does not wait for its WAL to reach the disk (nor for a
/// synchronous standby): the note indexes a ledger record that is durable already, and a note
/// lost with the database is made again from the ledger when the result is read. Shown on a
/// private cluster whose durable commits then wait for a standby that never connects: a new
/// result's commit waits, a note's commit does not, and the note is read back.
#[tokio::test]
async fn a_delivery_notes_commit_does_not_wait_for_the_wal_flush() {
    let cluster = tokio::task::spawn_blocking(medai_testkit::PrivatePostgres::start)
        .await
        .expect("private cluster");
    let store = medai_inference::results::ResultsStore::connect(&cluster.url())
        .await
        .expect("results store");
    let (stored, _) = store
        .insert(undelivered_result(0))
        .await
        .expect("a result stored while commits are durable");
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.query("ALTER SYSTEM SET synchronous_standby_names = 'absent_standby'");
        cluster.query("SELECT pg_reload_conf()");
        cluster
    })
    .await
    .expect("settings");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    // Every durable commit now waits for the absent standby.
    let durable = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        store.insert(undelivered_result(1)),
    )
    .await;
    assert!(
        durable.is_err(),
        "a new result's commit did not wait for the standby: {durable:?}"
    );
    let noted = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        store.record_delivery(&stored.result_id, 42),
    )
    .await
    .expect("the note's commit does not wait for the standby")
    .expect("noted");
    assert_eq!(noted, 42);
    assert_eq!(
        store.get(&stored.result_id).await.expect("read").ledger_seq,
        42,
        "the note is read back"
    );
    drop(cluster);
}

/// Issue 14: RecordDeliveries notes many deliveries in one call, each as RecordDelivery would
/// (the first seq of a result stands; an unknown result and a seq of 0 are refused on their
/// own, by their stable codes), answering one outcome per delivery in order; a call over the
/// bound is refused whole, and only the gateway may call it.
#[tokio::test]
async fn record_deliveries_answers_each_note_in_order_and_refuses_an_oversize_call() {
    use medai_proto::inference::v1::RecordDeliveriesRequest;
    let assets = Assets::locate();
    let harness = Harness::start(&assets.model_repository, RuntimeSettings::default()).await;
    let mut gateway = harness.client_as("gateway");
    let mut ids = Vec::new();
    for side in [96, 128] {
        ids.push(
            gateway
                .predict(predict(grey_image(side)))
                .await
                .expect("prediction")
                .into_inner()
                .result_id,
        );
    }
    let note = |result_id: &str, ledger_seq: u64| RecordDeliveryRequest {
        result_id: result_id.to_owned(),
        ledger_seq,
    };
    let noted = gateway
        .record_deliveries(RecordDeliveriesRequest {
            deliveries: vec![
                note(&ids[0], 21),
                note("no-such-result", 22),
                note(&ids[1], 0),
                note(&ids[1], 23),
                note(&ids[0], 24),
            ],
        })
        .await
        .expect("deliveries")
        .into_inner()
        .noted;
    let outcomes: Vec<(u64, &str)> = noted
        .iter()
        .map(|outcome| (outcome.ledger_seq, outcome.error_code.as_str()))
        .collect();
    assert_eq!(
        outcomes,
        [
            (21, ""),
            (0, "RESULT_NOT_FOUND"),
            (0, "QUERY_INVALID"),
            (23, ""),
            (21, ""),
        ],
        "one outcome per delivery, in order; the first seq of a result stands"
    );
    for (id, seq) in [(&ids[0], 21), (&ids[1], 23)] {
        let stored = gateway
            .get_result(GetResultRequest {
                result_id: id.clone(),
                ..Default::default()
            })
            .await
            .expect("result")
            .into_inner()
            .result
            .expect("result");
        assert_eq!(stored.ledger_seq, seq);
    }
    // The single-note RPC still answers the seq that stands.
    let single = gateway
        .record_delivery(note(&ids[1], 99))
        .await
        .expect("delivery")
        .into_inner();
    assert_eq!(single.ledger_seq, 23);

    let status = gateway
        .record_deliveries(RecordDeliveriesRequest {
            deliveries: (0..1025).map(|seq| note(&ids[0], seq + 1)).collect(),
        })
        .await
        .expect_err("over the bound");
    assert_eq!(
        (status.code(), reason_of(&status).as_deref()),
        (Code::InvalidArgument, Some("QUERY_INVALID"))
    );
    let status = harness
        .client_as("validation")
        .record_deliveries(RecordDeliveriesRequest {
            deliveries: vec![note(&ids[0], 30)],
        })
        .await
        .expect_err("not the gateway");
    assert_eq!(status.code(), Code::PermissionDenied);
}
