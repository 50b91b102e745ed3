//! A real DICOM image filled with identifying values travels the whole mesh, is accepted, is
//! refused when damaged, and none of those values appears in any answer, log line, metric,
//! trace span, error message or ledger record. The patient is kept only as a keyed hash.

use dicom_core::VR;
use dicom_dictionary_std::tags;
use medai_e2e::{MeshUnderTest, Storage, authorised, http_get, traced_environment};
use medai_proto::common::v1::ImageFormat;
use medai_proto::gateway::v1 as gw;
use medai_testkit::Assets;
use medai_testkit::otlp::OtlpCollector;
use sea_orm::{ConnectionTrait, Database, DatabaseBackend, Statement};

/// Values no system text would contain by chance.
const IDENTIFYING: [(dicom_core::Tag, VR, &str); 10] = [
    (tags::PATIENT_NAME, VR::PN, "Quixotica^Zebulonia"),
    (tags::PATIENT_ID, VR::LO, "PID-97531-QZ"),
    (tags::ISSUER_OF_PATIENT_ID, VR::LO, "QZ-REGISTRY"),
    (tags::PATIENT_BIRTH_DATE, VR::DA, "19020304"),
    (tags::PATIENT_ADDRESS, VR::LO, "77 Xylophonic Lane"),
    (tags::INSTITUTION_NAME, VR::LO, "Zanzibarian General"),
    (
        tags::REFERRING_PHYSICIAN_NAME,
        VR::PN,
        "Vortigern^Quillfeather",
    ),
    (tags::ACCESSION_NUMBER, VR::SH, "ACC-24680-QZ"),
    (tags::STUDY_ID, VR::SH, "STQZ-8642"),
    (tags::OTHER_PATIENT_I_DS_SEQUENCE, VR::LO, "OTHER-QZ-1357"),
];

fn identifying_dicom() -> Vec<u8> {
    let path = Assets::locate().dicom_dir.join("MR_small.dcm");
    let mut object = dicom_object::open_file(path).expect("a real DICOM file");
    for (tag, vr, value) in IDENTIFYING {
        if tag == tags::OTHER_PATIENT_I_DS_SEQUENCE {
            // A sequence cannot hold a string; put the marker in Other Patient Names instead.
            object.put_str(tags::OTHER_PATIENT_NAMES, VR::PN, value);
            continue;
        }
        object.put_str(tag, vr, value);
    }
    let mut bytes = Vec::new();
    object.write_all(&mut bytes).expect("write DICOM");
    bytes
}

fn infer(image: Vec<u8>) -> gw::InferRequest {
    gw::InferRequest {
        image: image.into(),
        format: ImageFormat::Dicom.into(),
        model_name: String::new(),
        model_version: String::new(),
        idempotency_key: String::new(),
    }
}

#[tokio::test]
async fn no_identifying_value_leaves_validation() {
    let collector = OtlpCollector::start().await;
    let mesh =
        MeshUnderTest::start_with(Storage::Postgres, traced_environment(&collector.endpoint)).await;
    let token = mesh.admin_token().await;
    let mut gateway = mesh.gateway().await;
    let image = identifying_dicom();
    for (_, _, value) in IDENTIFYING {
        assert!(
            image
                .windows(value.len())
                .any(|window| window == value.as_bytes()),
            "{value} is in the file"
        );
    }

    let mut seen = String::new();
    let answer = gateway
        .infer(authorised(infer(image.clone()), &token))
        .await
        .expect("accepted")
        .into_inner();
    seen.push_str(&format!("{answer:?}\n"));
    let again = gateway
        .infer(authorised(infer(image.clone()), &token))
        .await
        .expect("accepted")
        .into_inner();
    let truncated = gateway
        .infer(authorised(
            infer(image[..image.len() * 2 / 3].to_vec()),
            &token,
        ))
        .await
        .expect_err("refused");
    seen.push_str(&format!("{truncated:?} {}\n", truncated.message()));

    let database = Database::connect(mesh.settings.audit_database_url.as_str())
        .await
        .expect("ledger");
    let rows = database
        .query_all_raw(Statement::from_string(
            DatabaseBackend::Postgres,
            "SELECT actor, action, resource, outcome, context FROM ledger_entries ORDER BY seq",
        ))
        .await
        .expect("ledger rows");
    let mut patient_keys = Vec::new();
    for row in &rows {
        for column in ["actor", "action", "resource", "outcome", "context"] {
            seen.push_str(&row.try_get::<String>("", column).expect("text"));
            seen.push('\n');
        }
        let context: serde_json::Value =
            serde_json::from_str(&row.try_get::<String>("", "context").expect("context"))
                .expect("json");
        if let Some(key) = context["patient_key"].as_str() {
            patient_keys.push(key.to_owned());
        }
    }
    seen.push_str(&mesh.all_logs());
    // Every span the predictions and the refusal produced, from validation too.
    let spans = collector
        .wait_until(std::time::Duration::from_secs(20), |spans| {
            spans.iter().any(|span| span.service == "medai-validation")
                && spans.iter().any(|span| span.service == "medai-inference")
        })
        .await;
    assert!(
        spans.iter().any(|span| span.service == "medai-validation"),
        "validation exported its spans"
    );
    for span in &spans {
        seen.push_str(&format!(
            "{} {} {}\n",
            span.name,
            span.attributes.join(" "),
            span.events.join(" ")
        ));
    }
    for service in medai_cli::launcher::SERVICES {
        if let Some(admin) = mesh.mesh.admin_address(service) {
            seen.push_str(&http_get(admin, "/metrics").await);
        }
    }

    for (_, _, value) in IDENTIFYING {
        assert!(!seen.contains(value), "{value} leaked");
    }
    // The patient survives only as a keyed hash: the same for the same patient, never the id.
    assert_eq!(
        patient_keys.len(),
        2,
        "both accepted predictions carry the pseudonymous key"
    );
    assert_eq!(patient_keys[0], patient_keys[1]);
    assert_eq!(patient_keys[0].len(), 32);
    assert_ne!(answer.result_id, again.result_id);

    // Declared burned-in text in the pixels is refused, and the refusal names no value either.
    let mut object = dicom_object::from_reader(&image[128..]).expect("parse");
    object.put_str(tags::BURNED_IN_ANNOTATION, VR::CS, "YES");
    let mut burned = Vec::new();
    object.write_all(&mut burned).expect("write");
    let status = gateway
        .infer(authorised(infer(burned), &token))
        .await
        .expect_err("refused");
    assert_eq!(
        medai_runtime::errors::reason_of(&status).as_deref(),
        Some("DICOM_BURNED_IN_ANNOTATION")
    );
    for (_, _, value) in IDENTIFYING {
        assert!(!format!("{status:?}").contains(value));
    }
    mesh.stop().await;
}
