//! The Structured Report read back by an independent toolkit: dcmtk's `dsrdump` parses it
//! without errors or warnings, and its content (references, algorithm, probabilities, finding,
//! decision, result id, ledger seq, disclaimer, status) is where a reader expects it.

use dicom_dictionary_std::tags;
use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use medai_bridge::amendment::{SignatureOutcome, build_amended_report};
use medai_bridge::outbox::NewInstance;
use medai_bridge::outcome::{InferenceOutcome, JudgedFrame, QualitySummary};
use medai_bridge::report::{
    DISCLAIMER, FrameStatement, SourceInstance, build_report, frame_statement,
};
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
        frame: None,
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

/// One of pydicom's files as the Storage SCP keeps it after a C-STORE in the file's own
/// transfer syntax.
fn stored(name: &str) -> NewInstance {
    let file = dicom_object::open_file(Assets::locate().dicom_dir.join(name)).expect("source");
    let transfer_syntax_uid = file
        .meta()
        .transfer_syntax()
        .trim_end_matches('\0')
        .to_owned();
    let transfer_syntax = TransferSyntaxRegistry
        .get(&transfer_syntax_uid)
        .expect("a known transfer syntax");
    let mut dataset = Vec::new();
    file.write_dataset_with_ts(&mut dataset, transfer_syntax)
        .expect("dataset");
    part10_instance(&transfer_syntax_uid, dataset, "STORESCU").expect("instance")
}

fn source_of(stored: &NewInstance) -> SourceInstance<'_> {
    SourceInstance {
        sop_class_uid: &stored.sop_class_uid,
        sop_instance_uid: &stored.sop_instance_uid,
        series_instance_uid: &stored.series_instance_uid,
        study_instance_uid: &stored.study_instance_uid,
        dicom: &stored.dicom,
    }
}

/// The gateway's answer carrying `frame`, converted at the bridge's edge as the forwarder
/// converts a StudyStream answer, and read back from JSON as the outbox keeps it.
fn answer_with(frame: Option<(u32, u32, &str)>) -> InferenceOutcome {
    use medai_proto::inference::v1::{LabelProbability, PredictResponse};
    let response = medai_proto::gateway::v1::InferResponse {
        result_id: "0b7d3a9e-result".to_owned(),
        ledger_seq: 4242,
        prediction: Some(PredictResponse {
            model_name: "synthetic-light".to_owned(),
            model_version: "1".to_owned(),
            probabilities: vec![
                LabelProbability {
                    label: "normal".to_owned(),
                    probability: 0.75,
                },
                LabelProbability {
                    label: "abnormal".to_owned(),
                    probability: 0.25,
                },
            ],
            top_label: "normal".to_owned(),
            top_probability: 0.75,
            decision_threshold: 0.5,
            decision: "ABOVE_THRESHOLD".to_owned(),
            intended_use: "research use only".to_owned(),
            ..Default::default()
        }),
        frame: frame.map(|(frame_number, number_of_frames, policy)| {
            medai_proto::common::v1::JudgedFrame {
                frame_number,
                number_of_frames,
                policy: policy.to_owned(),
            }
        }),
        ..Default::default()
    };
    let outcome = InferenceOutcome::try_from(response).expect("a complete answer");
    let kept = serde_json::to_string(&outcome).expect("json");
    serde_json::from_str(&kept).expect("the outbox's copy reads back")
}

/// The Referenced Frame Number of the report's IMAGE item, as written.
fn referenced_frame(content: &[(String, String, InMemDicomObject)]) -> Option<String> {
    let images: Vec<_> = content
        .iter()
        .filter(|(kind, _, _)| kind == "IMAGE")
        .collect();
    assert_eq!(images.len(), 1, "one IMAGE item references the source");
    let reference = &images[0]
        .2
        .element(tags::REFERENCED_SOP_SEQUENCE)
        .expect("ref")
        .items()
        .expect("items")[0];
    reference
        .get(tags::REFERENCED_FRAME_NUMBER)
        .map(|element| element.to_str().expect("text").trim().to_owned())
}

/// Issue 15: the report of a multi-frame source (pydicom's 30-frame ultrasound loop) references
/// the frame the gateway's answer says was judged, with Referenced Frame Number in the IMAGE
/// item, and says which frame of how many under which policy; the amended report keeps both.
/// An answer naming no frame (a replay, or an outbox entry from before) references none and
/// says so; a single-frame source stays as it was, whatever the answer carries.
#[test]
fn a_multi_frame_source_is_referenced_at_its_judged_frame_named_with_its_count_and_policy() {
    let ultrasound_loop = stored("examples_ybr_color.dcm");
    let source = source_of(&ultrasound_loop);
    let report_of = |outcome: &InferenceOutcome| {
        let report = build_report(
            "1.2.826.0.1.3680043.10.1234",
            &source,
            outcome,
            time::OffsetDateTime::now_utc(),
        )
        .expect("report");
        let mut content = Vec::new();
        items(&report.dataset, &mut content);
        content
    };
    let cases = [
        (
            Some((16, 30, "MIDDLE_FRAME")),
            Some("16"),
            "frame 16 of 30, chosen by the model's frame policy middle_frame",
        ),
        (
            Some((1, 30, "FIRST_FRAME")),
            Some("1"),
            "frame 1 of 30, chosen by the model's frame policy first_frame",
        ),
        (
            None,
            None,
            "not stated: the gateway's answer names no frame of the 30 this object holds; the prediction's ledger record names it",
        ),
        // A frame the source does not hold is never referenced.
        (
            Some((31, 30, "MIDDLE_FRAME")),
            None,
            "not stated: the gateway's answer names no frame of the 30 this object holds; the prediction's ledger record names it",
        ),
    ];
    for (frame, referenced, statement) in cases {
        let content = report_of(&answer_with(frame));
        assert_eq!(
            referenced_frame(&content).as_deref(),
            referenced,
            "{frame:?}"
        );
        assert_eq!(text_of(&content, "JUDGED_FRAME"), statement, "{frame:?}");
    }

    let amended = build_amended_report(
        "1.2.826.0.1.3680043.10.1234",
        &source,
        &answer_with(Some((16, 30, "MIDDLE_FRAME"))),
        &SignatureOutcome {
            signer_name: "Dr Reviewer".to_owned(),
            meaning: "APPROVED".to_owned(),
            reason: "read".to_owned(),
            signed_at: "2026-11-30T01:00:00Z".to_owned(),
            ledger_seq: 4300,
        },
        "1.2.826.0.1.3680043.10.1234.9",
        time::OffsetDateTime::now_utc(),
    )
    .expect("amended report");
    let mut content = Vec::new();
    items(&amended.dataset, &mut content);
    assert_eq!(referenced_frame(&content).as_deref(), Some("16"));
    assert_eq!(
        text_of(&content, "JUDGED_FRAME"),
        "frame 16 of 30, chosen by the model's frame policy middle_frame"
    );

    // A single frame: no frame number and no statement, as before.
    let mr = stored("MR_small.dcm");
    let single = build_report(
        "1.2.826.0.1.3680043.10.1234",
        &source_of(&mr),
        &answer_with(Some((1, 1, "REFUSE"))),
        time::OffsetDateTime::now_utc(),
    )
    .expect("report");
    let mut content = Vec::new();
    items(&single.dataset, &mut content);
    assert_eq!(referenced_frame(&content), None);
    assert!(
        !content
            .iter()
            .any(|(_, concept, _)| concept == "JUDGED_FRAME"),
        "a single-frame source's report states no frame"
    );

    // An outbox entry written before the bridge kept the frame reads as naming none.
    let mut old = serde_json::to_value(answer_with(Some((16, 30, "MIDDLE_FRAME")))).expect("json");
    old.as_object_mut().expect("object").remove("frame");
    let read: InferenceOutcome = serde_json::from_value(old).expect("old outbox entry");
    assert_eq!(read.frame, None);
}

fn judged(frame_number: u32, number_of_frames: u32, policy: &str) -> JudgedFrame {
    JudgedFrame {
        frame_number,
        number_of_frames,
        policy: policy.to_owned(),
    }
}

/// Issue 15: a frame is stated only when the source holds it: the answer's frame count must be
/// the source's Number of Frames and its number one of those frames; a single frame states
/// nothing whatever the answer says; a policy is written as the configuration names it.
#[test]
fn a_judged_frame_is_stated_only_when_the_source_holds_it() {
    let middle = judged(16, 30, "MIDDLE_FRAME");
    assert_eq!(
        frame_statement(Some(30), Some(&middle)),
        FrameStatement::Judged {
            frame_number: 16,
            number_of_frames: 30,
            policy: "middle_frame".to_owned()
        }
    );
    assert_eq!(
        frame_statement(Some(30), Some(&middle))
            .text()
            .expect("stated"),
        "frame 16 of 30, chosen by the model's frame policy middle_frame"
    );
    // Single frames stay as they were: no frame, no statement, whatever the answer says.
    for answer in [None, Some(judged(1, 1, "REFUSE"))] {
        assert_eq!(
            frame_statement(None, answer.as_ref()),
            FrameStatement::SingleFrame
        );
        assert_eq!(
            frame_statement(Some(1), answer.as_ref()),
            FrameStatement::SingleFrame
        );
    }
    assert_eq!(FrameStatement::SingleFrame.text(), None);
    // A multi-frame source whose answer names no frame of it: nothing is guessed.
    let not_stated = FrameStatement::NotStated {
        number_of_frames: 30,
    };
    for answer in [
        None,
        Some(judged(31, 30, "MIDDLE_FRAME")),
        Some(judged(0, 30, "FIRST_FRAME")),
        Some(judged(2, 2, "MIDDLE_FRAME")),
    ] {
        let statement = frame_statement(Some(30), answer.as_ref());
        assert_eq!(statement, not_stated, "{answer:?}");
    }
    assert!(
        not_stated
            .text()
            .expect("stated")
            .starts_with("not stated: the gateway's answer names no frame of the 30")
    );
    // The policy is written as the configuration names it, and nothing else.
    assert_eq!(
        frame_statement(Some(2), Some(&judged(1, 2, "FIRST_FRAME\n<x>"))),
        FrameStatement::Judged {
            frame_number: 1,
            number_of_frames: 2,
            policy: "first_framex".to_owned()
        }
    );
}
