//! Clinical decision support through the whole mesh (issue 18): real DICOM files from pydicom's
//! test set through the gateway, validation, the real brain-MRI model and the ledger. A CT slice
//! is outside the model's intended use (MR brain) and is flagged with its reason in the answer,
//! the stored result and the ledger; an explanation of a real MR slice is recorded in the ledger
//! before it is answered and then listed on the result; refusals carry stable codes.

use medai_e2e::{MeshUnderTest, Storage, authorised};
use medai_proto::common::v1::ImageFormat;
use medai_proto::gateway::v1 as gw;
use medai_runtime::errors::reason_of;
use medai_testkit::Assets;
use sea_orm::{ConnectionTrait, Database, DatabaseBackend, Statement};
use tonic::Code;

const BRAIN: &str = "brain-mri-tumor";

/// (seq, action, resource, context) of every ledger entry.
async fn ledger(mesh: &MeshUnderTest) -> Vec<(i64, String, String, serde_json::Value)> {
    let database = Database::connect(mesh.settings.audit_database_url.as_str())
        .await
        .expect("connect to the ledger");
    database
        .query_all_raw(Statement::from_string(
            DatabaseBackend::Postgres,
            "SELECT seq, action, resource, context FROM ledger_entries ORDER BY seq",
        ))
        .await
        .expect("query the ledger")
        .into_iter()
        .map(|row| {
            let context: String = row.try_get("", "context").expect("context");
            (
                row.try_get("", "seq").expect("seq"),
                row.try_get("", "action").expect("action"),
                row.try_get("", "resource").expect("resource"),
                serde_json::from_str(&context).expect("json"),
            )
        })
        .collect()
}

fn infer_dicom(image: Vec<u8>) -> gw::InferRequest {
    gw::InferRequest {
        image: image.into(),
        format: ImageFormat::Dicom.into(),
        model_name: BRAIN.to_owned(),
        model_version: String::new(),
        idempotency_key: String::new(),
    }
}

#[tokio::test]
async fn a_ct_slice_is_flagged_outside_the_intended_use_and_an_explanation_is_recorded_before_it_is_answered()
 {
    let mesh = MeshUnderTest::start(Storage::Postgres).await;
    let admin = mesh.admin_token().await;
    let clinician = mesh.user_token(&admin, "dr.explain", "clinician").await;
    let auditor = mesh.user_token(&admin, "auditor.cds", "auditor").await;
    let mut gateway = mesh.gateway().await;
    let assets = Assets::locate();

    // A CT slice to the MR brain model: answered, and flagged with its reason.
    let ct = gateway
        .infer(authorised(
            infer_dicom(assets.dicom("CT_small.dcm")),
            &clinician,
        ))
        .await
        .expect("prediction")
        .into_inner();
    let prediction = ct.prediction.clone().expect("prediction");
    let flag = prediction.unusual_case.clone().expect("flag");
    assert!(flag.flagged);
    assert!(
        flag.reasons
            .contains(&"MODALITY_OUTSIDE_INTENDED_USE".to_owned()),
        "{:?}",
        flag.reasons
    );
    let figures = prediction.uncertainty.expect("uncertainty");
    // The figures follow from the probabilities the client got.
    let probabilities: Vec<f64> = prediction
        .probabilities
        .iter()
        .map(|entry| f64::from(entry.probability))
        .collect();
    let entropy = -probabilities
        .iter()
        .filter(|p| **p > 0.0)
        .map(|p| p * p.ln())
        .sum::<f64>()
        / (probabilities.len() as f64).ln();
    assert!((entropy - f64::from(figures.normalized_entropy)).abs() < 1e-5);
    let mut sorted = probabilities.clone();
    sorted.sort_by(|a, b| b.total_cmp(a));
    assert!(((sorted[0] - sorted[1]) - f64::from(figures.top2_margin)).abs() < 1e-5);

    // The delivery's ledger entry carries the decision audit trail.
    let entries = ledger(&mesh).await;
    let (_, _, _, delivery) = entries
        .iter()
        .find(|(seq, action, _, _)| action == "INFERENCE" && *seq == ct.ledger_seq as i64)
        .expect("delivery entry");
    assert_eq!(delivery["unusual_case"], serde_json::json!(true));
    assert!(
        delivery["unusual_case_reasons"]
            .as_array()
            .expect("reasons")
            .contains(&serde_json::json!("MODALITY_OUTSIDE_INTENDED_USE"))
    );
    assert_eq!(delivery["decision"], serde_json::json!(prediction.decision));
    assert!(delivery["normalized_entropy"].is_number());
    assert!(delivery["top2_margin"].is_number());
    // The routing decision (issue 18, rollout): no canary, so the active version answered.
    assert_eq!(delivery["route"], serde_json::json!("ACTIVE"));

    // A real MR slice: not flagged for its modality. Then its explanation.
    let mr_bytes = assets.dicom("MR_small.dcm");
    let mr = gateway
        .infer(authorised(infer_dicom(mr_bytes.clone()), &clinician))
        .await
        .expect("prediction")
        .into_inner();
    let mr_flag = mr
        .prediction
        .as_ref()
        .and_then(|prediction| prediction.unusual_case.clone())
        .expect("flag");
    assert!(
        !mr_flag
            .reasons
            .contains(&"MODALITY_OUTSIDE_INTENDED_USE".to_owned())
    );
    let explain = |result_id: &str, image: Vec<u8>, grid: u32, token: &str| {
        authorised(
            gw::ExplainResultRequest {
                result_id: result_id.to_owned(),
                image,
                format: ImageFormat::Dicom.into(),
                grid_rows: grid,
                grid_columns: grid,
            },
            token,
        )
    };
    let explained = gateway
        .explain_result(explain(&mr.result_id, mr_bytes.clone(), 2, &clinician))
        .await
        .expect("explanation")
        .into_inner();
    let explanation = explained.explanation.expect("explanation");
    assert_eq!((explanation.grid_rows, explanation.grid_columns), (2, 2));
    assert_eq!(explanation.importance.len(), 4);
    let png = image::load_from_memory(&explanation.heatmap_png).expect("png");
    assert_eq!((png.width(), png.height()), (240, 240));

    // Recorded before it was answered: the answer names its ledger entry, which binds the
    // result's content hash and the heat map's hash; the result then lists it.
    let result = gateway
        .get_result(authorised(
            gw::GetResultRequest {
                result_id: mr.result_id.clone(),
            },
            &clinician,
        ))
        .await
        .expect("read")
        .into_inner()
        .result
        .expect("result");
    let entries = ledger(&mesh).await;
    let (_, _, resource, context) = entries
        .iter()
        .find(|(seq, action, _, _)| {
            action == "RESULT_EXPLAINED" && *seq == explained.ledger_seq as i64
        })
        .expect("explanation entry");
    assert_eq!(resource, &format!("result/{}", mr.result_id));
    assert_eq!(
        context["content_sha256"],
        serde_json::json!(result.content_sha256)
    );
    assert_eq!(
        context["heatmap_sha256"],
        serde_json::json!(explanation.heatmap_sha256)
    );
    assert_eq!(context["grid_rows"], serde_json::json!(2));
    assert_eq!(result.explanations.len(), 1);
    assert_eq!(result.explanations[0].ledger_seq, explained.ledger_seq);
    assert_eq!(result.content_hash_version, 3);
    assert_eq!(
        medai_inference::results::content_sha256_of_message(&result),
        result.content_sha256
    );

    // Refusals with stable codes, none recorded as an explanation.
    let explained_before = entries
        .iter()
        .filter(|(_, action, _, _)| action == "RESULT_EXPLAINED")
        .count();
    let status = gateway
        .explain_result(explain(&mr.result_id, mr_bytes.clone(), 32, &clinician))
        .await
        .expect_err("grid too large");
    assert_eq!(
        (status.code(), reason_of(&status).as_deref()),
        (Code::InvalidArgument, Some("EXPLANATION_GRID_INVALID"))
    );
    let status = gateway
        .explain_result(explain(
            &uuid::Uuid::new_v4().to_string(),
            mr_bytes.clone(),
            2,
            &clinician,
        ))
        .await
        .expect_err("unknown result");
    assert_eq!(
        (status.code(), reason_of(&status).as_deref()),
        (Code::NotFound, Some("RESULT_NOT_FOUND"))
    );
    let status = gateway
        .explain_result(explain(
            &mr.result_id,
            assets.dicom("CT_small.dcm"),
            2,
            &clinician,
        ))
        .await
        .expect_err("another image");
    assert_eq!(
        (status.code(), reason_of(&status).as_deref()),
        (Code::InvalidArgument, Some("IMAGE_NOT_OF_RESULT"))
    );
    let status = gateway
        .explain_result(explain(&mr.result_id, mr_bytes, 2, &auditor))
        .await
        .expect_err("auditors see no results");
    assert_eq!(
        (status.code(), reason_of(&status).as_deref()),
        (Code::PermissionDenied, Some("ROLE_NOT_ALLOWED"))
    );
    let explained_after = ledger(&mesh)
        .await
        .iter()
        .filter(|(_, action, _, _)| action == "RESULT_EXPLAINED")
        .count();
    assert_eq!(explained_after, explained_before);
    mesh.stop().await;
}
