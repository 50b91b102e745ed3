//! The Structured Report read back by an independent toolkit: dcmtk's `dsrdump` parses it
//! without errors or warnings, and its content (references, algorithm, probabilities, finding,
//! decision, result id, ledger seq, disclaimer, status) is where a reader expects it.

use dicom_dictionary_std::tags;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use medai_bridge::outcome::{InferenceOutcome, QualitySummary};
use medai_bridge::report::{DISCLAIMER, SourceInstance, build_report};
use medai_bridge::scp::part10_instance;
use medai_testkit::Assets;

fn outcome() -> InferenceOutcome {
    InferenceOutcome {
        result_id: "0b7d3a9e-result".to_owned(),
        ledger_seq: 4242,
        ledger_hash: "ab".repeat(32),
        image_sha256: "cd".repeat(32),
        replayed: false,
        model_name: "brain-mri-tumor".to_owned(),
        model_version: "1".to_owned(),
        model_sha256: "ef".repeat(32),
        probabilities: vec![
            ("glioma".to_owned(), 0.125),
            ("meningioma".to_owned(), 0.0625),
            ("notumor".to_owned(), 0.75),
            ("pituitary".to_owned(), 0.0625),
        ],
        top_label: "notumor".to_owned(),
        top_probability: 0.75,
        decision_threshold: 0.5,
        decision: "ABOVE_THRESHOLD".to_owned(),
        intended_use: "research use only, not for clinical diagnosis".to_owned(),
        quality: Some(QualitySummary {
            profile: "default".to_owned(),
            passed: true,
            checks: vec![("QUALITY_CONTRAST_LOW".to_owned(), 41.5, true)],
        }),
        unusual_case: false,
        unusual_case_reasons: Vec::new(),
    }
}

/// Every content item, depth first, as (value type, concept code value, item).
fn items(object: &InMemDicomObject, into: &mut Vec<(String, String, InMemDicomObject)>) {
    let Some(sequence) = object.get(tags::CONTENT_SEQUENCE) else {
        return;
    };
    for item in sequence.items().expect("items") {
        let value_type = item
            .element(tags::VALUE_TYPE)
            .expect("type")
            .to_str()
            .expect("text");
        let concept = item
            .element(tags::CONCEPT_NAME_CODE_SEQUENCE)
            .expect("concept")
            .items()
            .expect("code")[0]
            .element(tags::CODE_VALUE)
            .expect("code value")
            .to_str()
            .expect("text")
            .trim()
            .to_owned();
        into.push((value_type.trim().to_owned(), concept, item.clone()));
        items(item, into);
    }
}

fn text_of(items: &[(String, String, InMemDicomObject)], code: &str) -> String {
    let (_, _, item) = items
        .iter()
        .find(|(_, concept, _)| concept == code)
        .unwrap_or_else(|| panic!("no content item {code}"));
    item.element(tags::TEXT_VALUE)
        .expect("text")
        .to_str()
        .expect("text")
        .trim()
        .to_owned()
}

fn number_of(items: &[(String, String, InMemDicomObject)], code: &str) -> f64 {
    let (value_type, _, item) = items
        .iter()
        .find(|(_, concept, _)| concept == code)
        .unwrap_or_else(|| panic!("no content item {code}"));
    assert_eq!(value_type, "NUM");
    item.element(tags::MEASURED_VALUE_SEQUENCE)
        .expect("measured")
        .items()
        .expect("items")[0]
        .element(tags::NUMERIC_VALUE)
        .expect("value")
        .to_str()
        .expect("text")
        .trim()
        .parse()
        .expect("decimal")
}

#[tokio::test]
async fn the_report_for_an_mr_image_parses_cleanly_in_dsrdump_and_carries_the_result() {
    let source_file =
        dicom_object::open_file(Assets::locate().dicom_dir.join("MR_small.dcm")).expect("source");
    let mut dataset = Vec::new();
    source_file
        .write_dataset_with_ts(
            &mut dataset,
            &dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN.erased(),
        )
        .expect("dataset");
    let stored = part10_instance("1.2.840.10008.1.2.1", dataset, "STORESCU").expect("instance");
    let source = SourceInstance {
        sop_class_uid: &stored.sop_class_uid,
        sop_instance_uid: &stored.sop_instance_uid,
        series_instance_uid: &stored.series_instance_uid,
        study_instance_uid: &stored.study_instance_uid,
        dicom: &stored.dicom,
    };
    let outcome = outcome();
    let report = build_report(
        "1.2.826.0.1.3680043.10.1234",
        &source,
        &outcome,
        time::OffsetDateTime::now_utc(),
    )
    .expect("report");
    let again = build_report(
        "1.2.826.0.1.3680043.10.1234",
        &source,
        &outcome,
        time::OffsetDateTime::now_utc(),
    )
    .expect("report");
    assert_eq!(
        report.sop_instance_uid, again.sop_instance_uid,
        "a resent report keeps its UID"
    );

    // Patient and study copied from the source.
    for tag in [
        tags::PATIENT_NAME,
        tags::PATIENT_ID,
        tags::STUDY_INSTANCE_UID,
        tags::STUDY_DATE,
    ] {
        assert_eq!(
            report
                .dataset
                .element(tag)
                .expect("copied")
                .to_str()
                .expect("text"),
            source_file
                .element(tag)
                .expect("source")
                .to_str()
                .expect("text"),
            "{tag}"
        );
    }
    let text = |tag| {
        report
            .dataset
            .element(tag)
            .expect("present")
            .to_str()
            .expect("text")
            .trim()
            .to_owned()
    };
    assert_eq!(text(tags::MODALITY), "SR");
    assert_eq!(text(tags::MANUFACTURER), "MedAI Flow");
    assert_eq!(text(tags::PRELIMINARY_FLAG), "PRELIMINARY");
    assert_eq!(text(tags::VERIFICATION_FLAG), "UNVERIFIED");
    assert_ne!(text(tags::SERIES_INSTANCE_UID), stored.series_instance_uid);

    let mut content = Vec::new();
    items(&report.dataset, &mut content);
    assert_eq!(text_of(&content, "112039"), outcome.result_id);
    assert_eq!(text_of(&content, "111001"), "brain-mri-tumor");
    assert_eq!(text_of(&content, "111003"), "1");
    assert!(text_of(&content, "111002").contains(&outcome.model_sha256));
    assert_eq!(text_of(&content, "121014"), "MedAI Flow");
    assert_eq!(number_of(&content, "LEDGER_SEQ"), 4242.0);
    assert_eq!(number_of(&content, "P-notumor"), 0.75);
    assert_eq!(number_of(&content, "P-glioma"), 0.125);
    assert_eq!(number_of(&content, "THRESHOLD"), 0.5);
    assert!(text_of(&content, "DECISION").starts_with("ABOVE_THRESHOLD: notumor 0.750000"));
    assert!(text_of(&content, "DISCLAIMER").starts_with(DISCLAIMER));
    assert!(text_of(&content, "QUALITY").contains("QUALITY_CONTRAST_LOW"));
    assert_eq!(text_of(&content, "UNUSUAL_CASE"), "not flagged");
    let (_, _, image) = content
        .iter()
        .find(|(kind, _, _)| kind == "IMAGE")
        .expect("image reference");
    let reference = &image
        .element(tags::REFERENCED_SOP_SEQUENCE)
        .expect("ref")
        .items()
        .expect("items")[0];
    assert_eq!(
        reference
            .element(tags::REFERENCED_SOP_INSTANCE_UID)
            .expect("uid")
            .to_str()
            .expect("text"),
        stored.sop_instance_uid
    );

    // dcmtk reads it as an SR document without complaint.
    let directory = tempfile::tempdir().expect("dir");
    let path = directory.path().join("report.dcm");
    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid("1.2.840.10008.5.1.4.1.1.88.33")
        .media_storage_sop_instance_uid(report.sop_instance_uid.as_str())
        .transfer_syntax("1.2.840.10008.1.2.1")
        .build()
        .expect("meta");
    report
        .dataset
        .clone()
        .with_exact_meta(meta)
        .write_to_file(&path)
        .expect("write");
    let dump = tokio::process::Command::new("dsrdump")
        .arg(&path)
        .output()
        .await
        .expect("dsrdump runs (scripts/pacs-tools.sh installs dcmtk)");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&dump.stdout),
        String::from_utf8_lossy(&dump.stderr)
    );
    assert!(dump.status.success(), "{printed}");
    assert!(
        !printed
            .lines()
            .any(|line| line.starts_with("E:") || line.starts_with("W:")),
        "dsrdump reported problems:\n{printed}"
    );
    assert!(printed.contains("Comprehensive SR Document"), "{printed}");
    assert!(printed.contains("Imaging Measurement Report"), "{printed}");
    assert!(printed.contains("\"0.750000\""), "{printed}");
}

/// Issue 18: an input outside the model's domain is flagged in the SR, with its reasons, as an
/// observation next to the finding.
#[test]
fn a_flagged_result_names_its_unusual_case_reasons_in_the_report() {
    let source_file =
        dicom_object::open_file(Assets::locate().dicom_dir.join("CT_small.dcm")).expect("source");
    let mut dataset = Vec::new();
    source_file
        .write_dataset_with_ts(
            &mut dataset,
            &dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN.erased(),
        )
        .expect("dataset");
    let stored = part10_instance("1.2.840.10008.1.2.1", dataset, "STORESCU").expect("instance");
    let source = SourceInstance {
        sop_class_uid: &stored.sop_class_uid,
        sop_instance_uid: &stored.sop_instance_uid,
        series_instance_uid: &stored.series_instance_uid,
        study_instance_uid: &stored.study_instance_uid,
        dicom: &stored.dicom,
    };
    let flagged = InferenceOutcome {
        unusual_case: true,
        unusual_case_reasons: vec![
            "MODALITY_OUTSIDE_INTENDED_USE".to_owned(),
            "OUT_OF_DISTRIBUTION".to_owned(),
        ],
        ..outcome()
    };
    let report = build_report(
        "1.2.826.0.1.3680043.10.1234",
        &source,
        &flagged,
        time::OffsetDateTime::now_utc(),
    )
    .expect("report");
    let mut content = Vec::new();
    items(&report.dataset, &mut content);
    assert_eq!(
        text_of(&content, "UNUSUAL_CASE"),
        "FLAGGED: input outside the model's domain (MODALITY_OUTSIDE_INTENDED_USE, OUT_OF_DISTRIBUTION)"
    );
    // An outbox entry written before the flag existed reads as not flagged.
    let mut old = serde_json::to_value(outcome()).expect("json");
    let object = old.as_object_mut().expect("object");
    object.remove("unusual_case");
    object.remove("unusual_case_reasons");
    let read: InferenceOutcome = serde_json::from_value(old).expect("old outbox entry");
    assert!(!read.unusual_case && read.unusual_case_reasons.is_empty());
}

/// Issue 15: highdicom, the toolkit AI result producers use, reads the report as an SR document
/// and finds the algorithm identification, the references to the source instance and the top
/// finding as a coded concept: SNOMED CT where a standard concept names the label, the private
/// scheme where none is asserted (glioma).
#[test]
fn highdicom_reads_the_report_with_its_algorithm_its_source_and_a_snomed_coded_finding() {
    let source_file =
        dicom_object::open_file(Assets::locate().dicom_dir.join("MR_small.dcm")).expect("source");
    let mut dataset = Vec::new();
    source_file
        .write_dataset_with_ts(
            &mut dataset,
            &dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN.erased(),
        )
        .expect("dataset");
    let stored = part10_instance("1.2.840.10008.1.2.1", dataset, "STORESCU").expect("instance");
    let source = SourceInstance {
        sop_class_uid: &stored.sop_class_uid,
        sop_instance_uid: &stored.sop_instance_uid,
        series_instance_uid: &stored.series_instance_uid,
        study_instance_uid: &stored.study_instance_uid,
        dicom: &stored.dicom,
    };
    let directory = tempfile::tempdir().expect("dir");
    let cases = [
        ("meningioma", ("393566004", "SCT", "Meningioma")),
        ("pituitary", ("254956000", "SCT", "Pituitary adenoma")),
        ("glioma", ("glioma", "99MEDAI", "glioma")),
    ];
    let mut paths = Vec::new();
    for (top_label, _) in &cases {
        let result = InferenceOutcome {
            top_label: (*top_label).to_owned(),
            ..outcome()
        };
        let report = build_report(
            "1.2.826.0.1.3680043.10.1234",
            &source,
            &result,
            time::OffsetDateTime::now_utc(),
        )
        .expect("report");
        let path = directory.path().join(format!("{top_label}.dcm"));
        let meta = FileMetaTableBuilder::new()
            .media_storage_sop_class_uid("1.2.840.10008.5.1.4.1.1.88.33")
            .media_storage_sop_instance_uid(report.sop_instance_uid.as_str())
            .transfer_syntax("1.2.840.10008.1.2.1")
            .build()
            .expect("meta");
        report
            .dataset
            .with_exact_meta(meta)
            .write_to_file(&path)
            .expect("write");
        paths.push(path);
    }

    let read_back = medai_testkit::highdicom_readback(&paths);
    assert_eq!(read_back.len(), cases.len());
    for (read, (top_label, (value, scheme, meaning))) in read_back.iter().zip(cases) {
        assert_eq!(read["document_class"], "ComprehensiveSR", "{read}");
        assert_eq!(read["template"], "1500", "{read}");
        assert_eq!(
            read["algorithm_names"],
            serde_json::json!(["brain-mri-tumor"])
        );
        assert_eq!(read["algorithm_versions"], serde_json::json!(["1"]));
        let evidence = &read["evidence"][0];
        assert_eq!(
            evidence["sop_instance_uid"],
            stored.sop_instance_uid.as_str()
        );
        assert_eq!(evidence["sop_class_uid"], stored.sop_class_uid.as_str());
        assert_eq!(
            evidence["study_instance_uid"],
            stored.study_instance_uid.as_str()
        );
        assert_eq!(
            read["image_references"],
            serde_json::json!([{
                "sop_class_uid": stored.sop_class_uid,
                "sop_instance_uid": stored.sop_instance_uid,
            }])
        );
        assert_eq!(
            read["findings"],
            serde_json::json!([{ "value": value, "scheme": scheme, "meaning": meaning }]),
            "{top_label}"
        );
    }
}
